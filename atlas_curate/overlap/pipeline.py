"""``overlap-map``: the probabilistic lesion overlap map of a dataset, its figures and tables.

Which scans go in (each excluded scan is listed in ``overlap.json`` with its category and reason, checked
in this order):

1. ``qc-failed`` / ``normalize-failed`` / ``missing``: as :func:`atlas_curate.dataset.scan_table` says
   (QC-failed scans go in with ``include_failed``);
2. ``filtered``: not matched by ``--where`` (a pandas query on the participants/sessions columns);
3. ``missing``: no template-space lesion mask (e.g. test scans whose masks are withheld) or no lesion
   label image (``desc-lesions_dseg``, needed for lesion identity);
4. ``off-grid``: mask or dseg not on the template grid (shape or affine, from the headers; ``unreadable``
   when a header cannot be read);
5. ``not-first-session`` (``per_subject="first"``, the default): one scan per subject, its first session
   in sorted order among the scans still in;
6. ``unreadable``: a file that fails to decode while the map is built.

The map (see :mod:`.maps`) counts, per template voxel, the included scans whose lesion covers it
(``lesions="all"``: the union mask; ``"primary"``: label 1 of the dseg); the probability map is the count
divided by the number of included scans. Tables and the lesion report (see :mod:`.tables`) always use
every lesion of the included scans. Outputs go to ``BIDS_ROOT/derivatives/atlas-curate/overlap/`` by
default (listed in that derivative's ``.bidsignore``), each written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__, dataset, io, naming
from ..index import refresh_index
from ..tables import as_bool, write_json, write_tsv
from ..templates import template_grid
from . import figures, tables
from .maps import LESION_CHOICES, UNREADABLE_HEADER, ScanJob, ScanStats, accumulate, header_problem, probability

PER_SUBJECT_CHOICES = ("first", "all")
OUTPUT_NAME = "overlap"
FILES = {
    "prob": "overlap_prob.nii.gz",
    "count": "overlap_count.nii.gz",
    "sidecar": "overlap.json",
    "orthogonal": "overlap_orthogonal.png",
    "glass": "overlap_glass.png",
    "histogram": "lesion_volume_hist.png",
    "table1": "table1.tsv",
    "table2": "table2.tsv",
    "disagreements": "disagreements.tsv",
    "lesions_tsv": "lesions.tsv",
    "lesions_json": "lesions.json",
}
EXCLUDED_COLUMNS = ["scan", "participant_id", "session_id", "category", "reason"]


class NoScansError(ValueError):
    """Every scan was excluded: nothing to map."""


@dataclass
class OverlapResult:
    output: Path
    files: dict[str, Path]
    n_included: int
    included: pd.DataFrame          # the scan-table rows of the included scans
    excluded: pd.DataFrame          # scan, participant_id, session_id, category, reason
    table1: pd.DataFrame
    table2: pd.DataFrame
    disagreements: pd.DataFrame
    lesions: pd.DataFrame
    max_fraction: float
    peak_mm: tuple[float, float, float]
    options: dict = field(default_factory=dict)

    @property
    def n_excluded(self) -> int:
        return len(self.excluded)


# --- selection ---------------------------------------------------------------------------------

def _category(reason: str) -> str:
    if reason.startswith("qc failed"):
        return "qc-failed"
    if reason.startswith("normalize failed"):
        return "normalize-failed"
    if reason.startswith("excluded by rater"):
        return "rater-excluded"
    return "missing"


def _has(value) -> bool:
    return isinstance(value, str) and bool(value)


def _exclusion(row: pd.Series, category: str, reason: str) -> dict:
    return {"scan": row["scan"], "participant_id": row["participant_id"], "session_id": row["session_id"],
            "category": category, "reason": reason}


def _file_problem(row: pd.Series, template: str) -> tuple[str, str] | None:
    """(category, reason) when the scan's mask or dseg is missing or not on the template grid."""
    if not _has(row["mask"]):
        return "missing", "no template-space lesion mask"
    if not _has(row["dseg"]):
        return "missing", "no lesion label image (desc-lesions_dseg)"
    for key in ("mask", "dseg"):
        problem = header_problem(row[key], template)
        if problem and problem.startswith(UNREADABLE_HEADER):
            return "unreadable", f"{Path(row[key]).name}: {problem}"
        if problem:
            return "off-grid", f"not on the {template_grid(template).space} grid: {Path(row[key]).name}: {problem}"
    return None


def select_scans(table: pd.DataFrame, *, where: str | None = None, per_subject: str = "first",
                 template: str = naming.TEMPLATE_KEY) -> tuple[pd.DataFrame, list[dict]]:
    """The scans to map and the excluded ones (``scan``, ``category``, ``reason``); see the module docstring."""
    matched = set(dataset.where(table, where)["scan"]) if where else set(table["scan"])
    excluded, keep = [], []
    for _, row in table.iterrows():
        reason = row["excluded"] if isinstance(row["excluded"], str) else ""
        if reason:
            excluded.append(_exclusion(row, _category(reason), reason))
        elif row["scan"] not in matched:
            excluded.append(_exclusion(row, "filtered", f"not matched by --where {where!r}"))
        elif problem := _file_problem(row, template):
            excluded.append(_exclusion(row, *problem))
        else:
            keep.append(row["scan"])
    usable = table[table["scan"].isin(keep)]
    if per_subject == "first":
        first = set(dataset.first_sessions(usable)["scan"])
        for _, row in usable[~usable["scan"].isin(first)].iterrows():
            excluded.append(_exclusion(row, "not-first-session", "not the subject's first session among its "
                                                                 "usable scans (--per-subject first)"))
        usable = usable[usable["scan"].isin(first)]
    order = {scan: i for i, scan in enumerate(table["scan"])}
    excluded.sort(key=lambda e: order[e["scan"]])
    return usable.sort_values("scan").reset_index(drop=True), excluded


# --- outputs -----------------------------------------------------------------------------------

def output_dir(root: Path, output: os.PathLike | str | None) -> Path:
    """The output folder; inside the BIDS root only under ``derivatives/<name>/`` (never the lesion inputs)."""
    out = Path(output).resolve() if output else root / naming.PIPELINE_DERIVATIVE / OUTPUT_NAME
    derivatives = root / "derivatives"
    if out == root or root in out.parents:
        parts = out.relative_to(derivatives).parts if derivatives in out.parents else ()
        if len(parts) < 2 or parts[0] == naming.LESION_DERIVATIVE.name:
            raise ValueError(f"output {out} is inside the BIDS dataset {root}: use a folder under "
                             f"{derivatives}/<name>/ (default {root / naming.PIPELINE_DERIVATIVE / OUTPUT_NAME}) "
                             "or one outside the dataset")
    return out


def _bids_uri(path: str, root: Path) -> str:
    try:
        return "bids::" + Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _ignore_in_derivative(root: Path, out: Path) -> Path | None:
    """List ``out`` in the ``.bidsignore`` of the derivative it lives in, so that the derivative stays valid BIDS.

    The entry has no trailing slash: the BIDS validator (3.x) then ignores the folder itself too.
    """
    derivatives = root / "derivatives"
    if derivatives not in out.parents:
        return None
    parts = out.relative_to(derivatives).parts
    derivative = derivatives / parts[0]
    entry = Path(*parts[1:]).as_posix()
    ignore = derivative / ".bidsignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    if entry not in lines:
        io.write_text("\n".join([*lines, entry]) + "\n", ignore)
    return ignore


def _save_map(data: np.ndarray, dtype, description: str, path: Path, key: str) -> Path:
    img = template_grid(key).image(data, dtype)
    img.header["descrip"] = description.encode()[:79]
    return io.save_nifti(img, path)


def _sidecar(root: Path, options: dict, included: pd.DataFrame, stats: dict[str, ScanStats],
             excluded: list[dict], files: dict[str, Path], max_fraction: float, peak: tuple, key: str) -> dict:
    by_category = _category_counts(excluded)
    which = ("the union of all lesions (label-L_desc-T1lesion_mask)" if options["lesions"] == "all"
             else "the primary lesion only (label 1 of desc-lesions_dseg)")
    return {
        "Description": "Probabilistic lesion overlap map: for each template voxel, the fraction of the included "
                       f"scans whose lesion covers it; lesion = {which}",
        "GeneratedBy": [{"Name": "atlas-curate", "Version": __version__, "Command": "overlap-map"}],
        "SpatialReference": template_grid(key).space,
        "Options": options,
        "Files": {k: p.name for k, p in sorted(files.items())},
        "Maps": {
            FILES["prob"]: "float32, 0..1: count / n_included (the mean of the included scans' binary masks)",
            FILES["count"]: "int32: number of included scans whose lesion covers the voxel",
        },
        "NumberOfScans": {"included": len(included), "excluded": len(excluded), "excluded_by_category": by_category},
        "MaximumFraction": round(max_fraction, 6),
        "PeakMNI": [round(v, 2) for v in peak],
        "Tables": {
            FILES["table1"]: "Scans per group (all, then each cohort): no / single / multiple lesions, primary lesion "
                             "left / right / other; computed from the template-space masks beside the spreadsheet",
            FILES["table2"]: "Lesions per group: cortical / subcortical per hemisphere (side of the lesion centroid), "
                             "other (brainstem / cerebellum); computed beside the spreadsheet",
            FILES["disagreements"]: "Every scan and measure where the computed value and the spreadsheet's differ",
            "Definitions": tables.DEFINITIONS,
        },
        "Included": [{"scan": row["scan"], "participant_id": row["participant_id"], "session_id": row["session_id"],
                      "source": row["source"], "qc_pass": as_bool(row["qc_pass"]),
                      "mask": _bids_uri(row["mask"], root), "dseg": _bids_uri(row["dseg"], root),
                      "map_voxels": stats[row["scan"]].map_voxels, "notes": stats[row["scan"]].notes}
                     for _, row in included.iterrows()],
        "Excluded": [{k: entry[k] for k in ("scan", "category", "reason")} for entry in excluded],
    }


# --- the stage ---------------------------------------------------------------------------------

def _category_counts(excluded: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in excluded:
        counts[entry["category"]] = counts.get(entry["category"], 0) + 1
    return dict(sorted(counts.items()))


def _stream(table: pd.DataFrame, candidates: pd.DataFrame, excluded: list[dict], *, lesions: str, jobs: int,
            progress: bool, key: str, executor: str, scheduler: str | None
            ) -> tuple[np.ndarray, pd.DataFrame, dict[str, ScanStats]]:
    """Count map, included scans and their stats; scans that fail to decode join ``excluded``."""
    scan_jobs = [ScanJob(row["scan"], row["mask"], row["dseg"],
                         row["native_dseg"] if _has(row["native_dseg"]) else None, lesions, key)
                 for _, row in candidates.iterrows()]
    count, outcomes = accumulate(scan_jobs, workers=jobs, progress=progress, template=key, executor=executor,
                                 scheduler=scheduler)
    failed = {o.key: o.reason for o in outcomes if not o.ok}
    for _, row in candidates[candidates["scan"].isin(failed)].iterrows():
        excluded.append(_exclusion(row, "unreadable", failed[row["scan"]]))
    order = {scan: i for i, scan in enumerate(table["scan"])}
    excluded.sort(key=lambda e: order[e["scan"]])
    included = candidates[~candidates["scan"].isin(failed)].reset_index(drop=True)
    return count, included, {o.key: o.value for o in outcomes if o.ok}


def _write_tables(included: pd.DataFrame, stats: dict[str, ScanStats], files: dict[str, Path]) -> dict:
    frame = tables.compare_frame(included, stats)
    out = {"table1": tables.table1(frame), "table2": tables.table2(frame),
           "disagreements": tables.disagreements(frame), "lesions": tables.lesion_report(included, stats)}
    counts = ("computed", "spreadsheet", "difference")
    write_tsv(out["table1"], files["table1"], integer_columns=counts)
    write_tsv(out["table2"], files["table2"], integer_columns=counts)
    write_tsv(out["disagreements"], files["disagreements"])
    write_tsv(out["lesions"], files["lesions_tsv"], integer_columns=("lesion", "voxels_template"))
    write_json(tables.lesion_document(included, stats), files["lesions_json"], allow_nan=False)
    return out


def _write_figures(prob: np.ndarray, lesion_table: pd.DataFrame, files: dict[str, Path], *, n: int, lesions: str,
                   key: str) -> tuple[float, float, float]:
    """The three figures; returns the MNI coordinates of the peak the slices cut through."""
    grid = template_grid(key)
    prob_img = grid.image(prob, np.float32)
    title = f"Lesion overlap ({'all' if lesions == 'all' else 'primary'} lesions), n = {n} scans"
    figures.orthogonal(prob_img, grid.template.t1w, files["orthogonal"], n=n, title=title)
    figures.glass(prob_img, files["glass"], n=n, title=title)
    present = lesion_table[lesion_table["voxels_template"] > 0]
    figures.volume_histogram(present.groupby("scan")["volume_mm3_template"].sum().tolist(),
                             present["volume_mm3_template"].tolist(), files["histogram"],
                             title=f"Lesion volumes, n = {n} scans")
    return figures.peak_mm(prob_img)


def overlap_map(bids_root: os.PathLike | str, *, output: os.PathLike | str | None = None, lesions: str = "all",
                where: str | None = None, include_failed: bool = False, per_subject: str = "first", jobs: int = 1,
                progress: bool = True, executor: str = "local", scheduler: str | None = None) -> OverlapResult:
    """Build the overlap map, its figures, the dataset tables and the lesion report; see the module docstring.

    The scans are read by :func:`atlas_curate.executor.run_stream`: ``jobs`` local worker processes, or with
    ``executor="dask"`` the Dask cluster at ``scheduler``.

    Raises ``ValueError`` for bad options or an unknown ``--where`` column and :class:`NoScansError` when
    every scan is excluded (the message counts the reasons).
    """
    if lesions not in LESION_CHOICES:
        raise ValueError(f"--lesions must be one of {LESION_CHOICES}, not {lesions!r}")
    if per_subject not in PER_SUBJECT_CHOICES:
        raise ValueError(f"--per-subject must be one of {PER_SUBJECT_CHOICES}, not {per_subject!r}")
    key = naming.TEMPLATE_KEY
    root = Path(bids_root).resolve()
    out = output_dir(root, output)
    table = dataset.scan_table(root, include_failed=include_failed)
    if table.empty:
        raise NoScansError(f"{root}: no scans found (run bids-convert, and normalize for native releases)")
    candidates, excluded = select_scans(table, where=where, per_subject=per_subject, template=key)
    count, included, stats = _stream(table, candidates, excluded, lesions=lesions, jobs=jobs, progress=progress,
                                     key=key, executor=executor, scheduler=scheduler)
    if included.empty:
        detail = ", ".join(f"{v} {k}" for k, v in _category_counts(excluded).items())
        raise NoScansError(f"{root}: no scan left for the overlap map ({len(excluded)} excluded: {detail})")

    n = len(included)
    files = {name: out / filename for name, filename in FILES.items()}
    prob = probability(count, n)
    _save_map(count, np.int32, "atlas-curate overlap: number of scans", files["count"], key)
    _save_map(prob, np.float32, "atlas-curate overlap: fraction of scans", files["prob"], key)
    written = _write_tables(included, stats, files)
    peak = _write_figures(prob, written["lesions"], files, n=n, lesions=lesions, key=key)
    options = {"lesions": lesions, "where": where, "include_failed": include_failed, "per_subject": per_subject,
               "template": template_grid(key).space}
    max_fraction = float(prob.max())
    write_json(_sidecar(root, options, included, stats, excluded, files, max_fraction, peak, key),
                   files["sidecar"], allow_nan=False)
    _ignore_in_derivative(root, out)
    refresh_index(root, "overlap", out)
    return OverlapResult(out, files, n, included, pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS),
                         written["table1"], written["table2"], written["disagreements"], written["lesions"],
                         max_fraction, peak, options)


def summary(result: OverlapResult) -> str:
    """Lines for the command line: scans in and out, where the map, figures and tables are."""
    counts = result.excluded["category"].value_counts().sort_index().to_dict() if result.n_excluded else {}
    out_detail = f" ({', '.join(f'{v} {k}' for k, v in counts.items())})" if counts else ""
    files = result.files
    return "\n".join([
        f"overlap map: {result.n_included} scans in, {result.n_excluded} out{out_detail}; "
        f"lesions: {result.options.get('lesions', 'all')}; maximum overlap {result.max_fraction:.3f} at MNI "
        f"({', '.join(f'{v:g}' for v in result.peak_mm)})",
        f"  map: {files['prob']} (count: {files['count'].name})",
        f"  figures: {files['orthogonal']}, {files['glass'].name}, {files['histogram'].name}",
        f"  tables: {files['table1'].name}, {files['table2'].name} (computed vs spreadsheet); "
        f"{len(result.disagreements)} disagreement(s) in {files['disagreements'].name}",
        f"  lesion report: {files['lesions_tsv'].name}, {files['lesions_json'].name} ({len(result.lesions)} lesions)",
        f"  which scans went in and why others did not: {files['sidecar']}",
    ])
