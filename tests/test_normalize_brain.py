"""normalize on brain-extracted native T1s (sidecar ``SkullStripped: true``): brain-to-brain registration without
the head stage, no defacing (the reason recorded), the same QC; bad inputs fail alone with the file and reason.

Synthetic scans are rendered as the synthetic release renders native heads and zeroed outside the subject's
brain (``benchmarks/bench_brain.py``: ``synthetic_scan``, where the full sweep and the timing against the
whole-head path are). The slow tests put the real Colin27 brain (``ch2bet.nii.gz``) in known poses and give one
scan both brain-extracted and as a whole head.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_fixture

from atlas_curate import io, naming, tables
from atlas_curate.normalize import normalize
from atlas_curate.normalize.pipeline import NO_FACE, output_paths, skull_stripped
from atlas_curate.normalize.register import extracted_brain, register, register_brain

slow = pytest.mark.slow
SEED = 5


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_brain.py"
    spec = importlib.util.spec_from_file_location("bench_brain", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


bench = _bench()
POINTS = bench.brain_points_ras(stride=25)


def _errors(affine: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    d = bench.distances(affine, truth, POINTS)
    return float(d.mean()), float(np.percentile(d, 95))


def _add_t1(root: Path, scan: naming.ScanRef, image: nib.Nifti1Image, sidecar: dict | None) -> Path:
    path = root / scan.path("t1w", space=naming.NATIVE_SPACE)
    io.save_nifti(image, path)
    if sidecar is not None:
        tables.write_json(sidecar, root / naming.sidecar(path))
    return path


@pytest.fixture(scope="module")
def brain_dataset(tmp_path_factory):
    """A tiny BIDS tree: one brain-extracted synthetic scan (0.9 x 0.9 x 3 mm, lesion, brain dilated 1 mm) and
    two bad ones: a whole head that claims to be brain-extracted, and a sidecar whose SkullStripped is a word."""
    root = tmp_path_factory.mktemp("brain") / "bids"
    scan = bench.synthetic_scan(SEED, 2, 1.0, cohort=3)
    good = naming.ScanRef("b01")
    _add_t1(root, good, scan.brain, {"SkullStripped": True})
    io.save_nifti(scan.lesion, root / good.path("lesion_mask", space=naming.NATIVE_SPACE))
    _add_t1(root, naming.ScanRef("b02", "1"), scan.head, {"SkullStripped": True})
    _add_t1(root, naming.ScanRef("b03"), scan.brain, {"SkullStripped": "yes"})
    tables.write_dataset_description(root, "brain-extracted test", dataset_type="raw", raw_link=None)
    result = normalize(root, jobs=1, progress=False)
    return root, scan, result


def test_brain_extracted_scan_is_normalised_without_defacing(brain_dataset):
    root, scan, result = brain_dataset
    row = result.qc.set_index("scan").loc["sub-b01"]
    assert row["status"] == "ok", row["error"]
    assert row["qc_pass"], row["qc_reasons"]
    paths = {key: root / path for key, path in output_paths(naming.ScanRef("b01")).items()}
    sidecar = json.loads(naming.sidecar(paths["preproc_t1w"]).read_text())
    assert sidecar["SkullStripped"] is True
    assert sidecar["Defaced"] is False and sidecar["DefacingSkipped"] == NO_FACE
    affine = np.array(json.loads(naming.sidecar(paths["xfm"]).read_text())["AffineRAS"])
    mean, p95 = _errors(affine, scan.truth)
    assert mean <= 0.5 and p95 <= 1.0, (mean, p95)
    # the lesion came along
    assert nib.load(paths["norm_mask"]).get_fdata().sum() > 0


def test_bad_brain_extracted_inputs_fail_alone_with_the_file_and_reason(brain_dataset):
    root, _, result = brain_dataset
    rows = result.qc.set_index("scan")
    whole = rows.loc["sub-b02_ses-1"]
    assert whole["status"] == "failed"
    assert "sub-b02_ses-1_T1w.nii.gz" in whole["error"] and "not brain-sized" in whole["error"], whole["error"]
    word = rows.loc["sub-b03"]
    assert word["status"] == "failed"
    assert "sub-b03_T1w.json" in word["error"] and "SkullStripped must be true or false" in word["error"]


def test_skull_stripped_reads_the_sidecar(tmp_path):
    t1 = tmp_path / "sub-a_T1w.nii.gz"
    assert skull_stripped(t1) is False                     # no sidecar: a whole head
    sidecar = tmp_path / "sub-a_T1w.json"
    for doc, expected in (({}, False), ({"SkullStripped": False}, False), ({"SkullStripped": True}, True)):
        sidecar.write_text(json.dumps(doc))
        assert skull_stripped(t1) is expected
    sidecar.write_text("{not json")
    with pytest.raises(io.InputError, match="unreadable JSON sidecar"):
        skull_stripped(t1)


def test_extracted_brain_refuses_what_is_not_a_brain():
    with pytest.raises(ValueError, match="no non-zero voxel"):
        extracted_brain(np.zeros((10, 10, 10), np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="not brain-sized"):           # a whole field of view: a head
        extracted_brain(np.ones((200, 200, 200), np.float32), (1.0, 1.0, 1.0))
    ball = np.zeros((140, 160, 140), np.float32)
    z, y, x = np.ogrid[:140, :160, :140]
    ball[((z - 70) / 60.0) ** 2 + ((y - 80) / 70.0) ** 2 + ((x - 70) / 55.0) ** 2 <= 1] = 1.0
    ball[5, 5, 5] = 1.0                                                 # a stray voxel is not brain
    brain = extracted_brain(ball, (1.0, 1.0, 1.0))
    assert brain.sum() == ball.sum() - 1


def _register(fn, *args):
    work = tempfile.mkdtemp(prefix="atlas-curate-test-brain-")
    try:
        return fn(*args, workdir=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@slow
def test_same_scan_brain_extracted_and_whole_head_land_together():
    """1 mm grid, no dilation: the brain-extracted scan against the whole head it came from, and both against
    the truth."""
    scan = bench.synthetic_scan(SEED, 0, 0.0, cohort=1)
    whole = _register(register, scan.head, scan.lesion)
    brain = _register(register_brain, scan.brain, scan.lesion)
    for reg in (whole, brain):
        mean, p95 = _errors(reg.affine_ras, scan.truth)
        assert mean <= 0.5 and p95 <= 1.0, (mean, p95)
    between = bench.distances(whole.affine_ras, brain.affine_ras, POINTS).mean()
    assert between <= 1.0, between


@slow
def test_colin27_brain_agrees_between_poses():
    """The real Colin27 brain (brain-extracted) in three poses (1 mm and 0.9 x 0.9 x 3 mm grids, any orientation,
    rotations to 12 deg, shifts to 15 mm, scale 0.93-1.07): T_k = A_k Q_k^-1 agrees within 1 mm (mean)."""
    from atlas_curate.synth.scanner import random_spec

    brain = nib.load(shared_fixture("colin27", "ch2bet.nii.gz"))
    rng = np.random.default_rng(SEED)
    recovered = []
    for k in range(3):
        spec = random_spec(rng, lesion_mm3=0.0, grid="1mm" if k % 2 == 0 else "0.9x0.9x3", neck_cut_mm=None)
        image, q = bench.posed_brain(brain, spec)
        recovered.append(_register(register_brain, image).affine_ras @ np.linalg.inv(q))
    pairs = [bench.distances(recovered[j], recovered[k], POINTS).mean()
             for j in range(len(recovered)) for k in range(j + 1, len(recovered))]
    assert max(pairs) <= 1.0, pairs
