"""Automatic QC of a normalised scan; thresholds are data (``templates/qc.json``)."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

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


def metrics(*, t1: np.ndarray, template: np.ndarray, brain: np.ndarray, lesion: np.ndarray | None,
            affine_ras: np.ndarray, native_lesion_mm3: float | None, coverage: np.ndarray) -> dict:
    """QC figures of one scan in template space (all arrays on the template grid)."""
    keep = brain & ~lesion if lesion is not None else brain
    out = {"ncc_brain": ncc(t1, template, keep), "brain_coverage": float(coverage[brain].mean())}
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
