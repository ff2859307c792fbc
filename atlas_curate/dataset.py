"""One table of the scans of a converted (and usually normalised) BIDS dataset, for the later stages.

``overlap-map``, ``split``, ``train-baseline`` and ``export`` all need the same thing: every scan with its
template-space T1w and lesion images, its QC verdict and its participant/session metadata. This module
builds that table once, from files only:

* scans are found in ``sub-*/ses-*/anat`` and, without a session, ``sub-*/anat`` (of the raw dataset, the
  lesion derivative and the ``normalize`` derivative);
* template-space images come from the ``normalize`` derivative (``derivatives/atlas-curate``: the naming spec's
  ``preproc_t1w``, ``norm_mask``, ``norm_dseg``, ``norm_raw_mask``); a scan that was never normalised but was
  converted from a standard-space archive (``derivatives/lesions`` in the template space: ``standard_t1w``,
  ``lesion_mask``, ``lesion_dseg``, ``raw_mask``) uses those images directly (its QC is then ``n/a``);
* QC comes from ``derivatives/atlas-curate/qc.tsv`` (``qc_pass``, ``true``/``false``; a scan whose normalisation failed
  or was flagged is excluded by default, with the reason). A rater's decision recorded there by
  ``qc-apply`` (``human_decision``, see :mod:`atlas_curate.qc_decisions`) overrules the automatic verdict:
  ``exclude`` excludes the scan (``excluded by rater <rater>: <note>``), ``include`` keeps a scan whose
  automatic QC failed (``include_failed`` does not matter for it);
* metadata from ``participants.tsv`` and every ``sub-*/sub-*_sessions.tsv`` (session columns win over
  participant columns of the same name).

Columns: ``scan`` (``sub-X_ses-Y``, or ``sub-X`` without a session), ``participant_id``, ``session_id``,
``subject``, ``session`` (missing without a session),
``t1``, ``mask``, ``dseg``, ``raw_mask`` (absolute paths or ``None``), ``native_mask``, ``native_dseg``
(the converted native-space masks, for native volumes), ``source`` (``normalize`` | ``standard``),
``qc_pass`` (True/False/None), ``qc_reasons``, ``qc_decision`` (the rater's ``include`` / ``exclude``, or
``""``), ``has_mask``, ``excluded`` (reason or ``""``), then the metadata columns.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from . import naming, tables
from .naming import ScanRef

PATH_COLUMNS = ("t1", "mask", "dseg", "raw_mask", "native_mask", "native_dseg")
#: The template-space images of a scan (column -> naming-spec key): normalize's, or a standard-space release's.
NORMALIZED_IMAGES = {"t1": "preproc_t1w", "mask": "norm_mask", "dseg": "norm_dseg", "raw_mask": "norm_raw_mask"}
STANDARD_IMAGES = {"t1": "standard_t1w", "mask": "lesion_mask", "dseg": "lesion_dseg", "raw_mask": "raw_mask"}
NATIVE_IMAGES = {"native_mask": "lesion_mask", "native_dseg": "lesion_dseg"}
SCAN_FOLDERS = ("sub-*/ses-*/anat", "sub-*/anat")


def _existing(path: Path) -> str | None:
    return str(path) if path.is_file() else None


def _images(root: Path, scan: ScanRef, outputs: dict[str, str], space: str) -> dict[str, str | None]:
    return {column: _existing(root / scan.path(key, space=space)) for column, key in outputs.items()}


def _scans_in(base: Path, pattern: str) -> list[tuple[ScanRef, str]]:
    """``(scan, file name)`` of the files matching ``pattern`` in the scan folders of ``base`` whose name
    starts with the scan of their folder (``sub-X/ses-Y/anat/sub-X_ses-Y_*``, ``sub-X/anat/sub-X_*``)."""
    found = []
    for folder in SCAN_FOLDERS:
        for path in sorted(base.glob(f"{folder}/{pattern}")):
            scan = ScanRef.from_name(path.name)
            if scan is not None and path.parent == base / scan.folder():
                found.append((scan, path.name))
    return found


def _text(value) -> str:
    """A qc.tsv cell as text, ``""`` when missing."""
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value).strip()


def _metadata(root: Path) -> pd.DataFrame:
    """participants.tsv joined with every sessions.tsv: one row per (participant_id, session_id); a participant
    without a sessions table has one row with no session (it joins the session-less scans)."""
    participants = tables.read_tsv(root / "participants.tsv") if (root / "participants.tsv").is_file() else None
    sessions = []
    for path in sorted(root.glob("sub-*/sub-*_sessions.tsv")):
        table = tables.read_tsv(path)
        table.insert(0, "participant_id", path.parent.name)
        sessions.append(table)
    meta = (pd.concat(sessions, ignore_index=True) if sessions
            else pd.DataFrame(columns=["participant_id", "session_id"]))
    if participants is not None:
        extra = [c for c in participants.columns if c == "participant_id" or c not in meta.columns]
        meta = meta.merge(participants[extra], on="participant_id", how="outer")
    return meta


def _typed(table: pd.DataFrame, skip: set[str]) -> pd.DataFrame:
    """Numeric metadata columns as numbers (so ``--where "fazekas_pvh >= 2"`` works)."""
    for column in table.columns:
        if column in skip or not (table[column].dtype == object or pd.api.types.is_string_dtype(table[column])):
            continue
        converted = pd.to_numeric(table[column], errors="coerce")
        if converted.notna().sum() == table[column].notna().sum() and table[column].notna().any():
            table[column] = converted
    return table


def scan_table(bids_root: os.PathLike | str, *, include_failed: bool = False) -> pd.DataFrame:
    """Every scan of ``bids_root`` with template-space images, QC and metadata; see the module docstring.

    Rows are sorted by scan. ``excluded`` holds why a scan cannot be used by default: ``"qc failed: ..."``
    (unless ``include_failed`` or a rater's ``include``), ``"excluded by rater ..."`` (a rater's
    ``exclude``), ``"normalize failed: ..."``, ``"no template-space T1w"``.
    """
    root = Path(bids_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    pipeline = root / naming.PIPELINE_DERIVATIVE
    lesions = root / naming.LESION_DERIVATIVE
    keys = {scan for base in (root, lesions) for scan, _ in _scans_in(base, "sub-*_T1w.nii.gz")}
    for scan, name in _scans_in(pipeline, "*_T1w.nii.gz"):   # normalize's T1w, with or without desc-preproc
        if name in (scan.path("preproc_t1w", space=naming.SPACE, desc=desc).name for desc in ("preproc", None)):
            keys.add(scan)
    qc = tables.read_tsv(pipeline / "qc.tsv").set_index("scan") if (pipeline / "qc.tsv").is_file() else None

    rows = []
    for ref in sorted(keys, key=lambda r: (r.sub, r.ses or "")):
        scan = ref.key
        row: dict = {"scan": scan, "participant_id": ref.participant_id, "session_id": ref.session_id,
                     "subject": ref.sub, "session": ref.ses}
        images = _images(root, ref, NORMALIZED_IMAGES, naming.SPACE)
        source = "normalize" if images["t1"] else None
        if source is None:
            standard = _images(root, ref, STANDARD_IMAGES, naming.SPACE)
            if standard["t1"]:
                images, source = standard, "standard"
        row.update(images)
        row.update(_images(root, ref, NATIVE_IMAGES, naming.NATIVE_SPACE))
        row["source"] = source
        qc_pass, reasons, status, error, decision, rater, note = None, "", None, "", "", "", ""
        if qc is not None and scan in qc.index and source == "normalize":
            entry = qc.loc[scan]
            qc_pass = tables.as_bool(entry.get("qc_pass"))
            reasons = "" if pd.isna(entry.get("qc_reasons")) else str(entry.get("qc_reasons"))
            status = entry.get("status")
            error = "" if pd.isna(entry.get("error")) else str(entry.get("error"))
            decision, rater, note = (_text(entry.get(c)) for c in ("human_decision", "human_rater", "human_note"))
            decision = decision if decision in ("include", "exclude") else ""
        elif qc is not None and scan in qc.index and qc.loc[scan].get("status") == "failed":
            status, error, qc_pass = "failed", str(qc.loc[scan].get("error")), False
        row["qc_pass"] = qc_pass
        row["qc_reasons"] = reasons
        row["qc_decision"] = decision
        row["has_mask"] = row["mask"] is not None
        if status == "failed":
            row["excluded"] = f"normalize failed: {error}"
        elif source is None:
            row["excluded"] = "no template-space T1w"
        elif decision == "exclude":
            row["excluded"] = f"excluded by rater {rater or 'n/a'}" + (f": {note}" if note else "")
        elif decision == "include":
            row["excluded"] = ""
        elif qc_pass is False and not include_failed:
            row["excluded"] = f"qc failed: {reasons}"
        else:
            row["excluded"] = ""
        rows.append(row)

    fixed = ["scan", "participant_id", "session_id", "subject", "session", *PATH_COLUMNS, "source", "qc_pass",
             "qc_reasons", "qc_decision", "has_mask", "excluded"]
    table = pd.DataFrame(rows, columns=fixed)
    meta = _metadata(root)
    if len(meta):
        meta = meta.drop(columns=[c for c in meta.columns if c in table.columns
                                  and c not in ("participant_id", "session_id")])
        table = table.merge(meta, on=["participant_id", "session_id"], how="left")
    return _typed(table, skip=set(fixed) | {"source_id"}).reset_index(drop=True)


def where(table: pd.DataFrame, expression: str | None) -> pd.DataFrame:
    """Rows matching a pandas query on the metadata columns, e.g. ``"fazekas_pvh >= 2"``.

    Unknown column names are an error listing the columns that exist."""
    if not expression:
        return table
    try:
        return table.query(expression, engine="python")
    except pd.errors.UndefinedVariableError as exc:
        known = ", ".join(c for c in table.columns if c not in PATH_COLUMNS)
        match = re.search(r"name '([^']+)' is not defined", str(exc))
        what = f"unknown column {match[1]!r}" if match else str(exc)
        raise ValueError(f"--where {expression!r}: {what}; known columns: {known}") from None
    except (SyntaxError, TypeError) as exc:
        raise ValueError(f"--where {expression!r}: {exc}") from None


def session_order(label: str | None) -> tuple:
    """Sort key for session labels in natural order (``ses-2`` before ``ses-10``, ``ses-t01`` before ``ses-t02``);
    no session (a session-less scan) sorts first."""
    if label is None or (not isinstance(label, str) and pd.isna(label)):
        return ()
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(label)))


def first_sessions(table: pd.DataFrame) -> pd.DataFrame:
    """One scan per subject: its first session in natural order (see :func:`session_order`)."""
    order = sorted(range(len(table)), key=lambda i: (table["participant_id"].iloc[i],
                                                     session_order(table["session_id"].iloc[i])))
    return table.iloc[order].groupby("participant_id", sort=False).head(1)


def lesion_volume_mm3(path: str | None) -> float:
    """Volume of a mask file's non-zero voxels in mm³ (nan when there is none)."""
    if not path:
        return float("nan")
    import nibabel as nib

    img = nib.load(path)
    return float(np.count_nonzero(np.asanyarray(img.dataobj))) * float(np.prod(img.header.get_zooms()[:3]))
