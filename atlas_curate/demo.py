"""``atlas-curate demo``: build a small synthetic release and run every stage on it.

synth → bids-convert → normalize → overlap-map → split → train-baseline (quick preset) → evaluate →
predict. The training stages need the ``train`` extra (PyTorch); without it they are skipped with a
message. ``flavour="atlas2"`` builds an R2.0 release instead (template space, training/testing parts),
keeps the release's division in the split and predicts on its testing T1s.
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


def run_demo(out: os.PathLike | str, *, subjects: int = 10, seed: int = 0, jobs: int = 2, faults: bool = True,
             flavour: str = "native", train: bool = True) -> dict[str, Path]:
    """Synthesize ``subjects`` subjects (with fault scans) under ``out/release`` and run each stage.

    Returns the main output of each stage, which is also printed. Reruns reuse finished work.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}

    def stage(name: str, path: Path, started: float) -> None:
        outputs[name] = path
        click.echo(f"[demo] {name:<14} {time.perf_counter() - started:6.1f} s  -> {path}")

    release = out / "release"
    truth = out / "truth"
    bids = out / "bids"
    start = time.perf_counter()
    if (truth / "truth.json").is_file():
        click.echo(f"[demo] synth          reusing {release}")
        outputs["synth"] = release
    else:
        synthesize(release, subjects=subjects, seed=seed, flavour=flavour, faults=faults, truth=truth, jobs=jobs)
        stage("synth", release, start)
    outputs["truth"] = truth
    click.echo(f"[demo] ground truth   -> {truth / 'truth.json'}")

    start = time.perf_counter()
    result = convert(release, bids, jobs=jobs, progress=False)
    click.echo(result.summary())
    stage("bids-convert", bids, start)
    click.echo(f"[demo] lesion masks   -> {bids / 'derivatives' / 'lesions'}")

    start = time.perf_counter()
    normalized = normalize(bids, jobs=jobs, progress=False)
    stage("normalize", normalized.output, start)
    click.echo(f"[demo] QC table       -> {normalized.output / 'qc.tsv'}")
    click.echo(f"[demo] report         -> {normalized.report}")

    from .overlap import overlap_map

    start = time.perf_counter()
    overlap = overlap_map(bids, jobs=jobs, progress=False)
    stage("overlap-map", overlap.output, start)
    click.echo(f"[demo] overlap figure -> {overlap.files['orthogonal']}")

    from .split import balance_table, make_split, write_split

    start = time.perf_counter()
    table = make_split(bids, seed=seed, keep_release_division=flavour == "atlas2")
    split_tsv, _ = write_split(table, normalized.output / "split.tsv")
    click.echo(balance_table(table).to_string())
    stage("split", split_tsv, start)

    if not train:
        return outputs
    if importlib.util.find_spec("torch") is None:
        click.echo("[demo] train-baseline skipped: PyTorch is not installed (pip install 'atlas-curate[train]')")
        return outputs
    from .evaluate import evaluate
    from .predict import predict
    from .train import train as train_baseline

    start = time.perf_counter()
    run_dir = out / "run-quick"
    # the one long stage (minutes on a CPU): show its progress bar with the ETA
    trained = train_baseline(bids, split_tsv, run_dir, preset="quick", resume=(run_dir / "config.toml").is_file(),
                             progress=True)
    stage("train-baseline", run_dir, start)
    click.echo(f"[demo] training log   -> {run_dir / 'log.tsv'} (last dev Dice {trained.dev_dice:.3f})")

    start = time.perf_counter()
    scored = evaluate(run_dir, split="test", progress=False)
    click.echo(scored.text())
    stage("evaluate", scored.output, start)

    start = time.perf_counter()
    if flavour == "atlas2":
        t1s = [row.t1 for row in table.itertuples() if row.split == "test-release" and isinstance(row.t1, str)]
        t1s = [str(bids / t) if not Path(t).is_absolute() else t for t in t1s]
        native = False
    else:
        t1s = sorted(str(p) for p in bids.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))[:1]
        native = True
    predicted = predict(run_dir, t1s, out / "predictions", native=native, progress=False)
    stage("predict", out / "predictions", start)
    click.echo(f"[demo] predicted {len(t1s)} scan(s) ({'native space' if native else 'template space'}), "
               f"{predicted.n_failed} failed")
    return outputs
