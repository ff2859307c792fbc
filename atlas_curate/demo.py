"""``atlas-curate demo``: build a small synthetic release and run every stage on it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import click

from .convert import convert
from .normalize import normalize
from .synth import synthesize

log = logging.getLogger(__name__)


def run_demo(out: os.PathLike | str, *, subjects: int = 10, seed: int = 0, jobs: int = 2,
             faults: bool = True) -> dict[str, Path]:
    """Synthesize ``subjects`` subjects (with fault scans) under ``out/release`` and run each stage.

    Returns the main output of each stage, which is also printed.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}

    def stage(name: str, path: Path, started: float) -> None:
        outputs[name] = path
        click.echo(f"[demo] {name:<14} {time.perf_counter() - started:6.1f} s  -> {path}")

    release = out / "release"
    truth = out / "truth"
    start = time.perf_counter()
    if (truth / "truth.json").is_file():
        click.echo(f"[demo] synth          reusing {release}")
        outputs["synth"] = release
    else:
        synthesize(release, subjects=subjects, seed=seed, faults=faults, truth=truth, jobs=jobs)
        stage("synth", release, start)
    outputs["truth"] = truth
    click.echo(f"[demo] ground truth   -> {truth / 'truth.json'}")

    start = time.perf_counter()
    result = convert(release, out / "bids", jobs=jobs, progress=False)
    click.echo(result.summary())
    stage("bids-convert", out / "bids", start)
    click.echo(f"[demo] lesion masks    -> {out / 'bids' / 'derivatives' / 'lesions'}")

    start = time.perf_counter()
    normalized = normalize(out / "bids", jobs=jobs, progress=False)
    stage("normalize", normalized.output, start)
    click.echo(f"[demo] QC table       -> {normalized.output / 'qc.tsv'}")
    click.echo(f"[demo] report         -> {normalized.report}")
    return outputs
