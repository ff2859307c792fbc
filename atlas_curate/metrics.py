"""Segmentation metrics: overlap, surface distance, volume and lesion-wise scores, bootstrap summaries.

Definitions (prediction P, reference/truth T, both on the same voxel grid):

* **Masks** are boolean after ``> 0``. ``spacing`` is the voxel size in mm along each array axis (from the
  image affine, :func:`spacing_of`); all distances are in mm and all volumes in mm³ (voxel count × the
  product of the spacing).
* **Voxel overlap**: TP = |P ∩ T|, FP = |P \\ T|, FN = |T \\ P| (voxel counts).
  DSC = 2TP / (2TP + FP + FN); TPR (sensitivity, recall) = TP / (TP + FN); precision = TP / (TP + FP).
* **Surfaces**: the surface of a mask is the mask minus its binary erosion with the 3-D 6-connected
  structuring element (a cross); voxels on the array border count as surface (the erosion treats the
  outside as background). The directed surface distances A→B are, for every surface voxel of A, the
  Euclidean distance (mm, anisotropic spacing honoured) to the nearest surface voxel of B, computed with
  an exact Euclidean distance transform (``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``).
* **HD** (Hausdorff distance) = the maximum of both directed sets (= max of their union).
  **HD95** (``hd95``) = max(p95(P→T), p95(T→P)): the larger of the two directed 95th percentiles (numpy's
  default linear interpolation), the convention of Metrics Reloaded (Maier-Hein et al. 2024), MONAI
  (``compute_hausdorff_distance(percentile=95)``) and DeepMind's ``surface-distance`` package (which also
  weighs surface elements by their area, so its values can still differ slightly).
  ``hd95_pooled`` = the 95th percentile of the *union* of both directed sets: MedPy's ``hd95``, which uses the
  same surface and distance definitions. The two agree when the surfaces are alike and differ when one
  surface is much larger than the other (the pooled percentile is then dominated by the larger surface).
  **ASSD** (average symmetric surface distance) = the mean of that union, as defined for the MICCAI 2007
  segmentation challenges (Heimann et al. 2009), so each surface voxel of either mask weighs the same;
  MedPy's ``assd`` (from version 0.5) and MONAI's ``compute_average_surface_distance(symmetric=True)``
  compute the same pooled mean. (MedPy 0.4's ``assd`` averaged the two directed means instead; that
  quantity is Metrics Reloaded's MASD, mean average surface distance, which differs when the surfaces
  differ in size.)
* **Volumes**: ``volume_diff_mm3`` = V(P) − V(T) (signed; positive = over-segmentation);
  ``abs_volume_diff_mm3`` = |V(P) − V(T)|. ``volume_diff_voxels`` and ``abs_volume_diff_voxels`` are the
  same in voxels, |ΣP − ΣT|, the unit of the ATLAS 2022 challenge's "volume difference" (on its 1 mm
  template grid a voxel is 1 mm³).
* **Lesion-wise**: lesions are the connected components of each mask (``scipy.ndimage.label``). A truth
  lesion that shares at least one voxel with P is a lesion TP, one that shares none is a lesion FN; a
  predicted component sharing no voxel with T is a lesion FP. Lesion F1 = TP / (TP + (FP + FN) / 2)
  (= 2TP / (2TP + FP + FN)). A truth lesion split into several predicted components counts once as TP (and
  none of the pieces is a FP); one predicted component covering several truth lesions makes each of them a
  TP. ``lesion_count_diff`` = |#components(T) − #components(P)| (the challenge's "simple lesion count").
  ``connectivity`` chooses which voxels touch:

  - ``6`` (the default): voxels sharing a face. This is the ATLAS R2.0 / MICCAI 2022 challenge scorer
    (``isles/scoring.py`` of npnl/atlas2_grand_challenge, final version), which calls
    ``scipy.ndimage.label`` with its default structure, the 6-connected cross; the leaderboard's lesion-wise
    F1 and lesion count difference are computed this way.
  - ``26``: voxels sharing a face, an edge or a corner (full 3×3×3 structure), the ISLES'22 scorer
    (ezequieldlrosa/isles22, ``cc3d`` with ``connectivity=26``); same TP/FP/FN rules.

  Example: truth = one voxel, prediction = that voxel plus one touching it only at a corner. With 6
  connectivity the prediction has two lesions, one of them a FP: F1 = 1 / (1 + 1/2) = 0.667 and the count
  difference is 1; with 26 connectivity F1 = 1 and the count difference 0.

Empty masks (conventions, chosen so that a score is never invented where it is undefined):

* **Both empty**: DSC = 1 and lesion F1 = 1 (the prediction is exactly right; the challenge scorer also
  gives 1 to both); HD = HD95 = ASSD = 0 (the masks are identical, so no surface disagrees);
  TPR and precision are 0/0 and stay NaN: they are rates over positives that do not exist.
* **Exactly one empty**: DSC = 0 and lesion F1 = 0 (every lesion is missed or false); HD, both HD95s and
  ASSD are NaN, because the distance to an empty surface is undefined (infinite) and any finite stand-in
  (image diagonal, a fixed penalty) would be arbitrary and would swamp a mean. TPR and precision follow
  their formulas (truth empty: TPR = NaN, precision = 0; prediction empty: TPR = 0, precision = NaN).
* NaNs are dropped by :func:`bootstrap_ci` and :func:`summarize`, whose ``n`` column says how many scans
  each summary rests on.

Summaries: :func:`micro_dsc` pools voxels over all scans (2ΣTP / (2ΣTP + ΣFP + ΣFN)), so large lesions
weigh more than in the per-scan (macro) mean. :func:`bootstrap_ci` is a seeded percentile bootstrap
(resample scans with replacement, ``n_resamples`` times, take the (1 − level)/2 and (1 + level)/2
percentiles of the statistic). :data:`CHALLENGE_WINNER` holds the 2022 challenge winner's published scores
for comparison; they are comparable only with ``connectivity=6``.

Speed: surface distances and connected components are computed on the bounding box of P ∪ T. The result
is exactly that of the whole volume: every surface voxel and every component lies in the box, and the
erosion sees the same neighbourhood (beyond the box both masks are background, which is also how the
erosion treats the outside of the array or of the box). When the box still holds more than
:data:`EDT_MAX_VOXELS` voxels (typically false-positive specks scattered over the brain, where two
whole-volume distance transforms take seconds), the nearest-surface-voxel distances are found with a k-d
tree over the surface voxels' mm coordinates instead; both are exact Euclidean distances, so the choice
changes the time, not the values (beyond floating-point rounding).
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Iterable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.affines import voxel_sizes
from scipy import ndimage
from scipy.spatial import cKDTree

from .io import InputError, grid_difference, read_mask

Spacing = tuple[float, float, float]

SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)   # 6-connected cross
LESION_CONNECTIVITY = 6                                       # the ATLAS 2022 challenge scorer's
LESION_STRUCTURES: dict[int, np.ndarray] = {
    6: ndimage.generate_binary_structure(3, 1),    # faces only: scipy.ndimage.label's default (ATLAS 2022)
    26: np.ones((3, 3, 3), dtype=bool),            # faces, edges and corners (ISLES'22)
}
LESION_CONVENTIONS: dict[int, str] = {
    6: "ATLAS R2.0 / MICCAI 2022 challenge scorer: 6-connected lesions (scipy.ndimage.label default)",
    26: "ISLES'22 scorer: 26-connected lesions (cc3d connectivity=26)",
}
HD_PERCENTILE = 95.0
EDT_MAX_VOXELS = 2_000_000   # larger boxes use the k-d tree (same exact distances, time independent of the box)

CHALLENGE_WINNER: dict[str, float] = {
    "dsc": 0.667,
    "lesion_f1": 0.564,
    "lesion_count_diff": 4.54,
    "abs_volume_diff_voxels": 8805.0,
}
"""Scores of the MICCAI 2022 ATLAS challenge winner (nnU-Net with post-processing), means over the test set, as
the challenge scored them: lesion-wise figures with 6-connected lesions, volume difference in voxels."""

SCAN_METRIC_KEYS = (
    "dsc", "hd", "hd95", "hd95_pooled", "assd", "tpr", "precision",
    "volume_pred_mm3", "volume_truth_mm3", "volume_diff_mm3", "abs_volume_diff_mm3",
    "volume_diff_voxels", "abs_volume_diff_voxels",
    "lesion_f1", "lesion_tp", "lesion_fp", "lesion_fn", "lesion_count_pred", "lesion_count_truth",
    "lesion_count_diff", "tp_voxels", "fp_voxels", "fn_voxels",
)
AGREEMENT_COLUMNS = (
    "a", "b", "dsc", "hd", "hd95", "hd95_pooled", "assd", "volume_a_mm3", "volume_b_mm3", "volume_diff_mm3",
    "abs_volume_diff_mm3", "volume_a_voxels", "volume_b_voxels", "volume_diff_voxels", "abs_volume_diff_voxels",
    "lesion_f1", "lesion_count_diff", "lesion_count_a", "lesion_count_b", "lesion_connectivity",
)


# --------------------------------------------------------------------------------------------- helpers

def _as_masks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"expected 3-D masks, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def _spacing(spacing: Sequence[float]) -> Spacing:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def _crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union."""
    union = a | b
    box = []
    for axis in range(3):
        hits = np.flatnonzero(union.any(axis=tuple(i for i in range(3) if i != axis)))
        if hits.size == 0:   # both empty: one background voxel keeps every later step well defined
            return a[:1, :1, :1], b[:1, :1, :1]
        box.append(slice(hits[0], hits[-1] + 1))
    return a[tuple(box)], b[tuple(box)]


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=SURFACE_STRUCTURE, border_value=0)


def _directed(surface_from: np.ndarray, surface_to: np.ndarray, spacing: Spacing) -> np.ndarray:
    if not surface_from.any():
        return np.zeros(0)
    if not surface_to.any():
        return np.full(int(surface_from.sum()), np.inf)   # distance to an empty set: inf over nothing
    if surface_to.size <= EDT_MAX_VOXELS:
        distance = ndimage.distance_transform_edt(~surface_to, sampling=spacing)
        return np.asarray(distance[surface_from], dtype=float)
    # a box this large means voxels scattered over the brain: nearest surface voxel by k-d tree instead
    scale = np.asarray(spacing, dtype=float)
    tree = cKDTree(np.argwhere(surface_to) * scale)
    distance, _ = tree.query(np.argwhere(surface_from) * scale, k=1)
    return np.asarray(distance, dtype=float)


def _surface_distances_cropped(a: np.ndarray, b: np.ndarray, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    surface_a, surface_b = _surface(a), _surface(b)
    return _directed(surface_a, surface_b, spacing), _directed(surface_b, surface_a, spacing)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else float("nan")


def lesion_structure(connectivity: int = LESION_CONNECTIVITY) -> np.ndarray:
    """The ``scipy.ndimage.label`` structure of a lesion connectivity: 6 (ATLAS 2022) or 26 (ISLES'22)."""
    try:
        return LESION_STRUCTURES[int(connectivity)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"lesion connectivity must be 6 (ATLAS 2022 challenge) or 26 (ISLES'22), "
                         f"got {connectivity!r}") from None


# --------------------------------------------------------------------------------------------- per scan

def spacing_of(img: nib.spatialimages.SpatialImage) -> Spacing:
    """Voxel sizes (mm) along the array axes: the column norms of the affine (header zooms may disagree)."""
    return _spacing(voxel_sizes(np.asarray(img.affine)))


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(a → b, b → a)``, one value per surface voxel of the source.

    The surface is the mask minus its 6-connected erosion; distances come from an exact Euclidean distance
    transform with ``sampling=spacing`` on the bounding box of both masks, or an exact k-d tree search when
    that box exceeds :data:`EDT_MAX_VOXELS`. If ``b`` is empty every distance from ``a`` is ``inf`` (there is
    nothing to reach); an empty source gives an empty array.
    """
    a, b = _as_masks(a, b)
    a, b = _crop(a, b)
    return _surface_distances_cropped(a, b, _spacing(spacing))


def _lesion_counts(pred: np.ndarray, truth: np.ndarray, structure: np.ndarray) -> dict[str, float]:
    truth_labels, n_truth = ndimage.label(truth, structure=structure)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    both = pred & truth
    tp = int(np.count_nonzero(np.unique(truth_labels[both])))        # truth lesions touched by P
    pred_hitting = int(np.count_nonzero(np.unique(pred_labels[both])))  # predicted components touching T
    fn = n_truth - tp
    fp = n_pred - pred_hitting
    # the challenge scorer's formula; tp + fp + fn == 0 only when both masks are empty (its empty_value 1)
    f1 = 1.0 if tp + fp + fn == 0 else tp / (tp + (fp + fn) / 2.0)
    return {
        "lesion_f1": f1,
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_count_pred": int(n_pred),
        "lesion_count_truth": int(n_truth),
        "lesion_count_diff": abs(int(n_pred) - int(n_truth)),
    }


def lesion_wise(pred: np.ndarray, truth: np.ndarray, *, connectivity: int = LESION_CONNECTIVITY) -> dict[str, float]:
    """Lesion-wise scores of the challenge scorers (see the module docstring).

    ``connectivity=6`` (default) is the ATLAS R2.0 / MICCAI 2022 challenge scorer (6-connected lesions),
    ``connectivity=26`` the ISLES'22 scorer. Keys: ``lesion_f1, lesion_tp, lesion_fp, lesion_fn,
    lesion_count_pred, lesion_count_truth, lesion_count_diff``. Both masks empty → F1 = 1; exactly one
    empty → F1 = 0.
    """
    structure = lesion_structure(connectivity)
    pred, truth = _as_masks(pred, truth)
    pred, truth = _crop(pred, truth)
    return _lesion_counts(pred, truth, structure)


def _distance_summary(pred: np.ndarray, truth: np.ndarray, spacing: Spacing) -> dict[str, float]:
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return {"hd": 0.0, "hd95": 0.0, "hd95_pooled": 0.0, "assd": 0.0}
    if not (has_pred and has_truth):
        return {"hd": float("nan"), "hd95": float("nan"), "hd95_pooled": float("nan"), "assd": float("nan")}
    to_truth, to_pred = _surface_distances_cropped(pred, truth, spacing)
    union = np.concatenate([to_truth, to_pred])
    return {
        "hd": float(union.max()),
        # Metrics Reloaded / MONAI: the larger of the two directed percentiles
        "hd95": float(max(np.percentile(to_truth, HD_PERCENTILE), np.percentile(to_pred, HD_PERCENTILE))),
        # MedPy: one percentile of both directed sets pooled
        "hd95_pooled": float(np.percentile(union, HD_PERCENTILE)),
        "assd": float(union.mean()),
    }


def scan_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], *,
                 connectivity: int = LESION_CONNECTIVITY) -> dict[str, float]:
    """All per-scan metrics of a prediction against the truth (keys in :data:`SCAN_METRIC_KEYS`).

    ``hd95`` is the larger directed 95th percentile (Metrics Reloaded, MONAI), ``hd95_pooled`` the percentile
    of both directed sets pooled (MedPy). Lesion-wise scores use ``connectivity`` (6: the ATLAS 2022 challenge
    scorer, the default; 26: ISLES'22). Voxel counts and lesion counts are ints; everything else is a float
    (NaN where undefined, see the module docstring for the empty-mask conventions).
    """
    structure = lesion_structure(connectivity)
    pred, truth = _as_masks(pred, truth)
    spacing = _spacing(spacing)
    voxel_mm3 = float(np.prod(spacing))
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    pred, truth = _crop(pred, truth)
    tp = int(np.count_nonzero(pred & truth))
    fp, fn = n_pred - tp, n_truth - tp
    dsc = 1.0 if n_pred == 0 and n_truth == 0 else 2.0 * tp / (2.0 * tp + fp + fn)
    volume_pred, volume_truth = n_pred * voxel_mm3, n_truth * voxel_mm3
    row: dict[str, float] = {
        "dsc": dsc,
        **_distance_summary(pred, truth, spacing),
        "tpr": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "volume_pred_mm3": volume_pred,
        "volume_truth_mm3": volume_truth,
        "volume_diff_mm3": volume_pred - volume_truth,
        "abs_volume_diff_mm3": abs(volume_pred - volume_truth),
        "volume_diff_voxels": n_pred - n_truth,
        "abs_volume_diff_voxels": abs(n_pred - n_truth),
        **_lesion_counts(pred, truth, structure),
        "tp_voxels": tp,
        "fp_voxels": fp,
        "fn_voxels": fn,
    }
    return {key: row[key] for key in SCAN_METRIC_KEYS}


# --------------------------------------------------------------------------------------------- over scans

def micro_dsc(rows: Iterable[dict] | pd.DataFrame) -> float:
    """Voxel-pooled DSC over scans: 2ΣTP / (2ΣTP + ΣFP + ΣFN) from ``tp_voxels, fp_voxels, fn_voxels``.

    Accepts an iterable of :func:`scan_metrics` rows or a table with those columns. Rows with a missing
    (NaN) count, such as a scan that failed, are skipped like NaNs elsewhere. No rows → NaN; rows whose
    masks are all empty → 1 (the per-scan convention).
    """
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    tp = fp = fn = 0
    count = 0
    for row in rows:
        if any(pd.isna(row[key]) for key in ("tp_voxels", "fp_voxels", "fn_voxels")):
            continue
        tp += int(row["tp_voxels"])
        fp += int(row["fp_voxels"])
        fn += int(row["fn_voxels"])
        count += 1
    if count == 0:
        return float("nan")
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def _resampled_statistic(statistic: Callable, samples: np.ndarray) -> np.ndarray:
    try:
        result = np.asarray(statistic(samples, axis=1), dtype=float)
        if result.shape == (samples.shape[0],):
            return result
    except TypeError:   # a statistic without an ``axis`` argument
        pass
    return np.asarray([statistic(row) for row in samples], dtype=float)


def bootstrap_ci(values: np.ndarray | Sequence[float], *, statistic: Callable = np.mean, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` over ``values`` (NaNs dropped).

    Resamples the values with replacement ``n_resamples`` times from ``numpy.random.default_rng(seed)``
    and returns the (1 − level)/2 and (1 + level)/2 percentiles of the resampled statistic. No values →
    (NaN, NaN); one value → (value, value).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    data = np.asarray(values, dtype=float).ravel()
    data = data[~np.isnan(data)]
    n = data.size
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 2_000_000 // n))   # bounded memory; depends on n only → deterministic
    stats = []
    for start in range(0, n_resamples, chunk):
        draws = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        stats.append(_resampled_statistic(statistic, data[draws]))
    resampled = np.concatenate(stats)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(resampled, [tail, 100.0 - tail])
    return float(low), float(high)


def summarize(table: pd.DataFrame, columns: Sequence[str] | None = None, *, n_resamples: int = 1000,
              seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """One row per metric: ``metric, n, mean, mean_ci_low, mean_ci_high, median, median_ci_low, median_ci_high``.

    ``columns`` defaults to every numeric (non-boolean) column of ``table``. NaNs are dropped per metric
    (``n`` counts the values used); CIs are :func:`bootstrap_ci` with the same ``seed`` for every metric.
    """
    if columns is None:
        columns = [c for c in table.columns
                   if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
    records = []
    for column in columns:
        if column not in table.columns:
            raise ValueError(f"no column {column!r} in the table (columns: {list(table.columns)})")
        try:
            values = pd.to_numeric(table[column], errors="raise").to_numpy(dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"column {column!r} is not numeric") from exc
        values = values[~np.isnan(values)]
        empty = values.size == 0
        mean_ci = bootstrap_ci(values, statistic=np.mean, n_resamples=n_resamples, seed=seed, level=level)
        median_ci = bootstrap_ci(values, statistic=np.median, n_resamples=n_resamples, seed=seed, level=level)
        records.append({
            "metric": column,
            "n": int(values.size),
            "mean": float("nan") if empty else float(values.mean()),
            "mean_ci_low": mean_ci[0],
            "mean_ci_high": mean_ci[1],
            "median": float("nan") if empty else float(np.median(values)),
            "median_ci_low": median_ci[0],
            "median_ci_high": median_ci[1],
        })
    return pd.DataFrame.from_records(records, columns=[
        "metric", "n", "mean", "mean_ci_low", "mean_ci_high", "median", "median_ci_low", "median_ci_high"])


# --------------------------------------------------------------------------------------------- agreement

def agreement(paths: Sequence[str | os.PathLike], *, connectivity: int = LESION_CONNECTIVITY) -> pd.DataFrame:
    """Reliability between two or more masks of the same brain (e.g. several raters' tracings).

    One row per unordered pair ``(a, b)`` in input order (``itertools.combinations``), columns
    :data:`AGREEMENT_COLUMNS`. ``a`` is taken as the reference for the asymmetric lesion F1 (``b``'s lesions
    are scored against ``a``'s); ``volume_diff_mm3`` = V(b) − V(a) and ``volume_diff_voxels`` the same in
    voxels. DSC, HD, both HD95s, ASSD, volumes and the lesion count difference are symmetric. Lesions are
    ``connectivity``-connected (6, the default: the ATLAS 2022 challenge scorer; 26: ISLES'22); the
    ``lesion_connectivity`` column says which. Masks are ``> 0`` of the stored values; all must share the first
    mask's grid (shape, and affine within 1e-3 mm): masks are never resampled, a mismatch raises
    :class:`~atlas_curate.io.InputError` naming both files.
    """
    paths = list(paths)
    if len(paths) < 2:
        raise ValueError(f"agreement needs at least two masks, got {len(paths)}")
    masks, images = [], []
    for path in paths:
        mask, img = read_mask(path)
        if images:
            reason = grid_difference(images[0], img)
            if reason is not None:
                raise InputError(path, f"not on the grid of {paths[0]}: {reason} (masks are never resampled)")
        masks.append(mask)
        images.append(img)
    spacing = spacing_of(images[0])
    connectivity = int(connectivity)
    lesion_structure(connectivity)   # an unknown connectivity fails before any work
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(masks), 2):
        scores = scan_metrics(b, a, spacing, connectivity=connectivity)
        rows.append({
            "a": str(paths[i]),
            "b": str(paths[j]),
            "dsc": scores["dsc"],
            "hd": scores["hd"],
            "hd95": scores["hd95"],
            "hd95_pooled": scores["hd95_pooled"],
            "assd": scores["assd"],
            "volume_a_mm3": scores["volume_truth_mm3"],
            "volume_b_mm3": scores["volume_pred_mm3"],
            "volume_diff_mm3": scores["volume_diff_mm3"],
            "abs_volume_diff_mm3": scores["abs_volume_diff_mm3"],
            "volume_a_voxels": scores["tp_voxels"] + scores["fn_voxels"],
            "volume_b_voxels": scores["tp_voxels"] + scores["fp_voxels"],
            "volume_diff_voxels": scores["volume_diff_voxels"],
            "abs_volume_diff_voxels": scores["abs_volume_diff_voxels"],
            "lesion_f1": scores["lesion_f1"],
            "lesion_count_diff": scores["lesion_count_diff"],
            "lesion_count_a": scores["lesion_count_truth"],
            "lesion_count_b": scores["lesion_count_pred"],
            "lesion_connectivity": connectivity,
        })
    return pd.DataFrame.from_records(rows, columns=list(AGREEMENT_COLUMNS))
