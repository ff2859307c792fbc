"""Visual report of normalize: one figure per scan and one HTML page for the run."""

from __future__ import annotations

import html
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from .. import io
from ..resources import data_dir


def _slices(volume: np.ndarray, centre) -> list[np.ndarray]:
    i, j, k = centre
    return [volume[i].T, volume[:, j].T, volume[:, :, k].T]


def scan_figure(t1: np.ndarray, defaced: np.ndarray, brain: np.ndarray, lesion: np.ndarray | None, *,
                title: str) -> bytes:
    """The PNG of one scan: the registered T1 in three planes with the template brain outline (cyan) and the
    lesion (red), and a mid-sagittal view before and after defacing. A :class:`matplotlib.figure.Figure` drawn
    with the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    centre = [s // 2 for s in t1.shape]
    if lesion is not None and lesion.any():
        centre = [int(c) for c in np.argwhere(lesion).mean(axis=0)]
    vmax = float(np.percentile(t1[brain], 99.5)) if brain.any() else 1.0
    fig = Figure(figsize=(17, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 5, gridspec_kw={"width_ratios": [1.2, 1, 1, 1.2, 1.2]})
    for ax, img, outline, les in zip(axes[:3], _slices(t1, centre), _slices(brain.astype(float), centre),
                                     _slices(lesion.astype(float), centre) if lesion is not None else [None] * 3):
        ax.imshow(img, origin="lower", cmap="gray", vmin=0, vmax=vmax)
        ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.6)
        if les is not None and les.any():
            ax.contour(les, levels=[0.5], colors="red", linewidths=0.8)
    mid = t1.shape[0] // 2
    for ax, img, label in ((axes[3], t1[mid].T, "before defacing"), (axes[4], defaced[mid].T, "after defacing")):
        ax.imshow(img, origin="lower", cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(label, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10, color="darkred" if "FAIL" in title else "black")
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, dpi=80, format="png")
    return png.getvalue()


def write_report(table: pd.DataFrame, out: Path) -> Path:
    """``out/report.html``: the QC table, one figure per scan, and the controls with which a rater records
    include / exclude decisions (downloaded as ``qc_decisions.tsv`` for ``qc-apply``; the ``human_*`` columns
    of ``table``, when present, are shown preselected). The page needs no network (plain inline script)."""
    env = Environment(loader=FileSystemLoader(str(data_dir("templates"))), autoescape=select_autoescape(["html"]))
    rows = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in record.items()}
            for record in table.to_dict("records")]
    for r in rows:   # a rater's decision (qc-apply) against the automatic verdict
        r["overruled"] = (r.get("human_decision") in ("include", "exclude") and r.get("status") != "failed"
                          and (r.get("human_decision") == "include") != (r.get("qc_pass") is True))
    counts = {
        "total": len(rows),
        "passed": sum(1 for r in rows if r.get("qc_pass") is True and r.get("status") != "failed"),
        "failed_qc": sum(1 for r in rows if r.get("qc_pass") is False and r.get("status") != "failed"),
        "errors": sum(1 for r in rows if r.get("status") == "failed"),
        "include": sum(1 for r in rows if r.get("human_decision") == "include" and r.get("status") != "failed"),
        "exclude": sum(1 for r in rows if r.get("human_decision") == "exclude" and r.get("status") != "failed"),
        "overruled": sum(1 for r in rows if r["overruled"]),
    }
    counts["decisions"] = counts["include"] + counts["exclude"]
    text = env.get_template("report.html").render(rows=rows, counts=counts, escape=html.escape)
    path = out / "report.html"
    io.write_text(text, path)
    return path
