"""``bids-convert``: synthetic releases (both archives, with faults) and real MRIcron VOIs -> BIDS.

Each synthetic release is converted once per module (jobs=2) and the checks read that output. The
expected values come from the release files themselves and the generator's ground truth (``.truth``),
re-derived here with the test's own small parsers, never from the converter's code.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import shared_fixture

from atlas_curate.cli import main
from atlas_curate.convert import convert
from atlas_curate.convert.discover import ReleaseError
from atlas_curate.io import read_mask

NATIVE_KEY = re.compile(r"^c(?P<cohort>\d{4})s(?P<subject>\d{4})t(?P<tp>\d{2})$")
STANDARD_KEY = re.compile(r"^(?P<site>Site\d+)/(?P<subject>\d{6})/t(?P<tp>\d{2})$")
FAZEKAS = {"fazekas_pvh": "PVH", "fazekas_dwmh": "DWMH"}
STATE_DIR = ".atlas-curate"


# --- helpers: the test's own reading of the release and the output --------------------------------

@dataclass
class Converted:
    release: object          # conftest.Release
    output: Path
    result: object           # ConversionResult
    source_before: list      # tree_state(release.root) taken just before the conversion


def tree_state(root: Path) -> list[tuple]:
    """(path, size, mtime_ns, md5) of every file and (path, mtime_ns) of every folder under root."""
    state = []
    for path in [root, *sorted(root.rglob("*"))]:
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if path.is_dir():
            state.append((rel, "dir", st.st_mtime_ns))
        else:
            state.append((rel, st.st_size, st.st_mtime_ns, hashlib.md5(path.read_bytes()).hexdigest()))
    return state


def output_hashes(root: Path) -> dict[str, str]:
    """sha256 of every output file, except the converter's own state folder."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and STATE_DIR not in p.relative_to(root).parts}


def scan_file_mtimes(root: Path) -> dict[str, int]:
    """mtime_ns of the per-scan files (everything inside a ses-* folder, raw and derivative)."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.is_file() and any(part.startswith("ses-") for part in p.relative_to(root).parts)}


def labels(key: str, naming: str = "native") -> tuple[str, str]:
    """Expected BIDS (subject, session) labels of a release scan ID."""
    m = NATIVE_KEY.match(key)
    if m:
        cohort, subject, tp = int(m["cohort"]), int(m["subject"]), int(m["tp"])
        if naming == "native":
            return f"c{cohort:04d}s{subject:04d}", f"t{tp:02d}"
        width = 3 if subject <= 999 else 4
        return f"r{cohort:03d}s{subject:0{width}d}", str(tp)
    m = STANDARD_KEY.match(key)
    assert m, f"unexpected scan key {key!r}"
    return m["subject"], f"t{m['tp']}"


def cohort_of(key: str) -> str:
    m = NATIVE_KEY.match(key)
    return f"c{m['cohort']}" if m else STANDARD_KEY.match(key)["site"]


def scan_folder(root: Path, key: str) -> tuple[Path, str]:
    """The scan's folder in the release and the stem its file names start with."""
    m = NATIVE_KEY.match(key)
    if m:
        return root / f"c{m['cohort']}" / key, key
    m = STANDARD_KEY.match(key)
    base = root / "ATLAS_R1.1" if (root / "ATLAS_R1.1").is_dir() else root
    return base / m["site"] / m["subject"] / f"t{m['tp']}", m["subject"]


def source_masks(root: Path, key: str) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """{(Smooth|Raw, voi|nii.gz): {lesion index: boolean mask}} read from the release folder."""
    folder, stem = scan_folder(root, key)
    pattern = re.compile(rf"^{re.escape(stem)}_Lesion(?P<kind>Smooth|Raw)(?:_(?P<index>\d+))?(?:_stx)?"
                         r"\.(?P<ext>voi|nii\.gz)$")
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for path in sorted(folder.iterdir()):
        m = pattern.match(path.name)
        if m:
            found.setdefault((m["kind"], m["ext"]), {})[int(m["index"] or 0)] = read_mask(path)[0]
    return found


def one(paths: list[Path], what: str) -> Path:
    assert len(paths) == 1, f"expected exactly one {what}, found {[str(p) for p in paths]}"
    return paths[0]


def output_t1(output: Path, sub: str, ses: str) -> list[Path]:
    return sorted(output.glob(f"**/sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}*_T1w.nii.gz"))


def output_derivative(output: Path, sub: str, ses: str, pattern: str) -> list[Path]:
    folder = output / "derivatives" / "lesions" / f"sub-{sub}" / f"ses-{ses}" / "anat"
    return sorted(folder.glob(f"sub-{sub}_ses-{ses}_*{pattern}"))


def read_report(output: Path) -> pd.DataFrame:
    return pd.read_csv(output / "conversion_report.tsv", sep="\t", dtype=str, keep_default_na=False)


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def written_scans(report: pd.DataFrame) -> list[str]:
    return sorted(report.loc[report["status"].isin(["converted", "masks_withheld"]), "release_scan"])


def source_rows(release) -> dict[str, dict]:
    """The release's metadata table keyed by scan ID, every cell as stripped text ('' = blank)."""
    root = release.root
    xlsx = sorted(root.glob("*Meta*.xlsx"))
    if xlsx:
        table = pd.read_excel(xlsx[0], dtype=object, engine="openpyxl")
        rows = {}
        for _, row in table.iterrows():
            cells = {c: ("" if pd.isna(v) else str(v).strip()) for c, v in row.items()}
            rows[cells["Subject ID"]] = cells
        return rows
    table = pd.read_csv(one(sorted(root.glob("**/*Meta*.csv")), "metadata csv"), dtype=str, keep_default_na=False)
    rows = {}
    for _, row in table.iterrows():
        cells = {c.strip(): v.strip() for c, v in row.items()}
        key = f"{cells['INDI Site ID']}/{int(cells['INDI Subject ID']):06d}/{cells['Session']}"
        rows[key] = cells
    return rows


def grade_text(value: str) -> str:
    return "n/a" if value == "" else str(int(float(value)))


def validator() -> str:
    found = shutil.which("bids-validator-deno")
    if not found:
        beside = Path(sys.executable).parent / "bids-validator-deno"
        found = str(beside) if beside.is_file() else None
    if not found:
        pytest.skip("the official BIDS validator (bids-validator-deno) is not installed: "
                    "pip install bids-validator-deno")
    return found


def _collect_issues(doc: dict, where: str = "") -> list[dict]:
    issues = [{**issue, "dataset": where or "/"} for issue in doc.get("issues", {}).get("issues", [])]
    for name, sub in (doc.get("derivativesSummary") or {}).items():
        issues += _collect_issues(sub, f"{where}{name}")
    return issues


def validation_errors(dataset: Path) -> list[dict]:
    """Error-severity issues of ``bids-validator-deno DATASET -r`` (derivatives included)."""
    proc = subprocess.run([validator(), str(dataset), "-r", "--format", "json"], capture_output=True, text=True,
                          timeout=300)
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"validator gave no JSON (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    assert "issues" in doc, f"unexpected validator output keys {list(doc)}"
    return [i for i in _collect_issues(doc) if i.get("severity") == "error"]


def format_issues(issues: list[dict]) -> str:
    return "\n".join(f"  [{i['dataset']}] {i.get('code')} {i.get('subCode', '')} at {i.get('location')}: "
                     f"{str(i.get('issueMessage', ''))[:300]}" for i in issues)


def _convert_once(release, tmp_path_factory, name: str) -> Converted:
    before = tree_state(release.root)
    output = tmp_path_factory.mktemp(name) / "bids"
    result = convert(release.root, output, jobs=2, progress=False)
    return Converted(release, output, result, before)


@pytest.fixture(scope="module")
def native_bids(native_release, tmp_path_factory) -> Converted:
    return _convert_once(native_release, tmp_path_factory, "native-bids")


@pytest.fixture(scope="module")
def standard_bids(standard_release, tmp_path_factory) -> Converted:
    return _convert_once(standard_release, tmp_path_factory, "standard-bids")


@pytest.fixture(params=["native", "standard"])
def converted(request) -> Converted:
    return request.getfixturevalue(f"{request.param}_bids")


# --- 1. the official validator --------------------------------------------------------------------

def test_validator_reports_no_errors(converted):
    errors = validation_errors(converted.output)
    assert not errors, f"bids-validator-deno -r found {len(errors)} error(s):\n{format_issues(errors)}"


# --- 2. pybids finds every image with the right entities ------------------------------------------

def test_pybids_finds_t1_and_lesion_masks(converted):
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(str(converted.output), derivatives=True)
    report = read_report(converted.output)
    written = written_scans(report)
    with_masks = sorted(report.loc[report["status"] == "converted", "release_scan"])
    assert written and with_masks

    t1s = layout.get(suffix="T1w", extension=".nii.gz")
    found_t1 = sorted((f.entities["subject"], f.entities["session"]) for f in t1s)
    assert found_t1 == sorted(labels(k) for k in written)
    masks = layout.get(suffix="mask", label="L", desc="T1lesion", extension=".nii.gz")
    found_masks = sorted((f.entities["subject"], f.entities["session"]) for f in masks)
    assert found_masks == sorted(labels(k) for k in with_masks)
    if converted.release.truth["flavour"] == "native":
        assert ("c0001s0001", "t01") in found_t1
        assert ("c0001s0001", "t01") in found_masks
    for key in with_masks:
        sub, ses = labels(key)
        assert len(layout.get(subject=sub, session=ses, suffix="T1w", extension=".nii.gz")) == 1, key
        assert len(layout.get(subject=sub, session=ses, suffix="mask", label="L", desc="T1lesion",
                              extension=".nii.gz")) == 1, key


# --- 3. masks equal their sources voxel for voxel -------------------------------------------------

def test_masks_equal_source_voxel_for_voxel(converted):
    root, output = converted.release.root, converted.output
    report = read_report(output).set_index("release_scan")
    truth = converted.release.truth
    keys = sorted(report.index[report["status"] == "converted"])
    assert keys
    raw_checked = 0
    for key in keys:
        sub, ses = labels(key)
        sources = source_masks(root, key)
        smooth_sets = {ext: masks for (kind, ext), masks in sources.items() if kind == "Smooth"}
        assert smooth_sets, f"{key}: no LesionSmooth file in the release"
        t1 = nib.load(one(output_t1(output, sub, ses), f"{key} T1w"))
        src_t1 = nib.load(next(p for p in scan_folder(root, key)[0].iterdir()
                               if p.name.endswith("_t1w_deface_stx.nii.gz")
                               or p.name == f"{key}.nii.gz"))
        np.testing.assert_allclose(t1.affine, src_t1.affine, atol=1e-5, err_msg=f"{key}: T1 affine changed")

        mask_img = nib.load(one(output_derivative(output, sub, ses, "label-L_desc-T1lesion_mask.nii.gz"),
                                f"{key} union mask"))
        dseg_img = nib.load(one(output_derivative(output, sub, ses, "desc-lesions_dseg.nii.gz"), f"{key} dseg"))
        for img, what in ((mask_img, "mask"), (dseg_img, "dseg")):
            assert img.get_data_dtype() == np.uint8, f"{key} {what}: dtype {img.get_data_dtype()}"
            assert img.shape == t1.shape[:3], f"{key} {what}: shape {img.shape} vs T1 {t1.shape}"
            np.testing.assert_allclose(img.affine, t1.affine, atol=1e-6, err_msg=f"{key} {what}: affine differs")
        mask = np.asanyarray(mask_img.dataobj)
        assert set(np.unique(mask).tolist()) == {0, 1}, f"{key}: mask values {np.unique(mask)}"
        dseg = np.asanyarray(dseg_img.dataobj)

        for ext, masks in smooth_sets.items():
            assert sorted(masks) == list(range(len(masks))), f"{key}: lesion indices {sorted(masks)}"
            union = np.logical_or.reduce([masks[i] for i in sorted(masks)])
            assert np.array_equal(mask > 0, union), (
                f"{key}: union mask differs from OR of LesionSmooth .{ext} in "
                f"{np.count_nonzero((mask > 0) != union)} voxels")
            stack = np.stack([masks[i] for i in sorted(masks)])
            count = stack.sum(axis=0)
            first = np.argmax(stack, axis=0) + 1          # lowest lesion index covering the voxel
            assert np.all(dseg[count == 0] == 0), f"{key}: dseg labels outside every lesion"
            for index in sorted(masks):
                alone = masks[index] & (count == 1)
                assert np.all(dseg[alone] == index + 1), f"{key}: dseg label {index + 1} != source lesion {index}"
            assert np.array_equal(dseg[count > 1], first[count > 1]), f"{key}: overlaps not given the lower label"
        assert int(dseg.max()) == len(truth["scans"][key]["lesions"])

        expected = [les["volume_mm3_native_smooth"] for les in truth["scans"][key]["lesions"]]
        volumes = [float(v) for v in report.loc[key, "lesion_volumes_mm3"].split(";")]
        np.testing.assert_allclose(volumes, expected, atol=0.06, err_msg=f"{key}: lesion volumes / release order")
        assert int(report.loc[key, "n_lesions"]) == len(expected)

        raw_sets = {ext: masks for (kind, ext), masks in sources.items() if kind == "Raw"}
        raw_out = output_derivative(output, sub, ses, "label-L_desc-T1lesionRaw_mask.nii.gz")
        if not raw_sets:
            assert not raw_out, f"{key}: raw tracing written without a LesionRaw source"
            continue
        raw_img = nib.load(one(raw_out, f"{key} raw mask"))
        raw = np.asanyarray(raw_img.dataobj)
        assert raw_img.get_data_dtype() == np.uint8 and set(np.unique(raw).tolist()) == {0, 1}
        np.testing.assert_allclose(raw_img.affine, t1.affine, atol=1e-6)
        raw_union = np.logical_or.reduce([m for masks in raw_sets.values() for m in masks.values()])
        assert np.array_equal(raw > 0, raw_union), f"{key}: raw tracing differs from OR of LesionRaw files"
        raw_checked += 1
    if truth["flavour"] == "native":
        assert raw_checked == len(keys), "every native scan has LesionRaw tracings to compare"


# --- 4. faults are reported, everything else converted --------------------------------------------

def test_report_lists_every_fault_with_its_reason(converted):
    truth = converted.release.truth
    faults = truth["faults"]
    assert sorted(set(faults.values())) == sorted(["truncated_gzip", "mask_grid", "empty_mask",
                                                   "folder_without_row", "row_without_folder"])
    report = read_report(converted.output)
    assert report["release_scan"].is_unique
    assert sorted(report["release_scan"]) == sorted(set(truth["scans"]) | set(faults))
    # scan: the BIDS scan key as in every other table; release_scan right after it; n/a without a scan folder
    assert list(report.columns[:4]) == ["scan", "release_scan", "participant_id", "session_id"]
    for _, row in report.iterrows():
        if row["status"] == "no_scan":
            assert (row["scan"], row["participant_id"], row["session_id"]) == ("n/a",) * 3, row.to_dict()
            continue
        sub, ses = labels(row["release_scan"])
        assert (row["scan"], row["participant_id"], row["session_id"]) == (
            f"sub-{sub}_ses-{ses}", f"sub-{sub}", f"ses-{ses}"), row.to_dict()
    pd.testing.assert_series_equal(converted.result.report["status"].astype(str), report["status"],
                                   check_names=False)
    rows = report.set_index("release_scan")
    for key, fault in faults.items():
        row = rows.loc[key]
        where = f"{key} ({fault}): {row.to_dict()}"
        if fault == "truncated_gzip":
            assert row["status"] == "failed", where
            assert "gzip" in row["reason"] or "truncated" in row["reason"], where
        elif fault == "mask_grid":
            assert row["status"] == "masks_withheld" and "mask_grid" in row["reason"], where
        elif fault == "empty_mask":
            assert row["status"] == "masks_withheld" and "empty_mask" in row["reason"], where
        elif fault == "folder_without_row":
            assert row["status"] == "converted" and "no_metadata_row" in row["checks"], where
        elif fault == "row_without_folder":
            assert row["status"] == "no_scan", where
        if row["status"] in ("failed", "masks_withheld", "no_scan"):
            sub, ses = labels(key)
            assert not output_derivative(converted.output, sub, ses, "_mask.nii.gz"), f"{where}: mask written"
        if row["status"] in ("failed", "no_scan"):
            assert not output_t1(converted.output, *labels(key)), f"{where}: T1 written"
    for key in truth["scans"]:
        if key not in faults:
            assert rows.loc[key, "status"] == "converted", f"{key}: {rows.loc[key].to_dict()}"
            assert "no_metadata_row" not in rows.loc[key, "checks"], key
    assert converted.result.n_failed == sum(f in ("truncated_gzip", "mask_grid", "empty_mask")
                                            for f in faults.values())


def test_primary_override_is_reported(converted):
    truth = converted.release.truth
    overrides = {k for k, rec in truth["scans"].items() if rec.get("primary_override")}
    assert overrides, "the synthetic release should hold a primary-override scan"
    rows = read_report(converted.output).set_index("release_scan")
    for key in truth["scans"]:
        if rows.loc[key, "status"] != "converted":
            continue
        assert rows.loc[key, "primary_override"] == ("true" if key in overrides else "false"), key
    for key in overrides:
        assert rows.loc[key, "status"] == "converted"
        sidecar = one(output_derivative(converted.output, *labels(key), "desc-lesions_dseg.json"), "dseg sidecar")
        assert json.loads(sidecar.read_text())["PrimaryIsLargest"] is False


# --- 5. the real MRIcron VOIs ---------------------------------------------------------------------

def test_real_mricron_vois(tmp_path):
    ch2 = shared_fixture("colin27", "ch2.nii.gz")
    voi1, voi2 = shared_fixture("mricron", "1.voi"), shared_fixture("mricron", "2.voi")
    key = "c0001s0001t01"
    folder = tmp_path / "release" / "c0001" / key
    folder.mkdir(parents=True)
    shutil.copyfile(ch2, folder / f"{key}.nii.gz")
    shutil.copyfile(voi1, folder / f"{key}_LesionSmooth.voi")
    shutil.copyfile(voi2, folder / f"{key}_LesionSmooth_1.voi")

    t1 = nib.load(ch2)
    (m1, img1), (m2, img2) = read_mask(voi1), read_mask(voi2)
    assert m1.sum() == 42008 and m2.sum() == 21800, "fixture VOIs decode to their documented voxel counts"
    grids_agree = all(img.shape[:3] == t1.shape[:3] and np.allclose(img.affine, t1.affine, atol=1e-3)
                      for img in (img1, img2))

    result = convert(tmp_path / "release", tmp_path / "bids", progress=False)
    assert result.metadata_problems and any("metadata" in p for p in result.metadata_problems)
    row = result.report.set_index("release_scan").loc[key]
    out = tmp_path / "bids"
    t1_out = one(output_t1(out, "c0001s0001", "t01"), "T1")
    assert t1_out.read_bytes() == ch2.read_bytes(), "T1 not copied byte for byte"
    if not grids_agree:
        assert row["status"] == "masks_withheld" and "mask_grid" in row["reason"], row.to_dict()
        return
    assert row["status"] == "converted", row.to_dict()
    assert result.n_failed == 0
    union = nib.load(one(output_derivative(out, "c0001s0001", "t01", "label-L_desc-T1lesion_mask.nii.gz"), "mask"))
    data = np.asanyarray(union.dataobj)
    assert int(np.count_nonzero(data)) == int(np.count_nonzero(m1 | m2))
    assert np.array_equal(data > 0, m1 | m2)
    dseg = np.asanyarray(nib.load(one(output_derivative(out, "c0001s0001", "t01", "desc-lesions_dseg.nii.gz"),
                                      "dseg")).dataobj)
    assert np.all(dseg[m1] == 1) and np.all(dseg[m2 & ~m1] == 2) and np.all(dseg[~(m1 | m2)] == 0)
    assert not bool(row["primary_override"]), "1.voi (42,008 voxels) is larger than 2.voi (21,800)"
    assert not output_derivative(out, "c0001s0001", "t01", "desc-T1lesionRaw_mask.nii.gz")


# --- 6. reruns and the read-only source -----------------------------------------------------------

def test_rerun_skips_finished_scans_and_overwrite_is_identical(native_bids, tmp_path):
    output = tmp_path / "bids"
    shutil.copytree(native_bids.output, output)            # copy2 keeps mtimes
    first_hashes = output_hashes(output)
    first_mtimes = scan_file_mtimes(output)
    assert first_hashes and first_mtimes

    again = convert(native_bids.release.root, output, jobs=2, progress=False)
    pd.testing.assert_frame_equal(again.report, native_bids.result.report)
    assert output_hashes(output) == first_hashes
    assert scan_file_mtimes(output) == first_mtimes, "a finished scan was converted again"

    redone = convert(native_bids.release.root, output, jobs=2, overwrite=True, progress=False)
    pd.testing.assert_frame_equal(redone.report, native_bids.result.report)
    changed = {p for p, t in scan_file_mtimes(output).items() if t != first_mtimes.get(p)}
    assert changed, "overwrite=True rewrote nothing"
    after = output_hashes(output)
    differ = sorted(p for p in set(after) | set(first_hashes) if after.get(p) != first_hashes.get(p))
    assert not differ, f"overwrite changed bytes of {differ}"


def test_source_release_is_never_written(converted):
    assert tree_state(converted.release.root) == converted.source_before


# --- 7. metadata tables and sidecars --------------------------------------------------------------

def test_participants_and_sessions_tables(converted):
    output, release = converted.output, converted.release
    report = read_report(output)
    written = written_scans(report)
    source = source_rows(release)

    participants = read_tsv(output / "participants.tsv")
    assert list(participants.columns[:2]) == ["participant_id", "cohort"]
    assert participants["participant_id"].is_unique
    expected_participants = {f"sub-{labels(k)[0]}": cohort_of(k) for k in written}
    assert dict(zip(participants["participant_id"], participants["cohort"])) == expected_participants
    part_sidecar = json.loads((output / "participants.json").read_text())
    for column in participants.columns:
        assert part_sidecar.get(column, {}).get("Description"), f"participants.json lacks {column}"

    sess_sidecar = json.loads((output / "sessions.json").read_text())
    tables = sorted(output.glob("sub-*/sub-*_sessions.tsv"))
    assert sorted(t.parent.name for t in tables) == sorted({f"sub-{labels(k)[0]}" for k in written})
    seen = {}
    for table_path in tables:
        table = read_tsv(table_path)
        for column in table.columns:
            assert sess_sidecar.get(column, {}).get("Description"), f"sessions.json lacks {column} ({table_path.name})"
        for column in FAZEKAS:
            assert column in table.columns, f"{table_path.name} lacks {column}"
            levels = sess_sidecar[column].get("Levels")
            assert levels and set(levels) == {"0", "1", "2", "3"}, f"{column} Levels: {levels}"
            for value in table[column]:
                assert value == "n/a" or (value.isdigit() and value in levels), f"{column}: {value!r}"
        for _, row in table.iterrows():
            seen[row["source_id"]] = (table_path.parent.name, row)
    assert sorted(seen) == written, "sessions.tsv source_id should list the release IDs of the written scans"
    for key in written:
        subject_dir, row = seen[key]
        sub, ses = labels(key)
        assert (subject_dir, row["session_id"]) == (f"sub-{sub}", f"ses-{ses}")
        if key in source:
            for column, source_column in FAZEKAS.items():
                assert row[column] == grade_text(source[key][source_column]), f"{key} {column}"
            assert row["stroke_type"] == source[key]["Stroke type"], key
        else:
            assert all(row[c] == "n/a" for c in FAZEKAS), f"{key}: no metadata row, yet values"
    if release.truth["flavour"] == "native":
        assert "c0001s0001t01" in seen


def test_standard_session_whitespace_and_padded_subject_ids(standard_bids):
    output = standard_bids.output
    csv_path = one(sorted(standard_bids.release.root.glob("**/*Meta*.csv")), "metadata csv")
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    padded = raw[raw["Session"] != raw["Session"].str.strip()]
    assert len(padded), "the synthetic csv should hold a Session cell with stray whitespace"
    assert (raw["INDI Subject ID"].str.len() < 6).any(), "the csv should hold unpadded subject IDs"
    report = read_report(output).set_index("release_scan")
    checked = 0
    for _, row in padded.iterrows():
        key = f"{row['INDI Site ID'].strip()}/{int(row['INDI Subject ID']):06d}/{row['Session'].strip()}"
        assert key in report.index
        assert report.loc[key, "status"] != "no_scan", f"{key}: row with {row['Session']!r} not matched"
        assert "no_metadata_row" not in report.loc[key, "checks"], key
        if report.loc[key, "status"] in ("converted", "masks_withheld"):
            sub, ses = labels(key)
            sessions = read_tsv(output / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").set_index("session_id")
            assert sessions.loc[f"ses-{ses}", "source_session"] == row["Session"].strip()
            assert sessions.loc[f"ses-{ses}", "stroke_type"] == row["Stroke type"].strip()
            checked += 1
    assert checked
    participants = read_tsv(output / "participants.tsv")
    with_row = participants[participants["indi_subject_id"] != "n/a"]
    assert len(with_row)
    for _, row in with_row.iterrows():
        assert re.fullmatch(r"\d{6}", row["indi_subject_id"]), row.to_dict()
        assert row["participant_id"] == f"sub-{row['indi_subject_id']}"


@pytest.fixture(scope="module")
def edited_native(native_release, native_bids, tmp_path_factory):
    """One good scan of the native release with a 'Handedness' column and a Fazekas PVH of 7 in its row."""
    report = native_bids.result.report
    key = sorted(k for k in report.loc[report["status"] == "converted", "release_scan"]
                 if k not in native_release.truth["faults"])[0]
    base = tmp_path_factory.mktemp("edited")
    keep = {f"c{NATIVE_KEY.match(key)['cohort']}", key}

    def ignore(folder, names):
        return [n for n in names if (Path(folder) / n).is_dir() and n not in keep]

    shutil.copytree(native_release.root, base / "release", ignore=ignore)
    xlsx = one(sorted((base / "release").glob("*Meta*.xlsx")), "metadata xlsx")
    table = pd.read_excel(xlsx, dtype=object, engine="openpyxl")
    assert "Handedness" not in table.columns
    table["Handedness"] = ["Left-handed" if i % 2 else "Right-handed" for i in range(len(table))]
    row = table.index[table["Subject ID"] == key]
    assert len(row) == 1
    table.loc[row, "PVH"] = 7
    table.to_excel(xlsx, index=False, engine="openpyxl")
    handedness = table.loc[row[0], "Handedness"]
    result = convert(base / "release", base / "bids", progress=False)
    return key, handedness, result, base / "bids"


def test_unknown_spreadsheet_column_is_kept(edited_native):
    key, handedness, result, output = edited_native
    assert result.report.set_index("release_scan").loc[key, "status"] == "converted"
    sub, ses = labels(key)
    sessions = read_tsv(output / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").set_index("session_id")
    assert "handedness" in sessions.columns, list(sessions.columns)
    assert sessions.loc[f"ses-{ses}", "handedness"] == handedness
    sidecar = json.loads((output / "sessions.json").read_text())
    assert sidecar.get("handedness", {}).get("Description"), sidecar.get("handedness")
    assert "Handedness" in json.dumps(sidecar["handedness"])


def test_bad_fazekas_grade_is_na_and_reported(edited_native):
    key, _, result, output = edited_native
    sub, ses = labels(key)
    sessions = read_tsv(output / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").set_index("session_id")
    assert sessions.loc[f"ses-{ses}", "fazekas_pvh"] == "n/a"
    assert [p for p in result.metadata_problems if key in p and "PVH" in p], result.metadata_problems


def test_dataset_descriptions(native_bids):
    """The raw dataset's description links nothing; the lesion derivative's links the raw dataset."""
    from atlas_curate import __version__, naming

    raw = json.loads((native_bids.output / "dataset_description.json").read_text())
    assert sorted(raw) == ["Authors", "BIDSVersion", "DatasetType", "GeneratedBy", "License", "Name",
                           "ReferencesAndLinks"]
    assert (raw["DatasetType"], raw["BIDSVersion"]) == ("raw", naming.BIDS_VERSION)
    assert raw["GeneratedBy"] == [{"Name": "atlas-curate", "Version": __version__,
                                   "Description": "bids-convert of the ATLAS R1.1-native archive"}]
    derivative = json.loads((native_bids.output / "derivatives" / "lesions" / "dataset_description.json").read_text())
    assert sorted(derivative) == ["BIDSVersion", "DatasetLinks", "DatasetType", "GeneratedBy", "License", "Name",
                                  "SourceDatasets"]
    assert (derivative["DatasetType"], derivative["BIDSVersion"]) == ("derivative", naming.BIDS_VERSION)
    assert derivative["SourceDatasets"] == [{"URL": "bids:raw:"}] and derivative["DatasetLinks"] == {"raw": "../../"}
    assert derivative["License"] == raw["License"]


def _tiny_native_release(root: Path, keys: list[str]) -> None:
    """Hand-made native scans on a 12 mm cube: T1, one smoothed and one raw lesion each."""
    t1 = np.arange(12 ** 3, dtype=np.float32).reshape(12, 12, 12)
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[3:6, 3:6, 3:6] = 1
    for key in keys:
        folder = root / f"c{NATIVE_KEY.match(key)['cohort']}" / key
        folder.mkdir(parents=True)
        for data, name in ((t1, f"{key}.nii.gz"), (mask, f"{key}_LesionSmooth.nii.gz"),
                           (mask, f"{key}_LesionRaw.nii.gz")):
            nib.save(nib.Nifti1Image(data, np.eye(4)), folder / name)


def test_session_less_scans(tmp_path, monkeypatch):
    """A scan without a session (sub-X only) is written to sub-X/anat/ with sub-X_* names, reported with
    session_id n/a, listed in participants.tsv, given no sessions.tsv row, and skipped when current."""
    from dataclasses import replace

    from atlas_curate.convert import pipeline
    from atlas_curate.convert.scan import scan_outputs
    from atlas_curate.naming import ScanRef

    keys = ["c0001s0001t01", "c0002s0001t01"]
    _tiny_native_release(tmp_path / "release", keys)
    real = pipeline.discover

    def session_less(*args, **kwargs):
        flavour, scans = real(*args, **kwargs)
        return flavour, [replace(scan, ref=ScanRef(scan.ref.sub)) for scan in scans]

    monkeypatch.setattr(pipeline, "discover", session_less)
    out = tmp_path / "bids"
    result = convert(tmp_path / "release", out, progress=False)
    report = read_report(out).set_index("release_scan")
    lesions = out / "derivatives" / "lesions"
    for key in keys:
        sub = labels(key)[0]
        row = report.loc[key]
        assert (row["scan"], row["participant_id"], row["session_id"], row["status"]) == (
            f"sub-{sub}", f"sub-{sub}", "n/a", "converted"), row.to_dict()
        assert (out / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz").is_file()
        assert (out / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.json").is_file()
        for name in ("space-orig_label-L_desc-T1lesion_mask.nii.gz", "space-orig_label-L_desc-T1lesion_mask.json",
                     "space-orig_desc-lesions_dseg.nii.gz", "space-orig_desc-lesions_dseg.tsv",
                     "space-orig_label-L_desc-T1lesionRaw_mask.nii.gz", "space-orig_desc-lesionsRaw_dseg.tsv"):
            assert (lesions / f"sub-{sub}" / "anat" / f"sub-{sub}_{name}").is_file(), name
        assert (out / STATE_DIR / "convert" / f"sub-{sub}.json").is_file()
    assert not list(out.rglob("ses-*")) and not list(out.glob("sub-*/*_sessions.tsv"))
    assert sorted(read_tsv(out / "participants.tsv")["participant_id"]) == [f"sub-{labels(k)[0]}" for k in keys]
    scan = next(iter(pipeline.discover(tmp_path / "release")[1]))
    derived = "derivatives/lesions/sub-c0001s0001/anat/sub-c0001s0001_space-orig_"
    assert {key: path.as_posix() for key, path in scan_outputs(scan).items()} == {
        "t1w": "sub-c0001s0001/anat/sub-c0001s0001_T1w.nii.gz",
        "lesion_mask": f"{derived}label-L_desc-T1lesion_mask.nii.gz",
        "lesion_dseg": f"{derived}desc-lesions_dseg.nii.gz", "lesion_dseg_tsv": f"{derived}desc-lesions_dseg.tsv",
        "raw_mask": f"{derived}label-L_desc-T1lesionRaw_mask.nii.gz",
        "raw_dseg": f"{derived}desc-lesionsRaw_dseg.nii.gz", "raw_dseg_tsv": f"{derived}desc-lesionsRaw_dseg.tsv"}

    hashes, mtimes = output_hashes(out), {p: p.stat().st_mtime_ns for p in lesions.glob("sub-*/**/*") if p.is_file()}
    again = convert(tmp_path / "release", out, progress=False)
    pd.testing.assert_frame_equal(again.report, result.report)
    assert output_hashes(out) == hashes
    assert mtimes and {p: p.stat().st_mtime_ns for p in lesions.glob("sub-*/**/*") if p.is_file()} == mtimes, \
        "a current scan was redone"


# --- 8. Dask ---------------------------------------------------------------------------------------

def test_dask_executor_gives_the_same_result(standard_bids, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        result = convert(standard_bids.release.root, tmp_path / "bids", executor="dask",
                         scheduler=cluster.scheduler_address, progress=False)
    pd.testing.assert_frame_equal(result.report, standard_bids.result.report)
    assert output_hashes(tmp_path / "bids") == output_hashes(standard_bids.output)


# --- 9. CLI ----------------------------------------------------------------------------------------

def test_cli_exits_1_and_prints_failed_scans(standard_release, tmp_path):
    out = tmp_path / "bids"
    result = CliRunner().invoke(main, ["bids-convert", str(standard_release.root), str(out), "--jobs", "2"])
    assert result.exit_code == 1, result.output
    report = read_report(out).set_index("release_scan")
    bad = report.index[report["status"].isin(["failed", "masks_withheld"])]
    assert len(bad) == 3
    for key in bad:
        lines = [line for line in result.output.splitlines() if key in line]
        assert any(report.loc[key, "status"].upper() in line for line in lines), (key, result.output)


def test_output_inside_source_is_refused(native_release, tmp_path, monkeypatch, capsys):
    root = native_release.root
    inside = root / "bids-out"
    for target in (inside, root, root.parent):
        with pytest.raises(ReleaseError):
            convert(root, target, progress=False)
    assert not inside.exists()

    from atlas_curate.cli import run
    monkeypatch.setattr(sys, "argv", ["atlas-curate", "bids-convert", str(root), str(inside)])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not inside.exists()


# --- 10. ATLAS 2.0 naming --------------------------------------------------------------------------

def test_atlas2_naming_validates(native_release, tmp_path):
    out = tmp_path / "bids"
    result = convert(native_release.root, out, naming_scheme="atlas2", jobs=2, progress=False)
    written = written_scans(result.report)
    assert ("r001s001", "1") in {labels(k, "atlas2") for k in written}
    for key in written:
        sub, ses = labels(key, "atlas2")
        one(output_t1(out, sub, ses), f"{key} T1 as sub-{sub} ses-{ses}")
        sessions = read_tsv(out / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").set_index("session_id")
        assert sessions.loc[f"ses-{ses}", "source_id"] == key
    assert not list(out.glob("sub-c*")), "native labels left in an atlas2 conversion"
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(str(out), derivatives=True)
    masks = layout.get(suffix="mask", label="L", desc="T1lesion", extension=".nii.gz")
    assert sorted((f.entities["subject"], f.entities["session"]) for f in masks) == \
        sorted(labels(k, "atlas2") for k in result.report.loc[result.report["status"] == "converted", "release_scan"])
    errors = validation_errors(out)
    assert not errors, f"atlas2 naming: {len(errors)} validator error(s):\n{format_issues(errors)}"
