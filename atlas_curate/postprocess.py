"""Post-processing of predicted lesion masks, as the ATLAS 2022 challenge leaders did it: drop the connected
components that are too small or lie outside the brain.

The rule (:class:`PostProcessing`), applied to a binary mask on the 1 mm template grid:

* lesions are the connected components of the mask (``scipy.ndimage.label``) with the lesion connectivity of
  :mod:`atlas_curate.metrics`: **6** (voxels sharing a face), as the ATLAS 2022 challenge scorer counts them;
* a component is **outside the brain** when less than ``min_inside_fraction`` (default 0.5) of its voxels lie
  inside the template brain (:func:`atlas_curate.templates.template_grid` ``.brain``, the template T1w > 0)
  dilated by ``brain_margin_mm`` (default 3 mm, Euclidean: registration error and partial volume at the
  cortex): such a component is removed, whatever its size; a component with no voxel inside is always outside;
* a component is **small** when its volume (voxels × voxel volume) is less than ``min_size_mm3``: removed.
  ``min_size_mm3 = 0`` removes no component for its size (only the outside-the-brain rule acts).

Choice of the minimum size. At the end of training (:mod:`atlas_curate.train.loop`) the final model segments
the dev scans once; for every size of the configuration's ``postprocess_sizes_mm3`` (default 0, 10, 20, 50,
100, 200, 500 mm³) the rule is applied and the per-scan Dice averaged (on the 1 mm template grid, as the dev
Dice of the log). The size with the best mean dev Dice wins; ties go to the smallest size (the least removed).
Without dev scans the size is 0 mm³ (only the outside-the-brain rule), and the record says why. The choice is
written to ``RUN_DIR/postprocess.json`` (:func:`choice_record`; also summarised in ``run.json``), and applied
by ``predict`` (unless ``--no-postprocess``) and ``evaluate`` (which scores the masks with and without it).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from . import io, tables

POSTPROCESS_FILE = "postprocess.json"
DEFAULT_SIZES_MM3 = (0, 10, 20, 50, 100, 200, 500)
RULE = ("connected components (lesion connectivity) with less than min_inside_fraction of their voxels inside the "
        "template brain dilated by brain_margin_mm are removed, then those smaller than min_size_mm3")


@dataclass(frozen=True)
class PostProcessing:
    """The post-processing rule (see the module docstring)."""

    min_size_mm3: float = 0.0
    brain_margin_mm: float = 3.0
    min_inside_fraction: float = 0.5
    connectivity: int = 6

    def describe(self) -> str:
        size = f"smaller than {self.min_size_mm3:g} mm³ or " if self.min_size_mm3 > 0 else ""
        return (f"components {size}with < {self.min_inside_fraction:g} of their voxels inside the brain "
                f"(+{self.brain_margin_mm:g} mm) removed, {self.connectivity}-connected")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "PostProcessing":
        return cls(float(doc["min_size_mm3"]), float(doc["brain_margin_mm"]), float(doc["min_inside_fraction"]),
                   int(doc.get("connectivity", 6)))


@lru_cache(maxsize=4)
def brain_region(margin_mm: float = 3.0) -> np.ndarray:
    """The template brain dilated by ``margin_mm`` (Euclidean, in mm) on the template grid, read-only."""
    from .metrics import spacing_of
    from .templates import template_grid

    grid = template_grid()
    region = grid.brain
    if margin_mm > 0:
        distance = ndimage.distance_transform_edt(~grid.brain, sampling=spacing_of(grid.header))
        region = distance <= float(margin_mm)
    region = np.array(region, dtype=bool)
    region.setflags(write=False)
    return region


@dataclass
class Components:
    """Per connected component of a mask: voxel count, voxels inside the brain region and (when a truth was
    given) voxels inside the truth. ``labels``: the label image (0 background, k = component k − 1)."""

    labels: np.ndarray
    voxels: np.ndarray
    inside: np.ndarray
    overlap: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.voxels)


def components(mask: np.ndarray, brain: np.ndarray, *, connectivity: int = 6,
               truth: np.ndarray | None = None) -> Components:
    """The connected components of ``mask`` with their sizes, their voxels inside ``brain`` (and ``truth``)."""
    from .metrics import lesion_structure

    mask = np.asarray(mask) > 0
    if np.shape(brain) != mask.shape:
        raise ValueError(f"brain region shape {np.shape(brain)} differs from the mask's {mask.shape}")
    labels, count = ndimage.label(mask, structure=lesion_structure(connectivity))
    flat = labels.ravel()

    def per_component(weights=None) -> np.ndarray:
        values = np.bincount(flat, weights=None if weights is None else np.asarray(weights).ravel(),
                             minlength=count + 1)[1:]
        return values.astype(np.int64)

    overlap = per_component(np.asarray(truth) > 0) if truth is not None else None
    return Components(labels, per_component(), per_component(np.asarray(brain, dtype=bool)), overlap)


def kept(parts: Components, rule: PostProcessing, voxel_mm3: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per component: kept, removed as outside the brain, removed as small (boolean arrays)."""
    voxels = parts.voxels.astype(np.float64)
    outside = parts.inside < rule.min_inside_fraction * voxels
    outside |= parts.inside == 0
    small = ~outside & (voxels * float(voxel_mm3) < float(rule.min_size_mm3))
    return ~(outside | small), outside, small


def postprocess(mask: np.ndarray, rule: PostProcessing, *, brain: np.ndarray | None = None,
                voxel_mm3: float | None = None) -> tuple[np.ndarray, dict]:
    """``mask`` without the components the rule removes, and a report (``components``, ``removed_small``,
    ``removed_outside_brain``, ``voxels_removed``). ``brain`` defaults to :func:`brain_region` of the rule's
    margin and ``voxel_mm3`` to the template grid's (the mask must then be on the template grid)."""
    from .templates import template_grid

    mask = np.asarray(mask) > 0
    if brain is None:
        if mask.shape != template_grid().shape:
            raise ValueError(f"mask shape {mask.shape} is not the template grid {template_grid().shape}: give the "
                             "brain region")
        brain = brain_region(rule.brain_margin_mm)
    voxel_mm3 = template_grid().voxel_mm3 if voxel_mm3 is None else voxel_mm3
    parts = components(mask, brain, connectivity=rule.connectivity)
    keep, outside, small = kept(parts, rule, voxel_mm3)
    cleaned = np.concatenate([[False], keep])[parts.labels]
    report = {"components": len(parts), "removed_small": int(small.sum()),
              "removed_outside_brain": int(outside.sum()),
              "voxels_removed": int(parts.voxels[~keep].sum())}
    return cleaned, report


def dice_after(parts: Components, truth_voxels: int, rule: PostProcessing, voxel_mm3: float) -> float:
    """Dice of the post-processed mask from its components (``overlap`` needed): 1 when both are empty."""
    if parts.overlap is None:
        raise ValueError("components without their overlap with the truth")
    keep = kept(parts, rule, voxel_mm3)[0]
    denominator = int(parts.voxels[keep].sum()) + int(truth_voxels)
    return 1.0 if denominator == 0 else 2.0 * float(parts.overlap[keep].sum()) / denominator


def choose(scans: Sequence[tuple[Components, int]], sizes_mm3: Sequence[float], *, voxel_mm3: float,
           brain_margin_mm: float = 3.0, min_inside_fraction: float = 0.5, connectivity: int = 6,
           ) -> tuple[PostProcessing, list[dict]]:
    """The rule whose minimum size gives the best mean Dice over ``scans`` (components with their overlap, and
    the truth's voxel count, per dev scan); ties → the smallest size. Returns the rule and one row per size
    (``min_size_mm3, dev_dice, components_removed``). Without scans: size 0."""
    sizes = sorted({float(s) for s in sizes_mm3})
    rows = []
    best: tuple[float, PostProcessing] | None = None
    for size in sizes:
        rule = PostProcessing(size, float(brain_margin_mm), float(min_inside_fraction), int(connectivity))
        if not scans:
            rows.append({"min_size_mm3": size, "dev_dice": None, "components_removed": 0})
            continue
        scores = [dice_after(parts, truth, rule, voxel_mm3) for parts, truth in scans]
        removed = sum(int((~kept(parts, rule, voxel_mm3)[0]).sum()) for parts, _ in scans)
        mean = float(np.mean(scores))
        rows.append({"min_size_mm3": size, "dev_dice": mean, "components_removed": removed})
        if best is None or round(mean, 12) > round(best[0], 12):
            best = (mean, rule)
    if best is None:
        return PostProcessing(0.0, float(brain_margin_mm), float(min_inside_fraction), int(connectivity)), rows
    return best[1], rows


def choice_record(scans: Sequence[tuple[Components, int]], sizes_mm3: Sequence[float], *, voxel_mm3: float,
                  brain_margin_mm: float, min_inside_fraction: float, threshold: float, model: str,
                  connectivity: int = 6) -> dict:
    """The content of ``postprocess.json``: the rule chosen on the dev scans (:func:`choose`), how and why."""
    rule, grid = choose(scans, sizes_mm3, voxel_mm3=voxel_mm3, brain_margin_mm=brain_margin_mm,
                        min_inside_fraction=min_inside_fraction, connectivity=connectivity)
    raw = [(1.0 if (p.voxels.sum() + t) == 0 else 2.0 * float(p.overlap.sum()) / float(p.voxels.sum() + t))
           for p, t in scans]
    chosen = next((row for row in grid if row["min_size_mm3"] == rule.min_size_mm3), {})
    if scans:
        reason = (f"best mean dev Dice over {len(scans)} dev scan{'s' if len(scans) != 1 else ''} of "
                  f"{len(grid)} minimum sizes (ties: the smallest)")
    else:
        reason = "no dev scans: no size can be chosen, so 0 mm³ (only components outside the brain are removed)"
    return {
        "postprocessing": rule.to_dict(), "rule": RULE, "description": rule.describe(),
        "chosen_on": "dev" if scans else "default", "reason": reason, "n_dev_scans": len(scans),
        "min_size_voxels": int(math.ceil(rule.min_size_mm3 / voxel_mm3)) if voxel_mm3 else None,
        "voxel_mm3": float(voxel_mm3), "threshold": float(threshold), "model": model,
        "dev_dice_raw": float(np.mean(raw)) if raw else None, "dev_dice": chosen.get("dev_dice"),
        "grid": grid,
    }


def save_choice(record: dict, run_dir: os.PathLike | str) -> Path:
    return tables.write_json(record, Path(run_dir) / POSTPROCESS_FILE)


def load_choice(run_dir: os.PathLike | str) -> tuple[PostProcessing, dict] | None:
    """The rule a run chose (``RUN_DIR/postprocess.json``) and its record; ``None`` for a run without one (trained
    by an older version, or unfinished)."""
    path = Path(run_dir) / POSTPROCESS_FILE
    if not path.is_file():
        return None
    try:
        record = tables.read_json(path)
        return PostProcessing.from_dict(record["postprocessing"]), record
    except (ValueError, KeyError, TypeError) as exc:
        raise io.InputError(path, f"not a post-processing record ({type(exc).__name__}: {exc})") from exc
