"""Units of normalize's registration: the ANTs affine file conventions and the least-squares refinement."""

from __future__ import annotations

import ants
import numpy as np
import pytest

from atlas_curate.normalize.register import (
    REFINE_ROUNDS,
    _syn_fit,
    ants_affine_to_ras,
    brain_points_lps,
    downsample,
    read_ants_affine,
    template_images,
    write_ants_affine,
)

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def _affine(scale=(1.03, 0.98, 1.02), shear=0.02, shift=(2.0, -1.5, 1.0)) -> np.ndarray:
    a = np.diag([*scale, 1.0])
    a[0, 1] = shear
    a[:3, 3] = shift
    return a


def test_ants_affine_file_roundtrip(tmp_path):
    lps = _affine()
    path = str(tmp_path / "a.mat")
    write_ants_affine(lps, path)
    assert np.allclose(read_ants_affine(path), lps, atol=1e-5)
    # ANTs maps template LPS points to native LPS points; AffineRAS maps native RAS to template RAS
    native_to_template = ants_affine_to_ras(path)
    tx = ants.read_transform(path)
    for template_ras in ([10.0, -20.0, 30.0], [-45.0, 12.0, -8.0]):
        native_lps = np.asarray(tx.apply_to_point(tuple(FLIP[:3, :3] @ template_ras)))
        native_ras = FLIP[:3, :3] @ native_lps
        back = native_to_template[:3, :3] @ native_ras + native_to_template[:3, 3]
        assert np.allclose(back, template_ras, atol=1e-3)


def test_syn_fit_recovers_a_known_affine(tmp_path):
    """Moving = template resampled through a known affine S (fixed -> moving points S^-1 ... see below); the
    least-squares fit of the SyN displacement, started from the identity, must be that affine: one fit most of
    the way, the ``REFINE_ROUNDS`` fits of ``register`` (each from the last) all of it, without a scale bias."""
    tpl = template_images()
    fixed = tpl["t1_syn"]
    s_lps = _affine()                      # fixed point p -> point S p whose template value moving shows at p
    s_path = str(tmp_path / "s.mat")
    write_ants_affine(s_lps, s_path)
    moving = ants.apply_transforms(tpl["t1"], tpl["t1"], [s_path], interpolator="linear")
    moving = downsample(moving, 4.0)       # as ``register`` brings a scan to the 4 mm grid
    current = str(tmp_path / "identity.mat")
    write_ants_affine(np.eye(4), current)
    # moving(p) = T(S p); fixed(x) = T(x) = moving(S^-1 x): the fixed -> moving point map is S^-1
    expected = np.linalg.inv(s_lps)
    points = brain_points_lps()
    start = np.linalg.norm(points @ (np.eye(4) - expected)[:3, :3].T + (np.eye(4) - expected)[:3, 3], axis=1)
    errors = []
    for r in range(REFINE_ROUNDS):
        fit = _syn_fit(fixed, moving, initial=current, fixed_mask=tpl["brain_dil2_syn"], moving_mask=None,
                       outprefix=str(tmp_path / f"syn{r}_"))
        refined = read_ants_affine(current) @ fit
        current = str(tmp_path / f"refined{r}.mat")
        write_ants_affine(refined, current)
        error = np.linalg.norm(points @ (refined - expected)[:3, :3].T + (refined - expected)[:3, 3], axis=1)
        errors.append(float(error.mean()))
    log_det = float(np.log(np.linalg.det(refined[:3, :3] @ np.linalg.inv(expected[:3, :3]))))
    assert start.mean() > 2.0  # the affine is far from the identity ...
    assert errors[0] < 0.5, (errors, start.mean())  # ... one fit recovers most of it ...
    # ... and the rounds all of it (0.12 mm; with the template blurred no wider than the resampled one, 0.32 mm
    # and a 1 % volume error, log det -0.0105: the softer brain edge of a resampled image was read as scale)
    assert errors[-1] < 0.2, (errors, start.mean())
    assert abs(log_det) < 0.005, (log_det, errors)


def _small_head_pair():
    tpl = template_images()
    moving = ants.resample_image(tpl["t1"], (4.0, 4.0, 4.0), use_voxels=False, interp_type=0)
    return tpl["head_4mm"], moving


def test_head_stage_helper_is_reused_and_deterministic(tmp_path):
    """The single-threaded head stage runs in a helper process that later scans of this process reuse."""
    from atlas_curate.normalize import register as reg

    fixed, moving = _small_head_pair()
    first = reg.HeadStage(fixed, moving, initial=None, outprefix=str(tmp_path / "a_"))
    pid = first.helper.proc.pid
    one = read_ants_affine(first.result()["fwdtransforms"][0])
    second = reg.HeadStage(fixed, moving, initial=None, outprefix=str(tmp_path / "b_"))
    assert second.helper.proc.pid == pid  # the same helper, no new start-up
    two = read_ants_affine(second.result()["fwdtransforms"][0])
    assert np.array_equal(one, two)


def test_head_stage_failure_names_the_reason(tmp_path):
    from atlas_curate.normalize import register as reg

    fixed, moving = _small_head_pair()
    stage = reg.HeadStage(fixed, moving, initial=str(tmp_path / "no-such-initial.mat"), outprefix=str(tmp_path / "c_"))
    with pytest.raises(RuntimeError, match="head registration stage failed"):
        stage.result()
    # the helper survives a failed request and serves the next one
    ok = reg.HeadStage(fixed, moving, initial=None, outprefix=str(tmp_path / "d_"))
    assert ok.result()["fwdtransforms"]


def test_a_dead_helper_is_reported_and_replaced(tmp_path):
    from atlas_curate.normalize import register as reg

    fixed, moving = _small_head_pair()
    stage = reg.HeadStage(fixed, moving, initial=None, outprefix=str(tmp_path / "e_"))
    stage.helper.proc.kill()
    with pytest.raises(RuntimeError, match="helper exited"):
        stage.result()
    again = reg.HeadStage(fixed, moving, initial=None, outprefix=str(tmp_path / "f_"))
    assert again.result()["fwdtransforms"]

