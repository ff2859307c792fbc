"""``qc-apply``: a person's QC decisions, recorded in ``qc.tsv`` beside the automatic verdict.

The normalize report (``report.html``) has, per scan, an *include* / *exclude* choice and a note, and a
*rater* field; its "Download decisions" button saves ``qc_decisions.tsv``::

    scan                decision  rater     note
    sub-r001s001_ses-1  exclude   A. Rater  ghosting over the lesion

(tab-separated; one row per scan that has a decision; ``note`` may be empty or absent). A scan without a
row keeps the automatic verdict. :func:`apply_decisions` checks the whole file first and raises one
:class:`DecisionsError` naming the file, each line and its reason when anything is wrong (a missing column,
a decision other than ``include``/``exclude``, an empty rater, a scan that is not in ``qc.tsv``, a scan listed
twice with different decisions, a scan whose normalisation failed: it has no output to include); then
nothing is written. Otherwise it records each decision in ``qc.tsv`` in the columns ``human_decision``,
``human_rater``, ``human_time`` (UTC, ISO 8601 to the second) and ``human_note`` (``n/a`` where none), after
the automatic columns, which are kept byte for byte. Applying a file again replaces the decisions of the
scans it lists; the other scans keep theirs; a row equal to the decision on record (same decision, rater
and note) keeps its time. ``qc.tsv`` is replaced atomically and ``report.html`` is redrawn with the
decisions preselected.

Later stages read the decisions through :func:`atlas_curate.dataset.scan_table`: ``exclude`` always
excludes the scan, ``include`` keeps a scan whose automatic QC failed. ``normalize`` keeps the decisions
of the scans it rewrites (:func:`with_recorded`); a ``qc.tsv`` without any decision has no ``human_*``
columns.
"""

from __future__ import annotations

import csv
import io as _io
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import io, naming, tables

DECISIONS = ("include", "exclude")
REQUIRED_COLUMNS = ("scan", "decision", "rater")
HUMAN_COLUMNS = ["human_decision", "human_rater", "human_time", "human_note"]
NA = tables.NA


class DecisionsError(io.InputError):
    """A decisions file that cannot be applied: ``problems`` lists ``(line or None, reason)``."""

    def __init__(self, path: os.PathLike | str, problems: list[tuple[int | None, str]]):
        self.problems = problems
        texts = [f"line {line}: {reason}" if line else reason for line, reason in problems]
        if len(texts) == 1:
            reason = f"{texts[0]} (nothing applied)"
        else:
            reason = f"{len(texts)} problems (nothing applied):\n" + "\n".join(f"  {t}" for t in texts)
        super().__init__(path, reason)


@dataclass(frozen=True)
class Decision:
    scan: str
    decision: str
    rater: str
    note: str
    line: int


@dataclass
class ApplyResult:
    qc: Path
    report: Path
    decisions: list[Decision]
    overruled: list[str] = field(default_factory=list)   # scans whose decision goes against the automatic verdict
    unchanged: list[str] = field(default_factory=list)   # scans whose decision was already on record

    def summary(self) -> str:
        n_include = sum(d.decision == "include" for d in self.decisions)
        lines = [f"{len(self.decisions)} decisions applied: {n_include} include, "
                 f"{len(self.decisions) - n_include} exclude"
                 + (f" ({len(self.unchanged)} already on record)" if self.unchanged else "")]
        by_scan = {d.scan: d for d in self.decisions}
        if self.overruled:
            lines.append(f"overruling the automatic verdict ({len(self.overruled)}):")
            for scan in self.overruled:
                d = by_scan[scan]
                verdict = "failed" if d.decision == "include" else "passed"
                lines.append(f"  {d.decision} {scan} (automatic QC {verdict}; {d.rater}"
                             + (f": {d.note}" if d.note else "") + ")")
        else:
            lines.append("none overrules the automatic verdict")
        lines.append(f"qc table: {self.qc}")
        lines.append(f"report:   {self.report}")
        return "\n".join(lines)


def clean_text(value: str) -> str:
    """A note or rater as one TSV field: tabs and line breaks become spaces, ends trimmed."""
    return "".join(" " if ch in "\t\r\n" else ch for ch in str(value)).strip()


def _utc(now: datetime | None) -> str:
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_decisions(path: os.PathLike | str) -> list[Decision]:
    """The decisions of a ``qc_decisions.tsv``, one per scan, in file order; :class:`DecisionsError` for a
    file that is wrong in itself (columns, values, a scan with two different decisions). Whether the scans
    exist is checked by :func:`apply_decisions`."""
    found, problems = _parse(Path(path))
    if problems:
        raise DecisionsError(path, problems)
    return found


def _parse(path: Path) -> tuple[list[Decision], list[tuple[int | None, str]]]:
    """The decisions that are well formed and the problems of the others (a file without the header's
    columns raises at once)."""
    if not path.is_file():
        raise io.InputError(path, "decisions file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DecisionsError(path, [(None, f"not UTF-8 text ({exc})")]) from None
    reader = csv.reader(_io.StringIO(text, newline=""), delimiter="\t")
    header = next(reader, None)
    if header is None:
        raise DecisionsError(path, [(None, "empty file: expected the header scan, decision, rater, note")])
    header = [h.strip().lower() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DecisionsError(path, [(1, f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                        f"(the header must name scan, decision, rater, note; tab-separated)")])
    index = {name: header.index(name) for name in (*REQUIRED_COLUMNS, "note") if name in header}
    problems: list[tuple[int | None, str]] = []
    found: dict[str, Decision] = {}
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append((reader.line_num, f"unreadable row ({exc})"))
            break
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) <= max(index[c] for c in REQUIRED_COLUMNS):
            problems.append((line, f"{len(fields)} fields, the header has {len(header)}"))
            continue
        values = {name: fields[i] if i < len(fields) else "" for name, i in index.items()}
        scan = values["scan"].strip()
        decision = values["decision"].strip().lower()
        rater = clean_text(values["rater"])
        note = clean_text(values.get("note", ""))
        if note == NA:
            note = ""
        if not scan:
            problems.append((line, "empty scan"))
            continue
        if decision not in DECISIONS:
            problems.append((line, f"{scan}: decision {values['decision']!r} is not include or exclude"))
            continue
        if not rater:
            problems.append((line, f"{scan}: empty rater (say who decided)"))
            continue
        earlier = found.get(scan)
        if earlier is not None and earlier.decision != decision:
            problems.append((line, f"{scan} is listed twice with different decisions "
                                   f"({earlier.decision} on line {earlier.line}, {decision} here)"))
            continue
        found[scan] = Decision(scan, decision, rater, note, line)   # the same decision twice: the last row wins
    return list(found.values()), problems


# --- qc.tsv as text: the automatic columns are copied, never re-formatted ------------------------------

def qc_path(bids_root: os.PathLike | str) -> Path:
    return Path(bids_root).resolve() / naming.PIPELINE_DERIVATIVE / "qc.tsv"


def _read_records(path: Path) -> tuple[list[str], list[list[str]], str]:
    text = path.read_bytes().decode("utf-8")
    terminator = "\r\n" if text.split("\n", 1)[0].endswith("\r") else "\n"
    rows = [row for row in csv.reader(_io.StringIO(text, newline=""), delimiter="\t") if row]
    if not rows or "scan" not in rows[0]:
        raise io.InputError(path, "not a qc.tsv from normalize (no 'scan' column)")
    return rows[0], rows[1:], terminator


def _write_records(header: list[str], rows: list[list[str]], terminator: str, path: Path) -> Path:
    # the csv module with pandas' defaults (minimal quoting, '"' doubled): what normalize writes
    buffer = _io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter="\t", lineterminator=terminator, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows(rows)
    return io.write_text(buffer.getvalue(), path)


def read_qc(path: os.PathLike | str) -> pd.DataFrame:
    """``qc.tsv`` as normalize holds it in memory (``n/a`` → missing), e.g. to draw the report."""
    return tables.read_tsv(path, typed=True)


def apply_decisions(decisions: os.PathLike | str, bids_root: os.PathLike | str, *,
                    now: datetime | None = None) -> ApplyResult:
    """Record the decisions of ``decisions`` (a ``qc_decisions.tsv``) in ``bids_root``'s ``qc.tsv`` and
    redraw ``report.html``; see the module docstring. ``now`` (default: the current time) is stored as
    ``human_time`` in UTC."""
    decisions_path = Path(decisions)
    qc_file = qc_path(bids_root)
    if not qc_file.is_file():
        raise io.InputError(qc_file, "not found: run `atlas-curate normalize` on this dataset first")
    chosen, problems = _parse(decisions_path)
    header, rows, terminator = _read_records(qc_file)
    automatic = [i for i, name in enumerate(header) if name not in HUMAN_COLUMNS]
    human = {name: header.index(name) for name in HUMAN_COLUMNS if name in header}
    position = {name: header.index(name) for name in ("scan", "status", "qc_pass") if name in header}

    def cell(row: list[str], name: str, where: dict[str, int]) -> str:
        i = where.get(name)
        return row[i] if i is not None and i < len(row) else NA

    by_scan = {cell(row, "scan", position): row for row in rows}
    for d in chosen:
        row = by_scan.get(d.scan)
        if row is None:
            problems.append((d.line, f"{d.scan} is not in {qc_file}"))
        elif cell(row, "status", position) == "failed":
            problems.append((d.line, f"{d.scan}: its normalisation failed, there is no output to "
                                     f"{d.decision} (fix the input and rerun normalize)"))
    if problems:
        raise DecisionsError(decisions_path, sorted(problems, key=lambda p: p[0] or 0))

    stamp = _utc(now)
    recorded = {scan: [cell(row, name, human) for name in HUMAN_COLUMNS] for scan, row in by_scan.items()}
    overruled, unchanged = [], []
    for d in chosen:
        before = recorded[d.scan]
        note = d.note or NA
        if [before[0], before[1], before[3]] == [d.decision, d.rater, note]:
            unchanged.append(d.scan)
        else:
            recorded[d.scan] = [d.decision, d.rater, stamp, note]
        passed = tables.as_bool(cell(by_scan[d.scan], "qc_pass", position)) is True
        if passed != (d.decision == "include"):
            overruled.append(d.scan)

    # no decision on record at all (a file with only its header): no human_* columns, as normalize writes
    extra = HUMAN_COLUMNS if any(v[0] in DECISIONS for v in recorded.values()) else []
    new_rows = [[row[i] if i < len(row) else "" for i in automatic] + (recorded[cell(row, "scan", position)]
                                                                       if extra else []) for row in rows]
    _write_records([header[i] for i in automatic] + extra, new_rows, terminator, qc_file)
    from .normalize.report import write_report

    report = write_report(read_qc(qc_file), qc_file.parent)
    from .index import refresh_index

    refresh_index(bids_root)
    return ApplyResult(qc_file, report, chosen, overruled, unchanged)


# --- normalize reruns ---------------------------------------------------------------------------------

def with_recorded(table: pd.DataFrame, old_qc: os.PathLike | str) -> pd.DataFrame:
    """``table`` (a new qc table) with the ``human_*`` columns of its scans taken from the earlier ``old_qc``;
    unchanged (no ``human_*`` columns) when none of its scans has a decision on record."""
    old_qc = Path(old_qc)
    if not old_qc.is_file():
        return table
    earlier = tables.read_tsv(old_qc)
    if "human_decision" not in earlier.columns:
        return table
    earlier = earlier.reindex(columns=["scan", *HUMAN_COLUMNS])
    earlier = earlier[earlier["human_decision"].isin(DECISIONS) & earlier["scan"].isin(table["scan"])]
    if earlier.empty:
        return table
    earlier = earlier.drop_duplicates("scan", keep="last").set_index("scan")
    table = table.drop(columns=[c for c in HUMAN_COLUMNS if c in table.columns])
    for column in HUMAN_COLUMNS:
        table[column] = table["scan"].map(earlier[column])
    return table
