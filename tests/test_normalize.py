"""normalize on a small synthetic release with truth: accuracy, QC, defacing, reruns, standard inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from atlas_curate.convert import convert
from atlas_curate.normalize import normalize
from atlas_curate.normalize.deface import face_mask
from atlas_curate.normalize.qc import metrics, verdict
from atlas_curate.synth import synthesize
from atlas_curate.templates import get_template, template_arrays

pytestmark = pytest.mark.slow
SPACE = "MNI152NLin2009aSym"


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def normalized(tmp_path_factory):
    base = tmp_path_factory.mktemp("norm")
    synthesize(base / "release", subjects=2, seed=7, truth=base / "truth", jobs=2, progress=False)
    convert(base / "release", base / "bids", jobs=2, progress=False)
    result = normalize(base / "bids", jobs=2, progress=False)
    truth = json.loads((base / "truth" / "truth.json").read_text())
    return base, result, truth


def _scan_of(row) -> str:
    sub, ses = row["participant_id"][4:], row["session_id"][4:]
    return f"{sub}{ses}"


def test_every_scan_normalised_and_passes_qc(normalized):
    base, result, truth = normalized
    assert len(result.qc) == len(truth["scans"])
    assert (result.qc["status"] == "ok").all(), result.qc[["scan", "status", "error"]]
    assert result.qc["qc_pass"].all(), result.qc[["scan", "qc_reasons"]]
    assert (result.output / "qc.tsv").is_file()
    html = result.report.read_text()
    for _, row in result.qc.iterrows():
        assert row["figure"] in html
        assert (result.output / row["figure"]).is_file()


def test_transform_matches_truth(normalized):
    base, result, truth = normalized
    tpl = nib.load(get_template().t1w)
    idx = np.argwhere(np.asarray(tpl.dataobj) > 0)[::25]
    points = idx @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    for _, row in result.qc.iterrows():
        xfm = next((result.output / row["participant_id"] / row["session_id"] / "anat").glob("*_xfm.json"))
        affine = np.array(json.loads(xfm.read_text())["AffineRAS"])
        true = np.array(truth["scans"][_scan_of(row)]["native_to_template_ras"])
        native = points @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]
        back = native @ true[:3, :3].T + true[:3, 3]
        error = np.linalg.norm(back - points, axis=1)
        # issue targets 0.5 / 1.0 mm; benchmarks/bench_normalize.py measured 0.21-0.32 mm mean on 4 scans. An
        # intensity-only affine (no least-squares refinement) gave 0.6-0.9 mm and fails this bound.
        assert error.mean() <= 0.55 and np.percentile(error, 95) <= 1.1, (row["scan"], error.mean(),
                                                                          np.percentile(error, 95))


def test_lesions_land_on_truth(normalized):
    base, result, truth = normalized
    for _, row in result.qc.iterrows():
        scan = _scan_of(row)
        anat = result.output / row["participant_id"] / row["session_id"] / "anat"
        mask = np.asarray(nib.load(next(anat.glob("*_label-L_desc-T1lesion_mask.nii.gz"))).dataobj) > 0
        dseg = nib.load(next(anat.glob("*_desc-lesions_dseg.nii.gz")))
        assert set(np.unique(np.asarray(dseg.dataobj)).tolist()) <= set(range(0, 10))  # labels stay labels
        truth_dseg = base / "truth" / "masks" / f"{scan}_space-{SPACE}_desc-lesions_dseg.nii.gz"
        ref = np.asarray(nib.load(truth_dseg).dataobj) > 0
        dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
        assert dice >= 0.85, (scan, dice)


def test_defacing_removes_face_and_spares_brain(normalized):
    base, result, _ = normalized
    brain = template_arrays()["T1w"] > 0
    face = face_mask()
    assert not (face & brain).any()
    for path in result.output.rglob(f"*_space-{SPACE}_desc-preproc_T1w.nii.gz"):
        data = np.asarray(nib.load(path).dataobj)
        assert not data[face].any()
        assert data[brain].mean() > 10


def test_qc_flags_a_misregistration(normalized):
    base, result, _ = normalized
    arrays = template_arrays()
    brain = arrays["T1w"] > 0
    path = next(result.output.rglob(f"*_space-{SPACE}_desc-preproc_T1w.nii.gz"))
    good = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    kwargs = dict(template=arrays["T1w"], brain=brain, lesion=None, affine_ras=np.eye(4), native_lesion_mm3=None,
                  coverage=np.ones(brain.shape, bool))
    assert verdict(metrics(t1=good, **kwargs))[0]
    shifted = np.roll(good, 8, axis=1)  # an 8 mm misregistration
    ok, reasons = verdict(metrics(t1=shifted, **kwargs))
    assert not ok and any("ncc_brain" in r for r in reasons)
    squashed = dict(kwargs, affine_ras=np.diag([0.7, 0.7, 0.7, 1.0]))  # the naive head-onto-brain shrink
    ok, reasons = verdict(metrics(t1=good, **squashed))
    assert not ok and any("scale_min" in r for r in reasons)


def test_rerun_skips_and_keeps_outputs(normalized):
    base, result, _ = normalized
    before = _hashes(result.output)
    again = normalize(base / "bids", jobs=1, progress=False)
    assert again.skipped == len(again.qc) and (again.qc["status"] == "ok").all()
    assert _hashes(result.output) == before


def test_standard_inputs_skip_registration(tmp_path):
    synthesize(tmp_path / "release", subjects=1, seed=2, flavour="standard", truth=tmp_path / "truth", progress=False)
    convert(tmp_path / "release", tmp_path / "bids", progress=False)
    result = normalize(tmp_path / "bids", progress=False)
    assert (result.qc["status"] == "ok").all() and result.qc["qc_pass"].all(), result.qc.to_dict("records")
    assert not list(result.output.rglob("*_xfm.mat"))
    assert (result.qc["space_in"] == SPACE).all()


@pytest.fixture(scope="module")
def standard_bids(tmp_path_factory):
    base = tmp_path_factory.mktemp("std")
    synthesize(base / "release", subjects=2, seed=4, flavour="standard", truth=base / "truth", progress=False)
    convert(base / "release", base / "bids", progress=False)
    return base / "bids"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_image_fails_qc(standard_bids, tmp_path):
    bids = _copy(standard_bids, tmp_path / "bids")
    t1 = next(bids.rglob(f"*_space-{SPACE}_T1w.nii.gz"))
    img = nib.load(t1)
    rng = np.random.default_rng(0)
    noise = rng.permutation(np.asarray(img.dataobj).ravel()).reshape(img.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, img.affine, img.header), t1)
    result = normalize(bids, progress=False)
    bad = result.qc[result.qc["scan"].str.startswith(t1.name.split("_space")[0])]
    assert len(bad) == 1 and not bad["qc_pass"].iloc[0] and "ncc_brain" in bad["qc_reasons"].iloc[0]
    assert result.qc["qc_pass"].sum() == len(result.qc) - 1


def test_crash_leaves_no_partial_output_and_rerun_matches(standard_bids, tmp_path, monkeypatch):
    from atlas_curate.normalize import pipeline

    clean = normalize(_copy(standard_bids, tmp_path / "clean"), progress=False)
    crashed = _copy(standard_bids, tmp_path / "crashed")
    calls = {"n": 0}
    real_save = pipeline._save

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-scan")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_save", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        normalize(crashed, progress=False)
    leftovers = [p for p in crashed.rglob("*") if ".part" in p.name]
    assert not leftovers
    manifests = crashed / ".atlas-curate" / "normalize"
    assert not list(manifests.glob("*.json")) if manifests.exists() else True
    monkeypatch.setattr(pipeline, "_save", real_save)
    normalize(crashed, progress=False)
    assert _hashes(crashed / "derivatives" / "atlas-curate") == _hashes(clean.output)


def test_dask_executor_matches_local(standard_bids, tmp_path):
    from dask.distributed import LocalCluster

    local = normalize(_copy(standard_bids, tmp_path / "local"), progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        remote = normalize(_copy(standard_bids, tmp_path / "dask"), executor="dask",
                           scheduler=cluster.scheduler_address, progress=False)
    assert _hashes(remote.output) == _hashes(local.output)


def test_a_subset_rerun_keeps_every_scan_in_the_qc_table(normalized):
    """``--participant-label`` reruns one subject; qc.tsv must still list (and flag) every scan, else a scan
    that failed QC earlier would look unchecked to later stages and be used."""
    base, result, _ = normalized
    before = pd.read_csv(result.output / "qc.tsv", sep="\t")
    subject = before["participant_id"].iloc[0]
    again = normalize(base / "bids", participant_labels=[subject], progress=False)
    assert again.skipped == (before["participant_id"] == subject).sum()
    after = pd.read_csv(result.output / "qc.tsv", sep="\t")
    assert after["scan"].tolist() == before["scan"].tolist()
    assert after["qc_pass"].tolist() == before["qc_pass"].tolist()
    assert np.allclose(after["ncc_brain"], before["ncc_brain"])
