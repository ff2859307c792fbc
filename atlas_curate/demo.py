"""``atlas-curate demo``: build a small synthetic release and run every stage on it.

synth → bids-convert → normalize → overlap-map → split → train-baseline → evaluate → predict, each with its
progress bar, then the wall time of every stage and, last, the path of the run's ``index.html`` (one page
linking every report, figure and table).

Two sizes:

* the default, about five minutes on 2 cores: 6 subjects (8 scans, no broken ones), a split with a test set
  of two or three scans (:data:`DEMO_FRACTIONS`), and a training run with the :data:`DEMO_TRAINING` schedule
  (the quick preset's network on 3 mm voxels, about a minute and a half on 2 cores): enough to see the
  network learn the synthetic lesions, not a model to keep;
* ``full=True`` (``demo --full``): 10 subjects with the broken scans (truncated file, mask on another grid,
  empty mask, metadata row without a folder and the reverse), the usual split fractions and the full
  ``quick`` preset (about 20 minutes on 2 cores).

The training stages need the ``train`` extra (PyTorch); without it they are skipped with a message.
``flavour="atlas2"`` builds an R2.0 release instead (template space, training/testing parts), keeps the
release's division in the split and predicts on its testing T1s. Reruns reuse finished work.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import click

from .convert import convert
from .normalize import normalize
from .synth import synthesize

log = logging.getLogger(__name__)

DEMO_SUBJECTS = 6
FULL_SUBJECTS = 10
#: train/dev/test fractions of the default demo: a test set of two or three scans rather than one
DEMO_FRACTIONS = (0.6, 0.1, 0.3)

#: Overrides of the ``quick`` preset for the default demo: 3 mm voxels, one stage of
#: 12 epochs on 48³ crops (144 mm: most of the brain, so every batch holds plenty of lesion-free tissue). On
#: 2 cores it trains in about a minute and a half and reaches a test Dice near 0.7 on the demo's test scans,
#: where an untrained network scores about 0.03 (``benchmarks/bench_demo.py`` measures both). It shows the
#: pipeline working; it is not a model to keep (``demo --full`` runs the quick preset).
DEMO_TRAINING = {
    "voxel_size": 3,
    "lesion_crop_prob": 0.5,
    "stages": [
        {"name": "zoom_in", "crop": [48, 48, 48], "epochs": 12, "lr": 3e-3, "restart_period": 12,
         "batch_size": 2, "iterations_per_epoch": 8, "snapshot_epochs": [12]},
    ],
}


class _Stages:
    """Wall time of each stage, printed as it ends and as a table at the end."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.outputs: dict[str, Path] = {}

    def run(self, name: str, func, *args, **kwargs):
        click.echo(f"[demo] {name} ...")
        start = time.perf_counter()
        value = func(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        return value

    def done(self, name: str, path: Path) -> None:
        self.outputs[name] = path
        took = f"{self.seconds[name]:6.1f} s" if name in self.seconds else "reused  "
        click.echo(f"[demo] {name:<14} {took}  -> {path}")

    def table(self) -> str:
        lines = ["[demo] wall time per stage:"]
        lines += [f"         {name:<14} {seconds:7.1f} s" for name, seconds in self.seconds.items()]
        lines.append(f"         {'total':<14} {sum(self.seconds.values()):7.1f} s")
        return "\n".join(lines)


def run_demo(out: os.PathLike | str, *, subjects: int | None = None, seed: int = 0, jobs: int = 2,
             faults: bool | None = None, flavour: str = "native", train: bool = True, full: bool = False,
             progress: bool = True) -> dict[str, Path]:
    """Synthesize a release under ``out/release`` and run each stage on it.

    ``subjects`` defaults to 6, or 10 with ``full``; ``faults`` (broken scans among them) defaults to
    ``full``. Returns the main output of each stage (``index`` is the page linking them all); everything is
    also printed, the index page last.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    subjects = subjects or (FULL_SUBJECTS if full else DEMO_SUBJECTS)
    faults = full if faults is None else faults
    stages = _Stages()
    release, truth, bids = out / "release", out / "truth", out / "bids"
    if (truth / "truth.json").is_file():
        click.echo(f"[demo] synth          reusing {release}")
    else:
        stages.run("synth", synthesize, release, subjects=subjects, seed=seed, flavour=flavour, faults=faults,
                   truth=truth, jobs=jobs, progress=progress)
    stages.done("synth", release)
    stages.outputs["truth"] = truth
    click.echo(f"[demo] ground truth   -> {truth / 'truth.json'}")

    result = stages.run("bids-convert", convert, release, bids, jobs=jobs, progress=progress)
    click.echo(result.summary())
    stages.done("bids-convert", bids)

    normalized = stages.run("normalize", normalize, bids, jobs=jobs, progress=progress)
    stages.done("normalize", normalized.output)
    click.echo(f"[demo] QC report      -> {normalized.report}")

    from .overlap import overlap_map

    overlap = stages.run("overlap-map", overlap_map, bids, jobs=jobs, progress=progress)
    stages.done("overlap-map", overlap.output)

    from .split import DEFAULT_FRACTIONS, balance_table, make_split, write_split

    def split_stage():
        fractions = DEFAULT_FRACTIONS if full else DEMO_FRACTIONS
        table = make_split(bids, seed=seed, fractions=fractions, keep_release_division=flavour == "atlas2",
                           progress=progress)
        return table, write_split(table, normalized.output / "split.tsv")[0]

    table, split_tsv = stages.run("split", split_stage)
    click.echo(balance_table(table).to_string())
    stages.done("split", split_tsv)

    if train and importlib.util.find_spec("torch") is None:
        click.echo("[demo] train-baseline skipped: PyTorch is not installed (pip install 'atlas-curate[train]')")
    elif train:
        _train_stages(stages, out, bids, table, split_tsv, flavour, full, progress)
    return _finish(stages, bids)


def _train_stages(stages: _Stages, out: Path, bids: Path, table, split_tsv: Path, flavour: str, full: bool,
                  progress: bool) -> None:
    from .evaluate import evaluate
    from .predict import predict
    from .train import train as train_baseline

    run_dir = out / ("run-quick" if full else "run-demo")
    trained = stages.run("train-baseline", train_baseline, bids, split_tsv, run_dir, preset="quick",
                         config=None if full else DEMO_TRAINING, resume=(run_dir / "config.toml").is_file(),
                         progress=progress)
    stages.done("train-baseline", run_dir)
    click.echo(f"[demo] {trained.summary()}")

    scored = stages.run("evaluate", evaluate, run_dir, split="test", progress=progress)
    click.echo(scored.text())
    stages.done("evaluate", scored.output)

    if flavour == "atlas2":
        t1s = [row.t1 for row in table.itertuples() if row.split == "test-release" and isinstance(row.t1, str)]
        t1s = [str(bids / t) if not Path(t).is_absolute() else t for t in t1s]
        native = False
    else:
        t1s = sorted(str(p) for p in bids.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))[:1]
        native = True
    predicted = stages.run("predict", predict, run_dir, t1s, out / "predictions", native=native, progress=progress)
    stages.done("predict", out / "predictions")
    click.echo(f"[demo] predicted {len(t1s)} scan(s) ({'native space' if native else 'template space'}), "
               f"{predicted.n_failed} failed")


def _finish(stages: _Stages, bids: Path) -> dict[str, Path]:
    from .index import write_index

    index = write_index(bids)
    stages.outputs["index"] = index
    click.echo(stages.table())
    click.echo(f"[demo] open this page for every report, figure and table: {index}")
    return stages.outputs
