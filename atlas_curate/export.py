"""``export nnunet``: a curated split as an nnU-Net v2 raw dataset, so nnU-Net trains on the same split.

``OUT`` is the ``nnUNet_raw`` folder itself; the export creates ``OUT/Dataset<ID>_<NAME>/`` (``<ID>`` with three
digits, e.g. ``Dataset501_ATLAS``) in the nnU-Net v2 "raw" format:

* ``imagesTr/<case>_0000.nii.gz`` and ``labelsTr/<case>.nii.gz``: the train and dev scans (train + all folds);
* ``imagesTs/<case>_0000.nii.gz`` and ``labelsTs/<case>.nii.gz``: our held-out test split (nnU-Net never reads
  them; ``labelsTs`` is there for scoring predictions);
* ``dataset.json``: ``channel_names`` {"0": "T1w"}, ``labels`` {"background": 0, "lesion": 1},
  ``numTraining`` (= files in ``imagesTr``), ``file_ending`` ".nii.gz", and a description naming the source,
  the number of folds and their seed;
* ``splits_final.json``: a list of ``{"train": [...], "val": [...]}`` of case ids, one entry per fold (see
  *Folds*). nnU-Net >= 2.8 copies it from the raw dataset to ``nnUNet_preprocessed/Dataset<ID>_<NAME>/`` itself
  and stops (an AssertionError) when a different, older copy is already there, so that copy must be deleted
  after a new split is exported; older versions read it only from there, so it has to be copied by hand;
* ``folds.json``: how the folds were made, their seed and the size of each fold's validation set;
* ``cases.tsv``: case id → scan, subject, split, fold (the nnU-Net fold whose validation set holds the case;
  ``n/a`` for test cases), and the source files (relative to the BIDS root).

Folds. nnU-Net trains five folds by default (``nnUNetv2_train ID 3d_fullres FOLD``, FOLD 0..4) and, for a fold
that ``splits_final.json`` lacks, draws its own random 80:20 split of the cases, which ignores subjects (two
sessions of one subject can land in training and validation). So every fold it is asked for must be ours:

* a split made with ``--folds K`` keeps its K folds (round k validates on fold k);
* a split without folds gets five: fold 0 validates on the split's dev scans (the train/dev split as
  documented) and trains on its train scans; the train scans are divided into four groups that are the
  validation sets of folds 1..4 (each trains on all other train and dev scans). The four groups are made by
  :func:`atlas_curate.split.assign_folds`, the allocation ``split --folds`` uses: subject-grouped, stratified by
  cohort and by the split's lesion-volume quartile of the subject's first scan, equal scan targets, seeded by
  the split's seed unless another is given. Every train/dev scan is then in exactly one validation set and no
  subject is in two. Fold 0's validation set has the dev size (11 % of the scans by default) and the others
  about a quarter of the train scans each, so fold 0 is smaller than folds 1..4 (239 scans at the default
  fractions: 26/46/46/45/45 validation scans);
* a split without dev scans: its train scans are divided into five such groups.

With fewer subjects than that (toy datasets) there are as many folds as subjects allow; a warning says so,
since a higher fold would again be nnU-Net's own random split. A split whose subjects span two folds (or train
and dev) is refused.

Case ids come from the scan name with its BIDS keys removed (``sub-c0001s0001_ses-t01`` → ``c0001s0001t01``;
``ses`` is kept when the session label starts with a digit: ``sub-r001s001_ses-1`` → ``r001s001ses1``; a scan
without a session: ``sub-r001s001`` → ``r001s001``); if two scans would share an id, every case is numbered
``<NAME>_<nnnn>`` in scan order instead.

The output folder. ``OUT`` named like a dataset folder (``Dataset<3 digits>_...``) or holding a
``dataset.json`` is refused: it must be ``nnUNet_raw``. Another folder with the same id
(``Dataset<ID>_<OTHER>``) is refused, as is ``Dataset<ID>_<NAME>`` holding a different export (other cases,
files or folds), unless ``overwrite``: then the other folder is deleted, or the export's case files are
replaced (those the new split lacks are removed). Exporting the same split again rewrites the same files.

Images are taken byte for byte (a hard link when the source and the output share a file system, else a copy;
both atomic). Labels are hard-linked/copied when the mask file already stores uint8 0/1 without scaling, and
otherwise rewritten as uint8 0/1 (``> 0``) on the same grid. Each label must share the image's grid (nnU-Net
refuses mismatches later, less readably). Nothing is written into the BIDS dataset. The cases are written by
:func:`atlas_curate.executor.run_map` (``jobs`` local worker processes, or a Dask cluster whose workers see
the BIDS dataset and ``OUT`` at the same paths).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import nibabel as nib
import numpy as np
import pandas as pd

from . import __version__, io
from .executor import run_map, summarize
from .naming import SPACE, ScanRef
from .split import NO_COHORT, SPLITS, assign_folds, load_split, split_paths
from .tables import read_json, read_tsv, tsv_text, write_json, write_tsv

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
CHANNEL = "0000"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
CASE_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
DEFAULT_FOLDS = 5  # what nnUNetv2_train trains (folds 0..4) and nnUNetv2_predict ensembles by default
DATASET_FOLDER = re.compile(r"^Dataset(?P<id>\d{3})_")
CASE_KEYS = ["case", "scan", "subject", "split", "fold", "image", "label"]  # what makes two exports the same


def case_ids(scans: Iterable[str], name: str = "ATLAS") -> dict[str, str]:
    """nnU-Net case id of each scan (see the module docstring); sorted scans in, one id per scan out."""
    scans = sorted(scans)
    ids = {}
    for scan in scans:
        try:
            ref = ScanRef.parse(scan)
        except ValueError:
            ids[scan] = re.sub(r"[^A-Za-z0-9]", "", scan)
            continue
        ses = ref.ses or ""
        ids[scan] = ref.sub + (ses if not ses or ses[0].isalpha() else f"ses{ses}")
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


# --- folds ----------------------------------------------------------------------------------------------

def nnunet_folds(table: pd.DataFrame, *, seed: int = 0, folds: int = DEFAULT_FOLDS,
                 source: os.PathLike | str = "split") -> tuple[pd.Series, str]:
    """The nnU-Net validation fold of every train/dev scan of a split table, and how the folds were made.

    Returns a Series of fold numbers indexed by scan and ``"split"`` (the split's own folds), ``"dev"`` (fold 0
    = the split's dev scans, the train scans divided into ``folds - 1`` more) or ``"train"`` (no dev scans: the
    train scans divided into ``folds``); see the module docstring. ``seed`` seeds the division (not used for
    ``"split"``). ``source`` names the split file in errors.
    """
    used = table[table["split"].isin(("train", "dev"))].copy()
    if used.empty:
        return pd.Series([], dtype=int, index=pd.Index([], name="scan")), "none"
    split_fold = used["fold"].astype("Int64") if "fold" in used.columns else pd.Series(pd.NA, index=used.index,
                                                                                          dtype="Int64")
    if split_fold.notna().any() or table.attrs.get("folds"):
        lacking = sorted(used.loc[split_fold.isna(), "scan"])
        if lacking:
            raise io.InputError(source, f"the split has folds, but {', '.join(lacking[:5])}"
                                        f"{f' and {len(lacking) - 5} more' if len(lacking) > 5 else ''} have none")
        count = int(table.attrs.get("folds") or int(split_fold.max()) + 1)
        present = sorted(set(split_fold.astype(int).tolist()))
        if present != list(range(count)):
            raise io.InputError(source, f"the split's folds must be 0..{count - 1}, each with a scan; "
                                        f"it has {present}")
        fold, method = split_fold.astype(int), "split"
    else:
        used["cohort"] = used["cohort"].fillna(NO_COHORT).astype(str) if "cohort" in used.columns else NO_COHORT
        quartile = used["volume_quartile"] if "volume_quartile" in used.columns else pd.Series(pd.NA, index=used.index)
        used["volume_quartile"] = pd.array(quartile, dtype="Int64").fillna(0)  # 0: volume unknown
        train, dev = used[used["split"] == "train"], used[used["split"] == "dev"]
        fold = pd.Series(0, index=used.index, dtype=int)
        if len(dev):
            groups, method = min(folds - 1, train["subject"].nunique()), "dev"
            if groups:
                fold[train.index] = assign_folds(train, groups, seed=seed) + 1
        else:
            groups, method = min(folds, train["subject"].nunique()), "train"
            fold[train.index] = assign_folds(train, groups, seed=seed)
    spread = fold.groupby(used["subject"]).nunique()
    spread = sorted(spread[spread > 1].index)
    if spread:
        raise io.InputError(source, f"subject(s) {', '.join(spread[:5])} have scans in more than one fold or in "
                                    "both train and dev: nnU-Net would validate on a subject it trains on")
    tested = sorted(set(used["subject"]) & set(table.loc[table["split"] == "test", "subject"]))
    if tested:
        raise io.InputError(source, f"subject(s) {', '.join(tested[:5])} have scans in test and in train or dev: "
                                    "the test split would not be held out")
    return pd.Series(fold.to_numpy(dtype=int), index=pd.Index(used["scan"], name="scan")), method


def splits_final(fold: pd.Series, cases: Mapping[str, str]) -> list[dict]:
    """``splits_final.json`` entries: fold k validates on its scans and trains on all other train/dev scans."""
    entries = []
    for k in range(int(fold.max()) + 1 if len(fold) else 0):
        entries.append({"train": sorted(cases[s] for s in fold.index[fold != k]),
                        "val": sorted(cases[s] for s in fold.index[fold == k])})
    return entries


_METHODS = {
    "split": "the split's own {k} folds (split --folds {k}): fold k validates on the split's fold k",
    "dev": ("fold 0 validates on the split's dev scans and trains on its train scans; the train scans are divided "
            "into {rest} more validation sets (folds 1..{last}), subject-grouped and stratified by cohort and "
            "lesion-volume quartile like split --folds, seeded; each trains on all other train and dev scans"),
    "train": ("the split has no dev scans: its train scans are divided into {k} validation sets, subject-grouped "
              "and stratified by cohort and lesion-volume quartile like split --folds, seeded"),
    "none": "no train or dev scans: no folds",
}


# --- the output folder -----------------------------------------------------------------------------------

def _check_output(root: Path, out: Path, dataset: Path) -> None:
    if DATASET_FOLDER.match(out.name) or (out / "dataset.json").is_file():
        raise ValueError(
            f"{out} looks like an nnU-Net dataset folder, but OUT must be the nnUNet_raw folder itself: the export "
            f"creates {dataset.name} inside it (to write {out.parent / dataset.name}, give {out.parent})")
    if dataset == root or root in dataset.parents or dataset in root.parents:
        raise ValueError(f"the export {dataset} must be outside the BIDS dataset {root} and not contain it")


def _case_text(rows: pd.DataFrame) -> str:
    return tsv_text(rows.reindex(columns=CASE_KEYS))


def _same_export(dataset: Path, rows: pd.DataFrame, splits: list[dict]) -> bool:
    """Whether ``dataset`` holds an export of these cases (same ids, scans, splits, folds, sources) and folds."""
    try:
        old_rows = read_tsv(dataset / "cases.tsv")
        old_splits = read_json(dataset / "splits_final.json")
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return False
    if not set(CASE_KEYS) <= set(old_rows.columns) or old_splits != splits:
        return False
    return _case_text(old_rows) == _case_text(rows)


def _conflicts(out: Path, dataset: Path, rows: pd.DataFrame, splits: list[dict], overwrite: bool) -> list[Path]:
    """Folders in the way of the export: another ``Dataset<ID>_*`` with this id (returned, to delete with
    ``overwrite``) or this dataset holding a different export; without ``overwrite`` both are errors."""
    ident = dataset.name.split("_", 1)[0]
    others = sorted(p for p in out.glob(f"{ident}_*") if p.is_dir() and p != dataset) if out.is_dir() else []
    if others and not overwrite:
        raise FileExistsError(
            f"{others[0]} already holds nnU-Net dataset {ident[len('Dataset'):]} and nnU-Net needs one folder per "
            f"id: choose another dataset id, or use overwrite to delete it and write {dataset.name}")
    if dataset.is_dir() and any(dataset.iterdir()) and not overwrite and not _same_export(dataset, rows, splits):
        raise FileExistsError(f"{dataset} exists and is not empty: it holds a different export (other cases, "
                              "sources or folds); use overwrite to replace its cases")
    if dataset.exists() and not dataset.is_dir():
        raise FileExistsError(f"{dataset} exists and is not a folder")
    return others


def _remove_stale(dataset: Path, keep: set[Path]) -> None:
    """With ``overwrite``: drop case files of an earlier export that this split no longer has."""
    for folder in CASE_FOLDERS:
        for path in sorted((dataset / folder).glob(f"*{FILE_ENDING}")):
            if path not in keep:
                path.unlink()


# --- the export ------------------------------------------------------------------------------------------

def export_nnunet(bids_root: os.PathLike | str, split_path: os.PathLike | str, out: os.PathLike | str, *,
                  dataset_id: int = 501, name: str = "ATLAS", overwrite: bool = False, link: bool = True,
                  seed: int | None = None, folds: int = DEFAULT_FOLDS, jobs: int = 1, progress: bool = False,
                  executor: str = "local", scheduler: str | None = None) -> Path:
    """Write the split at ``split_path`` (``split`` TSV/JSON) of ``bids_root`` as ``OUT/Dataset<ID>_<NAME>``.

    ``out`` is the ``nnUNet_raw`` folder. See the module docstring for the layout, the folds and the checks.
    Returns the dataset folder. ``seed`` seeds the folds of a split without folds (default: the split's seed,
    else 0); ``folds`` is how many such a split gets (5, what nnU-Net trains). ``overwrite`` replaces a different
    dataset with this id; ``link=False`` always copies. The cases are written by ``jobs`` local worker processes,
    or with ``executor="dask"`` on the Dask cluster at ``scheduler``.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not NAME.match(name):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '_' and '-'")
    if int(folds) != folds or folds < 1:
        raise ValueError(f"folds must be a positive integer, got {folds}")
    root = Path(bids_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    out = Path(out).resolve()
    dataset = out / f"Dataset{int(dataset_id):03d}_{name}"
    _check_output(root, out, dataset)
    split_tsv = split_paths(split_path)[0]
    table = load_split(split_path, bids_root=root)
    settings = dict(table.attrs)
    table = table[table["split"].isin(SPLITS)].sort_values("scan").reset_index(drop=True)
    table.attrs = settings
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

    split_seed = settings.get("seed")
    fold_seed = int(seed) if seed is not None else int(split_seed) if split_seed is not None else 0
    fold, method = nnunet_folds(table, seed=fold_seed, folds=int(folds), source=split_tsv)
    n_folds = int(fold.max()) + 1 if len(fold) else 0
    if method == "split":
        if seed is not None and seed != split_seed:
            log.warning("the split %s has its own folds: seed %s is not used", split_tsv.name, seed)
        fold_seed = split_seed
    elif n_folds < folds:
        log.warning("only %d fold(s): the split has too few subjects outside its test set for %d; nnU-Net makes "
                    "its own random split (ignoring subjects) for a higher fold", n_folds, folds)
    cases = case_ids(table["scan"], name)
    splits = splits_final(fold, cases)
    for k, entry in enumerate(splits):
        if not entry["val"] or not entry["train"]:
            log.warning("splits_final.json entry %d has no %s case: nnU-Net cannot train that fold", k,
                        "validation" if not entry["val"] else "training")
    relative = [[Path(p).relative_to(root).as_posix() if root in Path(p).parents else p for p in table[c]]
                for c in ("t1", "mask")]
    rows = pd.DataFrame({
        "case": [cases[s] for s in table["scan"]], "scan": table["scan"], "subject": table["subject"],
        "split": table["split"],
        "fold": pd.array([fold.get(s, pd.NA) for s in table["scan"]], dtype="Int64"),
        "image": relative[0], "label": relative[1],
    })
    others = _conflicts(out, dataset, rows, splits, overwrite)

    jobs_list = []
    for row in table.itertuples():
        suffix = "Ts" if row.split == "test" else "Tr"
        jobs_list.append(CaseJob(row.scan, cases[row.scan], row.t1, row.mask, str(dataset / f"images{suffix}"),
                                 str(dataset / f"labels{suffix}"), link))
    for other in others:
        log.warning("overwrite: deleting %s (the same dataset id as %s)", other, dataset.name)
        shutil.rmtree(other)
    dataset.mkdir(parents=True, exist_ok=True)
    outcomes = run_map(export_case, jobs_list, key=lambda j: j.scan, jobs=jobs, executor=executor,
                       scheduler=scheduler, desc="export nnunet", progress=progress)
    if any(not o.ok for o in outcomes):
        raise RuntimeError(f"nnU-Net export to {dataset} failed:\n{summarize(outcomes)}")
    keep = {Path(j.images_dir) / f"{j.case}_{CHANNEL}{FILE_ENDING}" for j in jobs_list}
    keep |= {Path(j.labels_dir) / f"{j.case}{FILE_ENDING}" for j in jobs_list}
    _remove_stale(dataset, keep)

    training = table["split"].isin(("train", "dev"))
    split_folds = settings.get("folds")
    meta = {
        "channel_names": {"0": "T1w"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": int(training.sum()),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": (
            f"ATLAS stroke lesions (T1w, {SPACE}) exported by atlas-curate {__version__} from the split "
            f"{split_tsv.name} (seed {split_seed if split_seed is not None else 'n/a'}, "
            f"{f'{split_folds} folds' if split_folds else 'train/dev'}); imagesTs/labelsTs hold its test split. "
            f"splits_final.json holds {n_folds} subject-grouped folds "
            f"(seed {fold_seed if fold_seed is not None else 'n/a'}; folds.json says how): "
            f"nnU-Net >= 2.8 copies it to nnUNet_preprocessed/{dataset.name}/ itself; delete an older copy there "
            "first (older nnU-Net: copy it there before nnUNetv2_train)."),
        "numTest": int((~training).sum()),
        "reference": "Liew et al. 2018, Sci Data 5:180011 (ATLAS)",
    }
    write_json(meta, dataset / "dataset.json", sort_keys=False)
    write_json(splits, dataset / "splits_final.json", sort_keys=False)
    subject_of = dict(zip(table["scan"], table["subject"]))
    doc = {
        "generated_by": {"name": "atlas-curate export nnunet", "version": __version__},
        "split": split_tsv.name, "split_seed": split_seed, "split_folds": split_folds,
        "folds": n_folds, "seed": fold_seed,
        "method": _METHODS[method].format(k=n_folds, rest=n_folds - 1, last=n_folds - 1),
        "grouping": "subject: all scans of a subject are in one validation set, and in no fold's training set "
                    "beside it",
        "strata": "cohort x lesion-volume quartile (of the split) of the subject's first scan",
        "validation": [{"fold": k, "scans": len(e["val"]), "training_scans": len(e["train"]),
                        "subjects": len({subject_of[s] for s in fold.index[fold == k]})}
                       for k, e in enumerate(splits)],
    }
    write_json(doc, dataset / "folds.json", sort_keys=False)
    how = {o.key: o.value for o in outcomes}
    rows["label_binarised"] = [how[s]["label_written"] == "rewritten" for s in table["scan"]]
    rows["lesion_voxels"] = [how[s]["lesion_voxels"] for s in table["scan"]]
    write_tsv(rows, dataset / "cases.tsv")
    return dataset


# --- what to do next ---------------------------------------------------------------------------------------

def stale_preprocessed_splits(dataset: os.PathLike | str, env: Mapping[str, str] | None = None) -> Path | None:
    """``$nnUNet_preprocessed/<dataset>/splits_final.json`` when it exists and differs from the export's."""
    env = os.environ if env is None else env
    if not env.get("nnUNet_preprocessed"):
        return None
    dataset = Path(dataset)
    copy = Path(env["nnUNet_preprocessed"]) / dataset.name / "splits_final.json"
    if not copy.is_file():
        return None
    try:
        same = read_json(copy) == read_json(dataset / "splits_final.json")
    except (OSError, ValueError, UnicodeDecodeError):
        same = False
    return None if same else copy


def next_steps(dataset: os.PathLike | str, split: os.PathLike | str = "SPLITS",
               env: Mapping[str, str] | None = None) -> list[str]:
    """What to run after :func:`export_nnunet` (nnU-Net v2), with warnings about the environment."""
    env = os.environ if env is None else env
    dataset = Path(dataset)
    raw = dataset.parent
    match = DATASET_FOLDER.match(dataset.name)
    ident = str(int(match["id"])) if match else "ID"
    count = len(read_json(dataset / "splits_final.json"))
    fold_list = " ".join(str(k) for k in range(count))
    lines = [f"nnU-Net dataset: {dataset}",
             f"  {count} subject-grouped folds in splits_final.json (how, seed, sizes: folds.json); "
             "imagesTs/labelsTs: the split's test scans",
             "next, with nnU-Net v2 (nnUNet_raw = the OUT given here):"]
    if not env.get("nnUNet_raw") or Path(env["nnUNet_raw"]).resolve() != raw.resolve():
        lines.append(f"  export nnUNet_raw={raw}   # and nnUNet_preprocessed, nnUNet_results")
    lines += [f"  nnUNetv2_plan_and_preprocess -d {ident} --verify_dataset_integrity",
              f"  nnUNetv2_train {ident} 3d_fullres FOLD   # FOLD = {fold_list}: each one of our folds",
              f"  nnUNetv2_predict -i {dataset / 'imagesTs'} -o PRED -d {ident} -c 3d_fullres"
              + ("" if count == DEFAULT_FOLDS else f" -f {fold_list}"),
              f"  atlas-curate evaluate --predictions PRED --split {split}"]
    if count == 0:
        lines.append("WARNING: no train or dev scans: nothing for nnU-Net to train on")
    elif count < DEFAULT_FOLDS:
        lines.append(f"WARNING: only {count} fold(s): train FOLD {fold_list} only; for fold {count} or higher "
                     "nnU-Net draws its own random 80:20 split, which can put one subject's sessions in training "
                     "and validation")
    if env.get("nnUNet_raw") and Path(env["nnUNet_raw"]).resolve() != raw.resolve():
        lines.append(f"WARNING: nnUNet_raw is {env['nnUNet_raw']}, not {raw}: nnU-Net will not find {dataset.name} "
                     f"(export nnUNet_raw={raw})")
    lines.append(f"splits_final.json: nnU-Net >= 2.8 copies it from here to nnUNet_preprocessed/{dataset.name}/ and "
                 "stops with an AssertionError when an older, different copy is there: after exporting a new split, "
                 "delete that copy (older nnU-Net: copy this file there yourself)")
    stale = stale_preprocessed_splits(dataset, env)
    if stale is not None:
        lines.append(f"WARNING: {stale} differs from this export's splits_final.json: delete it before running "
                     "nnU-Net on this dataset")
    return lines
