"""Figures of the overlap map for a paper: orthogonal slices over the template, a glass brain, and a
lesion-volume histogram. PNG at 300 dpi, each a :class:`matplotlib.figure.Figure` drawn with the Agg canvas
(no pyplot, no global backend change), no time stamp or software version in the file, so the same map gives
the same bytes.

The colour scale is the fraction of scans (0 at the bottom of the colour bar, the map's maximum at the
top); voxels covered by no scan are transparent. Slices cut through the voxel of highest overlap.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .. import io

DPI = 300
COLORBAR_LABEL = "fraction of scans"
# 'hot' without its darkest quarter, so that voxels covered by few scans stay visible over the template
CMAP = LinearSegmentedColormap.from_list("overlap_hot", matplotlib.colormaps["hot"](np.linspace(0.25, 1.0, 256)))
PNG_METADATA = {"Software": None}


def _figure(figsize: tuple[float, float], facecolor: str) -> Figure:
    fig = Figure(figsize=figsize, facecolor=facecolor)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", metadata=PNG_METADATA, facecolor=fig.get_facecolor())
    return path


def _colorbar(fig, rect, vmax: float, *, dark: bool) -> None:
    cax = fig.add_axes(rect)
    mappable = ScalarMappable(norm=Normalize(0.0, vmax), cmap=CMAP)
    bar = fig.colorbar(mappable, cax=cax)
    bar.set_label(COLORBAR_LABEL, fontsize=8, color="white" if dark else "black")
    bar.ax.tick_params(labelsize=7, colors="white" if dark else "black")
    bar.outline.set_edgecolor("white" if dark else "black")


def peak_mm(prob: nib.Nifti1Image) -> tuple[float, float, float]:
    """World coordinates (mm) of the voxel of highest overlap (the first one in C order on ties)."""
    data = np.asanyarray(prob.dataobj)
    ijk = np.unravel_index(int(np.argmax(data)), data.shape)
    return tuple(float(v) for v in nib.affines.apply_affine(prob.affine, ijk))


def _threshold(n: int) -> float:
    """Below one scan's share: every voxel covered by at least one scan is drawn."""
    return 0.5 / max(n, 1)


def orthogonal(prob: nib.Nifti1Image, template_t1: Path, path: Path, *, n: int, title: str) -> Path:
    """Sagittal, coronal and axial slices through the peak, the map over the template T1."""
    from nilearn import plotting

    vmax = max(float(np.asanyarray(prob.dataobj).max()), 1.0 / max(n, 1))
    fig = _figure((7.2, 2.8), "black")
    ax = fig.add_axes([0.03, 0.0, 0.85, 0.9])
    plotting.plot_stat_map(prob, bg_img=str(template_t1), cut_coords=peak_mm(prob), display_mode="ortho",
                           colorbar=False, figure=fig, axes=ax, threshold=_threshold(n), cmap=CMAP, vmin=0.0,
                           vmax=vmax, symmetric_cbar=False, black_bg=True, draw_cross=False, annotate=True,
                           dim=-0.3, resampling_interpolation="nearest")
    fig.text(0.44, 0.95, title, ha="center", va="center", color="white", fontsize=9)
    _colorbar(fig, [0.9, 0.12, 0.022, 0.72], vmax, dark=True)
    return _save(fig, path)


def glass(prob: nib.Nifti1Image, path: Path, *, n: int, title: str) -> Path:
    """Maximum-intensity projections of the map (left, right, coronal, axial) on a glass brain."""
    from nilearn import plotting

    vmax = max(float(np.asanyarray(prob.dataobj).max()), 1.0 / max(n, 1))
    fig = _figure((9.0, 2.6), "white")
    ax = fig.add_axes([0.0, 0.0, 0.9, 0.88])
    plotting.plot_glass_brain(prob, display_mode="lyrz", colorbar=False, figure=fig, axes=ax,
                              threshold=_threshold(n), cmap=CMAP, vmin=0.0, vmax=vmax, plot_abs=False,
                              symmetric_cbar=False, black_bg=False, annotate=True, alpha=0.6)
    fig.text(0.45, 0.95, title, ha="center", va="center", color="black", fontsize=9)
    _colorbar(fig, [0.92, 0.12, 0.015, 0.72], vmax, dark=False)
    return _save(fig, path)


def volume_histogram(scan_mm3: list[float], lesion_mm3: list[float], path: Path, *, title: str) -> Path:
    """Histogram of lesion volumes on a log axis: per scan (all its lesions) and per single lesion."""
    scans = np.asarray([v for v in scan_mm3 if v > 0], float)
    lesions = np.asarray([v for v in lesion_mm3 if v > 0], float)
    fig = _figure((4.8, 3.4), "white")
    ax = fig.subplots()
    if lesions.size:
        per_decade = 6
        low = np.floor(np.log10(min(lesions.min(), scans.min())) * per_decade)
        high = max(np.ceil(np.log10(max(lesions.max(), scans.max())) * per_decade), low + 1)
        bins = np.logspace(low / per_decade, high / per_decade, int(high - low) + 1)
        ax.hist(scans, bins=bins, color="#4477AA", alpha=0.85, label=f"per scan, all lesions (n = {scans.size})")
        ax.hist(lesions, bins=bins, histtype="step", color="#CC3311", linewidth=1.4,
                label=f"per lesion (n = {lesions.size})")
        ax.set_xscale("log")
        ax.legend(fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no lesion voxels", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("lesion volume in template space (mm³)", fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
