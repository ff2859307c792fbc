"""``export nnunet``: layout, dataset.json, splits_final.json and its folds, labels voxel for voxel, links,
overwrite, the output folder, the next steps, errors.

Most cases use a tiny hand-made template-space dataset (a few voxels per side, written here) so they run in
well under a second; one case exports the shared synthetic standard release after ``bids-convert``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from atlas_curate.cli import main
from atlas_curate.convert import convert
from atlas_curate.export import case_ids, export_nnunet, next_steps, nnunet_folds, stale_preprocessed_splits
from atlas_curate.io import InputError
from atlas_curate.split import assign_folds, load_split, make_split, write_split

SPACE = "MNI152NLin2009aSym"
SHAPE = (6, 7, 5)
AFFINE = np.array([[1.0, 0, 0, -3], [0, 1.0, 0, -4], [0, 0, 1.0, -2], [0, 0, 0, 1]])


# --- a tiny template-space dataset ------------------------------------------------------------------------

def _save(data: np.ndarray, path: Path, *, slope: float | None = None) -> None:
    img = nib.Nifti1Image(data, AFFINE)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def tiny_dataset(root: Path, *, subjects: int = 12, seed: int = 0, odd_masks: bool = False) -> Path:
    """``subjects`` subjects over 3 cohorts (every fourth with two sessions), T1 + mask in the lesion derivative.

    With ``odd_masks`` some masks are stored as float32 0/1, uint8 100 with slope 0.01 (old VOI style) and
    int16 with values 1..3 — all of which must reach nnU-Net as uint8 0/1."""
    rng = np.random.default_rng(seed)
    participants = []
    for s in range(subjects):
        cohort = s % 3 + 1
        sub = f"c{cohort:04d}s{s + 1:04d}"
        participants.append({"participant_id": f"sub-{sub}", "cohort": f"c{cohort:04d}"})
        for t, ses in enumerate(["t01", "t02"] if s % 4 == 0 else ["t01"]):
            anat = root / "derivatives" / "lesions" / f"sub-{sub}" / f"ses-{ses}" / "anat"
            stem = f"sub-{sub}_ses-{ses}_space-{SPACE}"
            _save(rng.normal(100, 20, SHAPE).astype(np.float32), anat / f"{stem}_T1w.nii.gz")
            lesion = rng.random(SHAPE) < rng.uniform(0.05, 0.5)
            lesion[0, 0, 0] = True
            mask = anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz"
            kind = (s + t) % 4 if odd_masks else 0
            if kind == 0:
                _save(lesion.astype(np.uint8), mask)
            elif kind == 1:
                _save(lesion.astype(np.float32), mask)
            elif kind == 2:
                _save((lesion * 100).astype(np.uint8), mask, slope=0.01)
            else:
                _save((lesion * rng.integers(1, 4, SHAPE)).astype(np.int16), mask)
    pd.DataFrame(participants).to_csv(root / "participants.tsv", sep="\t", index=False)
    return root


def split_file(root: Path, where: Path, **kwargs) -> Path:
    return write_split(make_split(root, **kwargs), where / "split.tsv")[0]


def data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def differences(a: Path, b: Path, files: list[str]) -> list[str]:
    """Each file whose bytes differ between two exports, with what differs (text: the lines; NIfTI: header fields
    and voxel count), so a mismatch says where it is."""
    found = []
    for f in files:
        if sha(a / f) == sha(b / f):
            continue
        if f.endswith(".nii.gz"):
            x, y = nib.load(a / f), nib.load(b / f)
            fields = [k for k in x.header.keys() if x.header[k].tobytes() != y.header[k].tobytes()]
            voxels = int(np.count_nonzero(np.asanyarray(x.dataobj) != np.asanyarray(y.dataobj))) \
                if x.shape == y.shape else -1
            found.append(f"{f}: header fields {fields}, {voxels} voxels differ")
        else:
            pairs = zip((a / f).read_text().splitlines(), (b / f).read_text().splitlines())
            lines = [(u, v) for u, v in pairs if u != v]
            found.append(f"{f}: {lines[:3]}")
    return found


def stems(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def check_folds(dataset: Path) -> list[dict]:
    """splits_final.json against cases.tsv: each fold's train + val = imagesTr, disjoint; every training case in
    exactly one validation set (the fold cases.tsv gives it); no subject in train and val of one fold, nor in two
    validation sets; folds.json counts the same folds."""
    cases = pd.read_csv(dataset / "cases.tsv", sep="\t", dtype=str, keep_default_na=False)
    subject = dict(zip(cases["case"], cases["subject"]))
    training = stems(dataset / "imagesTr", "_0000.nii.gz")
    assert sorted(cases.loc[cases["split"] != "test", "case"]) == training
    splits = json.loads((dataset / "splits_final.json").read_text())
    val_subjects = []
    for k, entry in enumerate(splits):
        assert entry["val"] and entry["train"]
        assert sorted(entry["train"] + entry["val"]) == training
        assert not {subject[c] for c in entry["train"]} & {subject[c] for c in entry["val"]}, f"fold {k}"
        val_subjects.append({subject[c] for c in entry["val"]})
        assert entry["val"] == sorted(cases.loc[cases["fold"] == str(k), "case"])
    validated = sorted(c for entry in splits for c in entry["val"])
    assert validated == training  # each training case once
    assert sum(len(v) for v in val_subjects) == len(set().union(*val_subjects))  # no subject in two val sets
    assert set(cases.loc[cases["split"] == "test", "fold"]) <= {"n/a"}
    doc = json.loads((dataset / "folds.json").read_text())
    assert doc["folds"] == len(splits)
    assert [v["scans"] for v in doc["validation"]] == [len(e["val"]) for e in splits]
    assert [v["subjects"] for v in doc["validation"]] == [len(v) for v in val_subjects]
    return splits


def test_case_ids_follow_the_scan_names_and_fall_back_to_numbers():
    assert case_ids(["sub-c0001s0001_ses-t01", "sub-031768_ses-t02", "sub-r001s001_ses-1"]) == {
        "sub-c0001s0001_ses-t01": "c0001s0001t01", "sub-031768_ses-t02": "031768t02",
        "sub-r001s001_ses-1": "r001s001ses1"}
    assert case_ids(["sub-ab_ses-t01", "sub-abt_ses-t01x"]) == {"sub-ab_ses-t01": "abt01", "sub-abt_ses-t01x":
                                                               "abtt01x"}
    clash = case_ids(["sub-a_ses-bt01", "sub-ab_ses-t01"], name="X")
    assert clash == {"sub-a_ses-bt01": "X_0001", "sub-ab_ses-t01": "X_0002"}
    # a scan without a session: its subject label
    assert case_ids(["sub-r001s001", "sub-r001s002_ses-1"]) == {"sub-r001s001": "r001s001",
                                                                "sub-r001s002_ses-1": "r001s002ses1"}


def test_layout_counts_and_dataset_json(tmp_path):
    root = tiny_dataset(tmp_path / "bids")
    split = split_file(root, tmp_path, seed=1)
    table = pd.read_csv(split, sep="\t")
    dataset = export_nnunet(root, split, tmp_path / "nnUNet_raw")
    assert dataset == (tmp_path / "nnUNet_raw" / "Dataset501_ATLAS").resolve()
    cases = pd.read_csv(dataset / "cases.tsv", sep="\t", dtype=str)
    case_of = dict(zip(cases["scan"], cases["case"]))
    train = sorted(case_of[s] for s in table.loc[table["split"].isin(["train", "dev"]), "scan"])
    test = sorted(case_of[s] for s in table.loc[table["split"] == "test", "scan"])
    assert len(train) + len(test) == len(table) == 15 and test
    assert stems(dataset / "imagesTr", "_0000.nii.gz") == train == stems(dataset / "labelsTr", ".nii.gz")
    assert stems(dataset / "imagesTs", "_0000.nii.gz") == test == stems(dataset / "labelsTs", ".nii.gz")
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1w"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == len(train) == len(list((dataset / "imagesTr").iterdir()))
    assert "split.tsv" in meta["description"] and "nnUNet_preprocessed/Dataset501_ATLAS" in meta["description"]
    assert case_of["sub-c0001s0001_ses-t01"] == "c0001s0001t01"
    splits = json.loads((dataset / "splits_final.json").read_text())
    assert len(splits) == 5  # what nnUNetv2_train trains; fold 0 is the split's train/dev
    assert splits[0] == {"train": sorted(case_of[s] for s in table.loc[table["split"] == "train", "scan"]),
                         "val": sorted(case_of[s] for s in table.loc[table["split"] == "dev", "scan"])}
    check_folds(dataset)


def test_labels_equal_the_source_masks_voxel_for_voxel(tmp_path):
    root = tiny_dataset(tmp_path / "bids", odd_masks=True)
    dataset = export_nnunet(root, split_file(root, tmp_path, seed=2), tmp_path / "out")
    cases = pd.read_csv(dataset / "cases.tsv", sep="\t", dtype=str)
    kinds = set()
    for row in cases.itertuples():
        folder = "Ts" if row.split == "test" else "Tr"
        label = dataset / f"labels{folder}" / f"{row.case}.nii.gz"
        image = dataset / f"images{folder}" / f"{row.case}_0000.nii.gz"
        source_mask, source_t1 = root / row.label, root / row.image
        exported = nib.load(label)
        assert exported.get_data_dtype() == np.uint8
        assert set(np.unique(data(label)).tolist()) <= {0, 1}
        assert np.array_equal(data(label), (data(source_mask) > 0).astype(np.uint8))
        assert np.allclose(exported.affine, nib.load(source_mask).affine)
        assert sha(image) == sha(source_t1)
        assert image.stat().st_ino == source_t1.stat().st_ino  # same file system: hard link
        stored = nib.load(source_mask).get_data_dtype()
        plain = stored == np.uint8 and nib.load(source_mask).dataobj.slope == 1.0  # as stored in the file
        assert (label.stat().st_ino == source_mask.stat().st_ino) == plain
        assert row.label_binarised == str(not plain).lower()   # the tables' boolean convention: true/false
        kinds.add(str(stored))
    assert kinds == {"uint8", "float32", "int16"}


def test_folds_become_splits_final_entries(tmp_path):
    root = tiny_dataset(tmp_path / "bids", subjects=16)
    split = split_file(root, tmp_path, seed=3, folds=3)
    table = pd.read_csv(split, sep="\t", dtype=str)
    dataset = export_nnunet(root, split, tmp_path / "out", dataset_id=42, name="ATLASfolds")
    assert dataset.name == "Dataset042_ATLASfolds"
    case_of = dict(zip(*[pd.read_csv(dataset / "cases.tsv", sep="\t", dtype=str)[c] for c in ("scan", "case")]))
    splits = json.loads((dataset / "splits_final.json").read_text())
    training = sorted(stems(dataset / "imagesTr", "_0000.nii.gz"))
    assert len(splits) == 3
    for k, entry in enumerate(splits):
        assert entry["val"] == sorted(case_of[s] for s in table.loc[table["fold"] == str(k), "scan"])
        assert sorted(entry["train"] + entry["val"]) == training and not set(entry["train"]) & set(entry["val"])
    assert sorted(sum((e["val"] for e in splits), [])) == training
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == len(training)
    assert check_folds(dataset) == splits
    doc = json.loads((dataset / "folds.json").read_text())
    assert (doc["folds"], doc["split_folds"], doc["seed"], doc["split_seed"]) == (3, 3, 3, 3)
    assert "split's own 3 folds" in doc["method"]
    lines = next_steps(dataset, split, env={})
    assert "  nnUNetv2_train 42 3d_fullres FOLD   # FOLD = 0 1 2: each one of our folds" in lines
    assert f"  nnUNetv2_predict -i {dataset / 'imagesTs'} -o PRED -d 42 -c 3d_fullres -f 0 1 2" in lines
    assert any(line.startswith("WARNING: only 3 fold(s): train FOLD 0 1 2 only") for line in lines)


def test_copies_when_asked_and_output_is_deterministic(tmp_path):
    root = tiny_dataset(tmp_path / "bids", odd_masks=True)
    split = split_file(root, tmp_path, seed=0)
    a = export_nnunet(root, split, tmp_path / "a", link=False)
    b = export_nnunet(root, split, tmp_path / "b", jobs=2)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert all(sha(a / f) == sha(b / f) for f in files)
    image = next((a / "imagesTr").iterdir())
    assert image.stat().st_nlink == 1


def test_export_on_dask_writes_the_same_files(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    root = tiny_dataset(tmp_path / "bids", odd_masks=True)
    split = split_file(root, tmp_path, seed=0)
    local = export_nnunet(root, split, tmp_path / "local", link=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        dask = export_nnunet(root, split, tmp_path / "dask", link=False, executor="dask",
                             scheduler=cluster.scheduler_address)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(dask).as_posix() for p in dask.rglob("*") if p.is_file())
    assert all(sha(local / f) == sha(dask / f) for f in files), differences(local, dask, files)


def test_existing_export_needs_overwrite_which_drops_stale_cases(tmp_path):
    root = tiny_dataset(tmp_path / "bids")
    first = split_file(root, tmp_path / "s1", seed=0)
    second = split_file(root, tmp_path / "s2", seed=5)
    assert first.read_text() != second.read_text()
    dataset = export_nnunet(root, first, tmp_path / "out")
    with pytest.raises(FileExistsError, match="Dataset501_ATLAS exists"):
        export_nnunet(root, second, tmp_path / "out")
    export_nnunet(root, second, tmp_path / "out", overwrite=True)
    fresh = export_nnunet(root, second, tmp_path / "fresh")
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        names = sorted(p.name for p in (dataset / folder).iterdir())
        assert names == sorted(p.name for p in (fresh / folder).iterdir())
    assert (dataset / "splits_final.json").read_text() == (fresh / "splits_final.json").read_text()


def test_bad_inputs_are_refused_with_the_file_and_the_reason(tmp_path):
    root = tiny_dataset(tmp_path / "bids", subjects=6)
    split = split_file(root, tmp_path, seed=0)
    with pytest.raises(ValueError, match="outside the BIDS dataset"):
        export_nnunet(root, split, root / "derivatives")
    with pytest.raises(ValueError, match="1..999"):
        export_nnunet(root, split, tmp_path / "out", dataset_id=1000)
    with pytest.raises(ValueError, match="dataset name"):
        export_nnunet(root, split, tmp_path / "out", name="AT LAS")
    with pytest.raises(InputError, match="split table not found"):
        export_nnunet(root, tmp_path / "nothing.tsv", tmp_path / "out")

    table = pd.read_csv(split, sep="\t", dtype=str, keep_default_na=False)
    used = table[table["split"].isin(["train", "dev", "test"])].index
    mask = root / table.loc[used[0], "mask"]
    img = nib.load(mask)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :4], img.affine), mask)
    with pytest.raises(InputError, match=rf"{mask.name}: lesion mask and T1w .* different grids: shape"):
        export_nnunet(root, split, tmp_path / "out")
    mask.unlink()
    with pytest.raises(InputError, match=rf"split.tsv: scan {table.loc[used[0], 'scan']}: mask .* does not exist"):
        export_nnunet(root, split, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing was written before the inputs were checked

    table.loc[used, "split"] = "excluded"
    table.to_csv(tmp_path / "none.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="none.tsv: no scan is in a train, dev or test split"):
        export_nnunet(root, tmp_path / "none.tsv", tmp_path / "out")


# --- folds for nnU-Net and the output folder ---------------------------------------------------------------

def test_split_without_folds_gets_five_subject_grouped_stratified_folds(tmp_path):
    root = tiny_dataset(tmp_path / "bids", subjects=40)
    split = split_file(root, tmp_path, seed=4)
    table = load_split(split, bids_root=root)
    assert table.attrs["folds"] is None and (table["split"] == "dev").any()
    dataset = export_nnunet(root, split, tmp_path / "raw")
    cases = pd.read_csv(dataset / "cases.tsv", sep="\t", dtype=str, keep_default_na=False)
    case_of = dict(zip(cases["scan"], cases["case"]))
    splits = check_folds(dataset)
    assert len(splits) == 5
    assert splits[0]["val"] == sorted(case_of[s] for s in table.loc[table["split"] == "dev", "scan"])
    assert splits[0]["train"] == sorted(case_of[s] for s in table.loc[table["split"] == "train", "scan"])
    train = table[table["split"] == "train"]
    groups = assign_folds(train, 4, seed=4) + 1  # split's allocation, seeded by the split's seed
    for k in range(1, 5):
        assert splits[k]["val"] == sorted(case_of[s] for s in train.loc[groups == k, "scan"])
    sizes = [len(e["val"]) for e in splits[1:]]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(train)
    cohort = dict(zip(table["scan"], table["cohort"]))
    scan_of = {c: s for s, c in case_of.items()}
    for name in set(train["cohort"]):  # stratified: each of folds 1..4 holds about a quarter of every cohort
        counts = [sum(cohort[scan_of[c]] == name for c in e["val"]) for e in splits[1:]]
        assert max(counts) - min(counts) <= 1, (name, counts)
    doc = json.loads((dataset / "folds.json").read_text())
    assert (doc["folds"], doc["seed"], doc["split_seed"], doc["split_folds"]) == (5, 4, 4, None)
    assert "fold 0 validates on the split's dev scans" in doc["method"]
    assert "5 subject-grouped folds (seed 4" in json.loads((dataset / "dataset.json").read_text())["description"]

    again = export_nnunet(root, split, tmp_path / "again")
    assert (again / "splits_final.json").read_text() == (dataset / "splits_final.json").read_text()
    seven = export_nnunet(root, split, tmp_path / "seven", seed=7)
    other = check_folds(seven)
    assert other[0] == splits[0] and other[1:] != splits[1:]
    assert json.loads((seven / "folds.json").read_text())["seed"] == 7


def test_split_without_dev_scans_divides_its_train_scans_into_five(tmp_path):
    root = tiny_dataset(tmp_path / "bids", subjects=20)
    split = split_file(root, tmp_path, seed=1, fractions=(0.87, 0.0, 0.13))
    table = load_split(split)
    assert not (table["split"] == "dev").any()
    fold, method = nnunet_folds(table, seed=1)
    assert method == "train" and sorted(set(fold)) == [0, 1, 2, 3, 4]
    dataset = export_nnunet(root, split, tmp_path / "raw")
    assert len(check_folds(dataset)) == 5
    assert "no dev scans" in json.loads((dataset / "folds.json").read_text())["method"]


def test_too_few_subjects_give_fewer_folds_and_say_so(tmp_path, caplog):
    root = tiny_dataset(tmp_path / "bids", subjects=4)
    split = split_file(root, tmp_path, seed=0)
    with caplog.at_level("WARNING", logger="atlas_curate.export"):
        dataset = export_nnunet(root, split, tmp_path / "raw")
    splits = check_folds(dataset)
    assert 2 <= len(splits) < 5
    assert f"only {len(splits)} fold(s)" in caplog.text
    lines = next_steps(dataset, split, env={})
    assert any(line.startswith(f"WARNING: only {len(splits)} fold(s)") for line in lines)
    folds = " ".join(str(k) for k in range(len(splits)))
    assert any(line.startswith("  nnUNetv2_predict") and line.endswith(f"-f {folds}") for line in lines)


def test_splits_that_would_leak_are_refused(tmp_path):
    root = tiny_dataset(tmp_path / "bids", subjects=12)
    table = pd.read_csv(split_file(root, tmp_path, seed=0), sep="\t", dtype=str, keep_default_na=False)
    two = table.index[table["subject"] == "sub-c0001s0001"]
    assert len(two) == 2
    table.loc[two, "split"] = ["train", "dev"]
    table.to_csv(tmp_path / "leak.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"leak.tsv: subject\(s\) sub-c0001s0001 have scans in more than one fold "
                                         "or in both train and dev"):
        export_nnunet(root, tmp_path / "leak.tsv", tmp_path / "raw")
    table.loc[two, "split"] = ["train", "test"]
    table.to_csv(tmp_path / "tested.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"tested.tsv: subject\(s\) sub-c0001s0001 have scans in test and in train"):
        export_nnunet(root, tmp_path / "tested.tsv", tmp_path / "raw")

    folds = pd.read_csv(split_file(root, tmp_path / "f", seed=0, folds=3), sep="\t", dtype=str,
                        keep_default_na=False)
    spread = folds.copy()
    spread.loc[two, "split"], spread.loc[two, "fold"] = "train", ["0", "1"]
    spread.to_csv(tmp_path / "spread.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=r"spread.tsv: subject\(s\) sub-c0001s0001 have scans in more than one"):
        export_nnunet(root, tmp_path / "spread.tsv", tmp_path / "raw")
    lacking = folds.copy()
    first = lacking.index[lacking["split"] == "train"][0]
    lacking.loc[first, "fold"] = "n/a"
    lacking.to_csv(tmp_path / "lacking.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match=rf"lacking.tsv: the split has folds, but {lacking.loc[first, 'scan']} have"):
        export_nnunet(root, tmp_path / "lacking.tsv", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_out_must_be_nnunet_raw_not_a_dataset_folder(tmp_path):
    root = tiny_dataset(tmp_path / "bids", subjects=6)
    split = split_file(root, tmp_path, seed=0)
    for out in (tmp_path / "nnUNet_raw" / "Dataset501_ATLAS", tmp_path / "raw" / "Dataset007_Other"):
        with pytest.raises(ValueError, match=rf"{out.name} looks like an nnU-Net dataset folder, but OUT must be "
                                             "the nnUNet_raw folder itself: the export creates Dataset501_ATLAS "
                                             "inside it"):
            export_nnunet(root, split, out)
        assert not out.exists()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "dataset.json").write_text("{}")
    with pytest.raises(ValueError, match="odd looks like an nnU-Net dataset folder"):
        export_nnunet(root, split, tmp_path / "odd")
    out = tmp_path / "nnUNet_raw" / "Dataset501_ATLAS"
    result = CliRunner().invoke(main, ["export", "nnunet", str(root), str(split), str(out)])
    assert result.exit_code != 0 and "OUT must be the nnUNet_raw folder itself" in str(result.exception)
    assert not out.exists()


def test_a_dataset_id_in_use_needs_overwrite_but_the_same_export_does_not(tmp_path):
    root = tiny_dataset(tmp_path / "bids", subjects=12)
    split = split_file(root, tmp_path, seed=0)
    raw = tmp_path / "raw"
    dataset = export_nnunet(root, split, raw)

    def files() -> dict[str, str]:
        return {p.relative_to(dataset).as_posix(): sha(p) for p in dataset.rglob("*") if p.is_file()}

    before = files()
    assert export_nnunet(root, split, raw) == dataset  # the same split again: no overwrite needed
    assert files() == before
    cases = dataset / "cases.tsv"   # an export written with True/False booleans is the same export too
    cases.write_text(cases.read_text().replace("\tfalse\t", "\tFalse\t").replace("\ttrue\t", "\tTrue\t"))
    assert files() != before
    assert export_nnunet(root, split, raw) == dataset and files() == before

    other = raw / "Dataset501_Other"
    (other / "imagesTr").mkdir(parents=True)
    (other / "dataset.json").write_text("{}")
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(other))} already holds nnU-Net dataset 501"):
        export_nnunet(root, split, raw)
    assert (other / "dataset.json").is_file() and files() == before
    export_nnunet(root, split, raw, dataset_id=502)  # another id is fine
    export_nnunet(root, split, raw, overwrite=True)
    assert not other.exists() and sorted(p.name for p in raw.iterdir()) == ["Dataset501_ATLAS", "Dataset502_ATLAS"]
    assert files() == before

    with pytest.raises(FileExistsError, match="Dataset501_ATLAS exists and is not empty: it holds a different export"):
        export_nnunet(root, split, raw, seed=9)  # other folds
    assert files() == before
    export_nnunet(root, split, raw, seed=9, overwrite=True)
    assert (dataset / "splits_final.json").read_text() != before and files() != before
    check_folds(dataset)


def test_next_steps_give_the_commands_and_name_a_stale_preprocessed_split(tmp_path):
    root = tiny_dataset(tmp_path / "bids", subjects=12)
    split = split_file(root, tmp_path, seed=0)
    raw = tmp_path / "nnUNet_raw"
    dataset = export_nnunet(root, split, raw)
    pre = tmp_path / "nnUNet_preprocessed"
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre)}
    lines = next_steps(dataset, split, env=env)
    assert "  nnUNetv2_plan_and_preprocess -d 501 --verify_dataset_integrity" in lines
    assert "  nnUNetv2_train 501 3d_fullres FOLD   # FOLD = 0 1 2 3 4: each one of our folds" in lines
    assert f"  nnUNetv2_predict -i {dataset / 'imagesTs'} -o PRED -d 501 -c 3d_fullres" in lines
    assert f"  atlas-curate evaluate --predictions PRED --split {split}" in lines
    assert not any("export nnUNet_raw" in line or "WARNING" in line for line in lines)
    assert any("nnUNet_preprocessed/Dataset501_ATLAS/ and stops" in line for line in lines)
    assert stale_preprocessed_splits(dataset, env) is None  # nothing there yet

    copy = pre / "Dataset501_ATLAS" / "splits_final.json"
    copy.parent.mkdir(parents=True)
    shutil.copy(dataset / "splits_final.json", copy)
    assert stale_preprocessed_splits(dataset, env) is None
    copy.write_text(json.dumps(json.loads(copy.read_text())[:1]))  # an older one-fold copy
    assert stale_preprocessed_splits(dataset, env) == copy
    assert stale_preprocessed_splits(dataset, {"nnUNet_raw": str(raw)}) is None
    warnings = [line for line in next_steps(dataset, split, env=env) if line.startswith("WARNING")]
    assert warnings == [f"WARNING: {copy} differs from this export's splits_final.json: delete it before running "
                        "nnU-Net on this dataset"]
    elsewhere = next_steps(dataset, split, env={"nnUNet_raw": str(tmp_path)})
    assert f"  export nnUNet_raw={raw}   # and nnUNet_preprocessed, nnUNet_results" in elsewhere
    assert any(line.startswith(f"WARNING: nnUNet_raw is {tmp_path}, not {raw}") for line in elsewhere)

    result = CliRunner().invoke(main, ["export", "nnunet", str(root), str(split), str(raw)], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == next_steps(dataset, split, env=env)   # progress bars go to stderr
    assert f"WARNING: {copy} differs" in result.output


def test_help_says_out_is_nnunet_raw_and_gives_the_commands():
    result = CliRunner().invoke(main, ["export", "nnunet", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for phrase in ("OUT is the nnUNet_raw folder itself", "creates OUT/Dataset{ID:03d}_{NAME}",
                   "nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity",
                   "nnUNetv2_train ID 3d_fullres FOLD (FOLD = 0, 1, 2, 3, 4)",
                   "nnUNetv2_predict -i OUT/Dataset{ID:03d}_{NAME}/imagesTs -o PRED -d ID -c 3d_fullres",
                   "atlas-curate evaluate --predictions PRED --split SPLITS",
                   "fold 0 validates on the split's dev scans", "nnUNet_preprocessed/Dataset{ID:03d}_{NAME}/",
                   "--seed", "--overwrite"):
        assert phrase in text, phrase


def test_export_of_a_converted_synthetic_release(standard_release, tmp_path):
    root = tmp_path / "bids"
    convert(standard_release.root, root, jobs=2, progress=False)
    split = write_split(make_split(root, seed=0), tmp_path / "split.tsv")[0]
    table = pd.read_csv(split, sep="\t", dtype=str, keep_default_na=False)
    dataset = export_nnunet(root, split, tmp_path / "out")
    cases = pd.read_csv(dataset / "cases.tsv", sep="\t", dtype=str)
    used = table[table["split"].isin(["train", "dev", "test"])]
    assert sorted(cases["scan"]) == sorted(used["scan"])
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["numTraining"] == used["split"].isin(["train", "dev"]).sum()
    for row in cases.itertuples():
        folder = "Ts" if row.split == "test" else "Tr"
        label = dataset / f"labels{folder}" / f"{row.case}.nii.gz"
        source = root / "derivatives" / "lesions" / row.subject / row.scan.split("_")[1] / "anat" / \
            f"{row.scan}_space-{SPACE}_label-L_desc-T1lesion_mask.nii.gz"
        assert np.array_equal(data(label), (data(source) > 0).astype(np.uint8))
        assert int(row.lesion_voxels) == np.count_nonzero(data(source))
        t1 = dataset / f"images{folder}" / f"{row.case}_0000.nii.gz"
        assert nib.load(t1).shape == nib.load(label).shape == (197, 233, 189)
