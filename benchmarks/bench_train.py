"""Training and inference speed of the 3D ResU-Net per stage: iterations/s and peak memory on one device.

Random tensors of each stage's crop and batch size stand in for data (the loader is not timed), so the figure
is the network's cost: forward, BCE + soft Dice loss, backward and the Adam step, with bf16 autocast on CUDA
exactly as ``train-baseline`` runs it. Inference is one sliding-window pass over a whole working-grid volume
with the last stage's window. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's
peak resident set size on CPU.

    python benchmarks/bench_train.py --preset quick --device cpu --steps 5
    python benchmarks/bench_train.py --preset paper --device cuda --steps 20
    python benchmarks/bench_train.py --config my.toml --device cuda --stage zoom_out
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_stage(config, stage, device, steps: int, warmup: int) -> dict:
    import torch

    from atlas_curate.train.infer import autocast
    from atlas_curate.train.model import bce_dice_loss, build_model

    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=stage.lr, weight_decay=config.weight_decay)
    crop = config.network_crop(stage)
    image = torch.randn(stage.batch_size, 1, *crop, device=device)
    mask = (torch.rand(stage.batch_size, 1, *crop, device=device) > 0.95).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for step in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, config.amp):
            logits = model(image)
        loss, _, _ = bce_dice_loss(logits, mask, bce_weight=config.bce_weight, dice_weight=config.dice_weight)
        loss.backward()
        optimizer.step()
        _sync(device)
        if step >= warmup:
            timings.append(time.perf_counter() - start)
    seconds = sorted(timings)[len(timings) // 2]
    return {"stage": stage.name, "crop": "x".join(map(str, crop)), "batch": stage.batch_size,
            "s_per_it": seconds, "it_per_s": 1.0 / seconds, "voxels_per_s": stage.batch_size * _prod(crop) / seconds,
            "peak_mb": _peak_mb(device)}


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def bench_inference(config, device) -> dict:
    import numpy as np
    import torch

    from atlas_curate.train.data import geometry_of
    from atlas_curate.train.infer import predict_volume
    from atlas_curate.train.model import build_model

    torch.manual_seed(0)
    model = build_model(config).to(device)
    geo = geometry_of(config)
    image = np.random.default_rng(0).normal(size=geo.working_shape).astype(np.float32)
    crop = config.network_crop(config.stages[-1])
    predict_volume(model, image[:16, :16, :16], crop, device, amp=config.amp)      # warm-up (cudnn autotune)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    predict_volume(model, image, crop, device, overlap=config.overlap, blend=config.blend, amp=config.amp)
    _sync(device)
    return {"stage": "inference", "crop": "x".join(map(str, geo.working_shape)), "batch": 1,
            "s_per_it": time.perf_counter() - start, "peak_mb": _peak_mb(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quick", choices=["paper", "quick"])
    parser.add_argument("--config", default=None, help="TOML overrides, as for train-baseline --config")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stage", default=None, help="only this stage (default: all, then inference)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per stage (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from atlas_curate.train.config import make_config
    from atlas_curate.train.infer import resolve_device

    config = make_config(args.preset, args.config)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; preset {config.preset}; voxel {config.voxel_size} mm; widths {config.widths}; "
          f"bf16 autocast: {config.amp and device.type == 'cuda'}")
    rows = [bench_stage(config, s, device, args.steps, args.warmup)
            for s in config.stages if args.stage in (None, s.name)]
    if args.stage is None:
        rows.append(bench_inference(config, device))
    print(f"{'stage':<10} {'crop':>12} {'batch':>5} {'s/it':>8} {'it/s':>8} {'Mvox/s':>8} {'peak MB':>9}")
    for r in rows:
        its = f"{r['it_per_s']:.2f}" if "it_per_s" in r else "-"
        mvox = f"{r['voxels_per_s'] / 1e6:.2f}" if "voxels_per_s" in r else "-"
        print(f"{r['stage']:<10} {r['crop']:>12} {r['batch']:>5} {r['s_per_it']:>8.3f} {its:>8} {mvox:>8} "
              f"{r['peak_mb']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
