"""Synthetic pathology (atlas_curate.synth.pathology): what a chronic-stroke brain shows besides the lesion.

Most tests build the pathology of the head model without a deformation around spherical lesions placed by hand
(a few seconds each); the last ones render a real synthetic subject on the template grid with and without
pathology.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from atlas_curate.synth.head import Deformation, head_model
from atlas_curate.synth.lesions import Lesion
from atlas_curate.synth.pathology import LABELS, build_pathology, draw_params, fazekas_grades
from atlas_curate.synth.release import metadata_row
from atlas_curate.synth.render import make_subject, pathology_dseg, render, template_dseg
from atlas_curate.templates import get_template, template_grid

WMH = 1
EX_VACUO = 5


@pytest.fixture(scope="module")
def model():
    return head_model()


@pytest.fixture(scope="module")
def still(model) -> Deformation:
    """No deformation: the subject is the head model itself."""
    return Deformation(np.zeros((3, 4, 4, 4), np.float32), np.zeros(3, np.float32), 100.0, 0.0,
                       model.ventricle_centre)


def ball(centre_mm, volume_mm3: float) -> Lesion:
    """A spherical lesion of about ``volume_mm3`` at a world position (mm)."""
    radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    half = int(np.ceil(radius)) + 2
    ax = np.arange(-half, half + 1)
    mask = (ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2) <= radius ** 2
    origin = np.round(np.asarray(centre_mm, float)) - half
    return Lesion(origin.astype(np.float32), mask, mask.astype(np.float32), np.full(mask.shape, 0.2, np.float32))


def quiet(params, **changes):
    """The subject's parameters with nothing but ``changes`` (no atrophy, WMH or perivascular spaces)."""
    base = dict(fazekas_pvh=0, fazekas_dwmh=0, atrophy_mm=0.0, ventricle_mm=0.0, pvs_basal_ganglia=0,
                pvs_centrum_semiovale=0)
    base.update(changes)
    return replace(params, **base)


def world_x(model) -> np.ndarray:
    return (np.arange(model.t1.shape[0]) * model.affine[0, 0] + model.affine[0, 3])[:, None, None]


def test_parameters_are_deterministic_and_per_subject():
    assert draw_params(3, 5) == draw_params(3, 5)
    assert draw_params(3, 5) != draw_params(3, 6)
    assert draw_params(3, 5) != draw_params(4, 5)
    grades = [(draw_params(0, k).fazekas_pvh, draw_params(0, k).fazekas_dwmh) for k in range(40)]
    assert len(set(grades)) >= 6, grades   # the grades vary between subjects


def test_metadata_reports_the_rendered_grades():
    """The grades in the spreadsheet are those the subject is rendered with (or blank)."""
    blanks = 0
    for k in range(40):
        params = draw_params(2, k)
        record = {"plan": {"seed": 2, "subject_index": k}, "lesions": []}
        row = metadata_row(record)
        assert (row["PVH"], row["DWMH"]) == fazekas_grades(2, k)
        for column, grade in (("PVH", params.fazekas_pvh), ("DWMH", params.fazekas_dwmh)):
            assert row[column] in (grade, ""), (k, column, row[column], grade)
            blanks += row[column] == ""
    assert blanks >= 1   # some grades are left blank, as in the real spreadsheet


def test_build_is_deterministic(model, still):
    lesions = [ball((-30, 5, 20), 4000)]
    a = build_pathology(draw_params(1, 2), model, still, lesions)
    b = build_pathology(draw_params(1, 2), model, still, lesions)
    assert np.array_equal(a.t1, b.t1) and np.array_equal(a.labels, b.labels)
    c = build_pathology(draw_params(1, 3), model, still, lesions)
    assert not np.array_equal(a.t1, c.t1)


def test_wmh_volume_increases_with_fazekas_grade(model, still):
    params = draw_params(0, 1)
    volumes = {}
    for grade in range(4):
        built = build_pathology(quiet(params, fazekas_pvh=grade, fazekas_dwmh=grade), model, still, [])
        volumes[grade] = int(np.count_nonzero(built.labels == WMH))
        # WMH are darker than white matter and brighter than CSF
        if grade:
            values = built.t1[built.labels == WMH]
            assert 0.3 < np.median(values) < 0.75, np.median(values)
    assert volumes[0] == 0
    assert volumes[0] < volumes[1] < volumes[2] < volumes[3], volumes
    assert volumes[3] > 20_000, volumes   # confluent: tens of cm³
    # each scale alone grows with its grade too
    pv = [int(np.count_nonzero(build_pathology(quiet(params, fazekas_pvh=g), model, still, []).labels == WMH))
          for g in (1, 3)]
    deep = [int(np.count_nonzero(build_pathology(quiet(params, fazekas_dwmh=g), model, still, []).labels == WMH))
            for g in (1, 3)]
    assert pv[0] < pv[1] and deep[0] < deep[1], (pv, deep)


def test_distractors_keep_away_from_the_lesion(model, still):
    """No change on or next to a lesion voxel, whatever the subject's pathology."""
    lesion = ball((-32, 8, 24), 8000)   # beside the left frontal horn, in the periventricular white matter
    params = replace(draw_params(0, 12), fazekas_pvh=3, fazekas_dwmh=3, atrophy_mm=2.0, ventricle_mm=2.5,
                     pvs_basal_ganglia=40, pvs_centrum_semiovale=40)
    built = build_pathology(params, model, still, [lesion])
    idx = (lesion.world_points() - model.affine[:3, 3]).astype(int)
    on_lesion = np.zeros(model.t1.shape, bool)
    on_lesion[tuple(idx.T)] = True
    near = ndimage.binary_dilation(on_lesion, iterations=1)
    assert np.count_nonzero(built.labels[near]) == 0
    assert np.array_equal(built.t1[on_lesion], build_pathology(quiet(params), model, still, [lesion]).t1[on_lesion])
    for label in (1, 2, 3, 4, 5):
        assert np.count_nonzero(built.labels == label) > 0, LABELS[label]


def test_ex_vacuo_enlarges_the_ipsilateral_ventricle_only(model, still):
    params = quiet(draw_params(0, 4))
    centre = (-34, -5, 20)                  # left hemisphere, lateral to the body of the left ventricle
    plain = build_pathology(params, model, still, [])
    pushed = {volume: build_pathology(params, model, still, [ball(centre, volume)]) for volume in (1000, 10000, 40000)}
    x = world_x(model)
    right = np.broadcast_to(x > 1, model.t1.shape)
    counts = {}
    for volume, built in pushed.items():
        ex_vacuo = built.labels == EX_VACUO
        counts[volume] = int(ex_vacuo.sum())
        assert not (ex_vacuo & right).any()
        # the other hemisphere is exactly as without the lesion
        assert np.array_equal(built.t1[right], plain.t1[right])
        # the left ventricle's CSF grew where the ex-vacuo label is
        if counts[volume]:
            darker = plain.t1[ex_vacuo] - built.t1[ex_vacuo]
            assert darker.min() > 0.05 and np.median(darker) > 0.2, (darker.min(), np.median(darker))
    assert counts[1000] == 0                # too small to pull the ventricle
    assert 0 < counts[10000] < counts[40000], counts
    assert pushed[40000].ex_vacuo and pushed[40000].ex_vacuo[0]["side"] == "left"


# ------------------------------------------------------------------------- a real subject on the template grid


SEED, INDEX = 1, 1     # one lesion of 45 cm³


@pytest.fixture(scope="module")
def rendered(model):
    template = get_template()
    out = {}
    for pathology in (False, True):
        subject = make_subject(SEED, INDEX, 1, False, model, pathology=pathology)
        image = render(subject, model, template.shape, template.affine, np.eye(4), np.random.default_rng(0),
                       noise=0.01, bias=False).image
        out[pathology] = (subject, image)
    return out


def test_pathology_keeps_the_lesions_and_the_truth(rendered, model):
    (clean, _), (sick, _) = rendered[False], rendered[True]
    assert clean.pathology is None
    truth = template_dseg(sick)
    assert np.array_equal(template_dseg(clean), truth)           # the same lesions, the same truth
    labels = pathology_dseg(sick, model, clear_lesions=False)
    assert labels.any()
    assert not (labels.astype(bool) & (truth > 0)).any()         # no distractor on a lesion voxel
    assert sick.lesions[0].rim_level >= 0.55 and sick.lesions[0].core_level == sick.pathology.params.csf_level


def _best_threshold_dsc(image: np.ndarray, truth: np.ndarray) -> float:
    """A crude detector at its best: brain voxels darker than t, t chosen on this very scan."""
    brain = template_grid().brain
    values, lesion = image[brain], truth[brain]
    best = 0.0
    for t in np.arange(0.05, 0.8, 0.01):
        flagged = values < t
        best = max(best, 2.0 * np.count_nonzero(flagged & lesion) / (flagged.sum() + lesion.sum()))
    return best


def test_a_threshold_detector_does_worse_with_pathology(rendered):
    truth = template_dseg(rendered[False][0]) > 0
    clean = _best_threshold_dsc(rendered[False][1], truth)
    sick = _best_threshold_dsc(rendered[True][1], truth)
    assert clean > 0.3, clean
    assert sick < clean - 0.1 and sick < 0.75 * clean, (clean, sick)


@pytest.mark.parametrize(("flags", "expected"), [([], False), (["--pathology"], True), (["--no-pathology"], False)])
def test_synth_cli_switch(tmp_path, monkeypatch, flags, expected):
    from click.testing import CliRunner

    import atlas_curate.synth as synth
    from atlas_curate.cli import main

    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs)
        return {"scans": {}}

    monkeypatch.setattr(synth, "synthesize", fake)
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "--subjects", "1", *flags])
    assert result.exit_code == 0, result.output
    assert seen["pathology"] is expected
