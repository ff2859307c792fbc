"""One page over every output: ``BIDS_ROOT/derivatives/atlas-curate/index.html``.

The page is rebuilt from what is on disk each time a stage ends (and by :func:`write_index`): per stage a
one-line verdict, links to its files and thumbnails of its figures, or "not run yet" with the command that
runs it. Every href is relative to the page, so the folder (or the whole tree, when runs live beside the
dataset) can be moved or zipped and the links still work.

Stages whose outputs live in a fixed place are found there: ``conversion_report.tsv`` at the BIDS root,
``qc.tsv`` and ``report.html`` of ``normalize``, ``overlap/`` and ``split.tsv`` in the derivative. Outputs that
may live anywhere (a split written with ``--output``, training runs, ``predict`` folders, an overlap map or
an evaluation of a predictions folder written elsewhere) are listed in a small registry,
``derivatives/atlas-curate/index.json``: one list of paths per kind, relative to the derivative folder,
appended to by :func:`register` (no duplicates) when the stage ends. A run's evaluations are its
``eval-*`` folders. A registered path that is gone is shown as missing, without a link.

The stages call :func:`refresh_index`, which never raises: a page that cannot be written is a warning in the
log, never a failed stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from . import __version__, io, naming, tables

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

INDEX_FILE = "index.html"
REGISTRY_FILE = "index.json"
KINDS = ("split", "run", "predictions", "overlap", "evaluation")
CONVERSION_REPORT = "conversion_report.tsv"
OVERLAP_FIGURES = (("overlap_orthogonal.png", "overlap map, orthogonal slices through the peak"),
                   ("overlap_glass.png", "overlap map, glass brain"),
                   ("lesion_volume_hist.png", "lesion volumes"))
OVERLAP_FILES = (("overlap.json", "overlap.json: which scans went in, and why others did not"),
                 ("table1.tsv", "table1.tsv: scans per group"), ("table2.tsv", "table2.tsv: lesions per group"),
                 ("lesions.tsv", "lesions.tsv: one row per lesion"), ("lesions.json", "lesions.json"),
                 ("disagreements.tsv", "disagreements.tsv: computed vs spreadsheet"),
                 ("overlap_prob.nii.gz", "overlap_prob.nii.gz: fraction of scans"),
                 ("overlap_count.nii.gz", "overlap_count.nii.gz: number of scans"))
RUN_FILES = (("config.toml", "config.toml"), ("run.json", "run.json"), ("log.tsv", "log.tsv"),
             ("curve.png", "curve.png"), ("model.pt", "model.pt"),
             ("postprocess.json", "postprocess.json: the post-processing chosen on the dev scans"))
EVAL_FILES = ("summary.tsv", "summary.json", "scans.tsv", "by_cohort.tsv", "by_size_quartile.tsv",
              "by_vascular_territory.tsv", "by_primary_lesion_location.tsv", "prediction_files.tsv",
              "postprocess.tsv", "raw/summary.tsv", "raw/scans.tsv")
COMMANDS = {
    "convert": "atlas-curate bids-convert RELEASE BIDS_ROOT",
    "normalize": "atlas-curate normalize BIDS_ROOT",
    "overlap": "atlas-curate overlap-map BIDS_ROOT",
    "split": "atlas-curate split BIDS_ROOT",
    "run": "atlas-curate train-baseline BIDS_ROOT --splits "
           f"BIDS_ROOT/{naming.PIPELINE_DERIVATIVE.as_posix()}/split.tsv --output RUN_DIR",
    "evaluation": "atlas-curate evaluate RUN_DIR",
    "predictions": "atlas-curate predict RUN_DIR T1W [T1W ...] --output DIR",
}


# --------------------------------------------------------------------------------------------- where things are

def derivative_root(bids_root: os.PathLike | str) -> Path:
    """``BIDS_ROOT/derivatives/atlas-curate``: where the page and the registry live."""
    return Path(bids_root).resolve() / naming.PIPELINE_DERIVATIVE


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:   # another drive (Windows): no relative path exists
        return path.resolve().as_posix()


def href(target: os.PathLike | str, base: os.PathLike | str) -> str:
    """The relative URL of ``target`` seen from a page in folder ``base`` (percent-encoded)."""
    path = _relative(Path(target).resolve(), Path(base).resolve())
    if Path(path).is_absolute():   # no relative path exists (another drive)
        return "file:///" + quote(path.lstrip("/"), safe="/:")
    return quote(path, safe="/")


# --------------------------------------------------------------------------------------------- the registry

def read_registry(bids_root: os.PathLike | str) -> dict[str, list[str]]:
    """The registered paths per kind, as stored (relative to the derivative folder)."""
    path = derivative_root(bids_root) / REGISTRY_FILE
    entries: dict[str, list[str]] = {kind: [] for kind in KINDS}
    if not path.is_file():
        return entries
    try:
        doc = tables.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise io.InputError(path, f"not readable JSON ({exc}); delete it and register the outputs again") from exc
    if not isinstance(doc, dict):
        raise io.InputError(path, "not a registry (expected a JSON object)")
    for kind in KINDS:
        values = doc.get(kind) or []
        entries[kind] = [str(v) for v in values if isinstance(v, str) and v]
    return entries


def registered(bids_root: os.PathLike | str, kind: str) -> list[Path]:
    """Absolute paths registered under ``kind``, in registration order."""
    base = derivative_root(bids_root)
    return [Path(os.path.normpath(base / entry)) for entry in read_registry(bids_root)[kind]]


def register(bids_root: os.PathLike | str, kind: str, path: os.PathLike | str) -> Path:
    """Add ``path`` (a split TSV, a run folder, a predictions folder, an overlap folder or an evaluation folder)
    to the registry of ``bids_root`` unless it is there already, then rewrite the page; returns the page."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    root = Path(bids_root).resolve()
    if not root.is_dir():
        raise io.InputError(root, "BIDS root is not a folder")
    base = derivative_root(root)
    target = Path(path).resolve()
    if kind == "split" and target.suffix != ".tsv":
        target = target.with_suffix(".tsv") if target.suffix == ".json" else target.with_name(target.name + ".tsv")
    entries = read_registry(root)
    known = {os.path.normpath(base / entry) for entry in entries[kind]}
    if str(target) not in known:
        entries[kind].append(_relative(target, base))
        tables.write_json(entries, base / REGISTRY_FILE)
    return write_index(root)


def refresh_index(bids_root: os.PathLike | str | None, kind: str | None = None,
                  path: os.PathLike | str | None = None) -> Path | None:
    """:func:`register` (with ``kind`` and ``path``) or :func:`write_index`, for the end of a stage: never raises.

    Returns the page, or ``None`` when there is no BIDS root or the page could not be written (logged as a
    warning)."""
    if bids_root is None:
        return None
    try:
        if kind is not None and path is not None:
            return register(bids_root, kind, path)
        return write_index(bids_root)
    except Exception as exc:  # noqa: BLE001 - the page is a convenience: it must never fail a stage
        log.warning("could not update %s: %s: %s", Path(bids_root) / naming.PIPELINE_DERIVATIVE / INDEX_FILE,
                    type(exc).__name__, exc)
        return None


def run_bids_root(run_dir: os.PathLike | str) -> Path | None:
    """The BIDS root a training run recorded in its ``run.json``, when it still exists."""
    try:
        doc = tables.read_json(Path(run_dir) / "run.json")
        root = Path(doc["bids_root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return root if root.is_dir() else None


# --------------------------------------------------------------------------------------------- the page's model

@dataclass
class Link:
    href: str
    label: str


@dataclass
class Image:
    src: str
    alt: str


@dataclass
class Item:
    """One output of a stage: a verdict line, links, thumbnails, an optional small table."""

    title: str
    verdict: str
    status: str = "ok"                          # ok | warn | error
    links: list[Link] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    table: dict | None = None                   # {"columns": [...], "rows": [[...], ...]}
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    key: str
    title: str
    items: list[Item] = field(default_factory=list)
    command: str = ""
    empty: str = "not run yet"


class _Page:
    """Builds links relative to the page's folder, only for files that exist."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.base = base

    def link(self, path: Path, label: str | None = None) -> Link | None:
        return Link(href(path, self.base), label or path.name) if path.exists() else None

    def links(self, pairs) -> list[Link]:
        return [link for link in (self.link(path, label) for path, label in pairs) if link is not None]

    def image(self, path: Path, alt: str) -> Image | None:
        return Image(href(path, self.base), alt) if path.is_file() else None

    def name(self, path: Path) -> str:
        """How an output is named on the page: its path relative to the BIDS root (``../run`` beside it)."""
        return _relative(path, self.root)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _number(value, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------- verdicts

CONVERSION_PARTS = (("converted", "converted"), ("no_mask", "converted without a mask"),
                    ("masks_withheld", "masks withheld"), ("failed", "failed"))


def release_scans(report: pd.DataFrame) -> pd.Series:
    """The release's name of each row of a ``conversion_report.tsv``: its ``release_scan`` column (where ``scan``
    is the BIDS scan key, ``n/a`` for a metadata row without a scan), or ``scan`` in reports written before that
    column existed (where ``scan`` was the release's name)."""
    return report["release_scan" if "release_scan" in report.columns else "scan"]


def conversion_verdict(report_tsv: os.PathLike | str) -> tuple[str, str]:
    """``(verdict, status)`` of a ``conversion_report.tsv``: scans per status, and metadata rows without a scan."""
    table = tables.read_tsv(Path(report_tsv))
    status = table["status"].fillna("")
    scans = status[status != "no_scan"]
    parts = [f"{int((scans == key).sum())} {label}" for key, label in CONVERSION_PARTS
             if key == "converted" or (scans == key).any()]
    other = sorted(set(scans) - {key for key, _ in CONVERSION_PARTS})
    parts += [f"{int((scans == key).sum())} {key or 'without status'}" for key in other]
    text = f"{_plural(len(scans), 'scan')}: " + ", ".join(parts)
    orphans = int((status == "no_scan").sum())
    if orphans:
        text += f"; {_plural(orphans, 'metadata row')} without a scan folder"
    bad = scans.isin(["failed", "masks_withheld"]).any() or orphans or bool(other)
    return text, "warn" if bad else "ok"


def qc_verdict(qc_tsv: os.PathLike | str) -> tuple[str, str]:
    """``(verdict, status)`` of normalize's ``qc.tsv``: passed QC, flagged, errors (and rater decisions)."""
    table = tables.read_tsv(Path(qc_tsv))
    failed = table["status"].fillna("") == "failed" if "status" in table.columns else pd.Series(False, table.index)
    verdicts = table["qc_pass"].map(tables.as_bool) if "qc_pass" in table.columns else pd.Series(None, table.index)
    passed = int((verdicts.eq(True) & ~failed).sum())     # values are True/False/None
    flagged = int((verdicts.eq(False) & ~failed).sum())
    errors = int(failed.sum())
    text = f"{_plural(len(table), 'scan')}: {passed} passed QC, {flagged} flagged, {_plural(errors, 'error')}"
    if "human_decision" in table.columns:
        decisions = table["human_decision"].fillna("").astype(str).str.strip()
        decided = decisions[decisions != ""]
        text += f"; {len(decided)} decided by a rater"
        if len(decided):
            text += " (" + ", ".join(f"{n} {d}" for d, n in sorted(decided.value_counts().items())) + ")"
    return text, "warn" if flagged or errors else "ok"


def overlap_verdict(overlap_json: os.PathLike | str) -> tuple[str, str]:
    """``(verdict, status)`` from an ``overlap.json``: scans in and out, the maximum overlap."""
    doc = tables.read_json(overlap_json)
    counts = doc.get("NumberOfScans", {})
    n = int(counts.get("included", 0))
    fraction = float(doc.get("MaximumFraction", float("nan")))
    text = f"overlap of {_plural(n, 'scan')}"
    excluded = int(counts.get("excluded", 0))
    if excluded:
        by = counts.get("excluded_by_category") or {}
        detail = ", ".join(f"{v} {k}" for k, v in sorted(by.items()))
        text += f" ({excluded} excluded{': ' + detail if detail else ''})"
    if not math.isnan(fraction):
        text += f", max overlap {fraction:.3f} ({round(fraction * n)} of {n} scans)"
    lesions = (doc.get("Options") or {}).get("lesions")
    if lesions:
        text += f"; lesions: {lesions}"
    return text, "ok"


def split_verdict(table: pd.DataFrame) -> tuple[str, str]:
    """``(verdict, status)`` of a split table: scans per split, set-aside scans, folds."""
    from .split import EXCLUDED, RELEASE_TEST, SPLITS

    split = table["split"].fillna("").astype(str)
    used = split.isin(SPLITS)
    text = f"{_plural(int(used.sum()), 'scan')} split: " + ", ".join(f"{int((split == s).sum())} {s}" for s in SPLITS)
    if "fold" in table.columns and pd.to_numeric(table["fold"], errors="coerce").notna().any():
        text += f" ({_plural(int(pd.to_numeric(table['fold'], errors='coerce').nunique()), 'fold')} over train)"
    aside = [f"{int((split == s).sum())} {label}" for s, label in ((RELEASE_TEST, "release test"),
                                                                    (EXCLUDED, "excluded")) if (split == s).any()]
    if aside:
        text += "; " + ", ".join(aside)
    return text, "ok"


def run_verdict(run_dir: os.PathLike | str) -> tuple[str, str]:
    """``(verdict, status)`` of a training run from ``run.json`` and ``log.tsv``."""
    run_dir = Path(run_dir)
    doc = tables.read_json(run_dir / "run.json")
    train_scans, dev_scans = doc.get("train_scans") or [], doc.get("dev_scans") or []
    epochs, dice = 0, float("nan")
    if (run_dir / "log.tsv").is_file():
        logged = tables.read_tsv(run_dir / "log.tsv")
        epochs = len(logged)
        values = pd.to_numeric(logged.get("dev_dice", pd.Series(dtype=str)), errors="coerce").dropna()
        dice = float(values.iloc[-1]) if len(values) else float("nan")
    total = _planned_epochs(run_dir / "config.toml")
    state = doc.get("status")
    if state == "complete":
        text = f"trained {_plural(epochs, 'epoch')} on {_plural(len(train_scans), 'scan')}"
    else:
        of = f" of {total}" if total else ""
        text = (f"{state or 'unfinished'} after {epochs}{of} epochs on {_plural(len(train_scans), 'scan')} "
                "(train-baseline --resume continues it)")
    text += f"; last dev Dice {_number(dice)} (dev set {_plural(len(dev_scans), 'scan')})"
    if doc.get("fold") is not None:
        text += f"; fold {doc['fold']}"
    if doc.get("preset"):
        text += f"; preset {doc['preset']}"
    return text, "ok" if state == "complete" else "warn"


def _planned_epochs(config_toml: Path) -> int | None:
    try:
        doc = tomllib.loads(config_toml.read_text())
        return int(sum(int(stage["epochs"]) for stage in doc["stages"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluation_verdict(summary_json: os.PathLike | str) -> tuple[str, str]:
    """``(verdict, status)`` from an evaluation's ``summary.json``: the mean DSC over the scored scans."""
    doc = tables.read_json(summary_json)
    dsc = (doc.get("metrics") or {}).get("dsc") or {}
    split = doc.get("split") or "?"
    which = f"{split} (snapshot ensemble)" if doc.get("ensemble") else split
    text = (f"{which} DSC mean {_number(dsc.get('mean'))} [{_number(dsc.get('mean_ci_low'))}, "
            f"{_number(dsc.get('mean_ci_high'))}] over {_plural(int(doc.get('n_scans', 0)), 'scan')}; "
            f"micro DSC {_number(doc.get('micro_dsc'))}")
    raw = ((doc.get("raw") or {}).get("metrics") or {}).get("dsc") or {}
    if raw:
        text += f" (post-processed; raw masks: DSC mean {_number(raw.get('mean'))})"
    return text, "ok"


def predictions_verdict(predictions_tsv: os.PathLike | str) -> tuple[str, str]:
    """``(verdict, status)`` of a ``predictions.tsv``: inputs segmented and failed."""
    table = tables.read_tsv(Path(predictions_tsv))
    ok = int((table["status"] == "ok").sum())
    failed = len(table) - ok
    text = f"{_plural(len(table), 'input')}: {ok} segmented, {failed} failed"
    return text, "warn" if failed else "ok"


# --------------------------------------------------------------------------------------------- the sections

def _guarded(title: str, build) -> Item:
    """``build()``, or an item saying why this output could not be read."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - one unreadable output must not hide the others
        return Item(title, f"could not be read: {type(exc).__name__}: {exc}", "error")


def _conversion(root: Path, page: _Page) -> Section:
    section = Section("bids-convert", "bids-convert", command=COMMANDS["convert"])
    report = root / CONVERSION_REPORT
    if report.is_file():
        def build() -> Item:
            text, status = conversion_verdict(report)
            item = Item("", text, status, page.links([(report, "conversion_report.tsv: one row per scan"),
                                                      (root / "participants.tsv", "participants.tsv"),
                                                      (root / "dataset_description.json",
                                                       "dataset_description.json")]))
            table = tables.read_tsv(report)
            bad = table[table["status"].isin(["failed", "masks_withheld", "no_scan"])]
            names = release_scans(bad)
            item.notes = [f"{row['status']} {names[i]}: {row['reason']}" for i, row in bad.head(20).iterrows()]
            if len(bad) > 20:
                item.notes.append(f"... and {len(bad) - 20} more in conversion_report.tsv")
            return item
        section.items.append(_guarded("", build))
    return section


def _normalize(base: Path, page: _Page) -> Section:
    section = Section("normalize", "normalize", command=COMMANDS["normalize"])
    qc = base / "qc.tsv"
    if qc.is_file() or (base / "report.html").is_file():
        def build() -> Item:
            text, status = qc_verdict(qc) if qc.is_file() else ("report without qc.tsv", "warn")
            return Item("", text, status, page.links([(base / "report.html", "report.html: every scan, with figures"),
                                                      (qc, "qc.tsv: QC measures and verdicts")]))
        section.items.append(_guarded("", build))
    return section


def _folders(default: Path | None, extra: list[Path]) -> list[Path]:
    """``default`` (when it exists) and ``extra``, without duplicates, in that order."""
    seen, out = set(), []
    for folder in ([default] if default is not None and default.exists() else []) + extra:
        key = os.path.normpath(folder)
        if key not in seen:
            seen.add(key)
            out.append(folder)
    return out


def _missing(page: _Page, path: Path, what: str) -> Item:
    return Item(page.name(path), f"registered {what} not found (moved or deleted)", "error")


def _overlap(base: Path, registry: dict[str, list[Path]], page: _Page) -> Section:
    from .overlap.pipeline import OUTPUT_NAME

    section = Section("overlap-map", "overlap-map", command=COMMANDS["overlap"])
    for folder in _folders(base / OUTPUT_NAME, registry["overlap"]):
        if not (folder / "overlap.json").is_file():
            section.items.append(_missing(page, folder, "overlap map"))
            continue

        def build(folder=folder) -> Item:
            text, status = overlap_verdict(folder / "overlap.json")
            item = Item(page.name(folder), text, status,
                        page.links((folder / name, label) for name, label in OVERLAP_FILES))
            item.images = [image for image in (page.image(folder / name, alt) for name, alt in OVERLAP_FIGURES)
                           if image is not None]
            return item
        section.items.append(_guarded(page.name(folder), build))
    return section


def _html_table(frame: pd.DataFrame) -> dict:
    def cell(value):
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:g}"
        return str(value)

    return {"columns": [frame.index.name or "", *map(str, frame.columns)],
            "rows": [[str(index), *map(cell, row)] for index, row in zip(frame.index, frame.itertuples(index=False))]}


def _split(base: Path, registry: dict[str, list[Path]], page: _Page) -> Section:
    from .split import balance_table, load_split, split_paths

    section = Section("split", "split", command=COMMANDS["split"])
    for tsv in _folders(base / "split.tsv", registry["split"]):
        if not tsv.is_file():
            section.items.append(_missing(page, tsv, "split table"))
            continue

        def build(tsv=tsv) -> Item:
            table = load_split(tsv)
            text, status = split_verdict(table)
            item = Item(page.name(tsv), text, status, page.links([(tsv, tsv.name), (split_paths(tsv)[1], None)]))
            item.table = _html_table(balance_table(table))
            return item
        section.items.append(_guarded(page.name(tsv), build))
    return section


def _runs(registry: dict[str, list[Path]], page: _Page) -> Section:
    section = Section("runs", "training runs", command=COMMANDS["run"])
    for run_dir in _folders(None, registry["run"]):
        if not (run_dir / "run.json").is_file():
            section.items.append(_missing(page, run_dir, "run folder"))
            continue

        def build(run_dir=run_dir) -> Item:
            text, status = run_verdict(run_dir)
            item = Item(page.name(run_dir), text, status,
                        page.links((run_dir / name, label) for name, label in RUN_FILES))
            curve = page.image(run_dir / "curve.png", "training curve")
            item.images = [curve] if curve else []
            return item
        section.items.append(_guarded(page.name(run_dir), build))
    return section


def _evaluation_item(folder: Path, page: _Page) -> Item:
    def build() -> Item:
        text, status = evaluation_verdict(folder / "summary.json")
        item = Item(page.name(folder), text, status, page.links((folder / name, name) for name in EVAL_FILES))
        figure = page.image(folder / "dsc_vs_volume.png", "DSC against lesion volume")
        item.images = [figure] if figure else []
        return item
    return _guarded(page.name(folder), build)


def _evaluations(registry: dict[str, list[Path]], page: _Page) -> Section:
    section = Section("evaluation", "evaluation", command=COMMANDS["evaluation"])
    folders = []
    for run_dir in registry["run"]:
        if run_dir.is_dir():
            folders += sorted(p for p in run_dir.glob("eval-*") if (p / "summary.json").is_file())
    for folder in _folders(None, folders + registry["evaluation"]):
        if (folder / "summary.json").is_file():
            section.items.append(_evaluation_item(folder, page))
        else:
            section.items.append(_missing(page, folder, "evaluation folder"))
    if registry["run"] and not section.items:
        section.empty = "no run evaluated yet"
    return section


def _predictions(registry: dict[str, list[Path]], page: _Page) -> Section:
    section = Section("predictions", "predictions", command=COMMANDS["predictions"])
    for folder in _folders(None, registry["predictions"]):
        table = folder / "predictions.tsv"
        if not table.is_file():
            section.items.append(_missing(page, folder, "predictions folder"))
            continue

        def build(folder=folder, table=table) -> Item:
            text, status = predictions_verdict(table)
            rows = tables.read_tsv(table)
            pairs = [(table, "predictions.tsv: one row per input")]
            pairs += [(folder / str(mask), str(mask)) for mask in rows.get("mask", pd.Series(dtype=str)).dropna()
                      if str(mask)][:50]
            return Item(page.name(folder), text, status, page.links(pairs))
        section.items.append(_guarded(page.name(folder), build))
    return section


def _dataset_name(root: Path) -> str:
    try:
        name = tables.read_json(root / "dataset_description.json").get("Name")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else root.name


def build_sections(bids_root: os.PathLike | str) -> list[Section]:
    """The page's content: one :class:`Section` per stage, read from disk and the registry."""
    root = Path(bids_root).resolve()
    base = derivative_root(root)
    page = _Page(root, base)
    registry = {kind: registered(root, kind) for kind in KINDS}
    return [_conversion(root, page), _normalize(base, page), _overlap(base, registry, page),
            _split(base, registry, page), _runs(registry, page), _evaluations(registry, page),
            _predictions(registry, page)]


def _ignore_in_derivative(base: Path) -> None:
    """List the page and the registry in the derivative's ``.bidsignore`` (the BIDS validator knows neither)."""
    ignore = base / ".bidsignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    missing = [name for name in (INDEX_FILE, REGISTRY_FILE) if name not in lines]
    if missing:
        io.write_text("".join(line + "\n" for line in lines + missing), ignore)


def write_index(bids_root: os.PathLike | str) -> Path:
    """Write ``BIDS_ROOT/derivatives/atlas-curate/index.html`` from what is on disk; returns its path."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from .resources import data_dir

    root = Path(bids_root).resolve()
    if not root.is_dir():
        raise io.InputError(root, "BIDS root is not a folder")
    sections = build_sections(root)
    env = Environment(loader=FileSystemLoader(str(data_dir("templates"))), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    text = env.get_template(INDEX_FILE).render(sections=sections, dataset=_dataset_name(root), version=__version__)
    page = io.write_text(text, derivative_root(root) / INDEX_FILE)
    _ignore_in_derivative(page.parent)
    return page
