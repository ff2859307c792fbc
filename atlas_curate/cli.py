"""Command-line interface: parses arguments and calls one library function per subcommand."""

from __future__ import annotations

import logging
import sys

import click

from . import __version__


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="atlas-curate")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Curate the ATLAS stroke-lesion MRI release: convert to BIDS, normalise to MNI152NLin2009aSym,
    summarise lesions, and train and evaluate a segmentation baseline."""
    _setup_logging(verbose)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--subjects", default=8, show_default=True, type=click.IntRange(1, 2000), help="Number of subjects.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; same seed, same release.")
@click.option("--flavour", default="native", show_default=True, type=click.Choice(["native", "standard"]),
              help="native: ICPSR layout with scanner-space heads; standard: FCP-INDI layout in template space.")
@click.option("--faults", is_flag=True, help="Add broken scans (truncated gzip, mask on another grid, empty mask, "
                                            "metadata row without folder, folder without row).")
@click.option("--truth", type=click.Path(file_okay=False), default=None,
              help="Where to write the ground truth (default: OUT-truth beside OUT).")
@click.option("--jobs", "-j", default=1, show_default=True, type=click.IntRange(1), help="Worker processes.")
def synth(out, subjects, seed, flavour, faults, truth, jobs):
    """Write a synthetic ATLAS release to OUT, with its ground truth beside it."""
    from .synth import default_truth_dir, synthesize

    doc = synthesize(out, subjects=subjects, seed=seed, flavour=flavour, faults=faults, truth=truth, jobs=jobs)
    click.echo(f"wrote {len(doc['scans'])} scans to {out}")
    click.echo(f"ground truth: {truth or default_truth_dir(out)}")


@main.command()
@click.argument("out", type=click.Path(file_okay=False), default="demo-output")
@click.option("--subjects", default=10, show_default=True, type=click.IntRange(1, 200))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--jobs", "-j", default=2, show_default=True, type=click.IntRange(1))
def demo(out, subjects, seed, jobs):
    """Build a small synthetic release in OUT and run every stage on it."""
    from .demo import run_demo

    run_demo(out, subjects=subjects, seed=seed, jobs=jobs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
