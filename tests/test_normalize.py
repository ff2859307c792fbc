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

slow = pytest.mark.slow   # the tests that synthesise, convert and normalise whole scans
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


@slow
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


@slow
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


@slow
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


@slow
def test_defacing_removes_face_and_spares_brain(normalized):
    base, result, _ = normalized
    brain = template_arrays()["T1w"] > 0
    face = face_mask()
    assert not (face & brain).any()
    for path in result.output.rglob(f"*_space-{SPACE}_desc-preproc_T1w.nii.gz"):
        data = np.asarray(nib.load(path).dataobj)
        assert not data[face].any()
        assert data[brain].mean() > 10


@slow
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


@slow
def test_rerun_skips_and_keeps_outputs(normalized):
    base, result, _ = normalized
    before = _hashes(result.output)
    again = normalize(base / "bids", jobs=1, progress=False)
    assert again.skipped == len(again.qc) and (again.qc["status"] == "ok").all()
    assert _hashes(result.output) == before


@slow
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


@slow
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


@slow
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


@slow
def test_dask_executor_matches_local(standard_bids, tmp_path):
    from dask.distributed import LocalCluster

    local = normalize(_copy(standard_bids, tmp_path / "local"), progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        remote = normalize(_copy(standard_bids, tmp_path / "dask"), executor="dask",
                           scheduler=cluster.scheduler_address, progress=False)
    assert _hashes(remote.output) == _hashes(local.output)


@slow
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


# --- fast: inputs, names, compute/write split, table format ---------------------------------------------

def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_find_inputs_with_and_without_sessions(tmp_path):
    from atlas_curate.naming import ScanRef
    from atlas_curate.normalize.pipeline import find_inputs

    raw = _touch(tmp_path / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz")
    flat = _touch(tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    standard = _touch(tmp_path / "derivatives" / "lesions" / "sub-03" / "anat" / f"sub-03_space-{SPACE}_T1w.nii.gz")
    _touch(tmp_path / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_acq-fast_T1w.nii.gz")     # not bids-convert's
    _touch(tmp_path / "sub-04" / "ses-1" / "anat" / "sub-05_ses-1_T1w.nii.gz")              # name and folder differ
    _touch(tmp_path / "derivatives" / "lesions" / "sub-06" / "anat" / "sub-06_space-orig_T1w.nii.gz")
    found = find_inputs(tmp_path)
    assert found == [(ScanRef("01", "1"), str(raw), "orig"), (ScanRef("02"), str(flat), "orig"),
                     (ScanRef("03"), str(standard), SPACE)]
    assert [f.scan.key for f in find_inputs(tmp_path, ["sub-02", "03"])] == ["sub-02", "sub-03"]


def test_outputs_follow_the_naming_spec():
    from atlas_curate import naming
    from atlas_curate.normalize.pipeline import OUTPUTS, lesion_inputs, output_paths

    assert set(OUTPUTS) == {"preproc_t1w", "norm_mask", "norm_dseg", "norm_raw_mask", "xfm", "figure"}
    pipeline, lesions = "derivatives/atlas-curate/sub-01", "derivatives/lesions/sub-01"
    paths = {k: p.as_posix() for k, p in output_paths(naming.ScanRef("01", "2")).items()}
    assert paths["preproc_t1w"] == f"{pipeline}/ses-2/anat/sub-01_ses-2_space-{SPACE}_desc-preproc_T1w.nii.gz"
    assert paths["xfm"] == f"{pipeline}/ses-2/anat/sub-01_ses-2_from-T1w_to-{SPACE}_mode-image_xfm.mat"
    assert paths["figure"] == f"{pipeline}/figures/sub-01_ses-2_desc-normalize_T1w.png"
    flat = {k: p.as_posix() for k, p in output_paths(naming.ScanRef("01")).items()}
    assert flat["norm_mask"] == f"{pipeline}/anat/sub-01_space-{SPACE}_label-L_desc-T1lesion_mask.nii.gz"
    assert flat["figure"] == f"{pipeline}/figures/sub-01_desc-normalize_T1w.png"
    inputs = lesion_inputs(Path("/r"), naming.ScanRef("01"), "orig")
    assert inputs["raw_mask"].as_posix() == f"/r/{lesions}/anat/sub-01_space-orig_label-L_desc-T1lesionRaw_mask.nii.gz"


@pytest.fixture
def flat_standard_scan(tmp_path):
    """A session-less template-space scan (no registration): the template T1 scaled, with a lesion and a dseg."""
    from atlas_curate import io, naming
    from atlas_curate.templates import template_grid

    grid = template_grid()
    scan = naming.ScanRef("01")
    t1 = template_arrays()["T1w"] * 300.0
    lesion = np.zeros(grid.shape, np.uint8)
    lesion[60:72, 110:125, 80:92] = 1
    io.save_nifti(grid.image(t1, np.float32), tmp_path / scan.path("standard_t1w", space=SPACE))
    io.save_nifti(grid.image(lesion, np.uint8), tmp_path / scan.path("lesion_mask", space=SPACE))
    io.save_nifti(grid.image(lesion * 2, np.uint8), tmp_path / scan.path("lesion_dseg", space=SPACE))
    return tmp_path, scan


def test_compute_writes_nothing_and_the_writer_follows_the_spec(flat_standard_scan):
    from atlas_curate import naming, tables
    from atlas_curate.normalize.pipeline import NormJob, compute_scan, find_inputs, normalize_scan, output_paths

    root, scan = flat_standard_scan
    (found,) = find_inputs(root)
    job = NormJob(str(root), found.scan, found.t1, found.space)
    before = _hashes(root)
    result = compute_scan(job)
    assert _hashes(root) == before                                   # compute: nothing written
    assert [key for key, _ in result.outputs()] == ["preproc_t1w", "norm_mask", "norm_dseg", "figure"]
    row = normalize_scan(job)
    assert row["scan"] == "sub-01" and row["session_id"] is None and row["qc_pass"] is True
    paths = output_paths(scan)
    for key, dtype in (("preproc_t1w", np.float32), ("norm_mask", np.uint8), ("norm_dseg", np.uint8)):
        img = nib.load(root / paths[key])
        assert img.get_data_dtype() == dtype and int(img.header["sform_code"]) == 4
        sidecar = tables.read_json(root / naming.sidecar(paths[key]))
        assert naming.output_sidecar(key, space=SPACE).items() <= sidecar.items()
        assert sidecar["Sources"][0].startswith("bids::derivatives/lesions/sub-01/anat/sub-01_space-")
    assert np.unique(np.asarray(nib.load(root / paths["norm_dseg"]).dataobj)).tolist() == [0, 2]
    assert (root / paths["figure"]).read_bytes() == result.figure.data
    assert not (root / paths["xfm"]).exists()
    manifest = tables.read_json(root / naming.STATE_DIR / "normalize" / "sub-01.json")
    assert manifest["outputs"][-1] == paths["figure"].as_posix() and manifest["qc"] == row


def test_qc_table_writes_lowercase_booleans_and_reads_earlier_tables(flat_standard_scan):
    """qc.tsv's qc_pass is true/false (the tables convention); a table written with True/False still reads."""
    from atlas_curate.normalize.pipeline import normalize

    root, _ = flat_standard_scan
    result = normalize(root, progress=False)
    qc_tsv = result.output / "qc.tsv"
    header, line = qc_tsv.read_text().splitlines()
    row = dict(zip(header.split("\t"), line.split("\t")))
    assert row["scan"] == "sub-01" and row["session_id"] == "n/a" and row["qc_pass"] == "true"
    assert bool(result.qc["qc_pass"].iloc[0]) is True
    description = json.loads((result.output / "dataset_description.json").read_text())
    assert description["Name"] == "atlas-curate normalize" and SPACE in description["GeneratedBy"][0]["Description"]
    qc_tsv.write_text(qc_tsv.read_text().replace("\ttrue\t", "\tTrue\t"))   # as written before
    again = normalize(root, progress=False)
    assert again.skipped == 1 and again.qc["qc_pass"].tolist() == [True]
    assert "\ttrue\t" in qc_tsv.read_text()


def test_scan_figure_leaves_the_matplotlib_backend_alone():
    """The figure is drawn on its own Agg canvas: importing the report and drawing keep the process's backend."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np, matplotlib\n"
            "from atlas_curate.normalize.report import scan_figure\n"
            "t1 = np.random.default_rng(0).random((12, 14, 10)).astype(np.float32)\n"
            "png = scan_figure(t1, t1, t1 > 0.2, t1 > 0.9, title='sub-01: PASS')\n"
            "assert png.startswith(b'\\x89PNG'), png[:8]\n"
            "assert matplotlib.get_backend().lower() == 'svg', matplotlib.get_backend()\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MPLBACKEND": "svg"})
