"""Whole-volume inference: sliding windows with overlap and blending, snapshot ensembles, a run's models.

:func:`predict_volume` pads the image with zeros at its far end to a multiple of the network's size
multiple (8 for three downsamplings) and tiles it with windows (the crop rounded up to that multiple, cut
to the padded size per axis) whose starts are evenly spaced from 0 to ``size − window`` with at most
``window · (1 − overlap)`` between them, so every voxel is covered. The sigmoid outputs of the windows
covering a voxel are averaged with weights: ``gaussian`` (a Gaussian centred on the window, sigma = 1/8 of
its size per axis, floored at 1e-3 of its peak so that the border is never weightless; windows are less
reliable at their edges) or ``uniform``. When one window covers the whole padded input this is exactly one
forward pass. The model is put in eval mode under ``torch.inference_mode`` and its previous mode restored.

A snapshot ensemble is the mean of its members' probabilities (:func:`predict_ensemble`).
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import io, tables
from .config import TrainConfig, load_config
from .data import Geometry, geometry_of, image_to_working, prob_to_template
from .model import build_model

RUN_CONFIG = "config.toml"
MODEL_FILE = "model.pt"
RUN_FILE = "run.json"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r} (auto, cuda, cpu)")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; nothing on CPU (CPU bf16 is slower on most processors and changes results)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def padded_shape(shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    """``shape`` rounded up to a multiple of ``multiple`` per axis."""
    return tuple(int(math.ceil(s / multiple) * multiple) for s in shape)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Evenly spaced starts from 0 to ``size − window``, at most ``window·(1 − overlap)`` apart."""
    if window >= size:
        return [0]
    step = max(1.0, window * (1.0 - overlap))
    count = int(math.ceil((size - window) / step)) + 1
    return sorted({int(round(x)) for x in np.linspace(0, size - window, count)})


def sliding_windows(shape: Sequence[int], window: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    starts = [window_starts(s, w, overlap) for s, w in zip(shape, window)]
    return [tuple(slice(a, a + w) for a, w in zip(corner, window))
            for corner in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(shape))]


def blend_weights(window: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    if mode == "uniform":
        return np.ones(tuple(window), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"unknown blend mode {mode!r}")
    axes = []
    for w in window:
        x = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        axes.append(np.exp(-0.5 * (x / (sigma_scale * w)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


def predict_volume(model: nn.Module, image: np.ndarray, crop: Sequence[int], device: torch.device | str = "cpu", *,
                   overlap: float = 0.5, blend: str = "gaussian", amp: bool = True) -> np.ndarray:
    """Lesion probabilities (float32, the image's shape) by sliding-window inference; see the module docstring."""
    device = resolve_device(device)
    image = np.asarray(image, dtype=np.float32)
    multiple = int(getattr(model, "size_multiple", 8))
    crop = tuple(-(-int(c) // multiple) * multiple for c in crop)
    shape = padded_shape(image.shape, multiple)
    window = tuple(min(c, s) for c, s in zip(crop, shape))
    padded = np.zeros(shape, dtype=np.float32)
    padded[tuple(slice(0, s) for s in image.shape)] = image
    volume = torch.from_numpy(padded).to(device)
    weights = torch.from_numpy(blend_weights(window, blend)).to(device)
    total = torch.zeros(shape, dtype=torch.float32, device=device)
    norm = torch.zeros(shape, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, amp):
            for box in sliding_windows(shape, window, overlap):
                logits = model(volume[box][None, None])
                total[box] += torch.sigmoid(logits.float())[0, 0] * weights
                norm[box] += weights
    finally:
        model.train(was_training)
    prob = (total / norm).cpu().numpy()
    return prob[tuple(slice(0, s) for s in image.shape)]


def predict_ensemble(models: Sequence[nn.Module], image: np.ndarray, crop: Sequence[int],
                     device: torch.device | str = "cpu", **options) -> np.ndarray:
    """Mean of the members' probabilities (a snapshot ensemble when the models are snapshots)."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    total = np.zeros(np.shape(image), dtype=np.float32)
    for model in models:
        total += predict_volume(model, image, crop, device, **options)
    return total / len(models)


def load_state(path: os.PathLike | str, device: torch.device | str = "cpu") -> dict:
    """A checkpoint or weights file, loaded with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise io.InputError(path, "checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad files
        raise io.InputError(path, f"not a loadable weights file ({type(exc).__name__}: {exc})") from exc


@dataclass
class Segmenter:
    """The trained network(s) of a run with what is needed to segment a template-grid T1."""

    config: TrainConfig
    models: list[nn.Module]
    device: torch.device
    sources: list[str] = field(default_factory=list)

    @property
    def geometry(self) -> Geometry:
        return geometry_of(self.config)

    @property
    def crop(self) -> tuple[int, int, int]:
        return self.config.network_crop(self.config.stages[-1])

    def working_probability(self, image: np.ndarray) -> np.ndarray:
        return predict_ensemble(self.models, image, self.crop, self.device, overlap=self.config.overlap,
                                blend=self.config.blend, amp=self.config.amp)

    def probability(self, t1: np.ndarray) -> np.ndarray:
        """Lesion probability on the 1 mm template grid of a standardised template-grid T1 (WM = 100)."""
        geo = self.geometry
        return prob_to_template(self.working_probability(image_to_working(t1, geo, self.config.intensity)), geo)


def snapshot_paths(run_dir: os.PathLike | str) -> list[Path]:
    """The snapshot checkpoints of the run's last stage, in epoch order."""
    run_dir = Path(run_dir)
    doc = tables.read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
    return [run_dir / p for p in doc.get("snapshots", [])]


def load_segmenter(run_dir: os.PathLike | str, *, ensemble: bool = False, device: str | torch.device = "auto"
                   ) -> Segmenter:
    """The final model of a run (``model.pt``), or its snapshot ensemble."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / RUN_CONFIG)
    device = resolve_device(device)
    if ensemble:
        paths = snapshot_paths(run_dir)
        if not paths:
            raise io.InputError(run_dir, "the run has no snapshots for an ensemble (no snapshot_epochs in its "
                                         "last stage, or training has not finished)")
    else:
        paths = [run_dir / MODEL_FILE]
        if not paths[0].is_file():
            raise io.InputError(paths[0], "no final model: training has not finished in this run folder")
    models = []
    for path in paths:
        model = build_model(config)
        state = load_state(path, device)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise io.InputError(path, f"weights do not fit the network of {RUN_CONFIG}: {exc}") from exc
        models.append(model.to(device).eval())
    return Segmenter(config, models, device, [str(p) for p in paths])
