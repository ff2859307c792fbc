"""``synth --flavour bids``: synthetic BIDS lesion datasets of native scans (the ``lab`` layout and our guess at
ATLAS v3.0, ``atlas3``), whole head or brain-extracted, masks beside the T1 or in a derivative dataset.

Three datasets are built once for the module, all with the same seed so that subject k's first scan is the
same rendering in each: ``lab`` (3 subjects, whole heads, ``_label-lesion_roi`` masks; sub-01 and sub-03
session-less, sub-02 with two sessions), ``labd`` (2 subjects, brain-extracted, masks in
``derivatives/lesions_manual``) and ``atlas3`` (2 subjects, brain-extracted by default, through the CLI).
Building them takes a few minutes on 2 cores, so the tests that read them are marked ``slow``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import ndimage

from atlas_curate.cli import main
from atlas_curate.synth import plan_bids, synthesize
from atlas_curate.synth.bids import extract_brain, render_bids_scan, write_dataset_files

SEED = 7
SPACE = "MNI152NLin2009aSym"
slow = pytest.mark.slow   # the tests that read the datasets built once for the module (minutes on 2 cores)


class Built:
    def __init__(self, root: Path, truth_dir: Path):
        self.root, self.truth_dir = root, truth_dir
        self.truth = json.loads((truth_dir / "truth.json").read_text())

    def files(self, under: Path | None = None) -> set[str]:
        base = under or self.root
        return {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()}

    def t1(self, key: str) -> nib.Nifti1Image:
        return nib.load(self.root / self.truth["scans"][key]["t1w"])

    def mask(self, key: str) -> nib.Nifti1Image:
        return nib.load(self.root / self.truth["scans"][key]["mask"])

    def brain(self, key: str) -> np.ndarray:
        path = self.truth_dir / "brain_masks" / f"{key}_space-orig_desc-brain_mask.nii.gz"
        return np.asarray(nib.load(path).dataobj) > 0


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Built:
    base = tmp_path_factory.mktemp("bids-lab")
    synthesize(base / "lab", subjects=3, seed=SEED, flavour="bids", layout="lab", truth=base / "truth", jobs=2,
               progress=False)
    return Built(base / "lab", base / "truth")


@pytest.fixture(scope="module")
def labd(tmp_path_factory) -> Built:
    base = tmp_path_factory.mktemp("bids-labd")
    synthesize(base / "lab", subjects=2, seed=SEED, flavour="bids", layout="lab", masks="derivatives",
               brain_extracted=True, truth=base / "truth", jobs=2, progress=False)
    return Built(base / "lab", base / "truth")


@pytest.fixture(scope="module")
def atlas3(tmp_path_factory) -> Built:
    base = tmp_path_factory.mktemp("bids-atlas3")
    result = CliRunner().invoke(main, ["synth", str(base / "release"), "--flavour", "bids", "--subjects", "2",
                                       "--seed", str(SEED), "--jobs", "2", "--truth", str(base / "truth")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "wrote 2 scans" in result.output
    return Built(base / "release", base / "truth")


# --- plans and options -----------------------------------------------------------------------------


def test_plan_sessions_and_labels():
    plans = plan_bids(4, SEED, "lab")
    assert [p.key for p in plans] == ["sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-03", "sub-04_ses-1",
                                      "sub-04_ses-2"]
    assert all(not p.brain_extracted for p in plans)            # lab default: whole heads
    by_key = {p.key: p for p in plans}
    assert by_key["sub-02_ses-2"].days_post_stroke > by_key["sub-02_ses-1"].days_post_stroke
    atlas = plan_bids(5, SEED)
    assert [p.key for p in atlas] == ["sub-r001s001_ses-1", "sub-r002s001_ses-1", "sub-r003s001_ses-1",
                                      "sub-r004s001_ses-1", "sub-r001s002_ses-1"]
    assert all(p.brain_extracted for p in atlas)                 # atlas3 default: brain-extracted
    assert not any(p.brain_extracted for p in plan_bids(2, SEED, "atlas3", brain_extracted=False))


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "isles"}, "layout must be one of"),
    ({"layout": "lab", "masks": "elsewhere"}, "masks must be one of"),
    ({"layout": "atlas3", "masks": "derivatives"}, "atlas3 layout keeps its masks beside the T1"),
])
def test_bad_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "out", subjects=1, flavour="bids", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bids_options_for_other_flavours(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "--layout", "lab"])
    assert result.exit_code == 2 and "--layout works only with --flavour bids" in result.output
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "--whole-head"])
    assert result.exit_code == 2 and "--brain-extracted/--whole-head works only" in result.output
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "--flavour", "bids", "--faults"])
    assert isinstance(result.exception, ValueError) and "no fault scans" in str(result.exception)


# --- the lab layout ---------------------------------------------------------------------------------


@slow
def test_lab_files(lab):
    scans = {
        "sub-01/anat/sub-01": 1,
        "sub-02/ses-1/anat/sub-02_ses-1": 1,
        "sub-02/ses-2/anat/sub-02_ses-2": 1,
        "sub-03/anat/sub-03": 1,
    }
    expected = {"dataset_description.json", "README", "participants.tsv", "participants.json", ".bidsignore",
                "sessions.json", "sub-02/sub-02_sessions.tsv"}
    for stem in scans:
        expected |= {f"{stem}_T1w.nii.gz", f"{stem}_T1w.json", f"{stem}_label-lesion_roi.nii.gz"}
    assert lab.files() == expected
    assert "**/*_label-lesion_roi.nii.gz" in (lab.root / ".bidsignore").read_text().split()
    desc = json.loads((lab.root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"]
    assert set(lab.truth["scans"]) == {"sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-03"}


@slow
def test_lab_sessions_participants_and_sidecars(lab):
    participants = pd.read_csv(lab.root / "participants.tsv", sep="\t", dtype=str)
    assert participants["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    described = json.loads((lab.root / "participants.json").read_text())
    assert set(participants.columns) <= set(described)
    sessions = pd.read_csv(lab.root / "sub-02" / "sub-02_sessions.tsv", sep="\t")
    assert sessions["session_id"].tolist() == ["ses-1", "ses-2"]
    site = dict(zip(participants["participant_id"], participants["site"]))
    for key, record in lab.truth["scans"].items():
        sidecar = json.loads((lab.root / record["t1w"].replace(".nii.gz", ".json")).read_text())
        days = sidecar["DAYS_POST_STROKE"]
        assert isinstance(days, int) and days > 0
        assert sidecar["CHRONICITY"] == (1 if days < 180 else 0)
        assert sidecar["CENTER"] == site[record["subject"]]
        assert sidecar["SkullStripped"] is False
        if record["session"]:
            assert days == int(sessions.set_index("session_id").loc[record["session"], "days_post_stroke"])
    assert not list((lab.root / "sub-01").glob("ses-*")) and not list((lab.root / "sub-03").glob("ses-*"))


@slow
def test_native_scans_vary_as_the_native_flavour(lab):
    """Real-looking native scans: posed, cohort grids (1 mm and 0.9 x 0.9 x 3 mm), orientations, dtypes; the
    mask binary, on its T1's grid and inside its head."""
    grids, codes = set(), set()
    for key, record in lab.truth["scans"].items():
        t1, mask = lab.t1(key), lab.mask(key)
        assert t1.ndim == 3 and t1.shape == mask.shape
        assert np.allclose(t1.affine, mask.affine, atol=1e-5)
        grids.add(tuple(round(float(z), 2) for z in t1.header.get_zooms()))
        codes.add("".join(nib.aff2axcodes(t1.affine)))
        pose = np.array(record["native_to_template_ras"])
        assert not np.allclose(pose, np.eye(4), atol=1e-3)
        values = np.asarray(mask.dataobj)
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(values)) == {0, 1}
        data = np.asarray(t1.dataobj)
        inside = data[values > 0]
        assert np.count_nonzero(inside) == inside.size       # the lesion lies in the head (no zeros there)
        voxel = float(np.prod(t1.header.get_zooms()))
        volumes = [les["volume_mm3_native_smooth"] for les in record["lesions"]]
        assert max(volumes) - voxel <= values.sum() * voxel <= sum(volumes) + voxel
        assert (lab.truth_dir / "masks" / f"{key}_space-{SPACE}_desc-lesions_dseg.nii.gz").is_file()
        head = np.count_nonzero(data > 0.05 * np.percentile(data, 99))
        assert head > 3 * lab.brain(key).sum() / 2               # a whole head: far more than the brain
    assert {(1.0, 1.0, 1.0), (0.9, 0.9, 3.0)} <= grids
    assert len(codes) >= 2
    poses = [np.array(r["native_to_template_ras"]) for r in lab.truth["scans"].values()]
    assert not np.allclose(poses[1], poses[2])                  # sub-02's sessions: two poses, one subject
    same = ("centroid_mm", "volume_mm3_template", "location", "territory")   # the subject's lesions, other poses
    first, second = (lab.truth["scans"][k]["lesions"] for k in ("sub-02_ses-1", "sub-02_ses-2"))
    assert [{k: les[k] for k in same} for les in first] == [{k: les[k] for k in same} for les in second]


# --- derivatives masks and brain extraction ------------------------------------------------------------


@slow
def test_lab_derivative_masks(labd):
    deriv = labd.root / "derivatives" / "lesions_manual"
    assert labd.files(deriv) == {
        "dataset_description.json",
        "sub-01/anat/sub-01_space-orig_desc-lesion_mask.nii.gz",
        "sub-01/anat/sub-01_space-orig_desc-lesion_mask.json",
        "sub-02/ses-1/anat/sub-02_ses-1_space-T1w_desc-lesion_mask.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_space-T1w_desc-lesion_mask.json",
        "sub-02/ses-2/anat/sub-02_ses-2_space-T1w_desc-lesion_mask.nii.gz",
        "sub-02/ses-2/anat/sub-02_ses-2_space-T1w_desc-lesion_mask.json",
    }
    assert json.loads((deriv / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert not list(labd.root.glob("sub-*/**/*_roi.nii.gz")) and not (labd.root / ".bidsignore").exists()
    for record in labd.truth["scans"].values():
        sidecar = json.loads((labd.root / record["t1w"].replace(".nii.gz", ".json")).read_text())
        assert sidecar["SkullStripped"] is True and record["skull_stripped"] is True


def _check_extracted(extracted: np.ndarray, whole: np.ndarray, brain: np.ndarray, lesion: np.ndarray, zooms):
    """Zero outside the brain dilated by 2 mm (the lesion apart), the whole head's voxels everywhere else that
    is kept, all of the brain kept, an uneven edge, and the scalp gone."""
    assert extracted.dtype == whole.dtype and extracted.shape == whole.shape
    kept = extracted != 0
    assert np.array_equal(extracted[kept], whole[kept])                     # head intact where kept
    assert np.array_equal(extracted[brain], whole[brain])                   # all of the brain kept
    outside_mm = ndimage.distance_transform_edt(~brain, sampling=zooms)
    assert not np.any(kept & (outside_mm > 2.0 + 1e-6) & ~lesion)          # nothing beyond 2 mm
    rim = (outside_mm > 0) & (outside_mm <= 2.0)
    kept_rim = np.count_nonzero(kept[rim]) / np.count_nonzero(rim)
    assert 0.1 < kept_rim < 0.9, kept_rim                                  # some CSF, uneven edge
    scalp = (outside_mm > 4.0) & (whole > 0)
    assert np.count_nonzero(scalp) > 0.3 * np.count_nonzero(brain)          # the whole head had a scalp


@slow
def test_brain_extracted_is_the_whole_head_cut_at_the_brain(lab, labd, atlas3):
    """Subject k's first scan is the same rendering in every dataset of one seed: the brain-extracted copies
    (labd: lab layout; atlas3: cohort R001) equal the whole head inside the brain and are 0 outside."""
    for built, key in ((labd, "sub-01"), (labd, "sub-02_ses-1"), (atlas3, "sub-r001s001_ses-1")):
        whole_key = "sub-01" if key.startswith("sub-r001") else key
        whole = np.asarray(lab.t1(whole_key).dataobj)
        extracted = np.asarray(built.t1(key).dataobj)
        assert np.allclose(built.t1(key).affine, lab.t1(whole_key).affine)
        assert np.array_equal(lab.brain(whole_key), built.brain(key))
        lesion = np.asarray(built.mask(key).dataobj) > 0
        assert np.array_equal(lesion, np.asarray(lab.mask(whole_key).dataobj) > 0)
        _check_extracted(extracted, whole, built.brain(key), lesion, built.t1(key).header.get_zooms())


def test_extract_brain_keeps_the_lesion_and_the_dtype():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 1000, (40, 40, 14)).astype(np.int16)
    brain = np.zeros(image.shape, bool)
    brain[10:30, 10:30, 4:10] = True
    lesion = np.zeros(image.shape, bool)
    lesion[28:34, 20:24, 6:8] = True                   # a cavity reaching past the brain's edge
    out, mask = extract_brain(image, brain, (0.9, 0.9, 3.0), np.random.default_rng(1), keep=lesion)
    assert out.dtype == np.int16 and np.array_equal(out[mask], image[mask]) and not out[~mask].any()
    assert mask[brain].all() and mask[lesion].all()
    assert not mask[:, :, 0].any() and not mask[:, :, 13].any()           # 3 mm slices: > 2 mm away
    again, _ = extract_brain(image, brain, (0.9, 0.9, 3.0), np.random.default_rng(1), keep=lesion)
    assert np.array_equal(out, again)


# --- ATLAS v3.0-like layout ----------------------------------------------------------------------------


@slow
def test_atlas3_layout(atlas3):
    files = atlas3.files()
    for cohort, sub in (("R001", "sub-r001s001"), ("R002", "sub-r002s001")):
        base = f"ATLAS_3/Training/{cohort}"
        stem = f"{base}/{sub}/ses-1/anat/{sub}_ses-1"
        assert {f"{base}/dataset_description.json", f"{base}/participants.tsv", f"{base}/participants.json",
                f"{base}/README", f"{stem}_space-orig_T1w.nii.gz", f"{stem}_space-orig_T1w.json",
                f"{stem}_space-orig_label-L_desc-T1lesion_mask.nii.gz",
                f"{stem}_space-orig_label-L_desc-T1lesion_mask.json"} == {f for f in files if f.startswith(base)}
        desc = json.loads((atlas3.root / base / "dataset_description.json").read_text())
        assert desc["DatasetType"] == "derivative" and "DatasetLinks" not in desc
        participants = pd.read_csv(atlas3.root / base / "participants.tsv", sep="\t", dtype=str)
        assert participants["participant_id"].tolist() == [sub]
        sidecar = json.loads((atlas3.root / f"{stem}_space-orig_T1w.json").read_text())
        assert sidecar["SkullStripped"] is True and "DAYS_POST_STROKE" not in sidecar
    assert not any(name.endswith("_sessions.tsv") for name in files)
    assert {p.parent.name for p in (atlas3.root / "ATLAS_3" / "Training").glob("*/dataset_description.json")} == \
        {"R001", "R002"}
    assert atlas3.truth["datasets"] == ["ATLAS_3/Training/R001", "ATLAS_3/Training/R002"]


# --- determinism ---------------------------------------------------------------------------------------


@slow
def test_same_seed_same_bytes(labd, tmp_path):
    """One scan rendered again, and the dataset files written again, give the same bytes."""
    plans = plan_bids(2, SEED, "lab", True, "derivatives")
    plan = next(p for p in plans if p.key == "sub-02_ses-2")
    out, truth = tmp_path / "out", tmp_path / "truth"
    record = render_bids_scan(replace(plan), str(out), str(truth))
    assert json.loads(json.dumps(record)) == labd.truth["scans"]["sub-02_ses-2"]
    write_dataset_files(plans, out)
    for path in out.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (labd.root / path.relative_to(out)).read_bytes(), path
    for path in truth.rglob("*.nii.gz"):
        assert path.read_bytes() == (labd.truth_dir / path.relative_to(truth)).read_bytes(), path
    assert len(list(out.rglob("*.nii.gz"))) == 2 and (out / "participants.tsv").is_file()


# --- the official validator ----------------------------------------------------------------------------


def _validator() -> str:
    found = shutil.which("bids-validator-deno")
    if not found:
        beside = Path(sys.executable).parent / "bids-validator-deno"
        found = str(beside) if beside.is_file() else None
    if not found:
        pytest.skip("the official BIDS validator (bids-validator-deno) is not installed: "
                    "pip install bids-validator-deno")
    return found


def _errors(dataset: Path) -> list[str]:
    proc = subprocess.run([_validator(), str(dataset), "-r", "--format", "json"], capture_output=True, text=True,
                          timeout=300)
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"validator gave no JSON (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")

    def collect(part: dict, where: str) -> list[str]:
        found = [f"[{where}] {i.get('code')} at {i.get('location')}: {str(i.get('issueMessage', ''))[:200]}"
                 for i in part.get("issues", {}).get("issues", []) if i.get("severity") == "error"]
        for name, sub in (part.get("derivativesSummary") or {}).items():
            found += collect(sub, f"{where}{name}")
        return found

    assert "issues" in doc, f"unexpected validator output keys {list(doc)}"
    return collect(doc, "/")


@slow
def test_validator_accepts_every_dataset(lab, labd, atlas3):
    datasets = [lab.root, labd.root] + [atlas3.root / d for d in atlas3.truth["datasets"]]
    for dataset in datasets:
        errors = _errors(dataset)
        assert not errors, f"{dataset}: {len(errors)} validator error(s):\n" + "\n".join(errors)
