"""``export nnunet``: a curated split as an nnU-Net v2 raw dataset, so nnU-Net trains on the same split.

Layout written under ``OUT/Dataset<ID>_<NAME>/`` (nnU-Net v2 "raw" format):

* ``imagesTr/<case>_0000.nii.gz`` and ``labelsTr/<case>.nii.gz``: the train and dev scans (train + all folds);
* ``imagesTs/<case>_0000.nii.gz`` and ``labelsTs/<case>.nii.gz``: our held-out test split (nnU-Net never reads
  them; ``labelsTs`` is there for ``nnUNetv2_evaluate_folder`` after prediction);
* ``dataset.json``: ``channel_names`` {"0": "T1w"}, ``labels`` {"background": 0, "lesion": 1},
  ``numTraining`` (= files in ``imagesTr``), ``file_ending`` ".nii.gz", and a description naming the source;
* ``splits_final.json``: a list of ``{"train": [...], "val": [...]}`` of case ids: one entry per fold when the
  split has folds (round k validates on fold k), else one entry, train vs dev. nnU-Net reads this file from
  ``nnUNet_preprocessed/Dataset<ID>_<NAME>/``, which only exists after ``nnUNetv2_plan_and_preprocess``; we write
  it at the dataset root and it must be copied there before training (``nnUNetv2_train ... FOLD`` then uses our
  folds instead of its own random five);
* ``cases.tsv``: case id → scan, subject, split, fold, and the source files (relative to the BIDS root).

Case ids come from the scan name with its BIDS keys removed (``sub-c0001s0001_ses-t01`` → ``c0001s0001t01``;
``ses`` is kept when the session label starts with a digit: ``sub-r001s001_ses-1`` → ``r001s001ses1``); if two
scans would share an id, every case is numbered ``<NAME>_<nnnn>`` in scan order instead.

Images are taken byte for byte (a hard link when the source and the output share a file system, else a copy;
both atomic). Labels are hard-linked/copied when the mask file already stores uint8 0/1 without scaling, and
otherwise rewritten as uint8 0/1 (``> 0``) on the same grid. Each label must share the image's grid (nnU-Net
refuses mismatches later, less readably). Nothing is written into the BIDS dataset.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np
import pandas as pd

from . import __version__, io
from .executor import run_map, summarize
from .split import SPLITS, load_split, split_paths

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
CHANNEL = "0000"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
SCAN = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)_ses-(?P<ses>[A-Za-z0-9]+)$")
CASE_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


def case_ids(scans: Iterable[str], name: str = "ATLAS") -> dict[str, str]:
    """nnU-Net case id of each scan (see the module docstring); sorted scans in, one id per scan out."""
    scans = sorted(scans)
    ids = {}
    for scan in scans:
        match = SCAN.match(scan)
        if match is None:
            ids[scan] = re.sub(r"[^A-Za-z0-9]", "", scan)
        else:
            ses = match["ses"]
            ids[scan] = match["sub"] + (ses if ses[0].isalpha() else f"ses{ses}")
    if len(set(ids.values())) != len(ids) or any(not v for v in ids.values()):
        ids = {scan: f"{name}_{n:04d}" for n, scan in enumerate(scans, start=1)}
    return ids


@dataclass(frozen=True)
class CaseJob:
    """One case to export: source image and mask, destination folder names, case id."""

    scan: str
    case: str
    image: str
    mask: str
    images_dir: str
    labels_dir: str
    link: bool = True


def _place(src: Path, dst: Path, link: bool) -> str:
    """Put ``src``'s bytes at ``dst`` atomically: a hard link when possible (and asked), else a copy."""
    if link:
        try:
            with io.atomic_path(dst) as tmp:
                tmp.unlink()
                os.link(src, tmp)
            return "link"
        except OSError:
            pass  # other file system, or links not allowed: copy
    io.copy_file(src, dst)
    return "copy"


def _binary_uint8(img: nib.Nifti1Image, path: Path) -> bool:
    """Whether the file already stores a uint8 0/1 mask without scaling (so its bytes can be used as is).

    nibabel moves a loaded file's ``scl_slope``/``scl_inter`` from the header to the data proxy, so read them there.
    """
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    return path.name.endswith(FILE_ENDING) and img.get_data_dtype() == np.uint8 and slope == 1.0 and inter == 0.0


def export_case(job: CaseJob) -> dict:
    """Write one case's image and label; returns how each was written."""
    image, mask = Path(job.image), Path(job.mask)
    for path in (image, mask):
        if not path.is_file():
            raise io.InputError(path, "file not found")
    image_img = io.load_nifti(image)
    binary, values, mask_img = io.read_mask_values(mask)
    problem = io.grid_difference(image_img, mask_img)
    if problem:
        raise io.InputError(mask, f"lesion mask and T1w {image.name} are on different grids: {problem}")
    image_dst = Path(job.images_dir) / f"{job.case}_{CHANNEL}{FILE_ENDING}"
    label_dst = Path(job.labels_dir) / f"{job.case}{FILE_ENDING}"
    if image.name.endswith(FILE_ENDING) and len(nib.load(image).shape) == 3:
        image_how = _place(image, image_dst, job.link)
    else:  # .nii, or a trailing singleton dimension: write the 3-D image as .nii.gz
        io.save_nifti(image_img, image_dst)
        image_how = "rewritten"
    raw = nib.load(mask)
    if _binary_uint8(raw, mask) and len(raw.shape) == 3 and set(values.tolist()) <= {1}:
        label_how = _place(mask, label_dst, job.link)
    else:
        label = nib.Nifti1Image(binary.astype(np.uint8), mask_img.affine, mask_img.header)
        label.set_data_dtype(np.uint8)
        label.header.set_slope_inter(1.0, 0.0)
        io.save_nifti(label, label_dst)
        label_how = "rewritten"
    return {"scan": job.scan, "case": job.case, "image_written": image_how, "label_written": label_how,
            "lesion_voxels": int(np.count_nonzero(binary))}


def _splits_final(table: pd.DataFrame, cases: dict[str, str]) -> list[dict]:
    used = table[table["split"].isin(("train", "dev"))]
    fold = used["fold"].astype("Int64")
    if fold.notna().any():
        return [{"train": sorted(cases[s] for s in used.loc[fold.ne(k).fillna(True), "scan"]),
                 "val": sorted(cases[s] for s in used.loc[fold.eq(k).fillna(False), "scan"])}
                for k in sorted(int(k) for k in fold.dropna().unique())]
    return [{"train": sorted(cases[s] for s in used.loc[used["split"] == "train", "scan"]),
             "val": sorted(cases[s] for s in used.loc[used["split"] == "dev", "scan"])}]


def _check_grids(image: Path, mask: Path) -> None:
    """Headers only (cheap): the label must lie on the image's grid; unreadable headers are input errors."""
    headers = []
    for path in (image, mask):
        try:
            headers.append(nib.load(path))
        except Exception as exc:  # nibabel raises several types for bad files
            raise io.InputError(path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
    problem = io.grid_difference(*headers)
    if problem:
        raise io.InputError(mask, f"lesion mask and T1w {image.name} are on different grids: {problem}")


def _check_output(root: Path, dataset: Path, overwrite: bool) -> None:
    if dataset == root or root in dataset.parents or dataset in root.parents:
        raise ValueError(f"the export {dataset} must be outside the BIDS dataset {root} and not contain it")
    if dataset.exists() and any(dataset.iterdir()) and not overwrite:
        raise FileExistsError(f"{dataset} exists and is not empty (use overwrite to replace its cases)")


def _remove_stale(dataset: Path, keep: set[Path]) -> None:
    """With ``overwrite``: drop case files of an earlier export that this split no longer has."""
    for folder in CASE_FOLDERS:
        for path in sorted((dataset / folder).glob(f"*{FILE_ENDING}")):
            if path not in keep:
                path.unlink()


def export_nnunet(bids_root: os.PathLike | str, split_path: os.PathLike | str, out: os.PathLike | str, *,
                  dataset_id: int = 501, name: str = "ATLAS", overwrite: bool = False, link: bool = True,
                  jobs: int = 1, progress: bool = False) -> Path:
    """Write the split at ``split_path`` (``split`` TSV/JSON) of ``bids_root`` as ``OUT/Dataset<ID>_<NAME>``.

    See the module docstring for the layout. Returns the dataset folder. ``overwrite`` replaces an earlier
    export there (case files the new split lacks are removed); ``link=False`` always copies.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not NAME.match(name):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '_' and '-'")
    root = Path(bids_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    dataset = Path(out).resolve() / f"Dataset{int(dataset_id):03d}_{name}"
    _check_output(root, dataset, overwrite)
    split_tsv = split_paths(split_path)[0]
    table = load_split(split_path, bids_root=root)
    settings = dict(table.attrs)
    table = table[table["split"].isin(SPLITS)].sort_values("scan").reset_index(drop=True)
    if table.empty:
        raise io.InputError(split_tsv, "no scan is in a train, dev or test split")
    for row in table.itertuples():
        for column in ("t1", "mask"):
            value = getattr(row, column)
            if not isinstance(value, str) or not value:
                raise io.InputError(split_tsv, f"scan {row.scan} has no {column} path")
            if not Path(value).is_file():
                raise io.InputError(split_tsv, f"scan {row.scan}: {column} {value} does not exist under {root}")
        _check_grids(Path(row.t1), Path(row.mask))

    cases = case_ids(table["scan"], name)
    jobs_list = []
    for row in table.itertuples():
        suffix = "Ts" if row.split == "test" else "Tr"
        jobs_list.append(CaseJob(row.scan, cases[row.scan], row.t1, row.mask, str(dataset / f"images{suffix}"),
                                 str(dataset / f"labels{suffix}"), link))
    dataset.mkdir(parents=True, exist_ok=True)
    outcomes = run_map(export_case, jobs_list, key=lambda j: j.scan, jobs=jobs, desc="export nnunet",
                       progress=progress)
    if any(not o.ok for o in outcomes):
        raise RuntimeError(f"nnU-Net export to {dataset} failed:\n{summarize(outcomes)}")
    keep = {Path(j.images_dir) / f"{j.case}_{CHANNEL}{FILE_ENDING}" for j in jobs_list}
    keep |= {Path(j.labels_dir) / f"{j.case}{FILE_ENDING}" for j in jobs_list}
    _remove_stale(dataset, keep)

    training = table["split"].isin(("train", "dev"))
    folds = settings.get("folds")
    meta = {
        "channel_names": {"0": "T1w"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": int(training.sum()),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": (
            f"ATLAS stroke lesions (T1w, MNI152NLin2009aSym) exported by atlas-curate {__version__} from the split "
            f"{split_tsv.name} (seed {settings.get('seed', 'n/a')}, "
            f"{f'{folds} folds' if folds else 'train/dev'}); imagesTs/labelsTs hold its test split. "
            "splits_final.json carries the split's folds: copy it to nnUNet_preprocessed/"
            f"{dataset.name}/ before nnUNetv2_train."),
        "numTest": int((~training).sum()),
        "reference": "Liew et al. 2018, Sci Data 5:180011 (ATLAS)",
    }
    io.write_text(json.dumps(meta, indent=2) + "\n", dataset / "dataset.json")
    splits_final = _splits_final(table, cases)
    for k, entry in enumerate(splits_final):
        if not entry["val"] or not entry["train"]:
            log.warning("splits_final.json entry %d has no %s case: nnU-Net cannot train that fold", k,
                        "validation" if not entry["val"] else "training")
    io.write_text(json.dumps(splits_final, indent=2) + "\n", dataset / "splits_final.json")
    how = {o.key: o.value for o in outcomes}
    rows = pd.DataFrame({
        "case": [cases[s] for s in table["scan"]], "scan": table["scan"], "subject": table["subject"],
        "split": table["split"], "fold": table["fold"],
        "image": [Path(p).relative_to(root).as_posix() if root in Path(p).parents else p for p in table["t1"]],
        "label": [Path(p).relative_to(root).as_posix() if root in Path(p).parents else p for p in table["mask"]],
        "label_binarised": [how[s]["label_written"] == "rewritten" for s in table["scan"]],
        "lesion_voxels": [how[s]["lesion_voxels"] for s in table["scan"]],
    })
    io.write_text(rows.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n"), dataset / "cases.tsv")
    return dataset
