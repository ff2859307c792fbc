"""bids-convert's BIDS reader (``--flavour bids``), brain-extraction detection and the defect checks.

The test trees are built here from synthetic native heads (``synthesize(flavour="native")``) rearranged into
BIDS: a lab's dataset (session-less and multi-session subjects, masks beside the T1w and in derivatives,
several T1w, sidecar fields, failures) and a v3.0-like multi-cohort tree of brain-extracted T1s. Expected
values come from the files the test wrote, never from the converter's code.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import shared_fixture
from scipy import ndimage
from test_convert import format_issues, read_report, validation_errors

from atlas_curate.cli import main
from atlas_curate.convert import convert, detect_flavour
from atlas_curate.convert.scan import STRIPPED_MAX_ML, skull_stripped
from atlas_curate.synth import synthesize
from atlas_curate.templates import template_grid

SCANS = ("c0001s0001t01", "c0002s0001t01", "c0003s0001t01", "c0003s0001t02")
DESCRIPTION = {"Name": "lab stroke cohort", "BIDSVersion": "1.10.0", "DatasetType": "raw"}


# --- building the trees -------------------------------------------------------------------------------

class Heads:
    """The synthetic native heads: T1 image, union lesion mask and brain mask per release scan."""

    def __init__(self, root: Path, truth: dict):
        self.root, self.truth = root, truth

    def t1(self, key: str) -> nib.Nifti1Image:
        img = nib.load(self.root / key[:5] / key / f"{key}.nii.gz")
        return nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(img.shape[:3]), img.affine, img.header)

    def mask(self, key: str) -> np.ndarray:
        masks = [np.asanyarray(nib.load(p).dataobj).reshape(self.t1(key).shape) > 0
                 for p in sorted((self.root / key[:5] / key).glob(f"{key}_LesionSmooth*.nii.gz"))]
        return np.logical_or.reduce(masks)

    def brain(self, key: str) -> np.ndarray:
        """The template brain brought into the scan's grid with the true native -> template transform."""
        img, grid = self.t1(key), template_grid()
        n2t = np.asarray(self.truth["scans"][key]["native_to_template_ras"], float)
        ijk = np.indices(img.shape).reshape(3, -1)
        world = img.affine[:3, :3] @ ijk + img.affine[:3, 3:]
        template = n2t[:3, :3] @ world + n2t[:3, 3:]
        inv = np.linalg.inv(grid.affine)
        voxels = inv[:3, :3] @ template + inv[:3, 3:]
        return ndimage.map_coordinates(grid.brain.astype(np.float32), voxels, order=1).reshape(img.shape) > 0.5

    def bet(self, key: str) -> nib.Nifti1Image:
        img = self.t1(key)
        data = np.asanyarray(img.dataobj) * self.brain(key)
        return nib.Nifti1Image(data.astype(img.get_data_dtype()), img.affine, img.header)


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Heads:
    base = tmp_path_factory.mktemp("heads")
    synthesize(base / "release", subjects=3, seed=1, flavour="native", truth=base / "truth", jobs=2, progress=False)
    truth = json.loads((base / "truth" / "truth.json").read_text())
    for entry in truth["scans"].values():
        if isinstance(entry["native_to_template_ras"], str):
            entry["native_to_template_ras"] = json.loads(entry["native_to_template_ras"])
    assert sorted(truth["scans"]) == list(SCANS)
    return Heads(base / "release", truth)


def save(img_or_data, path: Path, like: nib.Nifti1Image | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = img_or_data if like is None else nib.Nifti1Image(np.asarray(img_or_data, np.uint8), like.affine)
    nib.save(img, path)
    return path


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def outside_blob(shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[1:7, 1:7, 1:7] = True    # a corner of the field of view: air
    return mask


@pytest.fixture(scope="module")
def lab(heads, tmp_path_factory) -> Path:
    """A lab's BIDS dataset with every case the reader must handle."""
    root = tmp_path_factory.mktemp("lab") / "lab"
    write_json(DESCRIPTION, root / "dataset_description.json")
    (root / "participants.tsv").write_text("participant_id\tage\tsite\n" + "".join(
        f"sub-{n:02d}\t{50 + n}\tSiteA\n" for n in range(1, 9)))
    write_json({"age": {"Description": "Age at the first scan", "Units": "year"}}, root / "participants.json")
    # sub-01: session-less, mask beside the T1w (sMRIPrep style), sidecar fields, a second T1w, a stray lesion file
    t1 = heads.t1(SCANS[0])
    save(t1, root / "sub-01/anat/sub-01_T1w.nii.gz")
    write_json({"DAYS_POST_STROKE": 200, "CHRONICITY": 0, "CENTER": "A", "RepetitionTime": 2.3},
               root / "sub-01/anat/sub-01_T1w.json")
    flipped = nib.Nifti1Image(np.asanyarray(t1.dataobj)[::-1].copy(), t1.affine)
    save(flipped, root / "sub-01/anat/sub-01_acq-fast_T1w.nii.gz")
    save(heads.mask(SCANS[0]), root / "sub-01/anat/sub-01_label-lesion_roi.nii.gz", t1)
    save(heads.mask(SCANS[0]), root / "sub-01/anat/lesion_drawing_old.nii.gz", t1)
    # sub-02: two sessions, masks in two derivative datasets (space-orig and space-T1w), sessions.tsv
    for ses, key, deriv, name in (("1", SCANS[2], "manual", "space-orig_label-L_desc-T1lesion_mask"),
                                  ("2", SCANS[3], "tracer", "space-T1w_desc-lesion_mask")):
        img = heads.t1(key)
        save(img, root / f"sub-02/ses-{ses}/anat/sub-02_ses-{ses}_T1w.nii.gz")
        save(heads.mask(key), root / f"derivatives/{deriv}/sub-02/ses-{ses}/anat/sub-02_ses-{ses}_{name}.nii.gz", img)
    for deriv in ("manual", "tracer"):
        write_json({**DESCRIPTION, "DatasetType": "derivative", "GeneratedBy": [{"Name": "hand"}]},
                   root / f"derivatives/{deriv}/dataset_description.json")
    (root / "sub-02/sub-02_sessions.tsv").write_text("session_id\tdays\nses-1\t30\nses-2\t400\n")
    # sub-03: brain-extracted, session-less, no SkullStripped field
    save(heads.bet(SCANS[1]), root / "sub-03/anat/sub-03_T1w.nii.gz")
    save(heads.mask(SCANS[1]), root / "sub-03/anat/sub-03_label-L_desc-T1lesion_mask.nii.gz", heads.t1(SCANS[1]))
    # sub-04: truncated T1 (fails), sub-05: a template-grid mask on a native T1, sub-06: empty folder,
    # sub-07: misaligned mask with tiny components, sub-08: a space-MNI mask on a native T1
    blob = gzip.compress(nib.Nifti1Image(np.asanyarray(t1.dataobj), t1.affine).to_bytes())
    (root / "sub-04/anat").mkdir(parents=True)
    (root / "sub-04/anat/sub-04_T1w.nii.gz").write_bytes(blob[: len(blob) // 3])
    save(heads.mask(SCANS[0]), root / "sub-04/anat/sub-04_label-lesion_roi.nii.gz", t1)
    save(t1, root / "sub-05/anat/sub-05_T1w.nii.gz")
    grid = template_grid()
    template_mask = np.zeros(grid.shape, bool)
    template_mask[90:100, 100:110, 90:100] = True
    save(nib.Nifti1Image(template_mask.astype(np.uint8), grid.affine),
         root / "sub-05/anat/sub-05_label-lesion_roi.nii.gz")
    (root / "sub-06").mkdir()
    save(t1, root / "sub-07/anat/sub-07_T1w.nii.gz")
    misaligned = outside_blob(t1.shape)
    for i, j, k in ((100, 100, 100), (110, 120, 130), (60, 150, 100)):
        misaligned[i, j, k] = True     # three single-voxel components
    save(misaligned, root / "sub-07/anat/sub-07_label-lesion_roi.nii.gz", t1)
    save(t1, root / "sub-08/anat/sub-08_T1w.nii.gz")
    save(heads.mask(SCANS[0]), root / "sub-08/anat/sub-08_space-MNI152NLin2009aSym_label-lesion_roi.nii.gz", t1)
    return root


@pytest.fixture(scope="module")
def lab_out(lab, tmp_path_factory):
    out = tmp_path_factory.mktemp("lab-out") / "bids"
    return out, convert(lab, out, jobs=2, progress=False)


@pytest.fixture(scope="module")
def v3(heads, tmp_path_factory) -> Path:
    """A v3.0-like tree: ATLAS_3/Training/RNNN/ datasets of brain-extracted native T1s (space-orig)."""
    root = tmp_path_factory.mktemp("v3") / "download"
    for cohort, key in (("R011", SCANS[0]), ("R012", SCANS[1])):
        dataset = root / "ATLAS_3" / "Training" / cohort
        write_json({"Name": f"ATLAS {cohort}", "BIDSVersion": "1.10.0"}, dataset / "dataset_description.json")
        sub = f"sub-{cohort.lower()}s001"
        anat = dataset / sub / "ses-1" / "anat"
        save(heads.bet(key), anat / f"{sub}_ses-1_space-orig_T1w.nii.gz")
        save(heads.mask(key), anat / f"{sub}_ses-1_space-orig_label-L_desc-T1lesion_mask.nii.gz", heads.t1(key))
    return root


def row(report: pd.DataFrame, scan: str) -> pd.Series:
    rows = report[report["scan"] == scan]
    assert len(rows) == 1, f"expected one report row for {scan}, got {len(rows)}:\n{report.to_string()}"
    return rows.iloc[0]


def voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


# --- detection and the lab's dataset -----------------------------------------------------------------

def test_auto_detects_bids_trees(lab, v3):
    assert detect_flavour(lab) == "bids"
    assert detect_flavour(v3) == "bids"
    assert detect_flavour(v3 / "ATLAS_3") == "bids"


def test_lab_statuses_and_reasons(lab_out):
    out, result = lab_out
    report = read_report(out)
    assert row(report, "sub-01")["status"] == "converted"
    assert row(report, "sub-02_ses-1")["status"] == "converted"
    assert row(report, "sub-02_ses-2")["status"] == "converted"
    assert row(report, "sub-03")["status"] == "converted"
    failed = row(report, "sub-04")
    assert failed["status"] == "failed" and "sub-04_T1w.nii.gz" in failed["reason"], failed.to_dict()
    grid = row(report, "sub-05")
    assert grid["status"] == "masks_withheld" and "template_mask" in grid["reason"], grid.to_dict()
    assert "sub-05_label-lesion_roi.nii.gz" in grid["reason"]
    entity = row(report, "sub-08")
    assert entity["status"] == "masks_withheld" and "template_mask" in entity["reason"], entity.to_dict()
    assert "space-MNI152NLin2009aSym" in entity["reason"]
    empty = report[report["status"] == "empty_folder"]
    assert empty["release_scan"].tolist() == ["sub-06"], empty.to_string()
    sub01 = row(report, "sub-01")
    assert "other_t1w: sub-01_acq-fast_T1w.nii.gz" in sub01["checks"]
    assert "lesion_drawing_old.nii.gz" in sub01["checks"]
    assert result.n_failed == 3   # sub-04 failed, sub-05 and sub-08 masks withheld


def test_t1_and_masks_equal_their_sources(lab, lab_out):
    out, _ = lab_out
    pairs = {"sub-01": ("sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_label-lesion_roi.nii.gz"),
             "sub-02_ses-1": ("sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "derivatives/manual/sub-02/ses-1/anat/"
                              "sub-02_ses-1_space-orig_label-L_desc-T1lesion_mask.nii.gz"),
             "sub-02_ses-2": ("sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz", "derivatives/tracer/sub-02/ses-2/anat/"
                              "sub-02_ses-2_space-T1w_desc-lesion_mask.nii.gz"),
             "sub-03": ("sub-03/anat/sub-03_T1w.nii.gz", "sub-03/anat/sub-03_label-L_desc-T1lesion_mask.nii.gz")}
    for key, (t1, mask) in pairs.items():
        folder = "/".join(t1.split("/")[:-1])
        written = out / folder / f"{key}_T1w.nii.gz"
        assert np.array_equal(voxels(written), voxels(lab / t1)), written
        assert (out / folder / f"{key}_T1w.json").is_file()
        lesion = out / "derivatives/lesions" / folder / f"{key}_space-orig_label-L_desc-T1lesion_mask.nii.gz"
        assert np.array_equal(voxels(lesion) > 0, voxels(lab / mask) > 0), lesion
    # nothing of the failed scan, no sidecar without its image anywhere
    assert not (out / "sub-04").exists()
    for sidecar in out.rglob("*.json"):
        if sidecar.name.startswith("sub-") and ".atlas-curate" not in sidecar.relative_to(out).parts:
            stem = sidecar.name[: -len(".json")]
            assert any(sidecar.with_name(stem + ext).exists() for ext in (".nii.gz", ".tsv")), sidecar


def test_tables_keep_labels_and_metadata(lab_out):
    out, _ = lab_out
    participants = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert participants["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03", "sub-05", "sub-07", "sub-08"]
    by_id = participants.set_index("participant_id")
    assert by_id.loc["sub-01", "days_post_stroke"] == "200" and by_id.loc["sub-01", "center"] == "A"
    assert by_id.loc["sub-02", "age"] == "52" and by_id.loc["sub-02", "cohort"] == "SiteA"
    assert by_id.loc["sub-01", "skull_stripped"] == "false"
    assert by_id.loc["sub-03", "skull_stripped"] == "true"
    assert "repetitiontime" not in participants.columns and "RepetitionTime" not in participants.columns
    sidecar = json.loads((out / "participants.json").read_text())
    assert sidecar["age"]["Units"] == "year"
    assert "stroke" in sidecar["days_post_stroke"]["Description"].lower()
    assert "skull_stripped" in sidecar
    # session-less subjects have no sessions table; sub-02 keeps ses-1 and ses-2
    assert not list((out / "sub-01").glob("*_sessions.tsv"))
    sessions = pd.read_csv(out / "sub-02/sub-02_sessions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert sessions["session_id"].tolist() == ["ses-1", "ses-2"]
    assert sessions["days"].tolist() == ["30", "400"]
    assert sessions["skull_stripped"].tolist() == ["false", "false"]
    t1_sidecar = json.loads((out / "sub-03/anat/sub-03_T1w.json").read_text())
    assert t1_sidecar["SkullStripped"] is True and "image test" in t1_sidecar["SkullStrippedDecision"]


def test_defect_checks(lab_out):
    out, _ = lab_out
    report = read_report(out)
    misaligned = row(report, "sub-07")
    assert "mask_outside_head" in misaligned["checks"], misaligned.to_dict()
    outside_voxels = 6 ** 3
    assert f"{outside_voxels} of {outside_voxels + 3} voxels" in misaligned["checks"]
    assert misaligned["tiny_components"] == "3"
    assert "mask_outside_head" not in row(report, "sub-01")["checks"]


def test_validator_accepts_a_partly_failed_conversion(lab_out):
    out, _ = lab_out
    errors = validation_errors(out)
    assert not errors, f"{len(errors)} validator error(s):\n{format_issues(errors)}"


def test_t1w_entities_filter_and_cli(lab, tmp_path):
    out = tmp_path / "bids"
    result = CliRunner().invoke(main, ["bids-convert", str(lab), str(out), "--t1w-entities", "acq=fast", "-j", "1"])
    assert result.exit_code == 1, result.output     # the lab's failures still fail
    report = read_report(out)
    sub01 = row(report, "sub-01")
    assert "other_t1w: sub-01_T1w.nii.gz" in sub01["checks"]
    assert np.array_equal(voxels(out / "sub-01/anat/sub-01_T1w.nii.gz"),
                          voxels(lab / "sub-01/anat/sub-01_acq-fast_T1w.nii.gz"))
    bad = CliRunner().invoke(main, ["bids-convert", str(lab), str(tmp_path / "x"), "--t1w-entities", "acq"])
    assert bad.exit_code == 2 and "ENTITY=LABEL" in bad.output


def test_v3_like_multi_cohort_tree(v3, tmp_path):
    out = tmp_path / "bids"
    result = convert(v3, out, jobs=1, progress=False)
    assert result.flavour == "bids" and result.n_failed == 0, result.summary()
    participants = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert participants[["participant_id", "cohort"]].values.tolist() == [["sub-r011s001", "R011"],
                                                                          ["sub-r012s001", "R012"]]
    sessions = pd.read_csv(out / "sub-r011s001/sub-r011s001_sessions.tsv", sep="\t", dtype=str)
    assert sessions[["session_id", "part", "skull_stripped"]].values.tolist() == [["ses-1", "training", "true"]]
    source = v3 / "ATLAS_3/Training/R011/sub-r011s001/ses-1/anat/sub-r011s001_ses-1_space-orig_T1w.nii.gz"
    assert np.array_equal(voxels(out / "sub-r011s001/ses-1/anat/sub-r011s001_ses-1_T1w.nii.gz"), voxels(source))
    errors = validation_errors(out)
    assert not errors, format_issues(errors)


# --- brain extraction ------------------------------------------------------------------------------

def test_skull_stripped_image_test_on_synthetic_heads(heads):
    for key in SCANS:
        head, how = skull_stripped(heads.t1(key), {})
        assert head is False, (key, how)
        brain, how = skull_stripped(heads.bet(key), {})
        assert brain is True, (key, how)
    assert skull_stripped(heads.t1(SCANS[0]), {"SkullStripped": True}) == (
        True, "SkullStripped field of the source T1w sidecar")


def test_skull_stripped_image_test_on_colin27():
    head = nib.load(shared_fixture("colin27", "ch2.nii.gz"))
    brain = nib.load(shared_fixture("colin27", "ch2bet.nii.gz"))
    stripped, how = skull_stripped(head, {})
    assert stripped is False, how
    stripped, how = skull_stripped(brain, {})
    assert stripped is True, how
    volume = float(how.split("region ")[1].split(" mL")[0])
    assert volume < STRIPPED_MAX_ML * 0.7, how     # margin: the brain is well under the limit


# --- defect checks in the other readers ----------------------------------------------------------------

def test_defect_checks_in_the_native_reader(heads, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(heads.root, release)
    key = SCANS[0]
    t1 = heads.t1(key)
    misaligned = outside_blob(t1.shape)
    misaligned[100, 100, 100] = True
    for path in (release / key[:5] / key).glob(f"{key}_Lesion*"):
        path.unlink()
    save(misaligned, release / key[:5] / key / f"{key}_LesionSmooth.nii.gz", t1)
    (release / "c0001" / "c0001s0009t01").mkdir()
    out = tmp_path / "bids"
    convert(release, out, jobs=1, progress=False)
    report = read_report(out)
    scan = report[report["release_scan"] == key].iloc[0]
    assert "mask_outside_head" in scan["checks"] and scan["tiny_components"] == "1", scan.to_dict()
    empty = report[report["status"] == "empty_folder"]
    assert empty["release_scan"].tolist() == ["c0001/c0001s0009t01"], report.to_string()
    other = report[report["release_scan"] == SCANS[2]].iloc[0]
    assert "mask_outside_head" not in other["checks"]


def test_a_scan_that_fails_on_rerun_leaves_nothing_behind(lab, tmp_path):
    source = tmp_path / "lab"
    source.mkdir()
    for name in ("dataset_description.json", "sub-01", "sub-03"):
        copy = shutil.copytree if (lab / name).is_dir() else shutil.copy
        copy(lab / name, source / name)
    out = tmp_path / "bids"
    convert(source, out, jobs=1, progress=False)
    assert (out / "sub-01/anat/sub-01_T1w.nii.gz").is_file()
    t1 = source / "sub-01/anat/sub-01_T1w.nii.gz"
    t1.write_bytes(t1.read_bytes()[:5000])
    result = convert(source, out, jobs=1, progress=False)
    assert result.n_failed == 1
    assert not (out / "sub-01").exists() and not (out / "derivatives/lesions/sub-01").exists()
    participants = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str)
    assert participants["participant_id"].tolist() == ["sub-03"]
    errors = validation_errors(out)
    assert not errors, format_issues(errors)


# --- small hand-made trees (no synthetic heads): metadata spreadsheet, template-space T1w, mask choice --------

def _tiny(root: Path, name: str, shape=(24, 24, 24), affine=None, mask: bool = False) -> Path:
    rng = np.random.default_rng(len(name))
    data = (rng.random(shape) > 0.5).astype(np.uint8) if mask else (rng.random(shape) * 1000 + 1).astype(np.int16)
    return save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), root / name)


def test_spreadsheet_metadata_and_mask_choice(tmp_path):
    root = tmp_path / "src"
    write_json(DESCRIPTION, root / "dataset_description.json")
    _tiny(root, "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz")
    _tiny(root, "sub-01/ses-1/anat/sub-01_ses-1_space-MNI152NLin2009aSym_label-lesion_roi.nii.gz", mask=True)
    _tiny(root, "derivatives/manual/sub-01/ses-1/anat/sub-01_ses-1_space-orig_desc-lesion_mask.nii.gz", mask=True)
    _tiny(root, "derivatives/manual/sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz", mask=True)
    sheet = tmp_path / "clinical.csv"
    sheet.write_text("participant_id,session_id,NIHSS score\nsub-01,ses-1,7\nsub-09,,3\n")
    out = tmp_path / "bids"
    result = convert(root, out, metadata=sheet, jobs=1, progress=False)
    report = read_report(out)
    scan = row(report, "sub-01_ses-1")
    # the native-space mask in derivatives wins over the template-space one beside the T1w, which is reported
    assert scan["status"] == "converted", scan.to_dict()
    assert "other_mask: sub-01_ses-1_space-MNI152NLin2009aSym_label-lesion_roi.nii.gz" in scan["checks"]
    assert "desc-brain_mask" in scan["checks"]    # lesion-like, matches no rule: reported
    lesions = out / "derivatives/lesions/sub-01/ses-1/anat"
    written = voxels(lesions / "sub-01_ses-1_space-orig_label-L_desc-T1lesion_mask.nii.gz")
    source = voxels(root / "derivatives/manual/sub-01/ses-1/anat/sub-01_ses-1_space-orig_desc-lesion_mask.nii.gz")
    assert np.array_equal(written > 0, source > 0)
    sessions = pd.read_csv(out / "sub-01/sub-01_sessions.tsv", sep="\t", dtype=str)
    assert sessions["nihss_score"].tolist() == ["7"]
    assert any("sub-09" in p for p in result.metadata_problems), result.metadata_problems


def test_template_space_t1w_goes_to_the_lesion_derivative(tmp_path):
    grid = template_grid()
    root = tmp_path / "src"
    write_json(DESCRIPTION, root / "dataset_description.json")
    _tiny(root, "sub-01/anat/sub-01_space-MNI152NLin2009aSym_T1w.nii.gz", grid.shape, grid.affine)
    _tiny(root, "sub-01/anat/sub-01_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz", grid.shape,
          grid.affine, mask=True)
    out = tmp_path / "bids"
    result = convert(root, out, jobs=1, progress=False)
    assert result.n_failed == 0, result.summary()
    t1 = out / "derivatives/lesions/sub-01/anat/sub-01_space-MNI152NLin2009aSym_T1w.nii.gz"
    assert np.array_equal(voxels(t1), voxels(root / "sub-01/anat/sub-01_space-MNI152NLin2009aSym_T1w.nii.gz"))
    assert not list(out.glob("sub-01/anat/*.nii.gz"))
