"""Reading and writing the tables and JSON files every stage exchanges, in one convention.

* TSV: tab-separated, ``\\n`` line ends, a header row, ``n/a`` for a missing value, booleans as ``true`` /
  ``false`` (as in JSON and the BIDS examples); :func:`read_tsv` reads every table back as text and
  :func:`as_bool` reads a boolean cell written by any version (``true``/``True``/``1``).
* JSON: two-space indent, sorted keys, a final newline; NumPy scalars become numbers (a non-finite NumPy
  float32 ``null``; Python floats and float64 follow ``allow_nan``), paths text.
* :func:`write_dataset_description`: the ``dataset_description.json`` of every dataset written.
* :class:`Manifest`: the skip-if-current record of one scan's outputs (a fingerprint of its inputs and
  options, the outputs written, and the stage's row), kept under ``.atlas-curate/<stage>/``.

Every file is written atomically (:func:`atlas_curate.io.write_text`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import __version__, io, naming
from .executor import Skip

NA = "n/a"
TRUE, FALSE = "true", "false"


# --- TSV ------------------------------------------------------------------------------------------------

def as_bool(value: Any) -> bool | None:
    """A boolean cell as written by any stage (``true``/``True``/``1``, ``false``/``False``/``0``); else None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = "" if value is None else str(value).strip().lower()
    return {"true": True, "1": True, "false": False, "0": False}.get(text)


def _bool_text(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return TRUE if value else FALSE
    return value


def _with_bool_text(frame: pd.DataFrame) -> pd.DataFrame:
    out = None
    for column in frame.columns:
        values = frame[column]
        if values.dtype == bool or (values.dtype == object and values.map(
                lambda v: isinstance(v, (bool, np.bool_))).any()):
            if out is None:
                out = frame.copy()
            out[column] = values.map(_bool_text).astype(object)
    return frame if out is None else out


def tsv_text(frame: pd.DataFrame, *, float_format: str | None = None,
             integer_columns: Sequence[str] = ()) -> str:
    """A data frame as TSV text in the house convention (see the module docstring)."""
    frame = _with_bool_text(frame)
    if integer_columns:
        frame = frame.copy()
        for column in integer_columns:
            frame[column] = pd.array(frame[column].tolist(), dtype="Int64")
    return frame.to_csv(sep="\t", index=False, na_rep=NA, float_format=float_format, lineterminator="\n")


def write_tsv(frame: pd.DataFrame, path: os.PathLike | str, *, float_format: str | None = None,
              integer_columns: Sequence[str] = ()) -> Path:
    """Write ``frame`` atomically as TSV (``n/a``, ``true``/``false``; ``integer_columns`` without ``.0``)."""
    return io.write_text(tsv_text(frame, float_format=float_format, integer_columns=integer_columns), path)


def cell(value: Any) -> str:
    """One value as a TSV cell: ``n/a`` when missing or empty, booleans ``true``/``false``, whitespace folded."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return NA
    if isinstance(value, (bool, np.bool_)):
        return _bool_text(value)
    return " ".join(str(value).split())


def write_rows(rows: Iterable[Mapping], columns: Sequence[str], path: os.PathLike | str) -> Path:
    """Write dict rows as TSV, each value through :func:`cell` (for tables of free text, e.g. reports)."""
    lines = ["\t".join(columns)] + ["\t".join(cell(row.get(c)) for c in columns) for row in rows]
    return io.write_text("\n".join(lines) + "\n", path)


def read_tsv(path: os.PathLike | str, *, typed: bool = False) -> pd.DataFrame:
    """A TSV written by any stage: ``n/a`` is missing; every column text unless ``typed`` (pandas' inference)."""
    return pd.read_csv(path, sep="\t", dtype=None if typed else str, keep_default_na=False, na_values=[NA])


# --- JSON -----------------------------------------------------------------------------------------------

def json_default(value: Any) -> Any:
    """NumPy scalars and arrays as JSON values (non-finite floats → ``null``); paths as text."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_text(doc: Any, *, sort_keys: bool = True, indent: int = 2, allow_nan: bool = True) -> str:
    return json.dumps(doc, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=json_default) + "\n"


def write_json(doc: Any, path: os.PathLike | str, *, sort_keys: bool = True, indent: int = 2,
               allow_nan: bool = True) -> Path:
    """Write ``doc`` atomically as JSON (two-space indent, sorted keys, final newline)."""
    return io.write_text(json_text(doc, sort_keys=sort_keys, indent=indent, allow_nan=allow_nan), path)


def read_json(path: os.PathLike | str) -> Any:
    return json.loads(Path(path).read_text())


def write_dataset_description(folder: os.PathLike | str, name: str, *, description: str | None = None,
                              dataset_type: str = "derivative", raw_link: str | None = "../../",
                              **fields: Any) -> Path:
    """``folder/dataset_description.json``: ``Name``, the project's ``BIDSVersion``, ``DatasetType``,
    ``GeneratedBy`` atlas-curate (with ``description``); a derivative links its raw dataset at ``raw_link``
    (``SourceDatasets`` + ``DatasetLinks``; ``None``: no link). ``fields`` add to or replace any field."""
    generated = {"Name": "atlas-curate", "Version": __version__}
    if description:
        generated["Description"] = description
    doc: dict[str, Any] = {"Name": name, "BIDSVersion": naming.BIDS_VERSION, "DatasetType": dataset_type,
                           "GeneratedBy": [generated]}
    if dataset_type == "derivative" and raw_link is not None:
        doc.update({"SourceDatasets": [{"URL": "bids:raw:"}], "DatasetLinks": {"raw": raw_link}})
    doc.update(fields)
    return write_json(doc, Path(folder) / "dataset_description.json")


# --- skip if current ------------------------------------------------------------------------------------

def fingerprint(paths: Iterable[os.PathLike | str], options: Mapping[str, Any] | None = None) -> str:
    """A digest of the package version, ``options`` and each path's name, size and modification time
    (a missing path counts too): equal digests mean the same inputs with the same settings."""
    digest = hashlib.sha256(json.dumps({"version": __version__, **(options or {})}, sort_keys=True).encode())
    for path in paths:
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except (OSError, TypeError, ValueError):
            size = mtime = -1
        digest.update(f"{path}:{size}:{mtime}".encode())
    return digest.hexdigest()


class Manifest:
    """The record of one scan's finished outputs for one stage: ``root/.atlas-curate/<stage>/<key>.json``
    with the inputs' :func:`fingerprint`, the outputs written (relative to ``root``) and the stage's row."""

    def __init__(self, root: os.PathLike | str, stage: str, key: str):
        self.root = Path(root)
        self.path = self.root / naming.STATE_DIR / stage / f"{key}.json"

    def current(self, digest: str) -> dict | None:
        """The recorded document when it has ``digest`` and every output it lists still exists, else None."""
        if not self.path.is_file():
            return None
        try:
            done = read_json(self.path)
        except (OSError, ValueError):
            return None
        if done.get("fingerprint") != digest or not all((self.root / p).is_file() for p in done.get("outputs", ())):
            return None
        return done

    def skip_if_current(self, digest: str, reason: str, value_key: str, *, overwrite: bool = False) -> None:
        """Raise :class:`atlas_curate.executor.Skip` (carrying the recorded ``value_key``) when current."""
        if overwrite:
            return
        done = self.current(digest)
        if done is not None:
            raise Skip(reason, value=done.get(value_key))

    def record(self, digest: str, outputs: Iterable[os.PathLike | str], **payload: Any) -> Path:
        """Write the record last, after every output: a crash before it leaves the scan to be redone."""
        return write_json({"fingerprint": digest, "outputs": [Path(p).as_posix() for p in outputs], **payload},
                          self.path)
