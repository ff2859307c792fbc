"""``train-baseline``: train the 3D ResU-Net on the train split, watch the dev split, save everything needed.

Run folder (``RUN_DIR``):

* ``config.toml``: the full effective configuration (:mod:`.config`);
* ``run.json``: BIDS root, split table, data fingerprint, train/dev scans, device, versions, status, the
  snapshot list of the last stage (the snapshot ensemble) and the wall time;
* ``log.tsv``: one row per epoch: ``stage, epoch, train_loss, bce, dice_loss, lr, dev_dice, seconds``
  (``lr`` is the rate used during the epoch; ``dev_dice`` is ``n/a`` on epochs without a dev pass);
* ``checkpoints/last.pt``: model, optimiser, scheduler and RNG state dicts, the position (stage, epochs
  done) and the log so far, written every ``checkpoint_every`` epochs and at the end of every stage;
* ``checkpoints/<stage>-epoch<N>.pt``: snapshot weights; ``model.pt``: the final weights;
* ``curve.png``: loss per epoch and dev Dice (:mod:`.curve`), drawn when a call ends;
* ``cache/``: the prepared arrays (see :mod:`.data`).

Every file is written atomically. All checkpoints are plain state dicts and are read with
``torch.load(..., weights_only=True)``.

Each stage trains with Adam (``weight_decay``) and cosine annealing with warm restarts (``T_0 =
restart_period`` epochs; the rate is updated after every iteration with the fractional epoch, as in SGDR) from
the previous stage's weights. The model is in training
mode for the updates and in eval mode under ``torch.inference_mode`` for the dev pass, whose Dice comes from
sliding-window inference over each whole dev volume (never crops placed on the true lesion), with the
probabilities taken back to the 1 mm template grid (the truth is the original 1 mm mask):
``2 |P ∩ T| / (|P| + |T|)`` per scan (1 when both are empty), averaged over dev scans.

On CUDA: bf16 autocast, pinned-memory loading with ``num_workers`` workers, ``cudnn.benchmark``. On CPU with
``num_workers = 0`` a run is bit-for-bit reproducible, and a resumed run ends with the same weights as an
uninterrupted one (crops depend only on seed, stage, epoch and item; RNG and optimiser state are restored).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .. import __version__, io, tables
from ..index import refresh_index
from .config import TrainConfig, load_config, make_config, save_config
from .curve import curve_quietly
from .data import (
    CropDataset,
    PreparedScan,
    check_images,
    data_fingerprint,
    geometry_of,
    prepare_scans,
    prob_to_box,
    read_split,
)
from .infer import MODEL_FILE, RUN_CONFIG, RUN_FILE, autocast, load_state, predict_volume, resolve_device
from .model import bce_dice_loss, build_model

LOG_COLUMNS = ["stage", "epoch", "train_loss", "bce", "dice_loss", "lr", "dev_dice", "seconds"]
LAST = Path("checkpoints") / "last.pt"


@dataclass
class TrainResult:
    run_dir: Path
    config: TrainConfig
    model: Path | None                   # None when the call stopped early (``max_epochs``)
    snapshots: list[Path]
    log: pd.DataFrame
    seconds: float
    device: str
    complete: bool
    resumed_at: tuple[str, int] | None = None   # (stage, epochs already done) when resumed
    n_train: int = 0
    n_dev: int = 0
    extra: dict = field(default_factory=dict)
    dev_volumes_mm3: list[float] = field(default_factory=list)   # manual lesion volume of each dev scan

    @property
    def dev_dice(self) -> float:
        values = pd.to_numeric(self.log["dev_dice"], errors="coerce").dropna() if len(self.log) else []
        return float(values.iloc[-1]) if len(values) else float("nan")

    def summary(self) -> str:
        """What a person needs to read the run: the data, the time, and the dev Dice with what it rests on."""
        head = f"trained on {self.n_train} scans ({self.device}, {self.seconds:.0f} s)"
        return f"{head}; {dev_statement(self.dev_dice, self.dev_volumes_mm3)}"


#: A dev Dice from fewer scans, or from lesions all smaller than this, says little about the model (one voxel
#: more or less moves the Dice of a 0.2 cm³ lesion by several points; a network may miss it entirely).
DEV_MIN_SCANS = 3
DEV_SMALL_LESION_MM3 = 1000.0


def dev_statement(dice: float, volumes_mm3: list[float]) -> str:
    """One line on the dev Dice: its value, the dev set's size and lesion volumes, and a warning when the dev set
    is too small to say anything about the model."""
    if not volumes_mm3:
        return "no dev scans: the dev Dice was not measured (evaluate the run on its test scans)"
    if math.isnan(dice):
        return f"no dev Dice yet ({len(volumes_mm3)} dev scans)"
    sizes = ", ".join(f"{v / 1000:.1f}" for v in sorted(volumes_mm3)[:5]) + (", ..." if len(volumes_mm3) > 5 else "")
    plural = "s" if len(volumes_mm3) != 1 else ""
    line = f"dev Dice {dice:.3f} on {len(volumes_mm3)} dev scan{plural} (lesions {sizes} cm³)"
    if len(volumes_mm3) < DEV_MIN_SCANS or max(volumes_mm3) < DEV_SMALL_LESION_MM3:
        line += (" - too few or too small dev lesions to judge the model by; the test scores of `evaluate` say "
                 "more")
    return line


def _save_torch(obj, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _log_table(rows: list[dict], path: Path) -> pd.DataFrame:
    """The epoch log so far, written to ``path`` (``log.tsv``) and returned."""
    table = pd.DataFrame(rows, columns=LOG_COLUMNS)
    tables.write_tsv(table, path, float_format="%.6g")
    return table


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}")
    return out


def _rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    return table[table["split"].astype(str) == split].sort_values("scan").reset_index(drop=True)


def dev_dice(model: torch.nn.Module, scans: list[PreparedScan], config: TrainConfig, crop, device) -> float:
    """Mean per-scan Dice on the 1 mm grid from whole-volume sliding-window inference (see module docstring)."""
    geo = geometry_of(config)
    scores = []
    for scan in scans:
        prob = predict_volume(model, np.asarray(scan.load("image")), crop, device, overlap=config.overlap,
                              blend=config.blend, amp=config.amp)
        pred = prob_to_box(prob, geo) >= config.threshold
        truth = np.asarray(scan.load("truth_box")) > 0
        tp = int(np.count_nonzero(pred & truth))
        denominator = int(np.count_nonzero(pred)) + scan.truth_voxels
        scores.append(1.0 if denominator == 0 else 2.0 * tp / denominator)
    return float(np.mean(scores)) if scores else float("nan")


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _start(run_dir: Path, config: TrainConfig, resume: bool) -> dict | None:
    """The checkpoint to resume from (or None); refuses to overwrite a run unless resuming."""
    last = run_dir / LAST
    started = last.is_file() or (run_dir / MODEL_FILE).is_file()
    if started and not resume:
        raise FileExistsError(f"{run_dir} already holds a training run; use --resume to continue it or choose a "
                              "new RUN_DIR")
    if not resume or not last.is_file():
        return None
    saved = load_config(run_dir / RUN_CONFIG)
    diff = _differences(saved.to_dict(), config.to_dict())
    if diff:
        raise ValueError(f"{run_dir / RUN_CONFIG}: the run was started with another configuration (differs in "
                         f"{', '.join(diff)}); resume with the same --preset/--config")
    return load_state(last)


def train(bids_root: os.PathLike | str, splits: os.PathLike | str, run_dir: os.PathLike | str, *,
          preset: str = "quick", config: os.PathLike | str | dict | None = None, device: str = "auto",
          resume: bool = False, progress: bool = True, fold: int | None = None,
          max_epochs: int | None = None) -> TrainResult:
    """Train the baseline on the ``train`` rows of ``splits`` (dev Dice on the ``dev`` rows); see the module docstring.

    With ``fold = k`` (a split table with folds) the dev set is the ``train`` rows of fold ``k`` and the model
    trains on the other folds.
    ``config`` is a TOML file (or a parsed dict) overriding ``preset``. ``resume`` continues from
    ``RUN_DIR/checkpoints/last.pt`` (the configuration and data must be the same). ``max_epochs`` stops this
    call after that many epochs (a resumable, time-boxed run); the result then has ``complete = False``.
    """
    started_at = time.perf_counter()
    cfg = make_config(preset, config)
    root = Path(bids_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: BIDS root is not a folder")
    run_dir = Path(run_dir).resolve()
    device_ = resolve_device(device)
    checkpoint = _start(run_dir, cfg, resume)

    table = read_split(splits, root)
    train_rows, dev_rows = _rows(table, "train"), _rows(table, "dev")
    if fold is not None:
        if "fold" not in table.columns or train_rows["fold"].isna().all():
            raise io.InputError(splits, f"--fold {fold}: the split table has no folds")
        folds = pd.to_numeric(train_rows["fold"], errors="coerce")
        if not (folds == fold).any():
            raise io.InputError(splits, f"--fold {fold}: no such fold (folds: {sorted(folds.dropna().unique())})")
        train_rows, dev_rows = (train_rows[folds != fold].reset_index(drop=True),
                                train_rows[folds == fold].reset_index(drop=True))
    if train_rows.empty:
        raise io.InputError(splits, "no 'train' rows")
    check_images(train_rows)
    check_images(dev_rows)
    fingerprint = data_fingerprint(pd.concat([train_rows.assign(split="train"), dev_rows.assign(split="dev")]), cfg)
    run_doc = {
        "bids_root": str(root), "splits": str(Path(splits).resolve()), "data_fingerprint": fingerprint,
        "train_scans": train_rows["scan"].tolist(), "dev_scans": dev_rows["scan"].tolist(),
        "fold": fold, "device": str(device_), "torch": torch.__version__, "atlas_curate": __version__,
        "python": platform.python_version(), "preset": cfg.preset, "status": "running", "snapshots": [],
        "seconds": 0.0,
    }
    previous: dict = {}
    if checkpoint is not None:
        previous = tables.read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
        if previous.get("data_fingerprint") not in (None, fingerprint):
            raise ValueError(f"{run_dir}: the split table or its images changed since the run started "
                             "(data fingerprint differs); start a new run")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / RUN_CONFIG)
    tables.write_json(run_doc, run_dir / RUN_FILE)

    threads = torch.get_num_threads()
    try:
        if device_.type == "cpu" and cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        return _train(cfg, root, splits, run_dir, device_, checkpoint, train_rows, dev_rows, run_doc, previous,
                      progress, max_epochs, started_at)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, root: Path, splits, run_dir: Path, device_: torch.device, checkpoint: dict | None,
           train_rows: pd.DataFrame, dev_rows: pd.DataFrame, run_doc: dict, previous: dict, progress: bool,
           max_epochs: int | None, started_at: float) -> TrainResult:
    torch.manual_seed(cfg.seed)
    if device_.type == "cuda":
        torch.backends.cudnn.benchmark = True
    jobs = max(1, min(cfg.num_workers, os.cpu_count() or 1))
    train_scans = prepare_scans(train_rows, run_dir / "cache", cfg, jobs=jobs, progress=progress)
    dev_scans = prepare_scans(dev_rows, run_dir / "cache", cfg, jobs=jobs, progress=progress)

    model = build_model(cfg).to(device_)
    stage_index, epoch_done, rows = 0, 0, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        stage_index, epoch_done = int(checkpoint["stage"]), int(checkpoint["epoch"])
        rows = [dict(r) for r in checkpoint["log"]]
        _set_rng_state(checkpoint["rng"], device_)
    resumed_at = (cfg.stages[min(stage_index, len(cfg.stages) - 1)].name, epoch_done) if checkpoint else None

    total = sum(s.epochs for s in cfg.stages)
    done = sum(s.epochs for s in cfg.stages[:stage_index]) + epoch_done
    budget = max_epochs if max_epochs is not None else total
    ran = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc="train", unit="epoch", disable=not progress, dynamic_ncols=True)
    stopped = False
    try:
        for si in range(stage_index, len(cfg.stages)):
            stage = cfg.stages[si]
            optimizer = torch.optim.Adam(model.parameters(), lr=stage.lr, weight_decay=cfg.weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                optimizer, T_0=stage.restart_period, eta_min=stage.min_lr)
            first = 0
            if checkpoint is not None and si == stage_index and "optimizer" in checkpoint:
                optimizer.load_state_dict(checkpoint["optimizer"])
                scheduler.load_state_dict(checkpoint["scheduler"])
                first = epoch_done
            iterations = stage.iterations_per_epoch or math.ceil(len(train_scans) / stage.batch_size)
            crop = cfg.network_crop(stage)
            dataset = CropDataset(train_scans, crop, iterations * stage.batch_size, seed=cfg.seed,
                                  lesion_prob=cfg.lesion_crop_prob, flip_axes=cfg.flip_axes)
            loader = DataLoader(dataset, batch_size=stage.batch_size, shuffle=False, num_workers=cfg.num_workers,
                                pin_memory=device_.type == "cuda", drop_last=False)
            for epoch in range(first, stage.epochs):
                if ran >= budget:
                    stopped = True
                    break
                tick = time.perf_counter()
                dataset.set_epoch(si, epoch)
                lr = float(optimizer.param_groups[0]["lr"])
                sums = torch.zeros(3, dtype=torch.float64, device=device_)
                batches = 0
                model.train()
                for batch, (image, mask) in enumerate(loader):
                    image = image.to(device_, non_blocking=True)
                    mask = mask.to(device_, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device_, cfg.amp):
                        logits = model(image)
                    loss, bce, dice = bce_dice_loss(logits, mask, bce_weight=cfg.bce_weight,
                                                    dice_weight=cfg.dice_weight, smooth=cfg.dice_smooth)
                    loss.backward()
                    optimizer.step()
                    scheduler.step(epoch + (batch + 1) / iterations)    # annealed per iteration (SGDR)
                    sums += torch.stack([loss.detach(), bce.detach(), dice.detach()]).double()
                    batches += 1
                means = (sums / max(batches, 1)).tolist()
                number = epoch + 1
                last_of_stage = number == stage.epochs
                score = float("nan")
                if dev_scans and ((cfg.dev_every and number % cfg.dev_every == 0) or last_of_stage):
                    score = dev_dice(model, dev_scans, cfg, crop, device_)
                rows.append({"stage": stage.name, "epoch": number, "train_loss": means[0], "bce": means[1],
                             "dice_loss": means[2], "lr": lr, "dev_dice": score,
                             "seconds": time.perf_counter() - tick})
                if number in stage.snapshot_epochs:
                    _save_torch(model.state_dict(), run_dir / "checkpoints" / f"{stage.name}-epoch{number}.pt")
                ran += 1
                if number % cfg.checkpoint_every == 0 or last_of_stage or ran >= budget:
                    position = (si + 1, 0) if last_of_stage else (si, number)
                    _save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "rng": _rng_state(device_),
                                 "stage": position[0], "epoch": position[1], "log": rows}, run_dir / LAST)
                _log_table(rows, run_dir / "log.tsv")
                bar.update(1)
                bar.set_postfix(stage=stage.name, loss=f"{means[0]:.3f}",
                                dev=f"{score:.3f}" if not math.isnan(score) else "-")
            if stopped:
                break
            checkpoint = None
    finally:
        bar.close()

    complete = not stopped
    last_stage = cfg.stages[-1]
    snapshots = [Path("checkpoints") / f"{last_stage.name}-epoch{e}.pt" for e in last_stage.snapshot_epochs]
    model_path = None
    if complete:
        model_path = run_dir / MODEL_FILE
        _save_torch(model.state_dict(), model_path)
    seconds = time.perf_counter() - started_at
    run_doc.update({"status": "complete" if complete else "stopped",
                    "snapshots": [p.as_posix() for p in snapshots] if complete else [],
                    "seconds": round(float(previous.get("seconds", 0.0)) + seconds, 1),  # over all calls
                    "epochs_done": len(rows)})
    tables.write_json(run_doc, run_dir / RUN_FILE)
    log = _log_table(rows, run_dir / "log.tsv")
    curve_quietly(run_dir)
    refresh_index(root, "run", run_dir)
    volumes = pd.to_numeric(dev_rows.get("lesion_volume_mm3", pd.Series(dtype=float)), errors="coerce")
    return TrainResult(run_dir, cfg, model_path, [run_dir / p for p in run_doc["snapshots"]], log, seconds,
                       str(device_), complete, resumed_at, len(train_scans), len(dev_scans),
                       dev_volumes_mm3=[float(v) for v in volumes.fillna(0.0)])
