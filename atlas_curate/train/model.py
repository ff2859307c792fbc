"""The 3D residual U-Net of Tomita et al. 2020 and its loss, reimplemented from the paper's description.

Network (``widths = (w0, w1, ..., wL)``, default 16; 32/64/128/256):

* stem: one 3×3×3 convolution from the single T1 channel to ``w0`` channels, GroupNorm, ReLU;
* encoder level ``i`` (``i = 1..L``): ``encoder_blocks[i-1]`` residual blocks of width ``wi``; levels
  ``2..L`` start with a stride-2 residual block (the downsampling: three of them for four levels), and
  the last level is the bottleneck (four blocks by default);
* decoder: for each level from the bottom up, a 2×2×2 stride-2 transposed convolution to the width of
  the level above, concatenation with that level's encoder output (the skip), ``decoder_blocks``
  residual blocks back to that width;
* head: a 1×1×1 convolution to one channel. :meth:`ResUNet3D.forward` returns *logits*; the sigmoid is
  applied by the loss (``BCEWithLogits``, numerically stable under bf16 autocast) and by inference.

Residual block: ``conv3³ → GroupNorm(8) → ReLU → conv3³ → GroupNorm``, plus the shortcut (identity, or a
1×1×1 convolution with GroupNorm when the width or the stride changes), then ReLU. Convolutions have no
bias (GroupNorm follows each). Kaiming-normal initialisation (fan-out, ReLU gain); GroupNorm starts at
weight 1, bias 0.

Loss: ``bce_weight · BCE + dice_weight · (1 − soft Dice)`` (0.1 and 0.9 by default). The soft Dice is
computed over the whole batch at once, ``(2 Σ p·t + s) / (Σ p + Σ t + s)`` with ``s = 1`` voxel, so crops
without lesion neither divide by zero nor dominate.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.shortcut: nn.Module
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.GroupNorm(groups, out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stack(in_channels: int, out_channels: int, count: int, *, stride: int, groups: int) -> nn.Sequential:
    blocks = [ResidualBlock(in_channels, out_channels, stride=stride, groups=groups)]
    blocks += [ResidualBlock(out_channels, out_channels, groups=groups) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class ResUNet3D(nn.Module):
    """3D residual U-Net; see the module docstring. Input ``(N, 1, X, Y, Z)`` with sizes divisible by
    :attr:`size_multiple`; output logits of the same spatial size."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128, 256),
                 encoder_blocks: Sequence[int] = (1, 1, 1, 4), *, decoder_blocks: int = 1, groups: int = 8,
                 in_channels: int = 1):
        super().__init__()
        widths, encoder_blocks = tuple(widths), tuple(encoder_blocks)
        if len(widths) != len(encoder_blocks) + 1:
            raise ValueError("widths needs one entry more than encoder_blocks (the stem)")
        self.stem = nn.Sequential(nn.Conv3d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, widths[0]), nn.ReLU(inplace=True))
        self.encoder = nn.ModuleList()
        for level, count in enumerate(encoder_blocks):
            self.encoder.append(_stack(widths[level], widths[level + 1], count, stride=1 if level == 0 else 2,
                                       groups=groups))
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(encoder_blocks) - 1, 0, -1):      # from the bottleneck up
            deep, shallow = widths[level + 1], widths[level]
            self.up.append(nn.ConvTranspose3d(deep, shallow, 2, stride=2, bias=False))
            self.decoder.append(_stack(2 * shallow, shallow, decoder_blocks, stride=1, groups=groups))
        self.head = nn.Conv3d(widths[1], 1, 1)
        self.size_multiple = 2 ** (len(encoder_blocks) - 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal weights (fan-out, ReLU), zero biases, GroupNorm weight 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.size_multiple for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {self.size_multiple}")
        skips = []
        out = self.stem(x)
        for level in self.encoder:
            out = level(out)
            skips.append(out)
        skips.pop()   # the bottleneck output is not a skip
        for up, block in zip(self.up, self.decoder):
            out = block(torch.cat([up(out), skips.pop()], dim=1))
        return self.head(out)


def build_model(config) -> ResUNet3D:
    """The network described by a :class:`~atlas_curate.train.config.TrainConfig`."""
    return ResUNet3D(config.widths, config.encoder_blocks, decoder_blocks=config.decoder_blocks,
                     groups=config.norm_groups)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """``1 − (2 Σ p·t + smooth) / (Σ p + Σ t + smooth)`` over the whole batch, ``p = sigmoid(logits)``."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (prob.sum() + target.sum() + smooth)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, bce_weight: float = 0.1, dice_weight: float = 0.9,
                  smooth: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, bce, dice_loss)``: the affine combination used for training and its two parts."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    dice = soft_dice_loss(logits, target, smooth=smooth)
    return bce_weight * bce + dice_weight * dice, bce, dice
