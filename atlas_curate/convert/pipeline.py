"""``bids-convert``: an ATLAS release folder -> a BIDS dataset with a lesion derivative."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import __version__, io, naming, tables
from ..executor import outcomes_table, run_map
from ..index import refresh_index
from .discover import ReleaseError, SourceScan, discover, find_metadata
from .metadata import Metadata, column_sidecar, fixed_columns, load_metadata
from .scan import REPORT_COLUMNS, ScanJob, convert_scan, report_row, scan_outputs, t1_output

log = logging.getLogger(__name__)

RELEASES = {"native": "R1.1-native", "standard": "R1.1-standard", "atlas2": "R2.0", "bids": "BIDS"}
BIDS_RELEASE_LEVEL = {"BIDS": "A BIDS dataset (bids-convert's BIDS reader)"}
EMPTY_STATUS = "empty_folder"   # a subject/session/scan folder without files: reported, not a scan
REFERENCES = {"R2.0": "Liew et al. 2022, Sci Data 9:320, doi:10.1038/s41597-022-01401-7"}
WRITTEN_STATUSES = ("converted", "masks_withheld", "no_mask")   # scans whose T1 is in the dataset
FAILED_STATUSES = ("failed", "masks_withheld")
LICENSE = "Restricted: ATLAS data use agreement"


@dataclass
class ConversionResult:
    output: Path
    flavour: str
    report: pd.DataFrame
    metadata_problems: list[str]

    @property
    def n_failed(self) -> int:
        return int(self.report["status"].isin(FAILED_STATUSES).sum())

    def summary(self) -> str:
        counts = self.report["status"].value_counts().to_dict()
        lines = [f"{len(self.report)} report rows: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))]
        for _, row in self.report[self.report["status"].isin(FAILED_STATUSES + ("no_scan", EMPTY_STATUS))].iterrows():
            lines.append(f"  {row['status'].upper()} {row['release_scan']}: {row['reason']}")
        lines += [f"  {p}" for p in self.metadata_problems]
        lines.append(f"report: {self.output / 'conversion_report.tsv'}")
        return "\n".join(lines)


def _check_paths(source: Path, output: Path) -> None:
    if output == source or source in output.parents or output in source.parents:
        raise ReleaseError(f"output {output} must be outside the release folder {source} and not contain it")


def _bids_dataset_files(source: Path, output: Path) -> None:
    """dataset_description, README, CHANGES and .bidsignore of a dataset converted from BIDS source(s)."""
    from .bids import find_datasets

    names = []
    for folder, _, _ in find_datasets(source):
        try:
            names.append(str(tables.read_json(folder / "dataset_description.json").get("Name") or folder.name))
        except Exception:   # an unreadable description only loses its name
            names.append(folder.name)
    name = ", ".join(dict.fromkeys(names)) or source.name
    tables.write_dataset_description(output, f"{name} (lesion dataset)",
                                     description="bids-convert of BIDS lesion dataset(s)", dataset_type="raw",
                                     raw_link=None)
    io.write_text(
        f"{name}\n\nConverted by atlas-curate {__version__} (bids-convert, BIDS reader).\n\n"
        "* T1-weighted images: sub-*/[ses-*/]anat/*_T1w.nii.gz (native space; voxel-equal to the source; the\n"
        "  sidecar records SkullStripped and how it was decided). Template-space T1w live in derivatives/lesions/.\n"
        "* Lesion masks: derivatives/lesions/ (label-L_desc-T1lesion mask; desc-lesions_dseg: its 26-connected\n"
        "  components by size, 1 = largest, derived here).\n"
        "* participants.tsv and sub-*/sub-*_sessions.tsv: the source's tables and T1w sidecar fields, described in\n"
        "  the JSON sidecars; skull_stripped per scan.\n"
        "* conversion_report.tsv: one row per scan (and per empty folder) with status, reason and every check.\n",
        output / "README")
    io.write_text(f"1.0.0\n  - Converted from BIDS by atlas-curate {__version__}.\n", output / "CHANGES")
    io.write_text(f"conversion_report.tsv\n{naming.STATE_DIR.as_posix()}/\n", output / ".bidsignore")
    tables.write_dataset_description(
        output / naming.LESION_DERIVATIVE, f"{name} lesion masks",
        description="Lesion masks of the source dataset(s), checked against their T1w grid and written as BIDS "
                    "derivatives", dataset_type="derivative", raw_link="../../")
    io.write_text("Lesion derivatives\n\nLesion masks of the source, converted by "
                  f"atlas-curate {__version__}: see the raw dataset's README two levels up.\n",
                  output / naming.LESION_DERIVATIVE / "README")


def _dataset_files(output: Path, flavour: str, metadata: Metadata) -> None:
    release = RELEASES[flavour]
    tables.write_dataset_description(
        output, f"ATLAS {release.replace('-', ' ')} (Anatomical Tracings of Lesions After Stroke)",
        description=f"bids-convert of the ATLAS {release} archive", dataset_type="raw", raw_link=None,
        License=LICENSE, Authors=["Sook-Lei Liew", "Julia M. Anglin", "Nick W. Banks", "ATLAS contributors"],
        ReferencesAndLinks=["Liew et al. 2018, Sci Data 5:180011, doi:10.1038/sdata.2018.11"]
                           + ([REFERENCES[release]] if release in REFERENCES else []))
    readme = (
        "ATLAS: Anatomical Tracings of Lesions After Stroke\n\n"
        f"Converted to BIDS by atlas-curate {__version__} from the {release} archive.\n\n"
        "* T1-weighted images: sub-*/ses-*/anat/*_T1w.nii.gz"
        + (" (copied byte for byte unless the header had to change)" if flavour == "native" else
           f" are in template space and live in derivatives/lesions/ (space-{naming.SPACE})") + ".\n"
        "* Hand-traced lesions: derivatives/lesions/ (union mask label-L_desc-T1lesion, per-lesion\n"
        "  identity desc-lesions_dseg with 1 = primary, unsmoothed tracings desc-T1lesionRaw).\n"
        + ("* R2.0 ships one mask per scan (all lesions merged): the dseg's lesions are its 26-connected\n"
           "  components by size (1 = largest), derived here, not given by the release. Testing scans have\n"
           "  no mask (status no_mask in conversion_report.tsv); sessions.tsv column part = training|testing.\n"
           if flavour == "atlas2" else "")
        + "* Release metadata: participants.tsv and sub-*/sub-*_sessions.tsv, described in the JSON sidecars.\n"
        "* conversion_report.tsv: one row per scan with status, reason and every failed check.\n"
    )
    io.write_text(readme, output / "README")
    io.write_text(f"1.0.0\n  - Converted from the ATLAS {release} archive by atlas-curate {__version__}.\n",
                  output / "CHANGES")
    io.write_text(f"conversion_report.tsv\n{naming.STATE_DIR.as_posix()}/\n", output / ".bidsignore")
    derivative = output / naming.LESION_DERIVATIVE
    tables.write_dataset_description(
        derivative, f"ATLAS {release} hand-traced lesion masks",
        description="Lesion tracings of the ATLAS release (MRIcron VOI / NIfTI) decoded, checked against their "
                    "T1w grid and written as BIDS derivatives",
        dataset_type="derivative", raw_link="../../", License=LICENSE)
    io.write_text("ATLAS lesion derivatives\n\nHand-traced lesion masks of the ATLAS release, converted by "
                  f"atlas-curate {__version__}: see the raw dataset's README two levels up.\n", derivative / "README")


def _tables(output: Path, scans: list[SourceScan], written: set[str], metadata: Metadata, flavour: str) -> None:
    part_specs = [s for s in metadata.specs if s.table == "participants"]
    sess_specs = [s for s in metadata.specs if s.table == "sessions" and s.column != "source_id"]
    participants: dict[str, dict] = {}
    sessions: dict[str, list[dict]] = {}
    session_less = False
    for scan in scans:
        if scan.key not in written:
            continue
        values, ref = metadata.rows.get(scan.key, {}), scan.ref
        part = participants.setdefault(ref.participant_id, {"participant_id": ref.participant_id,
                                                            "cohort": scan.cohort, "release": RELEASES[flavour]})
        for spec in part_specs:
            if part.get(spec.column) is None:
                part[spec.column] = values.get(spec.column)
        if ref.session_id is not None:   # a session-less scan has no sessions.tsv row
            sessions.setdefault(ref.sub, []).append(
                {"session_id": ref.session_id, "source_id": scan.key, "part": scan.part or None,
                 **{s.column: values.get(s.column) for s in sess_specs}})
        else:   # its per-scan values go to its participants.tsv row
            part.update({s.column: values.get(s.column) for s in sess_specs})
            session_less = True
    fixed = dict(fixed_columns())
    if flavour == "bids":
        fixed["release"] = {**fixed["release"], "Levels": BIDS_RELEASE_LEVEL}
        fixed["cohort"] = {"Description": "Cohort: the cohort folder of a multi-dataset tree, else the site/center "
                                          "column, else the source dataset's folder name"}
        fixed["source_id"] = {"Description": "The scan in the source dataset (sub-X[_ses-Y])"}
    part_specs = part_specs + (sess_specs if session_less else [])
    part_cols = ["participant_id", "cohort", "release"] + [s.column for s in part_specs]
    tables.write_rows([participants[k] for k in sorted(participants)], part_cols, output / "participants.tsv")
    tables.write_json({**{c: fixed[c] for c in ("participant_id", "cohort", "release")},
                       **column_sidecar(part_specs, metadata.sidecars)}, output / "participants.json")
    scan_cols = ["session_id", "source_id"] + (["part"] if any(scan.part for scan in scans) else [])
    sess_cols = scan_cols + [s.column for s in sess_specs]
    for subject, rows in sessions.items():
        tables.write_rows(sorted(rows, key=lambda r: r["session_id"]), sess_cols,
                          output / naming.sessions_table(subject))
    if sessions or flavour != "bids":
        tables.write_json({**{c: fixed[c] for c in scan_cols}, **column_sidecar(sess_specs, metadata.sidecars)},
                          output / "sessions.json")
    elif (output / "sessions.json").exists():   # no sessions table: a sidecar without its data file is invalid
        (output / "sessions.json").unlink()


def _remove_stale(output: Path, scans: list[SourceScan], rows: list[dict]) -> None:
    """Files an earlier run wrote for a scan that now fails (all of them) or has its masks withheld (its lesion
    files): removed, so that the dataset lists only what it holds (no sidecar without its image, no subject
    folder missing from participants.tsv)."""
    status = {r["release_scan"]: r["status"] for r in rows}
    for scan in scans:
        if status.get(scan.key) not in FAILED_STATUSES:
            continue
        outputs = scan_outputs(scan)
        keys = [k for k in outputs if status[scan.key] == "failed" or k != t1_output(scan)]
        for key in keys:
            for path in (output / outputs[key], output / naming.sidecar(outputs[key])):
                if path.is_file():
                    path.unlink()
                    for folder in path.parents:   # and the folders left empty, up to the dataset
                        if folder in (output, output / naming.LESION_DERIVATIVE) or any(folder.iterdir()):
                            break
                        folder.rmdir()


def convert(source: os.PathLike | str, output: os.PathLike | str, *, metadata: os.PathLike | str | None = None,
            flavour: str = "auto", naming_scheme: str = "native", t1w_entities: str | dict | None = None,
            jobs: int = 1, executor: str = "local",
            scheduler: str | None = None, overwrite: bool = False, progress: bool = True) -> ConversionResult:
    """Convert the release at ``source`` into a BIDS dataset at ``output``.

    Writes raw T1w images (or, for the standard archive, template-space T1w derivatives), lesion
    derivatives under ``derivatives/lesions``, participants/sessions tables with sidecars, and
    ``conversion_report.tsv`` (one row per scan and per orphan metadata row). Never writes to
    ``source``. Finished scans are skipped unless ``overwrite``.
    """
    source, output = Path(source).resolve(), Path(output).resolve()
    _check_paths(source, output)
    from .bids import bids_metadata, parse_filter

    t1w_filter = parse_filter(t1w_entities) if isinstance(t1w_entities, str) else dict(t1w_entities or {})
    empty: list[tuple[str, naming.ScanRef | None]] = []
    flavour, scans = discover(source, flavour, naming_scheme=naming_scheme, t1w_filter=t1w_filter or None,
                              empty=empty)
    if t1w_filter and flavour != "bids":
        raise ReleaseError(f"--t1w-entities applies to BIDS sources only (this one is {flavour})")
    if flavour == "bids":
        meta = bids_metadata(source, scans, Path(metadata).resolve() if metadata else None)
    else:
        meta_path = Path(metadata).resolve() if metadata else find_metadata(source, flavour)
        meta = load_metadata(meta_path, flavour)
    output.mkdir(parents=True, exist_ok=True)
    jobs_list = [ScanJob(scan, str(source), str(output), RELEASES[flavour], overwrite) for scan in scans]
    outcomes = run_map(convert_scan, jobs_list, key=lambda j: j.scan.key, jobs=jobs, executor=executor,
                       scheduler=scheduler, desc="bids-convert", progress=progress)
    rows = []
    for scan, outcome in zip(scans, outcomes):
        if outcome.value is not None:
            row = dict(outcome.value)
        else:
            row = report_row(scan.key, scan.ref, "failed", outcome.reason, n_lesions=len(scan.smooth),
                             primary_override=False)
        if meta.path is not None and scan.key not in meta.rows:
            row["checks"] = "; ".join(filter(None, [row["checks"], "no_metadata_row: the metadata table has no row "
                                                    "for this scan (its metadata are n/a)"]))
        rows.append(row)
    present = {scan.key for scan in scans}
    for key in sorted(set(meta.rows) - present):
        rows.append(report_row(key, None, "no_scan", "metadata row without a scan folder"))
    for folder, ref in empty:
        rows.append(report_row(folder, ref, EMPTY_STATUS, "empty folder: no file to convert"))
    written = {r["release_scan"] for r in rows if r["status"] in WRITTEN_STATUSES}
    _remove_stale(output, scans, rows)
    if flavour == "bids":
        for row in rows:
            if row["release_scan"] in meta.rows and row.get("skull_stripped") not in ("", None):
                meta.rows[row["release_scan"]]["skull_stripped"] = row["skull_stripped"]
        _bids_dataset_files(source, output)
    else:
        _dataset_files(output, flavour, meta)
    _tables(output, scans, written, meta, flavour)
    report = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    tables.write_rows(rows, REPORT_COLUMNS, output / "conversion_report.tsv")
    timing = outcomes_table(outcomes)
    log.info("conversion timings:\n%s", timing.to_string(index=False))
    refresh_index(output)
    return ConversionResult(output, flavour, report, meta.problems)
