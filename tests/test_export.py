"""``export nnunet``: layout, dataset.json, splits_final.json, labels voxel for voxel, links, overwrite, errors.

Most cases use a tiny hand-made template-space dataset (a few voxels per side, written here) so they run in
well under a second; one case exports the shared synthetic standard release after ``bids-convert``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from atlas_curate.convert import convert
from atlas_curate.export import case_ids, export_nnunet
from atlas_curate.io import InputError
from atlas_curate.split import make_split, write_split

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


def stems(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def test_case_ids_follow_the_scan_names_and_fall_back_to_numbers():
    assert case_ids(["sub-c0001s0001_ses-t01", "sub-031768_ses-t02", "sub-r001s001_ses-1"]) == {
        "sub-c0001s0001_ses-t01": "c0001s0001t01", "sub-031768_ses-t02": "031768t02",
        "sub-r001s001_ses-1": "r001s001ses1"}
    assert case_ids(["sub-ab_ses-t01", "sub-abt_ses-t01x"]) == {"sub-ab_ses-t01": "abt01", "sub-abt_ses-t01x":
                                                               "abtt01x"}
    clash = case_ids(["sub-a_ses-bt01", "sub-ab_ses-t01"], name="X")
    assert clash == {"sub-a_ses-bt01": "X_0001", "sub-ab_ses-t01": "X_0002"}


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
    assert splits == [{"train": sorted(case_of[s] for s in table.loc[table["split"] == "train", "scan"]),
                       "val": sorted(case_of[s] for s in table.loc[table["split"] == "dev", "scan"])}]


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
        assert row.label_binarised == str(not plain)
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
        assert sorted(p.name for p in (dataset / folder).iterdir()) == sorted(p.name for p in (fresh / folder).iterdir())
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
