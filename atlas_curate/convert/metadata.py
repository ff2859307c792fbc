"""Release spreadsheets -> BIDS columns, driven by the mapping tables in ``metadata/``.

A release with renamed columns is a data change (edit or add a mapping file), not a code change.
Columns the mapping does not know are kept under a snake_case name and described as unmapped.

Rows are keyed by the scan they describe: ``Subject ID`` (R1.1 native, ``c0001s0001t01``), ``INDI Site
ID`` + ``INDI Subject ID`` + ``Session`` (R1.1 standard), or ``Subject ID`` (R2.0, ``r001s001`` or
``sub-r001s001``), which names a subject, not a scan: R2.0 has one session per subject, so the row is
taken to describe ``ses-1``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

from .. import tables
from ..ids import Atlas2ScanId, IdError, IndiScanId, ScanId
from ..io import InputError
from ..resources import data_dir

MAPPINGS = {"native": "r1.1-native.tsv", "standard": "r1.1-indi.tsv", "atlas2": "r2.0.tsv"}
ID_COLUMNS = {"native": ["Subject ID"], "standard": ["INDI Site ID", "INDI Subject ID", "Session"],
              "atlas2": ["Subject ID"]}
ATLAS2_SESSION = 1
TYPES = ("id", "count", "grade", "string", "subject6")


@dataclass(frozen=True)
class ColumnSpec:
    source: str
    column: str
    table: str        # participants | sessions
    type: str
    levels: str
    description: str


@lru_cache(maxsize=None)
def load_mapping(flavour: str) -> tuple[ColumnSpec, ...]:
    path = data_dir("metadata") / MAPPINGS[flavour]
    with path.open(newline="") as fh:
        specs = tuple(ColumnSpec(**{k: (v or "") for k, v in row.items()})
                      for row in csv.DictReader(fh, delimiter="\t"))
    for spec in specs:
        if spec.type not in TYPES or spec.table not in ("participants", "sessions"):
            raise ValueError(f"{path}: bad row for {spec.source!r}")
    return specs


@lru_cache(maxsize=None)
def levels() -> dict:
    return tables.read_json(data_dir("metadata") / "levels.json")


@lru_cache(maxsize=None)
def fixed_columns() -> dict:
    return tables.read_json(data_dir("metadata") / "columns.json")


def read_table(path: Path) -> pd.DataFrame:
    """Read an xlsx or csv metadata table as text, stripping stray whitespace in headers and cells."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm"):
            table = pd.read_excel(path, dtype=object, engine="openpyxl")
        elif path.suffix.lower() in (".csv", ".tsv"):
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            table = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep)
        else:
            raise InputError(path, "metadata must be .xlsx, .csv or .tsv")
    except InputError:
        raise
    except Exception as exc:  # openpyxl/pandas raise many types on bad files
        raise InputError(path, f"cannot read metadata table ({type(exc).__name__}: {exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    table = table.map(lambda v: v.strip() if isinstance(v, str) else v)
    return table.dropna(how="all")


def slug(name: str) -> str:
    text = re.sub(r"[^0-9a-zA-Z]+", "_", name.replace("#", "n ")).strip("_").lower()
    return text or "column"


def _missing(value) -> bool:
    return (value is None or (isinstance(value, float) and pd.isna(value))
            or str(value).strip() in ("", "n/a", "NA", "nan"))


def convert_value(value, spec: ColumnSpec):
    """Typed value for a BIDS table cell (``None`` = n/a); raises ValueError on a bad value."""
    if _missing(value):
        return None
    if spec.type in ("count", "grade"):
        try:
            number = float(str(value).strip())
            integral = number == int(number)
        except (ValueError, OverflowError):
            raise ValueError(f"{spec.source}: {value!r} is not a number") from None
        if not integral:
            raise ValueError(f"{spec.source}: {value!r} is not an integer")
        number = int(number)
        if spec.type == "grade" and str(number) not in levels().get(spec.levels, {}):
            raise ValueError(f"{spec.source}: {value!r} is not a valid grade (0-3)")
        if number < 0:
            raise ValueError(f"{spec.source}: {value!r} is negative")
        return number
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if spec.type == "subject6":
        text = str(value).strip().removesuffix(".0")
        if not text.isdigit() or len(text) > 6:
            raise ValueError(f"{spec.source}: {value!r} is not a subject number of up to 6 digits")
        return text.zfill(6)
    return str(value).strip()


@dataclass
class Metadata:
    path: Path | None
    specs: list[ColumnSpec]
    rows: dict[str, dict]           # scan key -> {column: value}
    problems: list[str]             # one line per problem, naming the row
    sidecars: dict[str, dict] = field(default_factory=dict)   # column -> JSON entry (BIDS sources: their own)


def row_key(row: pd.Series, flavour: str) -> str:
    if flavour == "native":
        return str(ScanId.parse(str(row["Subject ID"])))
    if flavour == "atlas2":
        return str(Atlas2ScanId(*Atlas2ScanId.parse_subject(str(row["Subject ID"])), ATLAS2_SESSION))
    subject = str(row["INDI Subject ID"]).strip()
    if subject.endswith(".0"):
        subject = subject[:-2]
    return str(IndiScanId.parse_parts(str(row["INDI Site ID"]).strip() if str(row["INDI Site ID"]).startswith("Site")
                                      else f"Site{row['INDI Site ID']}", subject, str(row["Session"]).strip()))


def load_metadata(path: Path | None, flavour: str) -> Metadata:
    """Map every row of the release's table; problems are collected, never raised per row."""
    specs = list(load_mapping(flavour))
    if path is None:
        return Metadata(None, specs, {}, ["metadata: no metadata table found at the release root"])
    table = read_table(path)
    known = {s.source for s in specs}
    id_columns = ID_COLUMNS[flavour]
    missing = [c for c in id_columns if c not in table.columns]
    if missing:
        raise InputError(path, f"metadata table lacks the ID column(s) {missing}; columns are {list(table.columns)}")
    present = [s for s in specs if s.source in table.columns]
    taken = {s.column for s in specs}
    for name in table.columns:
        if name not in known:
            column = slug(name)
            while column in taken:
                column += "_x"
            taken.add(column)
            present.append(ColumnSpec(name, column, "sessions", "string", "",
                                      f"Column '{name}' of {Path(path).name}, kept as is (not in the known mapping)"))
    problems = [f"metadata: expected column {s.source!r} is absent" for s in specs if s.source not in table.columns]
    rows: dict[str, dict] = {}
    for number, (_, row) in enumerate(table.iterrows(), start=2):
        try:
            key = row_key(row, flavour)
        except (IdError, ValueError) as exc:
            problems.append(f"metadata row {number}: {exc}")
            continue
        if key in rows:
            problems.append(f"metadata row {number}: duplicate row for {key} (first kept)")
            continue
        values = {}
        for spec in present:
            try:
                values[spec.column] = convert_value(row[spec.source], spec)
            except ValueError as exc:
                problems.append(f"metadata row {number} ({key}): {exc}; written as n/a")
                values[spec.column] = None
        rows[key] = values
    return Metadata(Path(path), present, rows, problems)


def column_sidecar(specs: list[ColumnSpec], given: dict[str, dict] | None = None) -> dict:
    """BIDS sidecar entries (Description, Levels) for mapped columns; ``given`` entries (a BIDS source's own
    descriptions) are taken as they are."""
    out = {}
    for spec in specs:
        if given and spec.column in given:
            out[spec.column] = given[spec.column]
            continue
        entry = {"Description": spec.description}
        if spec.levels:
            entry["Levels"] = levels()[spec.levels]
        if spec.type in ("count", "grade"):
            entry["Format"] = "integer"
        entry["SourceColumn"] = spec.source
        out[spec.column] = entry
    return out
