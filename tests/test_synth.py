"""The synthetic ATLAS release: layout, formats, lesions, ground truth, metadata, faults, determinism.

Most tests read the session releases built once in conftest (``native_release``: 4 subjects, seed 3,
faults; ``standard_release``: 3 subjects, seed 5, faults). Checks are made against the formats of the
real release (docs/formats.md) and against the truth folder, recomputed independently where possible.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.processing import resample_from_to

from atlas_curate.anatomy import classify_lesion
from atlas_curate.ids import IndiScanId, ScanId
from atlas_curate.io import InputError, grid_difference, load_nifti, read_mask
from atlas_curate.synth import FAULT_KINDS, plan_release, synthesize
from atlas_curate.synth.release import render_scan, write_metadata
from atlas_curate.templates import get_template

TEMPLATE_SHAPE = (197, 233, 189)
TEMPLATE_NAME = "MNI152NLin2009aSym"
NATIVE_XLSX = "20171106_ATLAS_Meta-Data_Release_1.1_Updated.xlsx"
STANDARD_CSV = "ATLAS_R1.1/ATLAS_Meta-Data_Release_1.1_standard_mni.csv"
COUNT_COLUMNS = ["# Strokes LH Cortical", "# Strokes LH subcortical", "# Strokes RH Cortical",
                 "# Strokes RH subcortical"]
METADATA_COLUMNS = ["Subject ID", *COUNT_COLUMNS, "Other Location", "Stroke type", "Primary Stroke Location",
                    "Primary Stroke Location Hemisphere", "Vascular territory", "PVH", "DWMH", "Notes"]
SMOOTH_NII = re.compile(r"^(?P<id>c\d{4}s\d{4}t\d{2})_LesionSmooth(?:_(?P<k>[1-9]\d*))?\.nii\.gz$")


# ------------------------------------------------------------------------------------------ helpers


def _scan_dir(release, scan: str) -> Path:
    return release.root / scan[:5] / scan


def _scan_dirs(release) -> list[Path]:
    return sorted(p for p in release.root.glob("c*/c*") if p.is_dir())


def _faults(release) -> dict[str, str]:
    """Fault kind -> scan."""
    return {kind: scan for scan, kind in release.truth["faults"].items()}


def _clean_scans(release) -> list[str]:
    return sorted(s for s, rec in release.truth["scans"].items() if not rec["fault"])


def _smooth_niftis(scan_dir: Path) -> list[Path]:
    """The scan's LesionSmooth .nii.gz files in release order (primary, _1, _2, ...)."""
    found = {}
    for path in scan_dir.iterdir():
        match = SMOOTH_NII.match(path.name)
        if match:
            found[int(match["k"] or 0)] = path
    assert sorted(found) == list(range(len(found))), f"non-contiguous lesion indices in {scan_dir}"
    return [found[k] for k in sorted(found)]


def _dseg(release, scan: str) -> np.ndarray:
    path = release.truth_dir / "masks" / f"{scan.replace('/', '_')}_space-{TEMPLATE_NAME}_desc-lesions_dseg.nii.gz"
    img = nib.load(path)
    assert img.shape == TEMPLATE_SHAPE
    return np.asarray(img.dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _voi_header(path: Path) -> dict:
    with gzip.open(path) as handle:
        raw = handle.read(352)
    return {"magic": raw[344:348], "vox_offset": struct.unpack("<f", raw[108:112])[0],
            "slope": struct.unpack("<f", raw[112:116])[0], "datatype": struct.unpack("<h", raw[70:72])[0],
            "qform_code": struct.unpack("<h", raw[252:254])[0], "sform_code": struct.unpack("<h", raw[254:256])[0]}


def _read_native_metadata(release) -> pd.DataFrame:
    return pd.read_excel(release.root / NATIVE_XLSX, engine="openpyxl")


# ----------------------------------------------------------------------------------- native layout


def test_native_layout(native_release):
    root = native_release.root
    truth_scans = native_release.truth["scans"]
    cohorts = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert all(re.fullmatch(r"c\d{4}", c) for c in cohorts), cohorts
    assert len(cohorts) >= 3
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == [NATIVE_XLSX]

    scan_dirs = _scan_dirs(native_release)
    for scan_dir in scan_dirs:
        assert re.fullmatch(r"c\d{4}s\d{4}t\d{2}", scan_dir.name), scan_dir
        assert scan_dir.name.startswith(scan_dir.parent.name)
    assert sorted(d.name for d in scan_dirs) == sorted(truth_scans)
    # every entry under a cohort is a scan folder
    assert sum(1 for c in cohorts for _ in (root / c).iterdir()) == len(scan_dirs)

    sessions = defaultdict(set)
    for scan_dir in scan_dirs:
        scan = ScanId.parse(scan_dir.name)
        sessions[scan.subject_id].add(f"t{scan.timepoint:02d}")
    assert any({"t01", "t02"} <= s for s in sessions.values()), "no subject with a second time point"

    for scan_dir in scan_dirs:
        scan = scan_dir.name
        n = len(truth_scans[scan]["lesions"])
        assert n >= 1
        expected = {f"{scan}.nii.gz"}
        for k in range(n):
            suffix = f"_{k}" if k else ""
            expected |= {f"{scan}_LesionRaw{suffix}.voi", f"{scan}_LesionSmooth{suffix}.voi",
                         f"{scan}_LesionSmooth{suffix}.nii.gz"}
        assert {p.name for p in scan_dir.iterdir()} == expected, scan


def test_truth_is_outside_the_release(native_release, standard_release):
    for release in (native_release, standard_release):
        root, truth = release.root.resolve(), release.truth_dir.resolve()
        assert root not in truth.parents and truth != root
        assert truth not in root.parents
        assert (truth / "truth.json").is_file() and (truth / "lesions.tsv").is_file()
        names = [p.name for p in root.rglob("*")]
        assert not any(n in ("truth.json", "lesions.tsv") or "dseg" in n or "truth" in n for n in names)


def test_native_grids_vary(native_release):
    zooms, orientations, dtypes, four_d = set(), set(), set(), 0
    for scan_dir in _scan_dirs(native_release):
        img = nib.load(scan_dir / f"{scan_dir.name}.nii.gz")  # header only: the truncated one reads too
        record = native_release.truth["scans"][scan_dir.name]
        shape = img.shape
        if len(shape) == 4:
            assert shape[3] == 1
            four_d += 1
        assert list(shape) == record["shape"]
        np.testing.assert_allclose(img.affine, record["affine"], atol=1e-4)
        assert str(img.get_data_dtype()) == record["dtype"]
        zooms.add(tuple(round(float(z), 3) for z in img.header.get_zooms()[:3]))
        orientations.add("".join(nib.aff2axcodes(img.affine)))
        dtypes.add(str(img.get_data_dtype()))
        assert img.header.get_sform(coded=True)[1] > 0
    assert {(1.0, 1.0, 1.0), (0.9, 0.9, 3.0)} <= zooms
    assert {"RAS", "LAS", "LPS"} <= orientations
    assert {"int16", "float32"} <= dtypes
    assert four_d >= 1, "no T1 with a trailing singleton 4th dimension"


def test_voi_files_in_both_flavours(native_release):
    slopes = defaultdict(list)
    for voi in sorted(native_release.root.rglob("*.voi")):
        header = _voi_header(voi)
        assert header["magic"] == b"n+1\x00"
        assert header["vox_offset"] == 352.0
        assert header["datatype"] == 2
        assert header["qform_code"] == 0 and header["sform_code"] > 0
        slope = round(header["slope"], 4)
        assert slope in (1.0, 0.01), voi
        slopes[slope].append(voi)
    assert set(slopes) == {1.0, 0.01}

    clean = set(_clean_scans(native_release))
    for slope, stored in ((1.0, 1), (0.01, 100)):
        voi = next(p for p in slopes[slope] if "Smooth" in p.name and p.parent.name in clean)
        raw = gzip.decompress(voi.read_bytes())
        assert set(np.unique(np.frombuffer(raw[352:], np.uint8)).tolist()) == {0, stored}
        # the VOI and the .nii.gz of the same smoothed lesion hold the same mask on the same grid
        from_voi, voi_img = read_mask(voi)
        from_nii, nii_img = read_mask(voi.with_name(voi.name.replace(".voi", ".nii.gz")))
        assert grid_difference(voi_img, nii_img) is None
        np.testing.assert_array_equal(from_voi, from_nii)
        assert from_voi.any()


def test_secondary_order_and_primary_override(native_release):
    truth = native_release.truth
    overrides = 0
    for scan, record in truth["scans"].items():
        if record["fault"] == "empty_mask":
            continue
        counts = [int(np.count_nonzero(read_mask(p)[0])) for p in _smooth_niftis(_scan_dir(native_release, scan))]
        assert len(counts) == len(record["lesions"])
        assert all(c > 0 for c in counts), scan
        secondaries = counts[1:]
        assert secondaries == sorted(secondaries, reverse=True), f"{scan}: secondaries not largest first {counts}"
        smaller_primary = len(counts) >= 2 and counts[0] < counts[1]
        assert smaller_primary == record["primary_override"], f"{scan}: {counts}"
        overrides += record["primary_override"]
        voxel = float(np.prod(record["zooms"]))
        np.testing.assert_allclose([les["volume_mm3_native_smooth"] for les in record["lesions"]],
                                   np.array(counts) * voxel, rtol=1e-3)
    assert overrides >= 1


@pytest.mark.parametrize("fixture", ["native_release", "standard_release"])
def test_lesion_volumes_plausible(request, fixture):
    release = request.getfixturevalue(fixture)
    volumes = [les["volume_mm3_template"] for rec in release.truth["scans"].values() for les in rec["lesions"]]
    assert volumes
    assert all(100.0 <= v <= 70_000.0 for v in volumes), volumes
    # the truth volume is the voxel count of its label in the truth dseg (1 mm template grid)
    scan = max(release.truth["scans"], key=lambda s: len(release.truth["scans"][s]["lesions"]))
    dseg = _dseg(release, scan)
    counts = [int(np.count_nonzero(dseg == label)) for label in range(1, dseg.max() + 1)]
    assert counts == [round(les["volume_mm3_template"]) for les in release.truth["scans"][scan]["lesions"]]


# ---------------------------------------------------------------------------------- truth transform


def test_truth_transform_maps_native_masks_onto_truth(native_release):
    template = get_template()
    target = (TEMPLATE_SHAPE, template.affine)
    identity_fails = 0
    scans = _clean_scans(native_release)
    assert len(scans) >= 3
    for scan in scans:
        record = native_release.truth["scans"][scan]
        paths = _smooth_niftis(_scan_dir(native_release, scan))
        masks = [read_mask(p) for p in paths]
        union = np.any([m for m, _ in masks], axis=0).astype(np.uint8)
        native_affine = masks[0][1].affine
        truth_mask = _dseg(native_release, scan) > 0
        assert truth_mask.any()
        pose = np.asarray(record["native_to_template_ras"])
        assert pose.shape == (4, 4)
        scores = {}
        for name, matrix in (("truth", pose), ("identity", np.eye(4))):
            moved = resample_from_to(nib.Nifti1Image(union, matrix @ native_affine), target, order=0)
            scores[name] = _dice(np.asarray(moved.dataobj) > 0, truth_mask)
        assert scores["truth"] > 0.9, f"{scan}: Dice {scores}"
        identity_fails += scores["identity"] <= 0.9
    assert identity_fails >= 1, "the native poses are all the identity"


# ------------------------------------------------------------------------------------------ metadata


def _expected_row(dseg: np.ndarray) -> tuple[dict, object]:
    counts = dict.fromkeys(COUNT_COLUMNS, 0)
    counts["Other Location"] = 0
    n = int(dseg.max())
    assert sorted(np.unique(dseg).tolist()) == list(range(n + 1)), "labels must be 1..n"
    described = [classify_lesion(dseg == label) for label in range(1, n + 1)]
    for lesion in described:
        if lesion.location == "other":
            counts["Other Location"] += 1
            continue
        left = lesion.hemisphere == "Left" or (lesion.hemisphere == "Bilateral" and lesion.centroid_mm[0] < 0)
        kind = "Cortical" if lesion.location == "cortical" else "subcortical"
        counts[f"# Strokes {'LH' if left else 'RH'} {kind}"] += 1
    return counts, described[0]


def _check_metadata_rows(rows: dict[str, pd.Series], release) -> int:
    checked = 0
    for scan, row in rows.items():
        record = release.truth["scans"].get(scan)
        if record is None:  # row_without_folder: no scan, no truth mask
            continue
        dseg = _dseg(release, scan)
        counts, primary = _expected_row(dseg)
        assert int(dseg.max()) == len(record["lesions"])
        got = {k: int(row[k]) for k in counts}
        assert got == counts, f"{scan}: metadata {got} != recomputed {counts}"
        assert sum(got.values()) == len(record["lesions"])
        assert row["Primary Stroke Location Hemisphere"] == primary.hemisphere
        assert row["Vascular territory"] == primary.territory
        expected_location = {"cortical": "Cortical", "subcortical": "Subcortical"}.get(
            primary.location, primary.other_site.capitalize())
        assert row["Primary Stroke Location"] == expected_location
        for grade in ("PVH", "DWMH"):
            value = row[grade]
            assert pd.isna(value) or (float(value).is_integer() and 0 <= float(value) <= 3), (scan, grade, value)
        assert isinstance(row["Stroke type"], str) and row["Stroke type"]
        checked += 1
    return checked


def test_native_metadata(native_release):
    table = _read_native_metadata(native_release)
    assert list(table.columns) == METADATA_COLUMNS
    assert table["Subject ID"].is_unique
    for text in table["Subject ID"]:
        ScanId.parse(text)
    faults = _faults(native_release)
    expected_ids = ((set(native_release.truth["scans"]) - {faults["folder_without_row"]})
                    | {faults["row_without_folder"]})
    assert set(table["Subject ID"]) == expected_ids
    rows = {r["Subject ID"]: r for _, r in table.iterrows()}
    assert _check_metadata_rows(rows, native_release) == len(expected_ids) - 1


def test_standard_metadata(standard_release):
    path = standard_release.root / STANDARD_CSV
    header = path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["INDI Site ID", "INDI Subject ID", "Session"]
    assert header[3:] == METADATA_COLUMNS[1:]
    table = pd.read_csv(path, dtype={"INDI Subject ID": str, "Session": str})
    rows = {}
    for _, row in table.iterrows():
        scan = IndiScanId.parse_parts(row["INDI Site ID"], row["INDI Subject ID"], row["Session"])
        rows[str(scan)] = row
    assert len(rows) == len(table)
    faults = _faults(standard_release)
    expected = (set(standard_release.truth["scans"]) - {faults["folder_without_row"]}) | {faults["row_without_folder"]}
    assert set(rows) == expected
    assert _check_metadata_rows(rows, standard_release) == len(expected) - 1


# -------------------------------------------------------------------------------------------- faults


def test_native_faults(native_release):
    faults = _faults(native_release)
    assert set(faults) == set(FAULT_KINDS)
    table = _read_native_metadata(native_release)
    listed = set(table["Subject ID"])

    scan = faults["truncated_gzip"]
    with pytest.raises(InputError, match="truncated|corrupt"):
        load_nifti(_scan_dir(native_release, scan) / f"{scan}.nii.gz")

    scan = faults["mask_grid"]
    t1 = load_nifti(_scan_dir(native_release, scan) / f"{scan}.nii.gz")
    for path in _scan_dir(native_release, scan).glob(f"{scan}_Lesion*"):
        assert grid_difference(t1, load_nifti(path)) is not None, path

    scan = faults["empty_mask"]
    masks = sorted(_scan_dir(native_release, scan).glob(f"{scan}_Lesion*"))
    assert len(masks) == 3
    assert not any(read_mask(p)[0].any() for p in masks)
    assert native_release.truth["scans"][scan]["lesions"], "the truth still knows the lesion"

    scan = faults["row_without_folder"]
    assert scan in listed
    assert not _scan_dir(native_release, scan).exists()
    assert not any(p.name == scan for p in native_release.root.rglob("*"))

    scan = faults["folder_without_row"]
    assert _scan_dir(native_release, scan).is_dir()
    assert scan not in listed

    # the control: clean scans load, and their masks are non-empty and on the T1 grid
    for scan in _clean_scans(native_release):
        scan_dir = _scan_dir(native_release, scan)
        t1 = load_nifti(scan_dir / f"{scan}.nii.gz")
        assert t1.ndim == 3
        for path in scan_dir.glob(f"{scan}_Lesion*"):
            mask, img = read_mask(path)
            assert grid_difference(t1, img) is None, path
            assert mask.any(), path


def test_standard_faults(standard_release):
    faults = _faults(standard_release)
    assert set(faults) == set(FAULT_KINDS)
    records = standard_release.truth["scans"]

    def scan_dir(scan: str) -> Path:
        plan = records[scan]["plan"]
        return standard_release.root / "ATLAS_R1.1" / f"Site{plan['cohort']}" / f"{plan['subject_number']:06d}" / \
            f"t{plan['timepoint']:02d}"

    scan = faults["truncated_gzip"]
    with pytest.raises(InputError, match="truncated|corrupt"):
        load_nifti(next(scan_dir(scan).glob("*_t1w_deface_stx.nii.gz")))
    scan = faults["mask_grid"]
    t1 = load_nifti(next(scan_dir(scan).glob("*_t1w_deface_stx.nii.gz")))
    assert all(grid_difference(t1, load_nifti(p)) for p in scan_dir(scan).glob("*_LesionSmooth*"))
    scan = faults["empty_mask"]
    assert not any(read_mask(p)[0].any() for p in scan_dir(scan).glob("*_LesionSmooth*"))
    assert faults["row_without_folder"] not in records
    assert scan_dir(faults["folder_without_row"]).is_dir()


# ---------------------------------------------------------------------------------- standard flavour


def test_standard_layout(standard_release):
    root = standard_release.root
    assert [p.name for p in root.iterdir()] == ["ATLAS_R1.1"]
    template = get_template()
    records = standard_release.truth["scans"]
    faults = _faults(standard_release)
    folders = {p.relative_to(root).as_posix() for p in root.glob("ATLAS_R1.1/Site*/*/t*") if p.is_dir()}
    expected_folders = set()
    for scan, record in records.items():
        plan = record["plan"]
        stem = f"{plan['subject_number']:06d}"
        folder = root / "ATLAS_R1.1" / f"Site{plan['cohort']}" / stem / f"t{plan['timepoint']:02d}"
        expected_folders.add(folder.relative_to(root).as_posix())
        n = len(record["lesions"])
        expected = {f"{stem}_t1w_deface_stx.nii.gz"} | {
            f"{stem}_LesionSmooth{f'_{k}' if k else ''}_stx.nii.gz" for k in range(n)}
        assert {p.name for p in folder.iterdir()} == expected, folder
        if record["fault"]:
            continue
        assert re.fullmatch(r"ATLAS_R1\.1/Site\d+/\d{6}/t\d{2}", folder.relative_to(root).as_posix())
        for path in folder.iterdir():
            img = load_nifti(path)
            assert img.shape == TEMPLATE_SHAPE, path
            np.testing.assert_allclose(img.affine, template.affine, atol=1e-4)
        masks = [read_mask(folder / f"{stem}_LesionSmooth{f'_{k}' if k else ''}_stx.nii.gz")[0] for k in range(n)]
        assert all(m.any() for m in masks)
        # standard space: the masks are the truth lesions up to the 2 mm smoothing
        assert _dice(np.any(masks, axis=0), _dseg(standard_release, scan) > 0) > 0.9
    assert folders == expected_folders
    assert len(records) - len(set(faults) - {"row_without_folder"}) >= 3


def test_standard_subject_ids_are_six_digits(standard_release):
    """Every scan, fault scans included, has an INDI id that parses back (6-digit subject folder)."""
    for scan, record in standard_release.truth["scans"].items():
        assert str(IndiScanId.parse(scan)) == scan
        assert record["plan"]["subject_number"] <= 999_999
    for folder in standard_release.root.glob("ATLAS_R1.1/Site*/*"):
        assert re.fullmatch(r"\d{6}", folder.name), folder


# -------------------------------------------------------------------------------------- determinism


CHEAP_PLAN = (3, 11, 2)  # plan_release(3, 11)[2]: cohort 3, 0.9 x 0.9 x 3 mm, the cheapest grid


def _cheap_plan(seed: int):
    subjects, _, index = CHEAP_PLAN
    plan = plan_release(subjects, seed)[index]
    assert plan.cohort == 3 and not plan.fault
    return plan


def _tree(base: Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def rendered_once(tmp_path_factory):
    base = tmp_path_factory.mktemp("render_a")
    record = render_scan(_cheap_plan(CHEAP_PLAN[1]), str(base / "release"), str(base / "truth"))
    return base, record


def test_render_scan_is_deterministic(rendered_once, tmp_path):
    base_a, record_a = rendered_once
    record_b = render_scan(_cheap_plan(CHEAP_PLAN[1]), str(tmp_path / "release"), str(tmp_path / "truth"))
    tree_a, tree_b = _tree(base_a), _tree(tmp_path)
    assert len(tree_a) >= 5
    assert sorted(tree_a) == sorted(tree_b)
    different = [name for name in tree_a if tree_a[name] != tree_b[name]]
    assert different == []
    assert json.dumps(record_a, sort_keys=True) == json.dumps(record_b, sort_keys=True)


def test_render_scan_depends_on_seed(rendered_once, tmp_path):
    base_a, record_a = rendered_once
    plan = _cheap_plan(CHEAP_PLAN[1] + 1)
    record_c = render_scan(plan, str(tmp_path / "release"), str(tmp_path / "truth"))
    scan = plan.key
    t1 = f"release/c0003/{scan}/{scan}.nii.gz"
    assert (base_a / t1).read_bytes() != (tmp_path / t1).read_bytes()
    assert record_a["native_to_template_ras"] != record_c["native_to_template_ras"]


def test_metadata_spreadsheet_is_deterministic(native_release, tmp_path, monkeypatch):
    import time

    records = list(native_release.truth["scans"].values())
    real_time = time.time
    a = write_metadata(records, tmp_path / "a", "native").read_bytes()
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600.0)  # as if written an hour later
    b = write_metadata(records, tmp_path / "b", "native").read_bytes()
    assert a == b


# ----------------------------------------------------------------------------------------- hardness


def test_lesion_intensity_overlaps_csf(native_release):
    """A threshold at the lesion's median intensity takes in more non-lesion brain than lesion."""
    template = get_template()
    scan = next(s for s in _clean_scans(native_release)
                if np.allclose(native_release.truth["scans"][s]["zooms"], 1.0))
    record = native_release.truth["scans"][scan]
    scan_dir = _scan_dir(native_release, scan)
    t1 = load_nifti(scan_dir / f"{scan}.nii.gz")
    image = np.asarray(t1.dataobj, dtype=np.float32)
    lesion = np.any([read_mask(p)[0] for p in _smooth_niftis(scan_dir)], axis=0)
    # the template brain mask carried into this scan's grid with the true pose
    pose = np.asarray(record["native_to_template_ras"])
    brain_tpl = (np.asarray(template.load().dataobj) > 0).astype(np.uint8)
    brain = np.asarray(resample_from_to(nib.Nifti1Image(brain_tpl, np.linalg.inv(pose) @ template.affine),
                                        (image.shape, t1.affine), order=0).dataobj) > 0
    assert np.count_nonzero(lesion & ~brain) < 0.05 * np.count_nonzero(lesion)

    median = float(np.median(image[lesion]))
    healthy = brain & ~lesion
    # the lesion is visible (darker than healthy brain) ...
    assert median < float(np.median(image[healthy]))
    # ... but not separable by a threshold: CSF and sulci are as dark
    dark = image <= median
    assert np.count_nonzero(dark & healthy) > np.count_nonzero(dark & lesion)


# ---------------------------------------------------------------------------------------------- pathology


def _pathology_release(tmp_path_factory, flavour: str, subjects: int, seed: int):
    """A release with its truth, built with pathology (``synth --pathology``) and the faults."""
    from conftest import Release

    base = tmp_path_factory.mktemp(f"{flavour}-pathology")
    synthesize(base / "release", subjects=subjects, seed=seed, flavour=flavour, faults=True, truth=base / "truth",
               jobs=2, progress=False, pathology=True)
    return Release(base / "release", base / "truth")


@pytest.fixture(scope="module")
def pathology_native_release(tmp_path_factory):
    """The session fixture ``native_release`` again, with pathology."""
    return _pathology_release(tmp_path_factory, "native", subjects=4, seed=3)


@pytest.fixture(scope="module")
def pathology_standard_release(tmp_path_factory):
    """The session fixture ``standard_release`` again, with pathology."""
    return _pathology_release(tmp_path_factory, "standard", subjects=3, seed=5)


def test_pathology_is_per_subject_and_never_on_a_lesion(pathology_native_release, pathology_standard_release):
    """Sessions of a subject share its pathology; subjects differ; no pathology label on a lesion voxel; the
    spreadsheet reports the grades the subject was rendered with."""
    records = pathology_native_release.truth["scans"]
    assert pathology_native_release.truth["pathology"] is True
    by_subject = defaultdict(list)
    for scan, record in records.items():
        by_subject[record["plan"]["subject_index"]].append(scan)
    shared = [scans for scans in by_subject.values() if len(scans) == 2]
    assert shared, "no subject with two sessions"
    for first, second in shared:
        assert records[first]["pathology"] == records[second]["pathology"]
        assert (_pathology(pathology_native_release, first).tobytes()
                == _pathology(pathology_native_release, second).tobytes())
    clean = [s for s in _clean_scans(pathology_native_release) if records[s]["plan"]["subject_index"] < 9000]
    kinds = {json.dumps({k: v for k, v in records[s]["pathology"].items() if k != "lesion_rim_levels"},
                        sort_keys=True) for s in clean}
    assert len(kinds) == len({records[s]["plan"]["subject_index"] for s in clean})
    for release in (pathology_native_release, pathology_standard_release):
        for scan, record in release.truth["scans"].items():
            doc = record["pathology"]
            assert doc["rendered"]
            labels = _pathology(release, scan)
            assert not (labels.astype(bool) & (_dseg(release, scan) > 0)).any(), scan
            assert doc["wmh_mm3"] == float(np.count_nonzero(labels == 1))
            assert doc["reported_pvh"] in (doc["fazekas_pvh"], "") and doc["reported_dwmh"] in (doc["fazekas_dwmh"], "")
    table = _read_native_metadata(pathology_native_release).set_index("Subject ID")
    for scan in clean:
        for column, key in (("PVH", "reported_pvh"), ("DWMH", "reported_dwmh")):
            reported = records[scan]["pathology"][key]
            value = table.loc[scan, column]
            assert (pd.isna(value) if reported == "" else int(value) == reported), (scan, column, value, reported)
    pathology_table = pd.read_csv(pathology_native_release.truth_dir / "pathology.tsv", sep="\t")
    assert sorted(pathology_table["scan"]) == sorted(records)


def _pathology(release, scan: str) -> np.ndarray:
    path = release.truth_dir / "masks" / f"{scan.replace('/', '_')}_space-{TEMPLATE_NAME}_desc-pathology_dseg.nii.gz"
    return np.asarray(nib.load(path).dataobj)
