"""``train-baseline``: train the 3D ResU-Net on the train split, watch the dev split, save everything needed.

Run folder (``RUN_DIR``):

* ``config.toml``: the full effective configuration (:mod:`.config`);
* ``run.json``: BIDS root, split table, data fingerprint, train/dev scans, device, versions, status, the
  snapshot list of the last stage (the snapshot ensemble), the wall time, ``extensions`` (one entry per resume
  that changed the configuration: ``time`` (UTC), ``at`` (``stage`` and ``epoch`` where training went on,
  ``epochs_done`` before it), ``status_before`` and ``changes``, each ``{field, from, to}``) and ``postprocess``
  (the post-processing chosen, summarised from ``postprocess.json``);
* ``log.tsv``: one row per epoch: ``stage, epoch, train_loss, bce, dice_loss, lr, dev_dice, seconds``
  (``lr`` is the rate used during the epoch; ``dev_dice`` is ``n/a`` on epochs without a dev pass);
* ``checkpoints/last.pt``: model, optimiser, scheduler and RNG state dicts, the position (stage, epochs
  done) and the log so far, written every ``checkpoint_every`` epochs and at the end of every stage;
* ``checkpoints/<stage>-epoch<N>.pt``: snapshot weights; ``model.pt``: the final weights;
* ``postprocess.json``: the post-processing chosen on the dev scans when training completes
  (:mod:`atlas_curate.postprocess`: the minimum lesion size with the best mean dev Dice, the grid tried);
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
uninterrupted one (crops depend only on seed, stage, epoch and item; RNG and optimiser state are restored; a
stage that had not started when the run stopped starts with a fresh optimiser, as it would have).

Extending a run. ``--resume`` reads the run's ``config.toml`` and applies ``--config`` on top of it: more epochs
in the stage in progress or in the last completed stage, and stages added at the end, continue the run from
``checkpoints/last.pt`` — also a finished one, which then trains only the added epochs or stages. The log
(``log.tsv``, ``curve.png``) goes on from the rows already there (stage epochs keep counting), ``config.toml``
becomes the new configuration, the change is recorded in ``run.json``'s ``extensions``, and ``model.pt``,
the snapshots and ``postprocess.json`` are rewritten when the extended run completes (until then the previous
``model.pt`` stays). The learning-rate schedule of an extended stage continues from the epoch reached: cosine
annealing restarts every ``restart_period`` epochs whatever the stage's length, so the extended run trains as a
run configured with the longer stage from the start. What may and may not change is in :mod:`.resume`
(refused: the network, the data preparation, the seed, the loss, a stage already trained other than by more
epochs, shrinking a completed stage).

Post-processing. When training completes, the final model segments the dev scans once more (reusing the last
dev pass when it ran with the final weights) and the minimum lesion size of :mod:`atlas_curate.postprocess` is
chosen on them and written to ``postprocess.json``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .. import __version__, io, postprocess, tables
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
from .resume import ResumePlan, plan_resume

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
    postprocess: dict | None = None      # postprocess.json's record (None when the call stopped early)
    extension: dict | None = None        # the run.json ``extensions`` entry this call added, if any

    @property
    def dev_dice(self) -> float:
        values = pd.to_numeric(self.log["dev_dice"], errors="coerce").dropna() if len(self.log) else []
        return float(values.iloc[-1]) if len(values) else float("nan")

    def summary(self) -> str:
        """What a person needs to read the run: the data, the time, and the dev Dice with what it rests on."""
        head = f"trained on {self.n_train} scans ({self.device}, {self.seconds:.0f} s)"
        if self.extension:
            head += "; changed on resuming: " + ", ".join(change_text(c) for c in self.extension["changes"])
        line = f"{head}; {dev_statement(self.dev_dice, self.dev_volumes_mm3)}"
        return line + (f"; {postprocess_statement(self.postprocess)}" if self.postprocess else "")


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


def change_text(change: dict) -> str:
    """``stages.zoom_out.epochs 3 -> 5``, ``added stage polish``, ``removed stage x`` (a run.json change)."""
    field_name = change["field"]
    if isinstance(change["to"], dict) and change["from"] is None:
        return f"added stage {field_name.split('.', 1)[1]}"
    if isinstance(change["from"], dict) and change["to"] is None:
        return f"removed stage {field_name.split('.', 1)[1]}"
    return f"{field_name} {change['from']} -> {change['to']}"


def postprocess_statement(record: dict) -> str:
    """One line on the post-processing chosen (``postprocess.json``'s record)."""
    rule = postprocess.PostProcessing.from_dict(record["postprocessing"])
    line = f"post-processing: {rule.describe()}"
    if record.get("chosen_on") == "dev" and record.get("dev_dice") is not None:
        line += (f" (chosen on the dev scans: dev Dice {record['dev_dice_raw']:.3f} raw, "
                 f"{record['dev_dice']:.3f} post-processed)")
    else:
        line += f" ({record.get('reason', 'default')})"
    return line


def _save_torch(obj, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _log_table(rows: list[dict], path: Path) -> pd.DataFrame:
    """The epoch log so far, written to ``path`` (``log.tsv``) and returned."""
    table = pd.DataFrame(rows, columns=LOG_COLUMNS)
    tables.write_tsv(table, path, float_format="%.6g")
    return table


def _rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    return table[table["split"].astype(str) == split].sort_values("scan").reset_index(drop=True)


def dev_dice(model: torch.nn.Module, scans: list[PreparedScan], config: TrainConfig, crop, device,
             collect: list | None = None) -> float:
    """Mean per-scan Dice on the 1 mm grid from whole-volume sliding-window inference (see module docstring).

    With ``collect`` (a list), each scan's predicted components with their overlap with the truth and the
    truth's voxel count are appended to it, for the choice of the post-processing."""
    geo = geometry_of(config)
    brain = postprocess.brain_region(config.postprocess_brain_margin_mm)[geo.box] if collect is not None else None
    scores = []
    for scan in scans:
        prob = predict_volume(model, np.asarray(scan.load("image")), crop, device, overlap=config.overlap,
                              blend=config.blend, amp=config.amp)
        pred = prob_to_box(prob, geo) >= config.threshold
        truth = np.asarray(scan.load("truth_box")) > 0
        tp = int(np.count_nonzero(pred & truth))
        denominator = int(np.count_nonzero(pred)) + scan.truth_voxels
        scores.append(1.0 if denominator == 0 else 2.0 * tp / denominator)
        if collect is not None:
            collect.append((postprocess.components(pred, brain, truth=truth), scan.truth_voxels))
    return float(np.mean(scores)) if scores else float("nan")


def choose_postprocessing(model: torch.nn.Module, scans: list[PreparedScan], config: TrainConfig, device,
                          collected: list | None = None) -> dict:
    """``postprocess.json``'s record: the minimum lesion size with the best mean dev Dice for ``model`` (see
    :mod:`atlas_curate.postprocess`); ``collected``: the components of a dev pass already made with ``model``."""
    from ..templates import template_grid

    if collected is None:
        collected = []
        if scans:
            dev_dice(model, scans, config, config.network_crop(config.stages[-1]), device, collect=collected)
    return postprocess.choice_record(collected, config.postprocess_sizes_mm3, voxel_mm3=template_grid().voxel_mm3,
                                     brain_margin_mm=config.postprocess_brain_margin_mm,
                                     min_inside_fraction=config.postprocess_min_inside, threshold=config.threshold,
                                     model=MODEL_FILE)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _start(run_dir: Path, preset: str | None, config, resume: bool
           ) -> tuple[TrainConfig, dict | None, ResumePlan | None]:
    """The configuration, the checkpoint to resume from and where to go on (both None for a new run); refuses to
    overwrite a run unless resuming, and a resumed run's changes that cannot continue it (:mod:`.resume`)."""
    last = run_dir / LAST
    started = last.is_file() or (run_dir / MODEL_FILE).is_file()
    if started and not resume:
        raise FileExistsError(f"{run_dir} already holds a training run; use --resume to continue it or choose a "
                              "new RUN_DIR")
    if not resume or not last.is_file():
        return make_config(preset or "quick", config), None, None
    saved = load_config(run_dir / RUN_CONFIG)
    cfg = make_config(preset or saved.preset, config, base=saved)
    checkpoint = load_state(last)
    try:
        plan = plan_resume(saved, cfg, (int(checkpoint["stage"]), int(checkpoint["epoch"])))
    except ValueError as exc:
        raise ValueError(f"{run_dir / RUN_CONFIG}: the run was started with another configuration; {exc}. Start a "
                         "new RUN_DIR to train with them") from None
    return cfg, checkpoint, plan


def train(bids_root: os.PathLike | str, splits: os.PathLike | str, run_dir: os.PathLike | str, *,
          preset: str | None = None, config: os.PathLike | str | dict | None = None, device: str = "auto",
          resume: bool = False, progress: bool = True, fold: int | None = None,
          max_epochs: int | None = None) -> TrainResult:
    """Train the baseline on the ``train`` rows of ``splits`` (dev Dice on the ``dev`` rows); see the module docstring.

    With ``fold = k`` (a split table with folds) the dev set is the ``train`` rows of fold ``k`` and the model
    trains on the other folds.
    ``config`` is a TOML file (or a parsed dict) overriding ``preset`` (default ``quick``). ``resume`` continues
    from ``RUN_DIR/checkpoints/last.pt``: ``config`` then overrides the run's own ``config.toml`` (``preset``
    defaults to the run's), the data must be the same, and more epochs or added stages extend the run (see the
    module docstring and :mod:`.resume`). ``max_epochs`` stops this call after that many epochs (a resumable,
    time-boxed run); the result then has ``complete = False``.
    """
    started_at = time.perf_counter()
    root = Path(bids_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: BIDS root is not a folder")
    run_dir = Path(run_dir).resolve()
    device_ = resolve_device(device)
    cfg, checkpoint, plan = _start(run_dir, preset, config, resume)

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
    extension = None
    if checkpoint is not None:
        previous = tables.read_json(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else {}
        if previous.get("data_fingerprint") not in (None, fingerprint):
            raise ValueError(f"{run_dir}: the split table or its images changed since the run started "
                             "(data fingerprint differs); start a new run")
        run_doc["extensions"] = list(previous.get("extensions") or [])
        if "postprocess" in previous:
            run_doc["postprocess"] = previous["postprocess"]     # the choice for the model.pt still there
        if plan is not None and plan.changes:
            at = cfg.stages[plan.stage].name if plan.stage < len(cfg.stages) else None
            extension = {"time": _utc_now(), "status_before": previous.get("status"),
                         "at": {"stage": at, "epoch": plan.epoch, "epochs_done": len(checkpoint["log"])},
                         "changes": [c.to_dict() for c in plan.changes]}
            run_doc["extensions"].append(extension)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / RUN_CONFIG)
    tables.write_json(run_doc, run_dir / RUN_FILE)

    threads = torch.get_num_threads()
    try:
        if device_.type == "cpu" and cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        result = _train(cfg, root, splits, run_dir, device_, checkpoint, plan, train_rows, dev_rows, run_doc,
                        previous, progress, max_epochs, started_at)
        result.extension = extension
        return result
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, root: Path, splits, run_dir: Path, device_: torch.device, checkpoint: dict | None,
           plan: ResumePlan | None, train_rows: pd.DataFrame, dev_rows: pd.DataFrame, run_doc: dict, previous: dict,
           progress: bool, max_epochs: int | None, started_at: float) -> TrainResult:
    torch.manual_seed(cfg.seed)
    if device_.type == "cuda":
        torch.backends.cudnn.benchmark = True
    jobs = max(1, min(cfg.num_workers, os.cpu_count() or 1))
    train_scans = prepare_scans(train_rows, run_dir / "cache", cfg, jobs=jobs, progress=progress)
    dev_scans = prepare_scans(dev_rows, run_dir / "cache", cfg, jobs=jobs, progress=progress)

    model = build_model(cfg).to(device_)
    stage_index, epoch_done, rows = 0, 0, []
    if checkpoint is not None and plan is not None:
        model.load_state_dict(checkpoint["model"])
        stage_index, epoch_done = plan.stage, plan.epoch
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
    collected: list | None = None        # the dev components of the final weights, when the last dev pass has them
    try:
        for si in range(stage_index, len(cfg.stages)):
            stage = cfg.stages[si]
            optimizer = torch.optim.Adam(model.parameters(), lr=stage.lr, weight_decay=cfg.weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                optimizer, T_0=stage.restart_period, eta_min=stage.min_lr)
            first = 0
            if checkpoint is not None and si == stage_index and plan is not None and plan.continue_stage:
                optimizer.load_state_dict(checkpoint["optimizer"])   # the stage goes on (interrupted or extended)
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
                collected = [] if last_of_stage and si == len(cfg.stages) - 1 else None
                if dev_scans and ((cfg.dev_every and number % cfg.dev_every == 0) or last_of_stage):
                    score = dev_dice(model, dev_scans, cfg, crop, device_, collect=collected)
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
    model_path, record = None, None
    if complete:
        model_path = run_dir / MODEL_FILE
        _save_torch(model.state_dict(), model_path)
        record = choose_postprocessing(model, dev_scans, cfg, device_, collected if dev_scans else None)
        postprocess.save_choice(record, run_dir)
        run_doc["postprocess"] = {key: record[key] for key in ("chosen_on", "dev_dice", "dev_dice_raw",
                                                               "description", "reason")}
        run_doc["postprocess"].update(record["postprocessing"], file=postprocess.POSTPROCESS_FILE)
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
                       dev_volumes_mm3=[float(v) for v in volumes.fillna(0.0)], postprocess=record)
