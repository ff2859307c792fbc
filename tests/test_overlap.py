"""``overlap-map``: the map, the inclusion rules, the tables and the lesion report on a hand-made dataset.

The dataset is written here with plain nibabel (fake ``normalize`` outputs on the template grid, a
``qc.tsv`` with a failing scan, an off-grid mask, a scan without a mask, a truncated mask, a native-space
dseg) so every expected value is known: the maps are checked against the mean of the binary masks, the
tables against counts made here from :func:`atlas_curate.anatomy.classify_lesion` on each lesion's full
mask, the volumes against voxel counts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from atlas_curate.anatomy import classify_lesion
from atlas_curate.dataset import scan_table
from atlas_curate.overlap import NoScansError, accumulate, overlap_map, read_scan, summary
from atlas_curate.overlap.maps import ScanJob
from atlas_curate.overlap.pipeline import select_scans
from atlas_curate.templates import get_template

SPACE = "MNI152NLin2009aSym"
COUNTS = ("lh_cortical", "lh_subcortical", "rh_cortical", "rh_subcortical", "other")
NATIVE_ZOOMS = (1.0, 1.0, 2.0)

# scan -> cohort, QC verdict, lesions as (MNI centre mm, radius mm); label k = k-th lesion (1 = primary)
PLAN = {
    "sub-01_ses-1": ("A", True, [((-45, -20, 45), 8), ((28, -8, 28), 4)]),
    "sub-01_ses-2": ("A", True, [((-45, -20, 45), 9)]),
    "sub-02_ses-1": ("A", False, [((40, 10, 20), 7)]),
    "sub-03_ses-1": ("A", True, [((-30, 0, 10), 6)]),      # mask written on a 2 mm grid: off-grid
    "sub-04_ses-1": ("B", True, []),                       # no mask (like a withheld test scan)
    "sub-05_ses-1": ("B", True, [((22, -65, -35), 6), ((-40, -30, 50), 5)]),
    "sub-06_ses-1": ("B", True, [((25, -5, 22), 5)]),      # its spreadsheet row is wrong on purpose
    "sub-07_ses-1": ("B", True, [((-20, 30, 0), 5)]),      # mask file truncated: unreadable
}
PVH = {"sub-01_ses-1": 1, "sub-01_ses-2": 1, "sub-02_ses-1": 2, "sub-03_ses-1": 2, "sub-04_ses-1": None,
       "sub-05_ses-1": 3, "sub-06_ses-1": 0, "sub-07_ses-1": 2}
DEFAULT_IN = ["sub-01_ses-1", "sub-05_ses-1", "sub-06_ses-1"]


# --- the hand-made dataset -------------------------------------------------------------------------

@dataclass
class Fake:
    root: Path
    affine: np.ndarray
    dsegs: dict[str, np.ndarray] = field(default_factory=dict)     # template-grid label images
    native: dict[str, dict[int, int]] = field(default_factory=dict)  # scan -> native voxel count per label


def sphere(shape, affine, centre, radius) -> np.ndarray:
    ijk = np.round(np.linalg.solve(affine, [*centre, 1.0])[:3]).astype(int)
    r = int(np.ceil(radius))
    out = np.zeros(shape, bool)
    i, j, k = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
    ball = i ** 2 + j ** 2 + k ** 2 <= radius ** 2
    out[ijk[0] - r:ijk[0] + r + 1, ijk[1] - r:ijk[1] + r + 1, ijk[2] - r:ijk[2] + r + 1] = ball
    return out


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=4)
    img.set_qform(affine, code=4)
    nib.save(img, path)


def anat(base: Path, scan: str) -> Path:
    sub, ses = scan.split("_")
    return base / sub / ses / "anat"


def lesion_anatomy(fake: Fake, scan: str) -> list:
    """classify_lesion of every lesion of a scan, from its full template-grid mask (the test's own count)."""
    dseg = fake.dsegs[scan]
    return [classify_lesion(dseg == label) for label in range(1, int(dseg.max()) + 1)]


def expected_counts(fake: Fake, scan: str) -> dict:
    counts = dict.fromkeys(COUNTS, 0)
    found = lesion_anatomy(fake, scan)
    for les in found:
        if les.location == "other":
            counts["other"] += 1
        else:
            side = "lh" if les.centroid_mm[0] < 0 else "rh"
            counts[f"{side}_{les.location}"] += 1
    return {"n": len(found), **counts, "hemisphere": found[0].hemisphere,
            "location": found[0].other_site or found[0].location}


def build(root: Path) -> Fake:
    tpl = get_template()
    affine, shape = tpl.affine, tpl.shape
    fake = Fake(root, affine)
    pipeline, lesions = root / "derivatives" / "atlas-curate", root / "derivatives" / "lesions"
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "fake", "BIDSVersion": "1.10.0"}))
    pipeline.mkdir(parents=True)
    (pipeline / "dataset_description.json").write_text(json.dumps({
        "Name": "atlas-curate normalize", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "atlas-curate"}]}))
    (pipeline / ".bidsignore").write_text("qc.tsv\nreport.html\n")
    t1 = np.zeros(shape, np.float32)
    qc_rows, sessions = [], {}
    for scan, (cohort, passed, spheres) in PLAN.items():
        sub, ses = scan.split("_")
        stem = anat(pipeline, scan) / f"{scan}_space-{SPACE}"
        save(t1, affine, Path(f"{stem}_desc-preproc_T1w.nii.gz"))
        Path(f"{stem}_desc-preproc_T1w.json").write_text(json.dumps({"SkullStripped": False}))
        qc_rows.append(f"{scan}\t{sub}\t{ses}\tok\t{passed}\t{'' if passed else 'ncc_brain 0.41 < 0.6'}\tn/a")
        dseg = np.zeros(shape, np.uint8)
        for label, (centre, radius) in enumerate(spheres, start=1):
            dseg[sphere(shape, affine, centre, radius) & (dseg == 0)] = label
        if spheres:
            fake.dsegs[scan] = dseg
            labels, grid = dseg, affine
            if scan == "sub-03_ses-1":  # written on a 2 mm grid
                labels, grid = dseg[::2, ::2, ::2], affine @ np.diag([2.0, 2.0, 2.0, 1.0])
            save((labels > 0).astype(np.uint8), grid, Path(f"{stem}_label-L_desc-T1lesion_mask.nii.gz"))
            save(labels, grid, Path(f"{stem}_desc-lesions_dseg.nii.gz"))
        row = {"session_id": ses, "fazekas_pvh": PVH[scan]}
        if spheres and scan != "sub-01_ses-2":  # sub-01_ses-2 has no spreadsheet row values
            truth = expected_counts(fake, scan)
            row.update({f"n_lesions_{k}": truth[k] for k in COUNTS})
            row.update({"primary_lesion_hemisphere": truth["hemisphere"],
                        "primary_lesion_location": truth["location"].capitalize()})
        if scan == "sub-06_ses-1":  # a spreadsheet that disagrees with the mask
            row["primary_lesion_hemisphere"] = "Left" if truth["hemisphere"] != "Left" else "Right"
            row["n_lesions_other"] = truth["other"] + 1
        sessions.setdefault(sub, []).append(row)
    # sub-07: truncate the mask inside the voxel data (the header still reads)
    mask7 = anat(pipeline, "sub-07_ses-1") / f"sub-07_ses-1_space-{SPACE}_label-L_desc-T1lesion_mask.nii.gz"
    blob = mask7.read_bytes()
    mask7.write_bytes(blob[: len(blob) // 2])
    # native dseg of sub-01_ses-1: labels 1, 2 and a third lesion that is not on the template grid
    native = np.zeros((40, 40, 20), np.uint8)
    native[2:12, 2:12, 2:7] = 1
    native[20:24, 20:25, 10:12] = 2
    native[30:32, 30:31, 15:16] = 3
    save(native, np.diag([*NATIVE_ZOOMS, 1.0]), anat(lesions, "sub-01_ses-1")
         / "sub-01_ses-1_space-orig_desc-lesions_dseg.nii.gz")
    fake.native["sub-01_ses-1"] = {1: 500, 2: 40, 3: 2}
    (pipeline / "qc.tsv").write_text("scan\tparticipant_id\tsession_id\tstatus\tqc_pass\tqc_reasons\terror\n"
                                     + "\n".join(qc_rows) + "\n")
    participants = pd.DataFrame({"participant_id": sorted({s.split('_')[0] for s in PLAN}),
                                 "cohort": [PLAN[f"{p}_ses-1"][0] for p in sorted({s.split('_')[0] for s in PLAN})]})
    participants.to_csv(root / "participants.tsv", sep="\t", index=False)
    for sub, rows in sessions.items():
        (root / sub).mkdir(exist_ok=True)
        pd.DataFrame(rows).to_csv(root / sub / f"{sub}_sessions.tsv", sep="\t", index=False, na_rep="n/a")
    return fake


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Fake:
    return build(tmp_path_factory.mktemp("overlap") / "bids")


@pytest.fixture(scope="module")
def default_run(fake):
    return overlap_map(fake.root, progress=False)


def binary(scans, fake: Fake, primary: bool = False) -> np.ndarray:
    return np.stack([(fake.dsegs[s] == 1) if primary else (fake.dsegs[s] > 0) for s in scans])


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"])


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# --- the map ---------------------------------------------------------------------------------------

def test_map_is_the_mean_of_the_binary_masks(fake, default_run):
    expected = binary(DEFAULT_IN, fake)
    prob = nib.load(default_run.files["prob"])
    count = nib.load(default_run.files["count"])
    assert prob.get_data_dtype() == np.float32 and count.get_data_dtype() == np.int32
    np.testing.assert_array_equal(prob.get_fdata(dtype=np.float32), expected.mean(axis=0).astype(np.float32))
    np.testing.assert_array_equal(np.asanyarray(count.dataobj), expected.sum(axis=0))
    assert np.asanyarray(count.dataobj).max() == 2  # two lesions of different scans overlap
    np.testing.assert_allclose(prob.affine, fake.affine)
    assert prob.shape == get_template().shape
    assert default_run.max_fraction == pytest.approx(2 / 3)


def test_primary_all_sessions_and_qc_failed_included(fake, tmp_path):
    result = overlap_map(fake.root, output=tmp_path / "out", lesions="primary", per_subject="all",
                         include_failed=True, progress=False)
    scans = ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-05_ses-1", "sub-06_ses-1"]
    assert list(result.included["scan"]) == scans
    expected = binary(scans, fake, primary=True)
    np.testing.assert_array_equal(nib.load(result.files["prob"]).get_fdata(dtype=np.float32),
                                  expected.mean(axis=0).astype(np.float32))
    np.testing.assert_array_equal(np.asanyarray(nib.load(result.files["count"]).dataobj), expected.sum(axis=0))
    doc = json.loads(result.files["sidecar"].read_text())
    assert doc["Options"]["lesions"] == "primary" and "not-first-session" not in doc["NumberOfScans"][
        "excluded_by_category"]
    # the tables still count every lesion: sub-01_ses-1 has two
    lesions = read_tsv(result.files["lesions_tsv"])
    assert (lesions["scan"] == "sub-01_ses-1").sum() == 3  # two on the grid + one native-only


# --- which scans go in -----------------------------------------------------------------------------

def test_sidecar_lists_included_and_excluded_with_reasons(default_run):
    doc = json.loads(default_run.files["sidecar"].read_text())
    assert [e["scan"] for e in doc["Included"]] == DEFAULT_IN
    excluded = {e["scan"]: (e["category"], e["reason"]) for e in doc["Excluded"]}
    assert set(excluded) == set(PLAN) - set(DEFAULT_IN)
    assert excluded["sub-02_ses-1"][0] == "qc-failed" and "ncc_brain" in excluded["sub-02_ses-1"][1]
    assert excluded["sub-03_ses-1"][0] == "off-grid" and "shape (99, 117, 95)" in excluded["sub-03_ses-1"][1]
    assert excluded["sub-04_ses-1"] == ("missing", "no template-space lesion mask")
    assert excluded["sub-01_ses-2"][0] == "not-first-session"
    assert excluded["sub-07_ses-1"][0] == "unreadable" and "truncated" in excluded["sub-07_ses-1"][1]
    assert doc["NumberOfScans"] == {"included": 3, "excluded": 5, "excluded_by_category": {
        "missing": 1, "not-first-session": 1, "off-grid": 1, "qc-failed": 1, "unreadable": 1}}
    assert doc["Included"][0]["mask"].startswith("bids::derivatives/atlas-curate/sub-01/")
    assert doc["Options"] == {"include_failed": False, "lesions": "all", "per_subject": "first",
                              "template": SPACE, "where": None}
    assert set(default_run.excluded["category"]) == {e[0] for e in excluded.values()}


def test_where_filters_on_metadata(fake):
    table = scan_table(fake.root)
    kept, excluded = select_scans(table, where="fazekas_pvh >= 2")
    categories = {e["scan"]: e["category"] for e in excluded}
    assert list(kept["scan"]) == ["sub-05_ses-1", "sub-07_ses-1"]  # sub-07 fails later, when its mask is read
    assert categories["sub-01_ses-1"] == categories["sub-06_ses-1"] == categories["sub-04_ses-1"] == "filtered"
    assert categories["sub-02_ses-1"] == "qc-failed"  # QC is checked before the filter
    assert categories["sub-03_ses-1"] == "off-grid"
    kept, excluded = select_scans(table, where="cohort == 'A'", per_subject="all")
    assert list(kept["scan"]) == ["sub-01_ses-1", "sub-01_ses-2"]
    assert {e["scan"] for e in excluded if e["category"] == "filtered"} == {
        "sub-04_ses-1", "sub-05_ses-1", "sub-06_ses-1", "sub-07_ses-1"}


def test_where_unknown_column_is_a_clear_error(fake, tmp_path):
    with pytest.raises(ValueError, match=r"unknown column 'pvh_grade'.*known columns:.*fazekas_pvh"):
        overlap_map(fake.root, output=tmp_path / "out", where="pvh_grade >= 2", progress=False)
    assert not (tmp_path / "out").exists()


def test_nothing_left_is_an_error_with_the_reasons(fake, tmp_path):
    with pytest.raises(NoScansError, match=r"no scan left.*filtered"):
        overlap_map(fake.root, output=tmp_path / "out", where="cohort == 'C'", progress=False)


def test_output_inside_the_dataset_must_be_a_derivative(fake):
    with pytest.raises(ValueError, match="inside the BIDS dataset"):
        overlap_map(fake.root, output=fake.root / "sub-01" / "overlap", progress=False)
    with pytest.raises(ValueError, match="inside the BIDS dataset"):
        overlap_map(fake.root, output=fake.root / "derivatives" / "lesions" / "overlap", progress=False)


def test_bad_options_are_errors(fake, tmp_path):
    with pytest.raises(ValueError, match="--lesions"):
        overlap_map(fake.root, output=tmp_path, lesions="largest", progress=False)
    with pytest.raises(ValueError, match="--per-subject"):
        overlap_map(fake.root, output=tmp_path, per_subject="last", progress=False)


# --- tables and the lesion report -------------------------------------------------------------------

def _value(table: pd.DataFrame, group: str, measure: str, column: str):
    row = table[(table["group"] == group) & (table["measure"] == measure)]
    assert len(row) == 1, (group, measure)
    return row[column].iloc[0]


def test_tables_match_counts_made_by_hand(fake, default_run):
    table1, table2 = read_tsv(default_run.files["table1"]), read_tsv(default_run.files["table2"])
    groups = {"all": DEFAULT_IN, "A": ["sub-01_ses-1"], "B": ["sub-05_ses-1", "sub-06_ses-1"]}
    assert sorted(set(table1["group"])) == sorted(groups)
    for group, scans in groups.items():
        truth = [expected_counts(fake, s) for s in scans]
        assert _value(table1, group, "scans", "computed") == len(scans)
        assert _value(table1, group, "single_lesion", "computed") == sum(t["n"] == 1 for t in truth)
        assert _value(table1, group, "multiple_lesions", "computed") == sum(t["n"] > 1 for t in truth)
        for side in ("Left", "Right"):
            assert _value(table1, group, f"primary_{side.lower()}", "computed") == \
                sum(t["hemisphere"] == side for t in truth)
        for measure in COUNTS:
            assert _value(table2, group, measure, "computed") == sum(t[measure] for t in truth)
        assert _value(table2, group, "total", "computed") == sum(t["n"] for t in truth)
    # the spreadsheet's own counts sit beside them: equal except where sub-06's row is wrong
    assert _value(table2, "A", "other", "spreadsheet") == _value(table2, "A", "other", "computed")
    assert _value(table2, "B", "other", "difference") == -1
    assert _value(table1, "all", "single_lesion", "computed_percent") == pytest.approx(
        round(100 * _value(table1, "all", "single_lesion", "computed") / 3, 1))


def test_disagreements_list_the_wrong_spreadsheet_row(fake, default_run):
    table = pd.read_csv(default_run.files["disagreements"], sep="\t", dtype=str)
    assert set(table["scan"]) == {"sub-06_ses-1"}
    truth = expected_counts(fake, "sub-06_ses-1")
    rows = {r["measure"]: (r["computed"], r["spreadsheet"]) for _, r in table.iterrows()}
    assert rows == {"n_lesions": (str(truth["n"]), str(truth["n"] + 1)),
                    "other": (str(truth["other"]), str(truth["other"] + 1)),
                    "primary_hemisphere": (truth["hemisphere"], "Left" if truth["hemisphere"] != "Left" else "Right")}


def test_lesion_report_volumes_centroids_and_anatomy(fake, default_run):
    lesions = read_tsv(default_run.files["lesions_tsv"])
    doc = json.loads(default_run.files["lesions_json"].read_text())
    assert set(doc["Scans"]) == set(DEFAULT_IN)
    for scan in DEFAULT_IN:
        mine = lesions[lesions["scan"] == scan].set_index("lesion")
        found = lesion_anatomy(fake, scan)
        for label, les in enumerate(found, start=1):
            voxels = int((fake.dsegs[scan] == label).sum())
            assert mine.loc[label, "voxels_template"] == voxels
            assert mine.loc[label, "volume_mm3_template"] == pytest.approx(voxels * 1.0)
            ijk = np.argwhere(fake.dsegs[scan] == label).mean(axis=0)
            centroid = nib.affines.apply_affine(fake.affine, ijk)
            np.testing.assert_allclose(mine.loc[label, ["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]],
                                       centroid, atol=1e-3)
            assert mine.loc[label, "hemisphere"] == les.hemisphere
            assert mine.loc[label, "location"] == les.location
            assert mine.loc[label, "role"] == ("primary" if label == 1 else "secondary")
        assert len(doc["Scans"][scan]["lesions"]) == len(mine)
    # native volumes from the native dseg (1 x 1 x 2 mm voxels); label 3 exists only in native space
    sub01 = lesions[lesions["scan"] == "sub-01_ses-1"].set_index("lesion")
    voxel_mm3 = float(np.prod(NATIVE_ZOOMS))
    for label, n in fake.native["sub-01_ses-1"].items():
        assert sub01.loc[label, "volume_mm3_native"] == pytest.approx(n * voxel_mm3)
    assert sub01.loc[3, "voxels_template"] == 0 and pd.isna(sub01.loc[3, "hemisphere"])
    assert any("lesion 3" in note for note in doc["Scans"]["sub-01_ses-1"]["notes"])
    assert lesions.loc[lesions["scan"] == "sub-05_ses-1", "volume_mm3_native"].isna().all()
    other = lesions[(lesions["scan"] == "sub-05_ses-1") & (lesions["lesion"] == 1)].iloc[0]
    assert (other["location"], other["other_site"]) == ("other", "cerebellum")


def test_read_scan_primary_without_label_one(tmp_path):
    tpl = get_template()
    dseg = np.zeros(tpl.shape, np.uint8)
    dseg[100:104, 100:104, 100:104] = 2
    save((dseg > 0).astype(np.uint8), tpl.affine, tmp_path / "mask.nii.gz")
    save(dseg, tpl.affine, tmp_path / "dseg.nii.gz")
    voxels, stats = read_scan(ScanJob("s", str(tmp_path / "mask.nii.gz"), str(tmp_path / "dseg.nii.gz"),
                                      lesions="primary"))
    assert voxels.size == 0 and stats.map_voxels == 0 and "no primary lesion" in stats.notes[0]
    voxels, stats = read_scan(ScanJob("s", str(tmp_path / "mask.nii.gz"), str(tmp_path / "dseg.nii.gz")))
    assert voxels.size == 64 and [les.label for les in stats.lesions] == [2]


def test_map_only_stream_matches_the_described_one(fake):
    """``describe=False`` (the map alone, as the benchmark times it) adds exactly the same voxels."""
    base = fake.root / "derivatives" / "atlas-curate"
    for lesions in ("all", "primary"):
        counts = []
        for describe in (True, False):
            jobs = [ScanJob(scan, str(anat(base, scan) / f"{scan}_space-{SPACE}_label-L_desc-T1lesion_mask.nii.gz"),
                            str(anat(base, scan) / f"{scan}_space-{SPACE}_desc-lesions_dseg.nii.gz"),
                            lesions=lesions, describe=describe) for scan in DEFAULT_IN]
            count, outcomes = accumulate(jobs)
            assert all(o.ok for o in outcomes) and all(bool(o.value.lesions) == describe for o in outcomes)
            counts.append(count)
        np.testing.assert_array_equal(counts[0], counts[1])
        np.testing.assert_array_equal(counts[0], binary(DEFAULT_IN, fake, primary=lesions == "primary").sum(axis=0))


def test_stream_on_dask_matches_the_local_one_and_names_the_failing_file(fake):
    """``accumulate`` on the executor: in this process, a pool and a Dask cluster give the same counts and the
    same outcomes; a file that fails to decode fails its scan with the file's name and the reason."""
    distributed = pytest.importorskip("dask.distributed")
    base = fake.root / "derivatives" / "atlas-curate"
    scans = [*DEFAULT_IN, "sub-07_ses-1"]
    jobs = [ScanJob(scan, str(anat(base, scan) / f"{scan}_space-{SPACE}_label-L_desc-T1lesion_mask.nii.gz"),
                    str(anat(base, scan) / f"{scan}_space-{SPACE}_desc-lesions_dseg.nii.gz")) for scan in scans]
    runs = [accumulate(jobs), accumulate(jobs, workers=2)]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        runs.append(accumulate(jobs, executor="dask", scheduler=cluster.scheduler_address))
    for count, outcomes in runs:
        np.testing.assert_array_equal(count, runs[0][0])
        assert [o.key for o in outcomes] == sorted(scans)
        assert [(o.status, o.reason) for o in outcomes] == [(o.status, o.reason) for o in runs[0][1]]
        assert [o.value for o in outcomes if o.ok] == [o.value for o in runs[0][1] if o.ok]
    failed = {o.key: o.reason for o in runs[0][1] if not o.ok}
    assert list(failed) == ["sub-07_ses-1"]
    assert failed["sub-07_ses-1"].startswith(f"sub-07_ses-1_space-{SPACE}_label-L_desc-T1lesion_mask.nii.gz: ")
    assert "truncated" in failed["sub-07_ses-1"]


# --- outputs: determinism, figures, BIDS validity ----------------------------------------------------

def test_rerun_and_process_pool_give_identical_files(fake, default_run, tmp_path):
    first = hashes(default_run.output)
    again = overlap_map(fake.root, output=tmp_path / "pool", jobs=2, progress=False)
    assert hashes(again.output) == first


def test_figures_are_publication_pngs(default_run):
    for name in ("orthogonal", "glass", "histogram"):
        path = default_run.files[name]
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert tuple(round(v) for v in img.info["dpi"]) == (300, 300)
            assert "Software" not in img.info and not any("date" in k.lower() for k in img.info)
            pixels = np.asarray(img.convert("RGB"), dtype=float)
            assert min(img.size) >= 700 and pixels.std() > 10  # not blank
    # the map's colours are drawn: the orthogonal view holds hot (red/yellow) pixels over the grey template
    with Image.open(default_run.files["orthogonal"]) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=int)
    assert ((rgb[..., 0] > 200) & (rgb[..., 2] < 80)).sum() > 1000


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    """The figures draw on their own Agg canvas: a program's backend (here svg) is not changed, no pyplot."""
    code = ("import sys, matplotlib; matplotlib.use('svg'); from atlas_curate.overlap import figures; "
            "figures.volume_histogram([10.0, 200.0], [10.0, 150.0, 50.0], figures.Path(sys.argv[1]), title='t'); "
            "assert matplotlib.get_backend() == 'svg' and 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "hist.png")], check=True, timeout=120)
    with Image.open(tmp_path / "hist.png") as img:
        assert img.format == "PNG" and tuple(round(v) for v in img.info["dpi"]) == (300, 300)


def test_summary_names_the_figure_and_counts(default_run):
    text = summary(default_run)
    assert "3 scans in, 5 out" in text and "1 qc-failed" in text
    assert str(default_run.files["orthogonal"]) in text
    assert default_run.output == default_run.files["prob"].parent


def test_default_output_is_listed_in_the_derivative_bidsignore(fake, default_run):
    assert default_run.output == fake.root / "derivatives" / "atlas-curate" / "overlap"
    lines = (fake.root / "derivatives" / "atlas-curate" / ".bidsignore").read_text().splitlines()
    assert lines[:2] == ["qc.tsv", "report.html"] and lines.count("overlap") == 1


def _validator() -> str:
    found = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    if not Path(found).is_file():
        pytest.skip("the BIDS validator (bids-validator-deno) is not installed")
    return found


def test_derivative_stays_valid_bids(fake, default_run):
    proc = subprocess.run([_validator(), str(fake.root / "derivatives" / "atlas-curate"), "--format", "json"],
                          capture_output=True, text=True, timeout=300)
    doc = json.loads(proc.stdout)
    errors = [i for i in doc["issues"]["issues"] if i.get("severity") == "error"]
    assert not errors, [(i.get("code"), i.get("location")) for i in errors]


# --- end to end on the product's own synthetic release ------------------------------------------------

@pytest.mark.slow
def test_standard_release_end_to_end(standard_release, tmp_path):
    """synth (standard archive, with faults) -> bids-convert -> overlap-map: the lesions the generator drew
    come back with their volumes and anatomy, the fault scans are out with reasons, the dataset stays valid."""
    from atlas_curate.convert import convert

    bids = tmp_path / "bids"
    convert(standard_release.root, bids, jobs=2, progress=False)
    result = overlap_map(bids, per_subject="all", jobs=2, progress=False)
    lesions = read_tsv(result.files["lesions_tsv"])
    expected = {}
    for key, record in standard_release.truth["scans"].items():
        site, subject, tp = key.split("/")
        scan = f"sub-{subject}_ses-{tp}"
        if record.get("fault") in ("mask_grid", "empty_mask"):  # converted without masks
            assert result.excluded.set_index("scan").loc[scan, "category"] == "missing"
        elif not record.get("fault") or record["fault"] == "folder_without_row":
            expected[scan] = record["lesions"]
    assert sorted(result.included["scan"]) == sorted(expected)
    for scan, truth in expected.items():
        mine = lesions[lesions["scan"] == scan].sort_values("lesion")
        assert list(mine["volume_mm3_template"]) == [les["volume_mm3_native_smooth"] for les in truth]
        assert list(mine["hemisphere"]) == [les["hemisphere"] for les in truth]
        assert list(mine["location"]) == [les["location"] for les in truth]
    disagreements = read_tsv(result.files["disagreements"])
    assert "n_lesions" not in set(disagreements["measure"]), disagreements
    counts = np.asanyarray(nib.load(result.files["count"]).dataobj)
    masks = sorted((bids / "derivatives" / "lesions").glob("sub-*/ses-*/anat/*_label-L_desc-T1lesion_mask.nii.gz"))
    assert len(masks) == len(expected)
    np.testing.assert_array_equal(counts, sum(np.asanyarray(nib.load(p).dataobj) > 0 for p in masks))
    proc = subprocess.run([_validator(), str(bids), "-r", "--format", "json"], capture_output=True, text=True,
                          timeout=300)
    doc = json.loads(proc.stdout)
    errors = [i for i in doc["issues"]["issues"] if i.get("severity") == "error"]
    for sub in (doc.get("derivativesSummary") or {}).values():
        errors += [i for i in sub["issues"]["issues"] if i.get("severity") == "error"]
    assert not errors, [(i.get("code"), i.get("location")) for i in errors]
