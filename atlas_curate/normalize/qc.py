"""Automatic QC of a normalised scan; thresholds are data (``templates/qc.json``)."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
from scipy import ndimage

from ..resources import data_dir


@lru_cache(maxsize=1)
def thresholds() -> dict:
    return json.loads((data_dir("templates") / "qc.json").read_text())


def affine_shape(affine_ras: np.ndarray) -> dict:
    """Scales (singular values) and shear (departure from a similarity) of the linear part."""
    linear = np.asarray(affine_ras)[:3, :3]
    scales = np.linalg.svd(linear, compute_uv=False)
    return {"scale_min": float(scales.min()), "scale_max": float(scales.max()),
            "shear": float(scales.max() / scales.min() - 1.0), "determinant": float(np.linalg.det(linear))}


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


# Small moves of a registration in template space (about the brain centre): a correct registration sits at
# (or within a mm or two of) the best brain correlation, so none of these improves it; a wrong one (shifted,
# rotated, scaled) is improved by the move back towards the right place. ("shift", axis, mm), ("rotate",
# axis, degrees), ("scale", None, factor).
MOVES = ([("shift", axis, mm) for axis in range(3) for mm in (-3.0, 3.0)]
         + [("rotate", axis, deg) for axis in range(3) for deg in (-5.0, 5.0)]
         + [("scale", None, f) for f in (0.95, 1.05)])
BRAIN_CENTRE_MM = (0.0, -18.0, 18.0)


def _move_matrix(kind: str, axis, amount: float) -> np.ndarray:
    """4x4 template-world move (RAS mm) about ``BRAIN_CENTRE_MM``."""
    move = np.eye(4)
    if kind == "shift":
        move[axis, 3] = amount
        return move
    if kind == "rotate":
        a = np.deg2rad(amount)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        linear = np.eye(3)
        linear[i, i], linear[i, j], linear[j, i], linear[j, j] = c, -s, s, c
    else:
        linear = np.eye(3) * amount
    centre = np.asarray(BRAIN_CENTRE_MM)
    move[:3, :3] = linear
    move[:3, 3] = centre - linear @ centre
    return move


def alignment_gain(t1: np.ndarray, template: np.ndarray, keep: np.ndarray, grid_affine: np.ndarray) -> float:
    """How much the brain correlation improves when the registration is moved a little (``MOVES``): the
    largest NCC over the moves minus the NCC where it is, on a 2 mm copy of the template grid. About 0 or
    negative for a correct registration, whatever the scanner's contrast; positive when the registration is
    off by more than a couple of mm or degrees (see ``templates/qc.json`` for the threshold and its margins)."""
    def half(a, order):
        return ndimage.zoom(np.asarray(a, np.float32), 0.5, order=order, prefilter=False)

    small_t1, small_tpl = half(t1, 1), half(template, 1)
    small_keep = half(keep.astype(np.float32), 1) > 0.5
    zoom = np.diag([2.0, 2.0, 2.0, 1.0])
    world = grid_affine @ zoom                      # small voxel -> template world
    base = ncc(small_t1, small_tpl, small_keep)
    best = -np.inf
    for kind, axis, amount in MOVES:
        # the moved registration's image at world x is the current image at move^-1 x
        vox = np.linalg.inv(world) @ np.linalg.inv(_move_matrix(kind, axis, amount)) @ world
        moved = ndimage.affine_transform(small_t1, vox[:3, :3], vox[:3, 3], order=1, cval=0.0)
        best = max(best, ncc(moved, small_tpl, small_keep))
    return float(best - base)


def metrics(*, t1: np.ndarray, template: np.ndarray, brain: np.ndarray, lesion: np.ndarray | None,
            affine_ras: np.ndarray, native_lesion_mm3: float | None, coverage: np.ndarray,
            grid_affine: np.ndarray | None = None) -> dict:
    """QC figures of one scan in template space (all arrays on the template grid, whose voxel->world
    affine ``grid_affine`` enables ``alignment_gain``)."""
    keep = brain & ~lesion if lesion is not None else brain
    out = {"ncc_brain": ncc(t1, template, keep), "brain_coverage": float(coverage[brain].mean())}
    if grid_affine is not None:
        out["alignment_gain"] = alignment_gain(t1, template, keep, grid_affine)
    out.update(affine_shape(affine_ras))
    if lesion is not None and native_lesion_mm3:
        template_mm3 = float(lesion.sum())
        out["lesion_mm3_native"] = native_lesion_mm3
        out["lesion_mm3_template"] = template_mm3
        out["lesion_volume_ratio"] = template_mm3 / (native_lesion_mm3 * abs(out["determinant"]))
        out["lesion_outside_brain"] = float((lesion & ~brain).sum() / max(lesion.sum(), 1))
    return out


def verdict(values: dict, limits: dict | None = None) -> tuple[bool, list[str]]:
    """Pass/fail and the reasons for a failure."""
    limits = limits or thresholds()
    reasons = []
    checks = [
        ("ncc_brain", ">=", limits["ncc_brain_min"]),
        ("alignment_gain", "<=", limits["alignment_gain_max"]),
        ("brain_coverage", ">=", limits["brain_coverage_min"]),
        ("scale_min", ">=", limits["scale_min"]),
        ("scale_max", "<=", limits["scale_max"]),
        ("shear", "<=", limits["shear_max"]),
        ("lesion_volume_ratio", ">=", limits["lesion_volume_ratio_min"]),
        ("lesion_volume_ratio", "<=", limits["lesion_volume_ratio_max"]),
        ("lesion_outside_brain", "<=", limits["lesion_outside_brain_max"]),
    ]
    for key, op, limit in checks:
        if key not in values or values[key] is None:
            continue
        value = values[key]
        ok = value >= limit if op == ">=" else value <= limit
        if not ok:
            reasons.append(f"{key} {value:.3g} {'<' if op == '>=' else '>'} {limit}")
    return not reasons, reasons
