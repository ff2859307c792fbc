"""The training curve of a run: ``RUN_DIR/curve.png`` drawn from ``RUN_DIR/log.tsv``.

Loss per epoch (the combined training loss, with its BCE and Dice parts fainter) on the left axis, the dev
Dice on the epochs where it was measured (markers) on the right axis, epochs counted across stages with a
dotted line where a stage starts and a dashed one, labelled ``extended``, where a resumed run was extended
(``run.json``'s ``extensions``). The figure is a :class:`matplotlib.figure.Figure` drawn with the Agg
canvas (no pyplot, no global backend change) and saved without the ``Software`` tag, so the same log gives
the same bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from .. import io, tables

log = logging.getLogger(__name__)

CURVE_FILE = "curve.png"
LOSS_COLUMNS = (("train_loss", "training loss (weighted BCE + Dice)", 1.0), ("bce", "BCE", 0.45),
                ("dice_loss", "Dice loss", 0.45))


def read_log(log_tsv: os.PathLike | str) -> pd.DataFrame:
    """``log.tsv`` of a run with numeric columns (``n/a`` → NaN) and ``step``: the epoch counted over all stages."""
    log_tsv = Path(log_tsv)
    if not log_tsv.is_file():
        raise io.InputError(log_tsv, "training log not found")
    table = pd.read_csv(log_tsv, sep="\t", dtype={"stage": str}, keep_default_na=False, na_values=["n/a"])
    missing = [c for c in ("stage", "epoch", "train_loss") if c not in table.columns]
    if missing:
        raise io.InputError(log_tsv, f"not a training log: missing columns {missing}")
    for column in table.columns:
        if column != "stage":
            table[column] = pd.to_numeric(table[column], errors="coerce")
    table["step"] = range(1, len(table) + 1)
    return table


def training_curve(log_tsv: os.PathLike | str, png: os.PathLike | str, *, marks: Sequence[tuple[int, str]] = ()
                   ) -> Path:
    """Draw the curve of ``log_tsv`` into ``png`` (written atomically); returns ``png``. ``marks``: ``(epochs
    before, label)`` of events between epochs (a run extended after that many epochs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    log = read_log(log_tsv)
    fig = Figure(figsize=(7.5, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = log["step"].to_numpy()
    for column, label, alpha in LOSS_COLUMNS:
        if column in log.columns and log[column].notna().any():
            ax.plot(x, log[column].to_numpy(), label=label, alpha=alpha, linewidth=1.5 if alpha == 1.0 else 1.0,
                    marker="." if len(log) < 30 else None)
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()

    dev = log[["step", "dev_dice"]].dropna() if "dev_dice" in log.columns else pd.DataFrame()
    if len(dev):
        right = ax.twinx()
        right.plot(dev["step"].to_numpy(), dev["dev_dice"].to_numpy(), color="tab:red", marker="o",
                   linestyle="--" if len(dev) > 1 else "none", label="dev Dice")
        right.set_ylabel("dev Dice", color="tab:red")
        right.set_ylim(0, 1)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels

    starts = log.index[log["stage"] != log["stage"].shift()].tolist()
    for position in starts:
        step = int(log.loc[position, "step"])
        if step > 1:
            ax.axvline(step - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.annotate(str(log.loc[position, "stage"]), xy=(step - 0.5, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="dimgrey")
    for before, label in marks:
        if 0 < before < len(log):
            ax.axvline(before + 0.5, color="tab:purple", linestyle="--", linewidth=1)
            ax.annotate(label, xy=(before + 0.5, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                        textcoords="offset points", fontsize=8, color="tab:purple")
    if len(log):
        ax.set_xlim(0.5, len(log) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.text(0.5, 0.5, "no epoch logged yet", transform=ax.transAxes, ha="center", va="center")
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(handles),
                  frameon=False)
    ax.set_title(f"{Path(log_tsv).parent.name}: {len(log)} epochs", fontsize=10)
    fig.tight_layout()
    png = Path(png)
    with io.atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return png


def extension_marks(run_dir: os.PathLike | str) -> list[tuple[int, str]]:
    """``(epochs before, "extended")`` for every extension recorded in ``RUN_DIR/run.json``."""
    try:
        doc = tables.read_json(Path(run_dir) / "run.json")
        return [(int(entry["at"]["epochs_done"]), "extended") for entry in doc.get("extensions") or []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def curve_quietly(run_dir: os.PathLike | str) -> Path | None:
    """``RUN_DIR/curve.png`` from ``RUN_DIR/log.tsv`` at the end of training; a failure is a warning (the weights
    and the log are written by then: a figure is not worth failing the run for)."""
    run_dir = Path(run_dir)
    try:
        return training_curve(run_dir / "log.tsv", run_dir / CURVE_FILE, marks=extension_marks(run_dir))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not draw %s: %s: %s", run_dir / CURVE_FILE, type(exc).__name__, exc)
        return None
