"""Post-processing: small and outside-the-brain components removed, the real lesion kept, 6-connectivity as the
metrics count lesions, mm³ on the grid's voxels, the choice of the minimum size on dev scans, the record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from atlas_curate import io, metrics
from atlas_curate.postprocess import (
    POSTPROCESS_FILE,
    PostProcessing,
    brain_region,
    choice_record,
    choose,
    components,
    load_choice,
    postprocess,
    save_choice,
)
from atlas_curate.templates import template_arrays, template_grid


def _ball(shape, centre, radius):
    grid = np.indices(shape).reshape(3, -1).T
    return (((grid - np.asarray(centre)) ** 2).sum(1) <= radius ** 2).reshape(shape)


@pytest.fixture(scope="module")
def scene():
    """On the template grid: a lesion (ball of radius 6 mm in white matter), a 3-voxel speck touching it only at a
    corner, a 3-voxel speck elsewhere in the brain, a 100-voxel block in the air outside the brain, and a 30-voxel
    bar half in, half out of the brain's edge."""
    grid = template_grid()
    brain = grid.brain
    wm = np.argwhere(template_arrays()["WM"] > 0.95)
    centre = wm[len(wm) // 2]
    lesion = np.zeros(grid.shape, bool)
    lesion[tuple(slice(c - 8, c + 9) for c in centre)] = _ball((17, 17, 17), (8, 8, 8), 6)
    voxels = np.argwhere(lesion)
    tip = voxels[np.argmax(voxels.sum(axis=1))]             # the lesion voxel with the largest x + y + z
    corner = np.zeros(grid.shape, bool)                      # no face shared with the lesion, one corner
    for offset in ((1, 1, 1), (2, 1, 1), (2, 2, 1)):
        corner[tuple(tip + offset)] = True
    speck = np.zeros(grid.shape, bool)
    inside = np.argwhere(brain & ~ndimage.binary_dilation(lesion | corner, iterations=10)
                         & (template_arrays()["WM"] > 0.9))
    s = inside[0]
    speck[s[0], s[1], s[2]:s[2] + 3] = True
    air = np.zeros(grid.shape, bool)
    air[2:7, 2:7, 2:6] = True
    assert not (air & brain_region(3.0)).any()
    # a bar along x crossing the brain's edge: 15 voxels inside the brain, 15 outside the dilated brain
    row = np.argwhere(brain[:, 116, 94])[:, 0]
    edge = int(row.max())
    bar = np.zeros(grid.shape, bool)
    bar[edge - 14:edge + 16, 116, 94] = True
    return {"lesion": lesion, "corner": corner, "speck": speck, "air": air, "bar": bar}


def test_small_and_outside_components_are_removed_and_the_lesion_kept(scene):
    mask = scene["lesion"] | scene["corner"] | scene["speck"] | scene["air"] | scene["bar"]
    # the corner speck is its own lesion with 6-connectivity (the metrics' and the challenge's), part of the
    # lesion with 26
    assert metrics.scan_metrics(mask, mask, (1, 1, 1))["lesion_count_pred"] == 5
    assert metrics.scan_metrics(mask, mask, (1, 1, 1), connectivity=26)["lesion_count_pred"] == 4
    cleaned, report = postprocess(mask, PostProcessing(min_size_mm3=10))
    assert np.array_equal(cleaned, scene["lesion"] | scene["bar"])
    assert report == {"components": 5, "removed_small": 2, "removed_outside_brain": 1,
                      "voxels_removed": int(scene["corner"].sum() + scene["speck"].sum() + scene["air"].sum())}
    # no minimum size: only the component outside the brain goes
    cleaned, report = postprocess(mask, PostProcessing(min_size_mm3=0))
    assert np.array_equal(cleaned, mask & ~scene["air"])
    assert (report["removed_small"], report["removed_outside_brain"]) == (0, 1)
    # more than half outside the brain (+3 mm): the bar is removed too
    cleaned, _ = postprocess(mask, PostProcessing(min_size_mm3=10, min_inside_fraction=0.9))
    assert np.array_equal(cleaned, scene["lesion"])
    # 26-connected: the corner speck joins the lesion and stays
    cleaned, report = postprocess(mask, PostProcessing(min_size_mm3=10, connectivity=26))
    assert np.array_equal(cleaned, scene["lesion"] | scene["corner"] | scene["bar"]) and report["components"] == 4
    # an empty mask stays empty
    cleaned, report = postprocess(np.zeros_like(mask), PostProcessing(min_size_mm3=10))
    assert not cleaned.any() and report["components"] == 0


def test_brain_region_is_the_template_brain_dilated_in_mm():
    brain = template_grid().brain
    region = brain_region(3.0)
    assert region.shape == brain.shape and (region >= brain).all() and not region.flags.writeable
    distance = ndimage.distance_transform_edt(~brain)
    assert region[(distance > 0) & (distance <= 3)].all() and not region[distance > 3].any()
    assert np.array_equal(brain_region(0.0), brain)
    # a voxel 2 mm from the brain is inside the region, one 6 mm away is outside
    near = np.zeros(brain.shape, bool)
    near[tuple(np.argwhere(np.isclose(distance, 2.0))[0])] = True
    far = np.zeros(brain.shape, bool)
    far[tuple(np.argwhere(np.isclose(distance, 6.0))[0])] = True
    cleaned, report = postprocess(near | far, PostProcessing())
    assert np.array_equal(cleaned, near) and report["removed_outside_brain"] == 1


def test_sizes_are_in_mm3_of_the_grid_and_other_grids_need_a_brain():
    mask = np.zeros((12, 12, 12), bool)
    mask[1, 1, 1] = True                       # 1 voxel = 8 mm³ at 2 mm
    mask[5, 5, 5:7] = True                     # 2 voxels = 16 mm³
    mask[9, 9:12, 9] = True                    # 3 voxels, outside the brain given below
    brain = np.ones(mask.shape, bool)
    brain[8:, 8:, 8:] = False
    cleaned, report = postprocess(mask, PostProcessing(min_size_mm3=10), brain=brain, voxel_mm3=8.0)
    assert np.argwhere(cleaned).tolist() == [[5, 5, 5], [5, 5, 6]]
    assert report == {"components": 3, "removed_small": 1, "removed_outside_brain": 1, "voxels_removed": 4}
    with pytest.raises(ValueError, match="template grid"):
        postprocess(mask, PostProcessing())


def _scan(truth_cube: tuple[int, int], blobs: list[int], shape=(20, 20, 20)):
    """Components of a prediction = the true cube (lo, hi) plus false blobs of the given voxel counts (rows)."""
    truth = np.zeros(shape, bool)
    lo, hi = truth_cube
    truth[lo:hi, lo:hi, lo:hi] = True
    pred = truth.copy()
    for row, size in enumerate(blobs):
        pred[17 - 2 * row, 0:size, 19] = True          # separate rows, far from the cube
    return components(pred, np.ones(shape, bool), truth=truth), int(truth.sum())


def test_the_dev_choice_picks_the_best_size_and_the_smallest_on_ties():
    """Scan A: a 27-voxel lesion found exactly, with false blobs of 5 and 15 voxels; scan B: an 8-voxel lesion
    found exactly, with a false 3-voxel blob. Removing < 6 voxels drops every small false blob and keeps both
    lesions (best); < 7 does the same (a tie: the smaller wins); < 10 loses B's lesion; < 20 also A's blob."""
    scans = [_scan((2, 5), [5, 15]), _scan((10, 12), [3])]
    rule, grid = choose(scans, [0, 4, 7, 6, 10, 20], voxel_mm3=1.0)
    assert rule == PostProcessing(6.0, 3.0, 0.5, 6)
    dice = {row["min_size_mm3"]: row["dev_dice"] for row in grid}
    assert list(dice) == [0, 4, 6, 7, 10, 20]                                  # sorted
    a0, b0 = 54 / (47 + 27), 16 / (11 + 8)
    assert dice[0] == pytest.approx((a0 + b0) / 2)
    assert dice[4] == pytest.approx((a0 + 1.0) / 2)
    assert dice[6] == dice[7] == pytest.approx((54 / (42 + 27) + 1.0) / 2)
    assert dice[10] == pytest.approx(54 / (42 + 27) / 2)
    assert dice[20] == pytest.approx(1.0 / 2)
    assert [row["components_removed"] for row in grid] == [0, 1, 2, 2, 3, 4]
    # in mm³: at 2 mm voxels (8 mm³) the same choice is 8 × larger
    rule, _ = choose(scans, [0, 32, 48, 56, 80], voxel_mm3=8.0)
    assert rule.min_size_mm3 == 48.0


def test_choice_record_without_dev_scans_and_its_file(tmp_path):
    record = choice_record([], [0, 10, 50], voxel_mm3=1.0, brain_margin_mm=3.0, min_inside_fraction=0.5,
                           threshold=0.5, model="model.pt")
    assert record["postprocessing"] == {"min_size_mm3": 0.0, "brain_margin_mm": 3.0, "min_inside_fraction": 0.5,
                                        "connectivity": 6}
    assert record["chosen_on"] == "default" and record["reason"].startswith("no dev scans")
    assert record["dev_dice"] is None and [row["dev_dice"] for row in record["grid"]] == [None] * 3
    chosen = choice_record([_scan((2, 5), [5])], [0, 10], voxel_mm3=1.0, brain_margin_mm=3.0, min_inside_fraction=0.5,
                           threshold=0.5, model="model.pt")
    assert chosen["chosen_on"] == "dev" and chosen["postprocessing"]["min_size_mm3"] == 10.0
    assert chosen["dev_dice_raw"] == pytest.approx(54 / (32 + 27)) and chosen["dev_dice"] == 1.0
    assert chosen["min_size_voxels"] == 10 and "1 dev scan " in chosen["reason"]
    save_choice(chosen, tmp_path)
    rule, again = load_choice(tmp_path)
    assert rule == PostProcessing(10.0) and again == json.loads((tmp_path / POSTPROCESS_FILE).read_text())
    assert load_choice(tmp_path / "elsewhere") is None
    (tmp_path / POSTPROCESS_FILE).write_text('{"postprocessing": {}}')
    with pytest.raises(io.InputError, match=POSTPROCESS_FILE):
        load_choice(tmp_path)


def test_training_without_dev_scans_records_size_zero():
    """The loop's choice with no dev scans: 0 mm³ (the outside-the-brain rule only), with the reason."""
    pytest.importorskip("torch")
    from atlas_curate.train import make_config
    from atlas_curate.train.loop import choose_postprocessing, postprocess_statement

    record = choose_postprocessing(None, [], make_config("quick"), "cpu")
    assert record["postprocessing"]["min_size_mm3"] == 0.0 and record["chosen_on"] == "default"
    assert [row["min_size_mm3"] for row in record["grid"]] == [0, 10, 20, 50, 100, 200, 500]
    assert "no dev scans" in postprocess_statement(record)
