"""ATLAS R2.0: ``synth --flavour atlas2`` and its ``bids-convert`` reader.

The synthetic release (conftest ``atlas2_release``: 6 subjects, seed 2, faults) is checked against the R2.0
layout in docs/formats.md and its truth folder; it is converted once per module and the output is checked
with the official validator, pybids, and the test's own reading of the release files (never the converter's
code). Small hand-made releases check the semantics that the generator does not exercise (26-connected
components, strict IDs, a mask in a testing scan).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import ndimage
from test_convert import format_issues, read_report, read_tsv, tree_state, validation_errors

from atlas_curate.cli import main
from atlas_curate.convert import convert, detect_flavour, discover
from atlas_curate.convert.discover import ReleaseError
from atlas_curate.ids import Atlas2ScanId, IdError
from atlas_curate.synth import plan_release
from atlas_curate.synth.release import render_scan, write_metadata
from atlas_curate.templates import get_template

SPACE = "MNI152NLin2009aSym"
TEMPLATE_SHAPE = (197, 233, 189)
XLSX = "20220425_ATLAS_2.0_MetaData.xlsx"
KEY = re.compile(r"^sub-(?P<sub>r(?P<cohort>\d{3})s\d{3})_ses-(?P<ses>\d+)$")
COUNT_COLUMNS = {"LH cortical": "# Lesions LH Cortical and White Matter", "LH subcortical": "# Lesions LH Subcortical",
                 "RH cortical": "# Lesions RH Cortical and White Matter", "RH subcortical": "# Lesions RH Subcortical",
                 "other": "# Lesions Other Location"}
MAPPED = {"# Lesions LH Cortical and White Matter": "n_lesions_lh_cortical",
          "# Lesions LH Subcortical": "n_lesions_lh_subcortical",
          "# Lesions RH Cortical and White Matter": "n_lesions_rh_cortical",
          "# Lesions RH Subcortical": "n_lesions_rh_subcortical",
          "# Lesions Other Location": "n_lesions_other", "Scanner": "scanner"}
STRUCTURE_26 = np.ones((3, 3, 3), bool)


# --- helpers: the test's own reading of the release -----------------------------------------------

def labels(key: str) -> tuple[str, str]:
    m = KEY.match(key)
    assert m, f"unexpected R2.0 scan key {key!r}"
    return m["sub"], m["ses"]


def anat_dir(root: Path, key: str, part: str) -> Path:
    sub, ses = labels(key)
    return root / "ATLAS_2" / part.capitalize() / f"R{KEY.match(key)['cohort']}" / f"sub-{sub}" / f"ses-{ses}" / "anat"


def t1_name(key: str) -> str:
    return f"{key}_space-{SPACE}_T1w.nii.gz"


def mask_name(key: str) -> str:
    return f"{key}_space-{SPACE}_label-L_desc-T1lesion_mask.nii.gz"


def faults_by_kind(release) -> dict[str, str]:
    return {kind: key for key, kind in release.truth["faults"].items()}


def expected_counts(lesions: list[dict]) -> dict[str, int]:
    """Lesions per side and class from the truth (a bilateral lesion counts on its centroid's side)."""
    counts = dict.fromkeys(COUNT_COLUMNS, 0)
    for les in lesions:
        if les["location"] == "other":
            counts["other"] += 1
            continue
        side = {"Left": "LH", "Right": "RH"}.get(les["hemisphere"]) or ("LH" if les["centroid_mm"][0] < 0 else "RH")
        counts[f"{side} {'cortical' if les['location'] == 'cortical' else 'subcortical'}"] += 1
    return counts


def derivative(output: Path, key: str, suffix: str) -> Path:
    sub, ses = labels(key)
    return (output / "derivatives" / "lesions" / f"sub-{sub}" / f"ses-{ses}" / "anat"
            / f"sub-{sub}_ses-{ses}_space-{SPACE}_{suffix}")


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


# --- 1. the synthetic release ----------------------------------------------------------------------

def test_plan_parts_sessions_and_ids():
    plans = plan_release(6, 2, "atlas2", faults=True)
    parts = {p.key: p.part for p in plans}
    assert sorted(k for k, v in parts.items() if v == "testing") == ["sub-r002s002_ses-1", "sub-r003s001_ses-1"]
    assert all(p.timepoint == 1 and not p.override for p in plans)
    assert all(parts[p.key] == "training" for p in plans if p.fault)
    for plan in plans:
        assert str(Atlas2ScanId.parse(plan.key)) == plan.key


def test_layout(atlas2_release):
    root, truth = atlas2_release.root, atlas2_release.truth
    assert [p.name for p in root.iterdir()] == ["ATLAS_2"]
    top = sorted(p.name for p in (root / "ATLAS_2").iterdir())
    assert top == sorted(["Training", "Testing", XLSX, f"{SPACE}.nii.gz"])
    template = get_template()
    assert (root / "ATLAS_2" / f"{SPACE}.nii.gz").read_bytes() == template.t1w.read_bytes()

    folders = set()
    for key, record in truth["scans"].items():
        part = record["plan"]["part"]
        folder = anat_dir(root, key, part)
        folders.add(folder)
        expected = {t1_name(key)} | ({mask_name(key)} if part == "training" else set())
        assert {p.name for p in folder.iterdir()} == expected, folder
        hidden = atlas2_release.truth_dir / "testing_masks" / mask_name(key)
        assert hidden.is_file() == (part == "testing"), hidden
        if record["fault"]:
            continue
        t1 = nib.load(folder / t1_name(key))
        assert t1.shape == TEMPLATE_SHAPE
        np.testing.assert_allclose(t1.affine, template.affine, atol=1e-4)
        mask_img = nib.load(folder / mask_name(key) if part == "training" else hidden)
        np.testing.assert_allclose(mask_img.affine, template.affine, atol=1e-4)
        mask = np.asarray(mask_img.dataobj)
        assert set(np.unique(mask).tolist()) == {0, 1}, key
        dseg = np.asarray(nib.load(atlas2_release.truth_dir / "masks" /
                                   f"{key}_space-{SPACE}_desc-lesions_dseg.nii.gz").dataobj)
        dice = 2 * np.count_nonzero((mask > 0) & (dseg > 0)) / (np.count_nonzero(mask) + np.count_nonzero(dseg))
        assert dice > 0.9, f"{key}: one merged mask should hold every truth lesion (Dice {dice:.3f})"
    # every scan folder is accounted for, and the testing part holds T1s only
    found = {p for p in root.glob("ATLAS_2/*/R*/sub-*/ses-*/anat")}
    assert found == folders
    assert not list(root.glob("ATLAS_2/Testing/**/*_mask.nii.gz"))
    assert len([k for k, r in truth["scans"].items() if r["plan"]["part"] == "testing"]) == 2

    cohorts = sorted(p for p in root.glob("ATLAS_2/*/*") if p.is_dir())
    assert cohorts and all(re.fullmatch(r"R\d{3}", p.name) for p in cohorts)
    for cohort in cohorts:
        doc = json.loads((cohort / "dataset_description.json").read_text())
        assert doc["Name"] and doc["BIDSVersion"], cohort


def test_scans_are_defaced_template_space_renderings(atlas2_release):
    """The standard flavour's renderer: whole heads minus the face, on the template grid."""
    clean = [k for k, r in atlas2_release.truth["scans"].items() if not r["fault"]]
    brain = np.asarray(get_template().load().dataobj) > 0
    origin = get_template().affine[:3, 3]
    face_zone = np.zeros(brain.shape, bool)
    face_zone[:, int(40 - origin[1]):, :int(-20 - origin[2])] = True
    face_zone &= ndimage.distance_transform_edt(~brain) > 20
    for key in clean[:2]:
        part = atlas2_release.truth["scans"][key]["plan"]["part"]
        t1 = np.asarray(nib.load(anat_dir(atlas2_release.root, key, part) / t1_name(key)).dataobj)
        assert np.mean(t1[brain] > 0) > 0.99, f"{key}: brain not imaged"
        head = ndimage.binary_fill_holes(t1 > 10)
        assert np.count_nonzero(head & ~brain) > 0.2 * np.count_nonzero(brain), f"{key}: no scalp/skull"
        # defaced: in front of the brain and below z = -20 mm, more than 20 mm from the brain (the face,
        # ~40 % filled on an intact synthetic head), almost nothing is left
        assert np.count_nonzero(t1[face_zone] > 10) < 0.02 * np.count_nonzero(face_zone), f"{key}: face not removed"


def test_metadata_spreadsheet(atlas2_release):
    table = pd.read_excel(atlas2_release.root / "ATLAS_2" / XLSX, dtype=object, engine="openpyxl")
    assert list(table.columns) == ["Subject ID", *COUNT_COLUMNS.values(), "Scanner"]
    faults = faults_by_kind(atlas2_release)
    truth = atlas2_release.truth["scans"]
    expected = (set(truth) - {faults["folder_without_row"]}) | {faults["row_without_folder"]}
    assert sorted(f"sub-{s}_ses-1" for s in table["Subject ID"]) == sorted(expected)
    assert all(re.fullmatch(r"r\d{3}s\d{3}", s) for s in table["Subject ID"])
    checked = 0
    for _, row in table.iterrows():
        key = f"sub-{row['Subject ID']}_ses-1"
        assert isinstance(row["Scanner"], str) and row["Scanner"], key
        if key not in truth:
            continue
        if truth[key]["plan"]["part"] == "testing":
            assert all(pd.isna(row[c]) for c in COUNT_COLUMNS.values()), f"{key}: testing counts should be hidden"
            continue
        counts = expected_counts(truth[key]["lesions"])
        assert {c: int(row[col]) for c, col in COUNT_COLUMNS.items()} == counts, key
        assert sum(counts.values()) == len(truth[key]["lesions"])
        checked += 1
    assert checked >= 4


def test_synthesis_is_deterministic(atlas2_release, tmp_path):
    """Re-rendering a scan of the fixture's plan and rewriting its spreadsheet gives the same bytes."""
    plans = plan_release(6, 2, "atlas2", faults=True)
    plan = next(p for p in plans if p.key == "sub-r004s001_ses-1")
    record = render_scan(plan, str(tmp_path / "r"), str(tmp_path / "t"))
    for name in (t1_name(plan.key), mask_name(plan.key)):
        rel = anat_dir(atlas2_release.root, plan.key, "training").relative_to(atlas2_release.root) / name
        assert (tmp_path / "r" / rel).read_bytes() == (atlas2_release.root / rel).read_bytes(), name
    assert record["lesions"] == atlas2_release.truth["scans"][plan.key]["lesions"]
    records = list(atlas2_release.truth["scans"].values())
    orphan = next(p for p in plans if p.fault == "row_without_folder")
    records.append({"scan": orphan.key, "plan": asdict(orphan), "lesions": [], "fault": orphan.fault})
    path = write_metadata(records, tmp_path / "meta", "atlas2")
    assert path.read_bytes() == (atlas2_release.root / "ATLAS_2" / XLSX).read_bytes()


# --- 2. flavour detection and discovery ------------------------------------------------------------

def test_flavour_detected_from_archive_root_and_atlas2_folder(atlas2_release):
    root = atlas2_release.root
    assert detect_flavour(root) == "atlas2"
    assert detect_flavour(root / "ATLAS_2") == "atlas2"
    flavour, scans = discover(root)
    flavour2, scans2 = discover(root / "ATLAS_2", "atlas2")
    assert flavour == flavour2 == "atlas2"
    assert [s.key for s in scans] == [s.key for s in scans2]
    expected = sorted(k for k, r in atlas2_release.truth["scans"].items())
    assert [s.key for s in scans] == expected
    for scan in scans:
        record = atlas2_release.truth["scans"][scan.key]
        assert (scan.subject, scan.session) == labels(scan.key)
        assert scan.cohort == f"R{record['plan']['cohort']:03d}"
        assert scan.part == record["plan"]["part"]
        assert bool(scan.smooth) == (scan.part == "training")
        assert not scan.unrecognised and not scan.problems


def _tiny_release(root: Path, scans: dict[tuple[str, str, str], np.ndarray | None]) -> np.ndarray:
    """A hand-made R2.0 tree on a 12 mm cube: {(part, cohort folder, key): mask or None} -> T1 + mask files."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -6
    t1 = np.arange(12 ** 3, dtype=np.float32).reshape(12, 12, 12)
    for (part, cohort, key), mask in scans.items():
        sub, ses = labels(key)
        folder = root / "ATLAS_2" / part / cohort / f"sub-{sub}" / f"ses-{ses}" / "anat"
        save(t1, affine, folder / t1_name(key))
        if mask is not None:
            save(mask, affine, folder / mask_name(key))
    return affine


@pytest.mark.parametrize("bad", ["sub-r01s001", "sub-r001s0001", "sub-R001s001", "r001s001", "sub-r001s001x"])
def test_bad_subject_folder_is_rejected(tmp_path, bad):
    _tiny_release(tmp_path, {("Training", "R001", "sub-r001s001_ses-1"): np.ones((12, 12, 12), np.uint8)})
    (tmp_path / "ATLAS_2" / "Training" / "R001" / bad / "ses-1" / "anat").mkdir(parents=True)
    with pytest.raises(ReleaseError, match=re.escape(bad)):
        discover(tmp_path)
    with pytest.raises(ReleaseError):
        convert(tmp_path, tmp_path.parent / f"out-{bad}", progress=False)
    assert not (tmp_path.parent / f"out-{bad}").exists()


@pytest.mark.parametrize("bad", ["ses-01", "ses-1a", "ses-", "session-1"])
def test_bad_session_folder_is_rejected(tmp_path, bad):
    _tiny_release(tmp_path, {("Training", "R001", "sub-r001s001_ses-1"): np.ones((12, 12, 12), np.uint8)})
    (tmp_path / "ATLAS_2" / "Training" / "R001" / "sub-r001s002" / bad).mkdir(parents=True)
    with pytest.raises(ReleaseError, match=re.escape(bad)):
        discover(tmp_path)


def test_ids_are_strict():
    assert str(Atlas2ScanId.parse_parts("sub-r012s345", "ses-2")) == "sub-r012s345_ses-2"
    assert Atlas2ScanId.parse("sub-r012s345_ses-2").bids_labels("native") == ("r012s345", "2")
    assert Atlas2ScanId.parse("sub-r012s345_ses-2").cohort_id == "R012"
    for bad in ["sub-r012s345_ses-02", "sub-r12s345_ses-1", "sub-r012s345_ses-1/..", "../sub-r012s345_ses-1",
                "sub-r012s345_ses-1 x", "sub-r012s3456_ses-1"]:
        with pytest.raises(IdError):
            Atlas2ScanId.parse(bad)


def test_not_a_release_is_an_error(tmp_path):
    (tmp_path / "ATLAS_2" / "Training" / "notacohort").mkdir(parents=True)
    with pytest.raises(ReleaseError, match="R2.0"):
        detect_flavour(tmp_path)
    with pytest.raises(ReleaseError, match="notacohort"):
        discover(tmp_path, "atlas2")


# --- 3. conversion of the synthetic release --------------------------------------------------------

@pytest.fixture(scope="module")
def converted(atlas2_release, tmp_path_factory):
    before = tree_state(atlas2_release.root)
    output = tmp_path_factory.mktemp("atlas2-bids") / "bids"
    result = convert(atlas2_release.root, output, jobs=2, progress=False)
    return atlas2_release, output, result, before


def test_validator_reports_no_errors(converted):
    errors = validation_errors(converted[1])
    assert not errors, f"bids-validator-deno -r found {len(errors)} error(s):\n{format_issues(errors)}"


def test_pybids_finds_every_t1_and_every_training_mask(converted):
    bids = pytest.importorskip("bids")
    release, output, result, _ = converted
    report = read_report(output).set_index("release_scan")
    layout = bids.BIDSLayout(str(output), derivatives=True)
    written = sorted(k for k in report.index if report.loc[k, "status"] in ("converted", "masks_withheld", "no_mask"))
    testing = sorted(k for k, r in release.truth["scans"].items() if r["plan"]["part"] == "testing")
    assert set(testing) <= set(written)
    t1s = layout.get(suffix="T1w", space=SPACE, extension=".nii.gz")
    assert sorted((f.entities["subject"], f.entities["session"]) for f in t1s) == sorted(labels(k) for k in written)
    training = sorted(k for k in report.index if report.loc[k, "status"] == "converted")
    assert training and not set(training) & set(testing)
    masks = layout.get(suffix="mask", label="L", desc="T1lesion", space=SPACE, extension=".nii.gz")
    assert sorted((f.entities["subject"], f.entities["session"]) for f in masks) == sorted(labels(k) for k in training)
    clean_training = [k for k, r in release.truth["scans"].items() if r["plan"]["part"] == "training"
                      and r["fault"] in ("", "folder_without_row")]
    assert sorted(clean_training) == training


def test_masks_equal_source_voxel_for_voxel(converted):
    release, output, _, _ = converted
    report = read_report(output).set_index("release_scan")
    keys = sorted(report.index[report["status"] == "converted"])
    assert len(keys) >= 4
    for key in keys:
        source_img = nib.load(anat_dir(release.root, key, "training") / mask_name(key))
        source = np.asarray(source_img.dataobj) > 0
        mask_img = nib.load(derivative(output, key, "label-L_desc-T1lesion_mask.nii.gz"))
        mask = np.asarray(mask_img.dataobj)
        assert mask_img.get_data_dtype() == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}, key
        assert np.array_equal(mask > 0, source), f"{key}: {np.count_nonzero((mask > 0) != source)} voxels differ"
        np.testing.assert_allclose(mask_img.affine, source_img.affine, atol=1e-6)
        t1 = derivative(output, key, "T1w.nii.gz")
        assert t1.read_bytes() == (anat_dir(release.root, key, "training") / t1_name(key)).read_bytes()

        # dseg: the 26-connected components of the source mask, 1 = largest
        dseg = np.asarray(nib.load(derivative(output, key, "desc-lesions_dseg.nii.gz")).dataobj)
        components, count = ndimage.label(source, structure=STRUCTURE_26)
        sizes = np.bincount(components.ravel())[1:]
        assert int(dseg.max()) == count, key
        assert np.array_equal(dseg > 0, source), key
        for label in range(1, count + 1):
            region = dseg == label
            ids = np.unique(components[region])
            assert len(ids) == 1, f"{key}: label {label} spans several components"
            assert np.array_equal(region, components == ids[0]), f"{key}: label {label} is not a whole component"
        by_label = [int(np.count_nonzero(dseg == label)) for label in range(1, count + 1)]
        assert by_label == sorted(sizes.tolist(), reverse=True), key
        table = read_tsv(derivative(output, key, "desc-lesions_dseg.tsv"))
        assert [float(v) for v in table["volume_mm3"]] == [float(v) for v in by_label]
        assert table["name"].iloc[0] == "primary"
        sidecar = json.loads(derivative(output, key, "desc-lesions_dseg.json").read_text())
        assert "derived" in sidecar["LesionIdentity"] and "DERIVED" in sidecar["Description"]
        assert report.loc[key, "n_lesions"] == str(count)
        truth_lesions = release.truth["scans"][key]["lesions"]
        # the truth's lesions are separate objects; smoothing may join or split a few, never many
        assert abs(count - len(truth_lesions)) <= max(1, len(truth_lesions) // 2), key


def test_testing_scans_are_no_mask_not_failures(converted):
    release, output, result, _ = converted
    report = read_report(output).set_index("release_scan")
    testing = sorted(k for k, r in release.truth["scans"].items() if r["plan"]["part"] == "testing")
    for key in testing:
        row = report.loc[key]
        assert row["status"] == "no_mask", row.to_dict()
        assert "testing" in row["reason"]
        assert derivative(output, key, "T1w.nii.gz").is_file()
        assert not derivative(output, key, "label-L_desc-T1lesion_mask.nii.gz").exists()
        assert not list(derivative(output, key, "x").parent.glob("*dseg*"))
    faults = release.truth["faults"]
    assert result.n_failed == sum(f in ("truncated_gzip", "mask_grid", "empty_mask") for f in faults.values())


def test_faults_are_reported(converted):
    release, output, result, _ = converted
    report = read_report(output).set_index("release_scan")
    assert sorted(report.index) == sorted(set(release.truth["scans"]) | set(release.truth["faults"]))
    # R2.0's scan IDs are BIDS keys already: scan == release_scan, n/a for a metadata row without a folder
    assert {key: report.loc[key, "scan"] for key in report.index} == {
        key: "n/a" if report.loc[key, "status"] == "no_scan" else key for key in report.index}
    faults = faults_by_kind(release)
    assert sorted(faults) == sorted(["truncated_gzip", "mask_grid", "empty_mask", "folder_without_row",
                                     "row_without_folder"])
    row = report.loc[faults["truncated_gzip"]]
    assert row["status"] == "failed" and "gzip" in row["reason"] and t1_name(faults["truncated_gzip"]) in row["reason"]
    row = report.loc[faults["mask_grid"]]
    assert row["status"] == "masks_withheld" and "mask_grid" in row["reason"]
    row = report.loc[faults["empty_mask"]]
    assert row["status"] == "masks_withheld" and "empty_mask" in row["reason"]
    row = report.loc[faults["folder_without_row"]]
    assert row["status"] == "converted" and "no_metadata_row" in row["checks"]
    assert report.loc[faults["row_without_folder"], "status"] == "no_scan"
    for kind in ("truncated_gzip", "mask_grid", "empty_mask"):
        assert not derivative(output, faults[kind], "label-L_desc-T1lesion_mask.nii.gz").exists(), kind
    assert faults["truncated_gzip"] in result.summary()


def test_participants_and_sessions(converted):
    release, output, _, _ = converted
    report = read_report(output).set_index("release_scan")
    written = sorted(k for k in report.index if report.loc[k, "status"] in ("converted", "masks_withheld", "no_mask"))
    participants = read_tsv(output / "participants.tsv")
    assert dict(zip(participants["participant_id"], participants["cohort"])) == {
        f"sub-{labels(k)[0]}": f"R{KEY.match(k)['cohort']}" for k in written}
    assert set(participants["release"]) == {"R2.0"}
    sidecar = json.loads((output / "sessions.json").read_text())
    assert set(sidecar["part"]["Levels"]) == {"training", "testing"}
    table = pd.read_excel(release.root / "ATLAS_2" / XLSX, dtype=object, engine="openpyxl")
    source = {f"sub-{r['Subject ID']}_ses-1": r for _, r in table.iterrows()}
    for key in written:
        sub, ses = labels(key)
        sessions = read_tsv(output / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").set_index("session_id")
        row = sessions.loc[f"ses-{ses}"]
        assert row["source_id"] == key
        assert row["part"] == release.truth["scans"][key]["plan"]["part"]
        for column, mapped in MAPPED.items():
            assert sidecar[mapped]["SourceColumn"] == column
            value = source[key][column] if key in source else None
            expected = "n/a" if value is None or pd.isna(value) else (
                value if isinstance(value, str) else str(int(value)))
            assert row[mapped] == expected, (key, column)
    description = json.loads((output / "dataset_description.json").read_text())
    assert "R2.0" in description["Name"]


def test_source_release_is_never_written(converted):
    release, _, _, before = converted
    assert tree_state(release.root) == before


# --- 4. a release without faults: exit status 0, unknown columns kept ------------------------------

@pytest.fixture(scope="module")
def clean_copy(atlas2_release, tmp_path_factory):
    """The release without its fault scans, its table given an unknown column and one ``sub-`` prefixed ID."""
    base = tmp_path_factory.mktemp("atlas2-clean")
    faults = {labels(k)[0] for k in atlas2_release.truth["faults"]}
    shutil.copytree(atlas2_release.root, base / "release",
                    ignore=lambda folder, names: [n for n in names if n.removeprefix("sub-") in faults])
    xlsx = base / "release" / "ATLAS_2" / XLSX
    table = pd.read_excel(xlsx, dtype=object, engine="openpyxl")
    table = table[~table["Subject ID"].isin(faults)].reset_index(drop=True)
    table["Handedness"] = ["Left" if i % 2 else "Right" for i in range(len(table))]
    table.loc[0, "Subject ID"] = f"sub-{table.loc[0, 'Subject ID']}"
    table.to_excel(xlsx, index=False, engine="openpyxl")
    return base, table


def test_clean_release_exits_0_with_testing_scans(clean_copy):
    base, _ = clean_copy
    out = base / "bids"
    result = CliRunner().invoke(main, ["bids-convert", str(base / "release"), str(out), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    report = read_report(out)
    assert set(report["status"]) == {"converted", "no_mask"}
    assert (report["status"] == "no_mask").sum() == 2
    errors = validation_errors(out)
    assert not errors, format_issues(errors)


def test_unknown_column_is_kept(clean_copy):
    base, table = clean_copy
    out = base / "bids-meta"
    result = convert(base / "release", out, progress=False)
    assert not result.metadata_problems, result.metadata_problems
    sidecar = json.loads((out / "sessions.json").read_text())
    assert "Handedness" in json.dumps(sidecar["handedness"]) and sidecar["handedness"]["Description"]
    for _, row in table.iterrows():
        sub = row["Subject ID"].removeprefix("sub-")
        sessions = read_tsv(out / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").set_index("session_id")
        assert sessions.loc["ses-1", "handedness"] == row["Handedness"], sub
        assert sessions.loc["ses-1", "scanner"] == row["Scanner"], sub
    assert "no_metadata_row" not in " ".join(result.report["checks"])


# --- 5. hand-made releases: component semantics, stray files, masks in testing ---------------------

def test_components_are_26_connected_and_ordered_by_size(tmp_path):
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:3, 1:3, 1:3] = 1                 # 8 voxels
    mask[3, 3, 3] = 1                       # touches the cube by a corner only: same lesion (9)
    mask[7:11, 7:11, 7:9] = 2               # 32 voxels, stored as 2 (binarised with > 0)
    mask[1, 10, 1] = 1                      # 1 voxel
    affine = _tiny_release(tmp_path / "rel", {("Training", "R001", "sub-r001s001_ses-1"): mask,
                                              ("Testing", "R002", "sub-r002s001_ses-1"): (mask > 0).astype(np.uint8),
                                              ("Testing", "R002", "sub-r002s002_ses-1"): None})
    anat = tmp_path / "rel" / "ATLAS_2" / "Training" / "R001" / "sub-r001s001" / "ses-1" / "anat"
    (anat / "notes.txt").write_text("x")
    out = tmp_path / "bids"
    result = convert(tmp_path / "rel", out, progress=False)
    report = result.report.set_index("release_scan")
    row = report.loc["sub-r001s001_ses-1"]
    assert row["status"] == "converted" and row["n_lesions"] == 3
    assert row["lesion_volumes_mm3"] == "32.0;9.0;1.0"
    assert "not_binary" in row["checks"] and "unrecognised_file: anat/notes.txt" in row["checks"]
    dseg = np.asarray(nib.load(derivative(out, "sub-r001s001_ses-1", "desc-lesions_dseg.nii.gz")).dataobj)
    assert np.all(dseg[7:11, 7:11, 7:9] == 1) and np.all(dseg[1:3, 1:3, 1:3] == 2) and dseg[3, 3, 3] == 2
    assert dseg[1, 10, 1] == 3 and np.count_nonzero(dseg) == 42
    union = np.asarray(nib.load(derivative(out, "sub-r001s001_ses-1", "label-L_desc-T1lesion_mask.nii.gz")).dataobj)
    assert np.array_equal(union > 0, mask > 0)
    np.testing.assert_allclose(nib.load(derivative(out, "sub-r001s001_ses-1", "desc-lesions_dseg.nii.gz")).affine,
                               affine)
    # a testing scan that does ship a mask is converted; one without is no_mask; nothing failed
    assert report.loc["sub-r002s001_ses-1", "status"] == "converted"
    assert report.loc["sub-r002s002_ses-1", "status"] == "no_mask"
    assert result.n_failed == 0
    assert any("metadata" in p for p in result.metadata_problems)


def test_missing_training_mask_and_misfiled_cohort_are_reported(tmp_path):
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[4:6, 4:6, 4:6] = 1
    _tiny_release(tmp_path / "rel", {("Training", "R001", "sub-r001s001_ses-1"): None,
                                     ("Training", "R001", "sub-r002s001_ses-1"): mask})
    result = convert(tmp_path / "rel", tmp_path / "bids", progress=False)
    report = result.report.set_index("release_scan")
    assert report.loc["sub-r001s001_ses-1", "status"] == "masks_withheld"
    assert "no_lesion_mask" in report.loc["sub-r001s001_ses-1", "reason"]
    assert report.loc["sub-r002s001_ses-1", "status"] == "converted"
    assert "cohort_folder" in report.loc["sub-r002s001_ses-1", "checks"]
    assert result.n_failed == 1
