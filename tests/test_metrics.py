"""Segmentation metrics on hand-checkable volumes, a brute-force surface-distance reference, and agreement."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import shared_fixture  # noqa: E402  (tests/ is on sys.path under pytest)
from scipy import ndimage
from scipy.spatial.distance import cdist

from atlas_curate import metrics
from atlas_curate.io import InputError, read_mask, save_nifti
from atlas_curate.metrics import (
    CHALLENGE_WINNER,
    SCAN_METRIC_KEYS,
    agreement,
    bootstrap_ci,
    lesion_wise,
    micro_dsc,
    scan_metrics,
    summarize,
    surface_distances,
)

SHAPE = (20, 20, 20)


def _box(lo, hi, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


def _brute_force(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Reference: all surface-voxel pairs, whole volume, no distance transform, no crop."""
    cross = ndimage.generate_binary_structure(3, 1)
    sa = np.argwhere(a & ~ndimage.binary_erosion(a, cross)) * np.asarray(spacing)
    sb = np.argwhere(b & ~ndimage.binary_erosion(b, cross)) * np.asarray(spacing)
    pairs = cdist(sa, sb)
    return pairs.min(axis=1), pairs.min(axis=0)


# ------------------------------------------------------------------------------------- overlap and distances

def test_identical_cubes_are_perfect():
    cube = _box((5, 5, 5), (10, 10, 10))
    m = scan_metrics(cube, cube, (1.0, 1.0, 1.0))
    assert list(m) == list(SCAN_METRIC_KEYS)
    assert m["dsc"] == 1.0 and m["tpr"] == 1.0 and m["precision"] == 1.0
    assert m["hd"] == m["hd95"] == m["assd"] == 0.0
    assert m["hd95_pooled"] == 0.0
    assert m["volume_pred_mm3"] == m["volume_truth_mm3"] == 125.0
    assert m["volume_diff_mm3"] == m["abs_volume_diff_mm3"] == 0.0
    assert m["volume_diff_voxels"] == m["abs_volume_diff_voxels"] == 0
    assert (m["tp_voxels"], m["fp_voxels"], m["fn_voxels"]) == (125, 0, 0)
    assert m["lesion_f1"] == 1.0 and m["lesion_count_diff"] == 0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (0.5, 2.0, 1.5)])
def test_cubes_offset_along_one_axis(spacing):
    # 6×6×4 boxes, the second shifted 2 voxels along z: overlap 2 of 4 slices
    truth = _box((4, 4, 2), (10, 10, 6))
    pred = _box((4, 4, 4), (10, 10, 8))
    m = scan_metrics(pred, truth, spacing)
    assert m["dsc"] == pytest.approx(2 * 72 / (144 + 144))
    assert m["tpr"] == pytest.approx(0.5) and m["precision"] == pytest.approx(0.5)
    # the far z-face of each box lies 2 slices from the other's near face, with nothing closer
    assert m["hd"] == pytest.approx(2 * spacing[2])
    voxel = float(np.prod(spacing))
    assert m["volume_pred_mm3"] == pytest.approx(144 * voxel)
    assert m["volume_diff_mm3"] == pytest.approx(0.0)
    assert (m["tp_voxels"], m["fp_voxels"], m["fn_voxels"]) == (72, 72, 72)


def test_offset_along_x_uses_x_spacing():
    truth = _box((2, 4, 4), (8, 10, 10))
    pred = _box((5, 4, 4), (11, 10, 10))
    m = scan_metrics(pred, truth, (2.5, 1.0, 1.0))
    assert m["hd"] == pytest.approx(3 * 2.5)
    assert m["dsc"] == pytest.approx(2 * 3 / 12)


def test_cube_versus_centred_sub_cube_by_hand():
    truth = _box((3, 3, 3), (9, 9, 9))    # 6³ = 216
    pred = _box((4, 4, 4), (8, 8, 8))     # 4³ = 64, one voxel inside on every side
    m = scan_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert m["dsc"] == pytest.approx(128 / 280)
    assert m["tpr"] == pytest.approx(64 / 216) and m["precision"] == 1.0
    assert m["volume_diff_mm3"] == -152.0 and m["abs_volume_diff_mm3"] == 152.0
    assert m["volume_diff_voxels"] == -152 and m["abs_volume_diff_voxels"] == 152
    # truth shell (152 voxels): 96 face voxels at 1, 48 edge voxels at √2, 8 corners at √3 from the sub-cube's
    # shell; the sub-cube's 56 shell voxels all lie 1 from the truth shell
    union = np.array([1.0] * (96 + 56) + [math.sqrt(2)] * 48 + [math.sqrt(3)] * 8)
    assert m["hd"] == pytest.approx(math.sqrt(3))
    # pooled (MedPy): rank 0.95 · 207 = 196.65 falls among the 48 values √2 (ranks 152..199)
    assert m["hd95_pooled"] == pytest.approx(np.percentile(union, 95))
    assert m["hd95_pooled"] == pytest.approx(math.sqrt(2))
    # max of directed percentiles (Metrics Reloaded, MONAI): truth → prediction, 152 sorted values, rank
    # 0.95 · 151 = 143.45 lies between the last √2 (rank 143) and the first √3 (rank 144); prediction → truth
    # is 1 everywhere
    truth_p95 = math.sqrt(2) + 0.45 * (math.sqrt(3) - math.sqrt(2))
    assert m["hd95"] == pytest.approx(max(truth_p95, 1.0)) and m["hd95"] == pytest.approx(1.5572, abs=1e-4)
    assert m["assd"] == pytest.approx((152 + 48 * math.sqrt(2) + 8 * math.sqrt(3)) / 208)
    to_pred, to_truth = surface_distances(truth, pred, (1.0, 1.0, 1.0))
    assert to_pred.size == 152 and to_truth.size == 56
    assert np.all(to_truth == 1.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.9)])
def test_surface_distances_match_brute_force(spacing):
    rng = np.random.default_rng(7)
    shape = (14, 12, 10)
    a = ndimage.binary_opening(rng.random(shape) > 0.55)
    b = ndimage.binary_opening(rng.random(shape) > 0.6)
    a[0, :3, :3] = True      # touch the array border: it must count as surface, crop or not
    b[-1, -2:, -3:] = True
    got_ab, got_ba = surface_distances(a, b, spacing)
    want_ab, want_ba = _brute_force(a, b, spacing)
    np.testing.assert_allclose(np.sort(got_ab), np.sort(want_ab), atol=1e-9)
    np.testing.assert_allclose(np.sort(got_ba), np.sort(want_ba), atol=1e-9)
    union = np.concatenate([want_ab, want_ba])     # HD, pooled HD95 and ASSD pool both directed sets
    m = scan_metrics(a, b, spacing)
    assert m["hd"] == pytest.approx(union.max())
    # hd95 is now the larger directed percentile (Metrics Reloaded / MONAI); the pooled one moved to hd95_pooled
    assert m["hd95"] == pytest.approx(max(np.percentile(want_ab, 95), np.percentile(want_ba, 95)))
    assert m["hd95_pooled"] == pytest.approx(np.percentile(union, 95))
    assert m["hd95_pooled"] != pytest.approx(max(np.percentile(want_ab, 95), np.percentile(want_ba, 95)))
    assert m["assd"] == pytest.approx(union.mean())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.9)])
def test_kd_tree_path_for_large_boxes_matches_brute_force(monkeypatch, spacing):
    rng = np.random.default_rng(11)
    a = rng.random((15, 13, 11)) > 0.9       # scattered specks: the case the k-d tree is for
    b = ndimage.binary_opening(rng.random((15, 13, 11)) > 0.5)
    edt = surface_distances(a, b, spacing)
    monkeypatch.setattr(metrics, "EDT_MAX_VOXELS", 0)
    kd = surface_distances(a, b, spacing)
    for got, want, other in zip(kd, _brute_force(a, b, spacing), edt):
        np.testing.assert_allclose(np.sort(got), np.sort(want), atol=1e-9)
        np.testing.assert_allclose(got, other, atol=1e-9)    # same voxel order as the transform path


def test_array_border_is_background_for_the_surface():
    corner = _box((0, 0, 0), (4, 4, 4))          # fills a corner of the array
    inner = _box((1, 1, 1), (3, 3, 3))
    to_inner, to_corner = surface_distances(corner, inner, (1, 1, 1))
    assert to_inner.size == 64 - 8 and to_corner.size == 8
    assert np.all(to_corner == 1.0) and to_inner.max() == pytest.approx(math.sqrt(3))


def test_crop_does_not_change_distances():
    small = (_box((10, 11, 12), (14, 15, 16), (40, 40, 40)), _box((25, 20, 12), (30, 27, 18), (40, 40, 40)))
    ab, ba = surface_distances(*small, (1.2, 0.9, 2.0))
    want_ab, want_ba = _brute_force(*small, (1.2, 0.9, 2.0))
    np.testing.assert_allclose(np.sort(ab), np.sort(want_ab))
    np.testing.assert_allclose(np.sort(ba), np.sort(want_ba))


def test_surface_distances_to_empty_mask():
    cube = _box((2, 2, 2), (5, 5, 5))
    empty = np.zeros(SHAPE, bool)
    to_empty, from_empty = surface_distances(cube, empty, (1, 1, 1))
    assert to_empty.size == 26 and np.all(np.isinf(to_empty)) and from_empty.size == 0


def test_both_empty_convention():
    empty = np.zeros(SHAPE, bool)
    m = scan_metrics(empty, empty, (1, 1, 1))
    assert m["dsc"] == 1.0 and m["lesion_f1"] == 1.0
    assert m["hd"] == m["hd95"] == m["assd"] == 0.0
    assert m["hd95_pooled"] == 0.0 and m["abs_volume_diff_voxels"] == 0
    assert math.isnan(m["tpr"]) and math.isnan(m["precision"])
    assert m["lesion_count_diff"] == 0 and m["abs_volume_diff_mm3"] == 0.0


def test_one_empty_convention():
    cube = _box((2, 2, 2), (5, 5, 5))
    empty = np.zeros(SHAPE, bool)
    missed = scan_metrics(empty, cube, (1, 1, 2))          # prediction empty
    assert missed["dsc"] == 0.0 and missed["lesion_f1"] == 0.0 and missed["tpr"] == 0.0
    assert math.isnan(missed["precision"])
    assert all(math.isnan(missed[k]) for k in ("hd", "hd95", "hd95_pooled", "assd"))
    assert (missed["lesion_fn"], missed["lesion_count_diff"]) == (1, 1)
    assert missed["volume_diff_mm3"] == -54.0
    spurious = scan_metrics(cube, empty, (1, 1, 1))        # truth empty
    assert spurious["dsc"] == 0.0 and spurious["precision"] == 0.0 and math.isnan(spurious["tpr"])
    assert (spurious["lesion_fp"], spurious["lesion_tp"], spurious["lesion_f1"]) == (1, 0, 0.0)


def test_values_above_zero_are_foreground_and_shapes_must_match():
    cube = _box((2, 2, 2), (5, 5, 5)).astype(np.float32) * 0.01   # the VOI 100 × 0.01 flavour, scaled
    assert scan_metrics(cube, cube > 0, (1, 1, 1))["dsc"] == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        scan_metrics(cube, cube[:-1], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        scan_metrics(cube, cube, (1, 0, 1))


# ------------------------------------------------------------------------------------- lesion-wise

def test_lesion_wise_miss_split_and_false_blob():
    truth = _box((1, 1, 1), (4, 4, 4)) | _box((8, 1, 1), (14, 5, 5)) | _box((1, 10, 1), (5, 14, 5))
    pred = (_box((8, 1, 1), (10, 5, 5)) | _box((12, 1, 1), (14, 5, 5))   # the second lesion split in two
            | _box((2, 11, 2), (4, 13, 4))                               # inside the third
            | _box((15, 15, 15), (18, 18, 18)))                          # false blob; the first is missed
    got = lesion_wise(pred, truth)
    assert (got["lesion_tp"], got["lesion_fp"], got["lesion_fn"]) == (2, 1, 1)
    assert got["lesion_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert (got["lesion_count_pred"], got["lesion_count_truth"], got["lesion_count_diff"]) == (4, 3, 1)
    assert scan_metrics(pred, truth, (1, 1, 1))["lesion_f1"] == got["lesion_f1"]


def test_one_prediction_covering_two_lesions_detects_both():
    truth = _box((2, 2, 2), (4, 4, 4)) | _box((6, 2, 2), (8, 4, 4))
    pred = _box((2, 2, 2), (8, 4, 4))
    got = lesion_wise(pred, truth)
    assert (got["lesion_tp"], got["lesion_fp"], got["lesion_fn"], got["lesion_count_diff"]) == (2, 0, 0, 1)
    assert got["lesion_f1"] == 1.0


def test_26_connectivity_corner_and_edge_contacts_join_lesions():
    # (26 is no longer the default, so it is asked for here; the default, 6, is tested below)
    corner = _box((2, 2, 2), (4, 4, 4)) | _box((4, 4, 4), (6, 6, 6))   # touch at one corner only
    edge = _box((2, 2, 2), (4, 4, 4)) | _box((4, 4, 2), (6, 6, 4))     # touch along an edge only
    assert ndimage.label(corner)[1] == 2                                # 6-connectivity would split it
    for mask in (corner, edge):
        got = lesion_wise(mask, mask, connectivity=26)
        assert got["lesion_count_truth"] == got["lesion_count_pred"] == 1
    apart = _box((2, 2, 2), (4, 4, 4)) | _box((5, 5, 5), (7, 7, 7))    # a gap of one voxel
    assert lesion_wise(apart, corner, connectivity=26)["lesion_count_pred"] == 2
    assert lesion_wise(apart, corner, connectivity=26)["lesion_count_diff"] == 1


def _voxels(*points, shape=(8, 8, 8)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for point in points:
        mask[point] = True
    return mask


def _challenge_reference(truth: np.ndarray, pred: np.ndarray, structure=None) -> tuple[float, int]:
    """The ATLAS 2022 scorer's rules written out: label each mask (scipy's default structure unless given),
    loop over the lesions; returns (F1, |#true - #pred|)."""
    truth_labels, n_truth = ndimage.label(truth, structure=structure)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    tp = sum(bool((pred & (truth_labels == k)).any()) for k in range(1, n_truth + 1))
    fn = n_truth - tp
    fp = sum(not (truth & (pred_labels == k)).any() for k in range(1, n_pred + 1))
    f1 = 1.0 if tp + fp + fn == 0 else tp / (tp + (fp + fn) / 2)
    return f1, abs(n_truth - n_pred)


def test_default_is_the_atlas_scorer_corner_contact_is_two_lesions():
    """Truth = one voxel; prediction = that voxel and one touching it only at a corner."""
    truth = _voxels((3, 3, 3))
    pred = _voxels((3, 3, 3), (4, 4, 4))
    atlas = lesion_wise(pred, truth)
    assert atlas == lesion_wise(pred, truth, connectivity=6)
    # 6-connected: the corner voxel is a second predicted lesion touching no true voxel
    assert (atlas["lesion_tp"], atlas["lesion_fp"], atlas["lesion_fn"]) == (1, 1, 0)
    assert atlas["lesion_f1"] == pytest.approx(1 / (1 + (1 + 0) / 2)) and round(atlas["lesion_f1"], 3) == 0.667
    assert (atlas["lesion_count_truth"], atlas["lesion_count_pred"], atlas["lesion_count_diff"]) == (1, 2, 1)
    # 26-connected (ISLES'22): one predicted lesion, detected
    isles = lesion_wise(pred, truth, connectivity=26)
    assert (isles["lesion_tp"], isles["lesion_fp"], isles["lesion_fn"]) == (1, 0, 0)
    assert isles["lesion_f1"] == 1.0 and isles["lesion_count_diff"] == 0
    # voxel overlap does not depend on the convention: DSC = 2·1 / (1 + 2)
    m6, m26 = scan_metrics(pred, truth, (1, 1, 1)), scan_metrics(pred, truth, (1, 1, 1), connectivity=26)
    assert m6["dsc"] == m26["dsc"] == pytest.approx(2 / 3)
    assert m6["lesion_f1"] == atlas["lesion_f1"] and m26["lesion_f1"] == 1.0
    assert _challenge_reference(truth, pred) == (pytest.approx(atlas["lesion_f1"]), atlas["lesion_count_diff"])


@pytest.mark.parametrize("step", [(1, 1, 1), (1, 1, 0)])     # corner contacts, edge contacts
def test_diagonal_chain_is_one_lesion_only_with_26_connectivity(step):
    chain = [tuple(i * np.asarray(step) + 1) for i in range(4)]   # 4 voxels, each touching the next diagonally
    truth = _voxels(*chain)
    pred = _voxels(chain[0])                                      # only the first voxel found
    atlas = lesion_wise(pred, truth)
    # 6-connected: 4 true lesions, 1 detected, 3 missed: F1 = 1 / (1 + 3/2) = 0.4; counts 4 vs 1
    assert (atlas["lesion_count_truth"], atlas["lesion_tp"], atlas["lesion_fn"], atlas["lesion_fp"]) == (4, 1, 3, 0)
    assert atlas["lesion_f1"] == pytest.approx(1 / (1 + 3 / 2)) and atlas["lesion_count_diff"] == 3
    # 26-connected: one chain, touched: F1 = 1, counts 1 vs 1
    isles = lesion_wise(pred, truth, connectivity=26)
    assert (isles["lesion_count_truth"], isles["lesion_tp"], isles["lesion_fn"]) == (1, 1, 0)
    assert isles["lesion_f1"] == 1.0 and isles["lesion_count_diff"] == 0
    assert _challenge_reference(truth, pred) == (pytest.approx(0.4), 3)


def test_detached_corner_speck():
    cube = _box((2, 2, 2), (5, 5, 5), (9, 9, 9))       # voxels 2..4
    speck = _voxels((5, 5, 5), shape=(9, 9, 9))       # touches the cube's corner (4, 4, 4) only at a corner
    # the speck in the prediction: a false positive lesion with 6-connectivity, part of the cube with 26
    atlas = lesion_wise(cube | speck, cube)
    assert (atlas["lesion_tp"], atlas["lesion_fp"], atlas["lesion_fn"], atlas["lesion_count_diff"]) == (1, 1, 0, 1)
    assert atlas["lesion_f1"] == pytest.approx(2 / 3)
    isles = lesion_wise(cube | speck, cube, connectivity=26)
    assert (isles["lesion_fp"], isles["lesion_f1"], isles["lesion_count_diff"]) == (0, 1.0, 0)
    # the speck in the truth: a missed lesion with 6-connectivity
    atlas = lesion_wise(cube, cube | speck)
    assert (atlas["lesion_tp"], atlas["lesion_fn"], atlas["lesion_fp"], atlas["lesion_count_diff"]) == (1, 1, 0, 1)
    assert atlas["lesion_f1"] == pytest.approx(1 / (1 + 1 / 2))
    assert lesion_wise(cube, cube | speck, connectivity=26)["lesion_f1"] == 1.0
    # volume difference: one voxel either way, whatever the connectivity
    m = scan_metrics(cube | speck, cube, (1.0, 2.0, 3.0))
    assert m["volume_diff_voxels"] == m["abs_volume_diff_voxels"] == 1 and m["abs_volume_diff_mm3"] == 6.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_anisotropic_voxels_distances_volumes_and_lesions(axis):
    """Truth = one voxel; prediction = it and a voxel 3 voxels away along ``axis`` (spacing 0.5 × 1 × 2.5 mm)."""
    spacing = (0.5, 1.0, 2.5)
    far = [4, 4, 4]
    far[axis] += 3
    truth, pred = _voxels((4, 4, 4), shape=(10, 10, 10)), _voxels((4, 4, 4), tuple(far), shape=(10, 10, 10))
    d = 3 * spacing[axis]
    m = scan_metrics(pred, truth, spacing)
    # directed sets: prediction → truth {0, d}, truth → prediction {0}; every voxel is its own surface
    assert m["hd"] == pytest.approx(d)
    assert m["hd95"] == pytest.approx(0.95 * d)              # p95 of {0, d}: rank 0.95 → 0.95 d
    assert m["hd95_pooled"] == pytest.approx(0.9 * d)       # p95 of {0, 0, d}: rank 1.9 → 0.9 d
    assert m["assd"] == pytest.approx(d / 3)
    assert m["dsc"] == pytest.approx(2 / 3)
    assert m["volume_diff_voxels"] == 1 and m["volume_diff_mm3"] == pytest.approx(0.5 * 1.0 * 2.5)
    for connectivity in (6, 26):   # a gap: two lesions either way, and the spacing plays no part
        got = scan_metrics(pred, truth, spacing, connectivity=connectivity)
        assert (got["lesion_count_pred"], got["lesion_fp"], got["lesion_f1"]) == (2, 1, pytest.approx(2 / 3))


@pytest.mark.parametrize("connectivity", [6, 26])
def test_empty_cases_for_both_connectivities(connectivity):
    empty = np.zeros((6, 6, 6), bool)
    speck = _voxels((2, 2, 2), (3, 3, 3), shape=(6, 6, 6))    # corner-touching: 2 lesions (6) or 1 (26)
    lesions = 2 if connectivity == 6 else 1
    both = scan_metrics(empty, empty, (1, 1, 1), connectivity=connectivity)
    assert (both["dsc"], both["lesion_f1"], both["lesion_count_diff"]) == (1.0, 1.0, 0)
    assert both["hd95"] == both["hd95_pooled"] == 0.0
    spurious = scan_metrics(speck, empty, (1, 1, 1), connectivity=connectivity)
    assert (spurious["dsc"], spurious["lesion_f1"]) == (0.0, 0.0)
    assert (spurious["lesion_fp"], spurious["lesion_count_diff"]) == (lesions, lesions)
    assert math.isnan(spurious["hd95"]) and math.isnan(spurious["hd95_pooled"])
    assert spurious["abs_volume_diff_voxels"] == 2
    missed = scan_metrics(empty, speck, (1, 1, 1), connectivity=connectivity)
    assert (missed["lesion_f1"], missed["lesion_fn"], missed["lesion_count_diff"]) == (0.0, lesions, lesions)


def test_lesion_wise_matches_the_scorers_rules_on_random_masks():
    rng = np.random.default_rng(5)
    for _ in range(5):
        truth = rng.random((12, 11, 10)) > 0.93
        pred = rng.random((12, 11, 10)) > 0.93
        for connectivity, structure in ((6, None), (26, np.ones((3, 3, 3)))):
            got = lesion_wise(pred, truth, connectivity=connectivity)
            f1, count_diff = _challenge_reference(truth, pred, structure)
            assert got["lesion_f1"] == pytest.approx(f1) and got["lesion_count_diff"] == count_diff
        assert lesion_wise(pred, truth)["lesion_count_truth"] > lesion_wise(pred, truth, connectivity=26)[
            "lesion_count_truth"]


def test_unknown_connectivity_is_refused():
    cube = _box((2, 2, 2), (4, 4, 4))
    for bad in (4, 18, "six"):
        with pytest.raises(ValueError, match="connectivity"):
            lesion_wise(cube, cube, connectivity=bad)
    with pytest.raises(ValueError, match="connectivity"):
        scan_metrics(cube, cube, (1, 1, 1), connectivity=8)


# ------------------------------------------------------------------------------------- over scans

def test_micro_dsc_by_hand():
    rows = [{"tp_voxels": 10, "fp_voxels": 0, "fn_voxels": 10},
            {"tp_voxels": 0, "fp_voxels": 5, "fn_voxels": 0},
            {"tp_voxels": 90, "fp_voxels": 5, "fn_voxels": 0}]
    want = 2 * 100 / (2 * 100 + 10 + 10)
    assert micro_dsc(rows) == pytest.approx(want)
    assert micro_dsc(pd.DataFrame(rows)) == pytest.approx(want)
    assert micro_dsc(iter(rows)) == pytest.approx(want)
    assert micro_dsc(rows + [{"tp_voxels": np.nan, "fp_voxels": np.nan, "fn_voxels": np.nan}]) == pytest.approx(want)
    assert micro_dsc([{"tp_voxels": 0, "fp_voxels": 0, "fn_voxels": 0}]) == 1.0
    assert math.isnan(micro_dsc([]))


def test_micro_dsc_from_scan_metrics_differs_from_macro_mean():
    big_truth, big_pred = _box((0, 0, 0), (10, 10, 10)), _box((0, 0, 0), (10, 10, 9))
    small_truth, small_pred = _box((0, 0, 0), (2, 2, 2)), _box((5, 5, 5), (7, 7, 7))
    rows = [scan_metrics(big_pred, big_truth, (1, 1, 1)), scan_metrics(small_pred, small_truth, (1, 1, 1))]
    assert micro_dsc(rows) == pytest.approx(2 * 900 / (2 * 900 + 0 + 100 + 8 + 8))
    assert micro_dsc(rows) > np.mean([r["dsc"] for r in rows])


def test_bootstrap_ci_is_seeded_contains_the_mean_and_narrows():
    rng = np.random.default_rng(1)
    few = rng.normal(0.6, 0.2, 20)
    many = rng.normal(0.6, 0.2, 500)
    ci = bootstrap_ci(few, seed=3)
    assert ci == bootstrap_ci(few, seed=3)
    assert ci != bootstrap_ci(few, seed=4)
    assert ci[0] < few.mean() < ci[1]
    wide = ci[1] - ci[0]
    narrow = np.subtract(*bootstrap_ci(many, seed=3)[::-1])
    assert narrow < wide / 2      # width ∝ 1/√n: √(500/20) = 5
    assert bootstrap_ci(few, level=0.5)[1] - bootstrap_ci(few, level=0.5)[0] < wide
    med = bootstrap_ci(few, statistic=np.median, seed=3)
    assert med[0] < np.median(few) < med[1]


def test_bootstrap_ci_drops_nans_and_handles_tiny_inputs():
    values = np.array([0.2, np.nan, 0.4, 0.6, np.nan, 0.8])
    assert bootstrap_ci(values, seed=0) == bootstrap_ci(values[~np.isnan(values)], seed=0)
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan]))
    # a statistic without an axis argument still works, and agrees with the vectorised path
    assert bootstrap_ci(values, statistic=lambda v: float(np.mean(v))) == pytest.approx(bootstrap_ci(values))
    with pytest.raises(ValueError):
        bootstrap_ci(values, level=1.5)


def test_summarize_one_row_per_metric():
    table = pd.DataFrame({"scan": ["a", "b", "c", "d"], "dsc": [0.5, 0.7, np.nan, 0.9],
                          "hd": [1.0, 2.0, 3.0, 4.0], "ok": [True, True, False, True]})
    out = summarize(table, n_resamples=200, seed=1)
    assert list(out["metric"]) == ["dsc", "hd"]
    assert list(out.columns) == ["metric", "n", "mean", "mean_ci_low", "mean_ci_high", "median",
                                 "median_ci_low", "median_ci_high"]
    dsc = out.set_index("metric").loc["dsc"]
    assert dsc["n"] == 3 and dsc["mean"] == pytest.approx(0.7) and dsc["median"] == pytest.approx(0.7)
    assert dsc["mean_ci_low"] <= dsc["mean"] <= dsc["mean_ci_high"]
    pd.testing.assert_frame_equal(out, summarize(table, n_resamples=200, seed=1))
    assert list(summarize(table, ["hd"])["metric"]) == ["hd"]
    with pytest.raises(ValueError, match="scan"):
        summarize(table, ["scan"])


def test_challenge_winner_reference():
    # the winner's volume difference is in voxels, the challenge's unit (the key said mm³ before)
    assert CHALLENGE_WINNER == {"dsc": 0.667, "lesion_f1": 0.564, "lesion_count_diff": 4.54,
                                "abs_volume_diff_voxels": 8805.0}


def test_template_sized_volume_crop_and_kdtree_paths():
    shape = (197, 233, 189)
    x, y, z = np.ogrid[:197, :233, :189]
    truth = ((x - 80) / 30) ** 2 + ((y - 110) / 40) ** 2 + ((z - 90) / 25) ** 2 <= 1   # ~125 000 voxels
    pred = np.roll(truth, 3, axis=0)
    specks = pred | (np.random.default_rng(0).random(shape) > 0.9998)   # false positives all over the grid,
    specks[0, 0, 0] = specks[-1, -1, -1] = True                          # so the box is the whole volume
    scan_metrics(pred, truth, (1, 1, 1))   # warm-up (imports, allocations)
    for case in (pred, specks):
        m = scan_metrics(case, truth, (1, 1, 1))  # speed: ~0.1 s and ~1 s on 2 cores (not asserted here)
        assert 0.9 < m["dsc"] < 1
        if case is pred:   # a translation by 3 voxels: no surface voxel is farther than 3 mm from the other
            assert m["hd"] == pytest.approx(3.0)
        else:              # a speck near the grid corner lies far from the lesion
            assert m["hd"] > 100 and m["lesion_fp"] > 1000


# ------------------------------------------------------------------------------------- agreement

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _write(path, mask, affine=AFFINE, scale=1):
    save_nifti(nib.Nifti1Image((mask * scale).astype(np.uint8), affine), path)
    return path


def test_agreement_three_masks_three_pairs(tmp_path):
    a = _box((2, 2, 2), (8, 8, 6))
    b = _box((2, 2, 3), (8, 8, 7))
    c = a | _box((12, 12, 12), (14, 14, 14))
    paths = [_write(tmp_path / "r1.nii.gz", a), _write(tmp_path / "r2.nii.gz", b, scale=100),
             _write(tmp_path / "r3.nii", c)]
    table = agreement(paths)
    assert len(table) == 3
    assert list(table[["a", "b"]].itertuples(index=False, name=None)) == [
        (str(paths[0]), str(paths[1])), (str(paths[0]), str(paths[2])), (str(paths[1]), str(paths[2]))]
    first = table.iloc[0]
    assert first["dsc"] == pytest.approx(2 * 108 / 288)
    assert first["hd"] == pytest.approx(2.0)           # one slice of 2 mm along z
    assert first["volume_a_mm3"] == first["volume_b_mm3"] == 144 * 2.0
    second = table.iloc[1]
    assert second["volume_diff_mm3"] == 8 * 2.0 and second["abs_volume_diff_mm3"] == 16.0
    assert second["lesion_count_diff"] == 1 and second["lesion_f1"] == pytest.approx(2 / 3)
    assert {"dsc", "hd", "hd95", "assd", "volume_a_mm3", "volume_b_mm3", "volume_diff_mm3",
            "abs_volume_diff_mm3", "lesion_f1", "lesion_count_diff"} <= set(table.columns)


def test_agreement_grid_mismatch_names_both_files(tmp_path):
    a = _write(tmp_path / "a.nii.gz", _box((2, 2, 2), (5, 5, 5)))
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    b = _write(tmp_path / "b.nii.gz", _box((2, 2, 2), (5, 5, 5)), affine=shifted)
    with pytest.raises(InputError) as err:
        agreement([a, b])
    assert err.value.path == b and str(a) in err.value.reason and "affine" in err.value.reason
    c = _write(tmp_path / "c.nii.gz", np.zeros((10, 10, 10), bool))
    with pytest.raises(InputError, match="shape"):
        agreement([a, c])


def test_agreement_needs_two_masks_and_readable_files(tmp_path):
    a = _write(tmp_path / "a.nii.gz", _box((2, 2, 2), (5, 5, 5)))
    with pytest.raises(ValueError):
        agreement([a])
    with pytest.raises(InputError, match="not found"):
        agreement([a, tmp_path / "missing.nii.gz"])


def test_agreement_connectivity_voxel_volumes_and_both_hd95(tmp_path):
    a = _voxels((3, 3, 3), shape=(10, 10, 10))
    b = _voxels((3, 3, 3), (4, 4, 4), shape=(10, 10, 10))
    paths = [_write(tmp_path / "a.nii.gz", a), _write(tmp_path / "b.nii.gz", b)]
    (row,) = agreement(paths).to_dict("records")
    assert (row["lesion_f1"], row["lesion_count_diff"], row["lesion_connectivity"]) == (pytest.approx(2 / 3), 1, 6)
    assert (row["lesion_count_a"], row["lesion_count_b"]) == (1, 2)
    assert (row["volume_a_voxels"], row["volume_b_voxels"], row["volume_diff_voxels"]) == (1, 2, 1)
    assert row["abs_volume_diff_voxels"] == 1 and row["abs_volume_diff_mm3"] == 2.0   # AFFINE: 1 × 1 × 2 mm
    # b → a {0, √(1 + 1 + 4)}, a → b {0}: directed p95 0.95·√6, pooled p95 of {0, 0, √6} 0.9·√6
    assert row["hd95"] == pytest.approx(0.95 * math.sqrt(6)) and row["hd95_pooled"] == pytest.approx(0.9 * math.sqrt(6))
    (row,) = agreement(paths, connectivity=26).to_dict("records")
    assert (row["lesion_f1"], row["lesion_count_diff"], row["lesion_connectivity"]) == (1.0, 0, 26)
    with pytest.raises(ValueError, match="connectivity"):
        agreement(paths, connectivity=18)


def test_real_tracings_agreement_by_definition():
    """Two real MRIcron tracings of one brain: every figure recomputed here from its definition on the whole
    volume (no crop, no k-d tree), and DSC, HD, ASSD and the pooled HD95 equal to the values measured before
    HD95 and the lesion connectivity changed."""
    voi1, voi2 = shared_fixture("mricron", "1.voi"), shared_fixture("mricron", "2.voi")
    (row,) = agreement([voi1, voi2]).to_dict("records")
    a, img = read_mask(voi1)     # a VOI is a gzipped NIfTI under another extension
    b, _ = read_mask(voi2)
    spacing = metrics.spacing_of(img)
    assert row["dsc"] == pytest.approx(2 * np.count_nonzero(a & b) / (a.sum() + b.sum()), rel=1e-12)
    cross = ndimage.generate_binary_structure(3, 1)
    surface_a, surface_b = a & ~ndimage.binary_erosion(a, cross), b & ~ndimage.binary_erosion(b, cross)
    b_to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    a_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    union = np.concatenate([b_to_a, a_to_b])
    assert row["hd"] == pytest.approx(union.max(), rel=1e-12)
    assert row["hd95"] == pytest.approx(max(np.percentile(b_to_a, 95), np.percentile(a_to_b, 95)), rel=1e-12)
    assert row["hd95_pooled"] == pytest.approx(np.percentile(union, 95), rel=1e-12)
    assert row["assd"] == pytest.approx(union.mean(), rel=1e-12)
    assert row["abs_volume_diff_voxels"] == abs(int(b.sum()) - int(a.sum()))
    f1, count_diff = _challenge_reference(a, b)
    assert (row["lesion_f1"], row["lesion_count_diff"]) == (pytest.approx(f1), count_diff)
    # before the change (pooled HD95 then called hd95): the other figures are unchanged
    assert row["dsc"] == 0.4369044633901705 and row["hd"] == 26.267851073127396
    assert row["assd"] == 5.702398288171664 and row["hd95_pooled"] == 20.83266665599966
    assert row["hd95"] > row["hd95_pooled"]
