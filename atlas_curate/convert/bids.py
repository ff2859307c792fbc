"""The BIDS reader of bids-convert: any BIDS lesion dataset (a lab's cohort, ATLAS v3.0-like trees, ISLES-style
native scans), and, as a configuration of the same reader, ATLAS R2.0.

What it recognises is data, not code: ``metadata/lesion-rules.json`` holds a *profile* per layout (``bids``,
``atlas2``) with the T1w rule and the lesion-mask rules (suffix, extensions, required entities, whether other
entities are allowed, beside the T1w in ``anat/`` or in a derivative dataset under ``derivatives/*/``).

* Datasets: the source folder when it holds ``dataset_description.json``, else every folder one or two levels
  down that does (``R011/``, ``Training/R011/``): a multi-cohort tree, one dataset per cohort folder; the
  cohort is that folder's name and a ``Training``/``Testing`` parent gives the part.
* Scans: ``sub-*/ses-*/`` folders, or ``sub-*/`` itself for a session-less subject; labels are kept as in the
  source (a session-less subject stays session-less).
* T1w: ``anat/*_T1w.nii[.gz]`` with any entities. Several in one scan: the default choice is a native-space
  one (no ``space-`` or ``space-orig``/``space-T1w``) over a template-space one, then the fewest entities
  (``sub-01_T1w`` before ``sub-01_acq-fast_T1w``), then the lowest ``run-``, then the name; ``t1w_filter``
  (``--t1w-entities acq=mprage,run=1``) keeps only the T1w carrying those entities. The others are reported.
* Lesion mask: a mask in the T1w's space (native or template) first, then the first matching rule (beside the
  T1w before derivatives), then one whose ``acq``/``rec``/``run`` agree with the T1w's; any other match is
  reported. The ``space-`` entity
  decides native vs template: a template-space mask on a native T1w (or the reverse) is an error, never a
  resample. Files whose names look like lesion files but match no rule are reported.

Indexing is a plain walk of the tree: on a 50-subject, 100-session, 400-file tree the whole reader took
0.5-0.7 s where pybids' ``BIDSLayout(validate=False, derivatives=True)`` alone took 1.1-10 s (same machine), and
pybids does not index ``_roi`` masks beside the T1w.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from .. import naming
from ..resources import data_dir
from .discover import ReleaseError, SourceScan

RULES_FILE = "lesion-rules.json"
DESCRIPTION = "dataset_description.json"
PARTS = {"training": "training", "testing": "testing"}
NII = (".nii.gz", ".nii")
MAX_DEPTH = 3   # cohort folders as deep as ATLAS_3/Training/R011/


@lru_cache(maxsize=None)
def rules() -> dict:
    """``metadata/lesion-rules.json``."""
    with (data_dir("metadata") / RULES_FILE).open() as fh:
        return json.load(fh)


def profile(name: str) -> dict:
    try:
        return rules()["profiles"][name]
    except KeyError:
        raise ValueError(f"{RULES_FILE} has no profile {name!r}") from None


def is_native(entities: dict) -> bool:
    """A file without ``space-`` or with a native space label (orig, T1w) is in the scanner's space."""
    return entities.get("space") is None or entities["space"] in rules()["native_spaces"]


def matches(entities: dict, suffix: str, ext: str, rule: dict) -> bool:
    """The file (parsed name) satisfies ``rule`` (sub/ses are checked by the caller)."""
    if suffix != rule["suffix"] or ext not in rule["extensions"]:
        return False
    own = {k: v for k, v in entities.items() if k not in ("sub", "ses")}
    if any(own.get(k) != v for k, v in rule["entities"].items()):
        return False
    if rule.get("exact") and set(own) != set(rule["entities"]):
        return False
    return True


def lesion_like(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in rules()["lesion_like"])


def parse_filter(text: str | None) -> dict[str, str]:
    """``"acq=mprage,run=1"`` -> ``{"acq": "mprage", "run": "1"}``; raises ValueError on a bad item."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not naming.BIDS_LABEL.match(value.strip()):
            raise ValueError(f"--t1w-entities: {item!r} is not ENTITY=LABEL (e.g. acq=mprage,run=1)")
        out[key.strip()] = value.strip()
    return out


# --- datasets ----------------------------------------------------------------------------------------

def _folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_datasets(root: Path, depth: int = MAX_DEPTH) -> list[tuple[Path, str, str]]:
    """``(dataset folder, cohort, part)`` of every BIDS dataset at ``root`` or up to ``depth`` levels down
    (``ATLAS_3/Training/R011/``; ``derivatives/`` and ``sub-*`` folders are not searched, nor is a dataset's
    inside). Cohort is ``""`` for a single dataset at ``root``, else the dataset folder's name; a parent folder
    named Training or Testing gives the part."""
    root = Path(root)
    if (root / DESCRIPTION).is_file():
        return [(root, "", "")]
    found = []

    def walk(folder: Path, level: int) -> None:
        for child in _folders(folder):
            if child.name == "derivatives" or child.name.startswith(("sub-", "ses-")):
                continue
            if (child / DESCRIPTION).is_file():
                found.append((child, child.name, PARTS.get(folder.name.lower(), "")))
            elif level < depth:
                walk(child, level + 1)

    walk(root, 1)
    return found


def is_bids_tree(root: Path) -> bool:
    """The source, or each cohort folder below it, is a BIDS dataset holding ``sub-*`` folders, and its T1w are
    not R2.0's template-space ones (that layout has its own profile)."""
    datasets = find_datasets(root)
    if not datasets or not any(any(p.name.startswith("sub-") for p in _folders(d)) for d, _, _ in datasets):
        return False
    atlas2_shaped = any((root / name).is_dir() for name in (naming.ATLAS2_ROOT, *naming.ATLAS2_PARTS.values()))
    for folder, _, _ in datasets:
        for t1 in folder.glob("sub-*/*/anat/*_T1w.nii*"):
            parsed = naming.parse_bids_name(t1.name)
            return not (atlas2_shaped and parsed and parsed[0].get("space") == naming.SPACE)
    return True


# --- one scan -----------------------------------------------------------------------------------------

def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(piece.startswith(".") for piece in p.relative_to(folder).parts))


def _labels_match(entities: dict, labels: tuple[str, str | None]) -> bool:
    return entities.get("sub") == labels[0] and entities.get("ses") == labels[1]


def _canonical(name: str, entities: dict, suffix: str, ext: str) -> bool:
    others = {k: v for k, v in entities.items() if k not in ("sub", "ses")}
    try:
        return name == naming.bids_name(entities.get("sub"), entities.get("ses"), suffix, ext, **others)
    except ValueError:
        return False


def _t1_rank(entities: dict, name: str) -> tuple:
    """Default T1w choice: native space first, then fewest entities, then lowest run, then the name."""
    run = entities.get("run", "")
    return (not is_native(entities), len(entities), int(run) if run.isdigit() else 0, name)


def collect_session(scan: SourceScan, scan_dir: Path, profile_name: str, *, derivatives: list[Path] = (),
                    t1w_filter: dict[str, str] | None = None,
                    labels: tuple[str, str | None] | None = None) -> SourceScan:
    """Fill ``scan`` (T1, lesion mask, reported files) from its folder and the derivative datasets; file names
    must carry ``labels`` (sub, ses; default: the scan's)."""
    labels = labels or (scan.ref.sub, scan.ref.ses)
    prof = profile(profile_name)
    t1_rule, mask_rules = prof["t1w"], prof["masks"]
    several = profile_name == "atlas2"   # R2.0: a second T1w is a duplicate (reported), the last one is kept
    t1s: list[tuple[dict, Path]] = []
    masks: list[tuple[int, dict, Path]] = []
    session_less = scan.ref.ses is None

    def consider(path: Path, rel: str, where: str) -> None:
        parsed = naming.parse_bids_name(path.name)
        if parsed is not None and _labels_match(parsed[0], labels):
            entities, suffix, ext = parsed
            canonical = _canonical(path.name, entities, suffix, ext)
            if where == "anat" and matches(entities, suffix, ext, t1_rule) and (canonical or not t1_rule.get("exact")):
                t1s.append((entities, path))
                return
            for order, rule in enumerate(mask_rules):
                if rule["where"] == where and matches(entities, suffix, ext, rule) and (
                        canonical or not rule.get("exact")):
                    masks.append((order, entities, path))
                    return
            if prof["report_unmatched"] != "all" and (suffix == t1_rule["suffix"] or ext == ".json"):
                return   # a T1w of another kind or a sidecar: not a lesion file
        if prof["report_unmatched"] == "all" or lesion_like(path.name):
            scan.unrecognised.append(rel)

    for path in _files(scan_dir):
        rel = path.relative_to(scan_dir)
        if session_less and rel.parts[0].startswith("ses-"):
            continue
        if len(rel.parts) != 2 or rel.parts[0] != "anat":
            if prof["other_folders"] == "report" or lesion_like(path.name):
                scan.unrecognised.append(rel.as_posix())
            continue
        consider(path, rel.as_posix(), "anat")
    for deriv in derivatives:
        folder = deriv / f"sub-{scan.ref.sub}" / (f"ses-{scan.ref.ses}" if scan.ref.ses else "") / "anat"
        for path in _files(folder):
            if path.parent == folder and not path.name.endswith(".json"):
                consider(path, f"{deriv.parent.name}/{deriv.name}/{path.relative_to(deriv).as_posix()}",
                         "derivatives")

    if several:
        for entities, path in t1s:
            if scan.t1 is not None:
                scan.problems.append(f"duplicate_t1: {path.name}")
            scan.t1 = str(path)
    else:
        chosen = [(e, p) for e, p in t1s if all(e.get(k) == v for k, v in (t1w_filter or {}).items())]
        chosen.sort(key=lambda item: _t1_rank(item[0], item[1].name))
        if chosen:
            scan.t1 = str(chosen[0][1])
            scan.space = naming.NATIVE_SPACE if is_native(chosen[0][0]) else naming.SPACE
            if not is_native(chosen[0][0]) and chosen[0][0]["space"] != naming.SPACE:
                scan.fatal.append(f"t1w_space: {chosen[0][1].name} is in space-{chosen[0][0]['space']}, neither "
                                  f"native nor {naming.SPACE}; masks not written")
            sidecar = chosen[0][1].with_name(chosen[0][1].name.split(".")[0] + ".json")
            if sidecar.is_file():
                try:
                    scan.sidecar = json.loads(sidecar.read_text())
                except (OSError, ValueError) as exc:
                    scan.problems.append(f"unreadable_sidecar: {sidecar.name}: {exc}")
        for _, path in t1s:
            if not chosen or path != chosen[0][1]:
                scan.problems.append(f"other_t1w: {path.name} not used (choose with --t1w-entities)")
        if not t1s:
            scan.missing_t1 = f"no T1w image ({'anat' if session_less else 'ses-*/anat'}/*_T1w.nii[.gz])"
        elif not chosen:
            scan.missing_t1 = f"no T1w image carries the entities {t1w_filter} (found {[p.name for _, p in t1s]})"

    if not masks:
        return scan
    t1_entities = naming.parse_bids_name(Path(scan.t1).name)[0] if scan.t1 else {}

    def mismatch(entities: dict) -> int:
        return sum(entities.get(k) is not None and entities.get(k) != t1_entities.get(k) for k in ("acq", "rec", "run"))

    masks.sort(key=lambda m: (is_native(m[1]) != is_native(t1_entities), m[0], mismatch(m[1]), m[2].name))
    order, entities, path = masks[0]
    stem = path.name.split(".")[0]
    for other_order, _, other in masks[1:]:
        if other.parent == path.parent and other.name.split(".")[0] == stem:
            continue
        scan.problems.append(f"other_mask: {other.name} also matches a lesion rule (used {path.name})")
    for _, _, same in masks:
        if same.parent == path.parent and same.name.split(".")[0] == stem:
            scan.smooth.setdefault(0, {})[next(e for e in NII if same.name.endswith(e)).lstrip(".")] = str(same)
    if scan.t1 and not several and is_native(entities) != is_native(t1_entities):
        what = "template" if not is_native(entities) else "native"
        scan.fatal.append(f"template_mask: {path.name} is a {what}-space mask (space-{entities.get('space')}) "
                          f"but its T1w {Path(scan.t1).name} is not; masks are never resampled")
    return scan


# --- the reader ----------------------------------------------------------------------------------------

def _subject_label(folder: Path) -> str:
    label = folder.name[len("sub-"):]
    if not naming.BIDS_LABEL.match(label):
        raise ReleaseError(f"{folder}: not a BIDS subject folder (sub-<alphanumeric label>)")
    return label


def _empty(folder: Path) -> bool:
    return not _files(folder)


def discover_bids(root: Path, *, t1w_filter: dict[str, str] | None = None,
                  empty: list[tuple[str, naming.ScanRef | None]] | None = None) -> list[SourceScan]:
    """Every scan of the BIDS dataset(s) at ``root``; empty subject/session folders go to ``empty``
    (``(folder relative to root, scan)``)."""
    datasets = find_datasets(root)
    if not datasets:
        raise ReleaseError(f"{root}: no {DESCRIPTION} here or in the folders one or two levels down")
    scans = []
    for dataset, cohort, part in datasets:
        derivatives = _folders(dataset / "derivatives") if (dataset / "derivatives").is_dir() else []
        for subject_dir in (p for p in _folders(dataset) if p.name.startswith("sub-")):
            sub = _subject_label(subject_dir)
            rel = subject_dir.relative_to(root).as_posix()
            if _empty(subject_dir):
                if empty is not None:
                    empty.append((rel, naming.ScanRef(sub)))
                continue
            sessions = [p for p in _folders(subject_dir) if p.name.startswith("ses-")]
            targets: list[tuple[Path, str | None]] = [(d, d.name[len("ses-"):]) for d in sessions]
            if not sessions or (subject_dir / "anat").is_dir():
                targets.insert(0, (subject_dir, None))
            for scan_dir, ses in targets:
                if ses is not None and not naming.BIDS_LABEL.match(ses):
                    raise ReleaseError(f"{scan_dir}: not a BIDS session folder (ses-<alphanumeric label>)")
                ref = naming.ScanRef(sub, ses)
                if ses is not None and _empty(scan_dir):
                    if empty is not None:
                        empty.append((scan_dir.relative_to(root).as_posix(), ref))
                    continue
                if ses is None and sessions and not (subject_dir / "anat").is_dir():
                    continue
                scan = SourceScan(ref.key, "bids", cohort, ref, str(scan_dir), part=part,
                                  merged_mask=True, mask_expected=part != "testing")
                scans.append(collect_session(scan, scan_dir, "bids", derivatives=derivatives, t1w_filter=t1w_filter))
    return scans


# --- metadata ------------------------------------------------------------------------------------------

BIDS_FIELD = re.compile(r"^[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")   # CamelCase: a BIDS metadata field
RESERVED = ("participant_id", "session_id", "cohort", "release", "source_id", "part", "skull_stripped")
SKULL_STRIPPED = {"Description": "Whether the T1w is brain-extracted (skull-stripped): the source sidecar's "
                                 "SkullStripped, else atlas-curate's image test (see the T1w sidecar's "
                                 "SkullStrippedDecision)",
                  "Levels": {"true": "brain-extracted", "false": "whole head"}}


def _na(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "n/a")


def _scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _column_name(source: tuple[str, str], taken: dict[str, tuple[str, str]]) -> str:
    """The output column of a (table, source column): its snake_case slug (DAYS_POST_STROKE -> days_post_stroke),
    shared by the sources of one table with the same slug (sessions.tsv's days_post_stroke and the sidecar's
    DAYS_POST_STROKE are one column); a name the converter writes itself gets ``_source``."""
    from .metadata import slug

    name = slug(source[1])
    if name in RESERVED:
        name += "_source"
    while taken.get(name, source)[0] != source[0]:
        name += "_x"
    taken.setdefault(name, source)
    return name


def _read_tsv(path: Path, problems: list[str]) -> list[dict]:
    from .metadata import read_table

    try:
        table = read_table(path)
    except Exception as exc:   # reported; the conversion goes on without this table
        problems.append(f"metadata: {path.name}: {getattr(exc, 'reason', exc)}")
        return []
    return [{str(k): v for k, v in row.items()} for _, row in table.iterrows()]


def _read_json(path: Path, problems: list[str]) -> dict:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError) as exc:
        problems.append(f"metadata: {path.name}: {exc}")
        return {}


def _label(value, prefix: str) -> str:
    text = str(value).strip()
    return text if text.startswith(prefix) else prefix + text


def bids_metadata(root: Path, scans: list[SourceScan], spreadsheet: Path | None = None):
    """The source's participants.tsv/.json, sub-*_sessions.tsv/sessions.json and the non-BIDS fields of each
    chosen T1w sidecar (e.g. DAYS_POST_STROKE, CHRONICITY, CENTER) as a :class:`~.metadata.Metadata`, rows keyed
    by scan; ``spreadsheet`` (``--metadata``: participant_id and optional session_id columns) adds columns.
    Sets the cohort of scans of a single dataset from a site/center column, else the dataset folder's name."""
    from .metadata import ColumnSpec, Metadata, read_table

    specs: dict[str, ColumnSpec] = {}
    sidecars: dict[str, dict] = {}
    taken: dict[str, tuple[str, str]] = {}
    described: set[str] = set()
    problems: list[str] = []
    rows: dict[str, dict] = {scan.key: {} for scan in scans}

    def add(table: str, source: str, origin: str, entry: dict | None) -> str:
        key = (table, source)
        column = _column_name(key, taken)
        if column in specs:
            if entry and entry.get("Description") and column not in described:   # the source's own description
                sidecars[column] = dict(entry)
                described.add(column)
            return column
        if entry and entry.get("Description"):
            described.add(column)
        description = (entry or {}).get("Description") or rules()["sidecar_descriptions"].get(source) \
            or f"Column '{source}' of {origin}, kept as is"
        specs[column] = ColumnSpec(source, column, table, "string", "", description)
        sidecars[column] = {**(entry or {}), "Description": description}
        return column

    def put(values: dict, column: str, value) -> None:
        """A value for the column; a source that has none does not erase another's."""
        if not _na(value) or column not in values:
            values[column] = None if _na(value) else value

    datasets = {str(d): (d, cohort) for d, cohort, _ in find_datasets(root)}
    by_dataset: dict[str, list[SourceScan]] = {}
    for scan in scans:
        home = next((d for d in datasets if scan.folder.startswith(d + "/") or scan.folder == d), None)
        by_dataset.setdefault(home, []).append(scan)
    for home, members in by_dataset.items():
        folder = datasets[home][0] if home else Path(root)
        part_json = _read_json(folder / "participants.json", problems)
        participants = {}
        if (folder / "participants.tsv").is_file():
            for row in _read_tsv(folder / "participants.tsv", problems):
                if "participant_id" in row and not _na(row["participant_id"]):
                    participants[_label(row["participant_id"], "sub-")] = row
        sess_json = _read_json(folder / "sessions.json", problems)
        for scan in members:
            values = rows[scan.key]
            for source, value in participants.get(scan.ref.participant_id, {}).items():
                if source != "participant_id":
                    put(values, add("participants", source, "participants.tsv", part_json.get(source)), value)
            if scan.ref.ses is not None:
                table = Path(scan.folder).parent / f"sub-{scan.ref.sub}_sessions.tsv"
                own = _read_json(Path(scan.folder).parent / f"sub-{scan.ref.sub}_sessions.json", problems) or sess_json
                for row in _read_tsv(table, problems) if table.is_file() else []:
                    if _label(row.get("session_id", ""), "ses-") == scan.ref.session_id:
                        for source, value in row.items():
                            if source != "session_id":
                                put(values, add("sessions", source, "sessions.tsv", own.get(source)), value)
            for source, value in scan.sidecar.items():
                if BIDS_FIELD.match(source) or isinstance(value, (dict, list)):
                    continue
                put(values, add("sessions", source, "the T1w JSON sidecar", None), _scalar(value))
            if not scan.cohort:
                site = next((values[c] for c in values if specs[c].source.lower() in rules()["cohort_columns"]
                             and not _na(values[c])), None)
                scan.cohort = str(site) if site is not None else folder.name
    if spreadsheet is not None:
        table = read_table(spreadsheet)
        if "participant_id" not in table.columns:
            from ..io import InputError

            raise InputError(spreadsheet, f"metadata table lacks the participant_id column; columns are "
                                          f"{list(table.columns)}")
        by_ref = {(s.ref.participant_id, s.ref.session_id): s.key for s in scans}
        for number, (_, row) in enumerate(table.iterrows(), start=2):
            ses = row.get("session_id")
            sessions = [None if _na(ses) else _label(ses, "ses-")]
            targets = [by_ref.get((_label(row["participant_id"], "sub-"), s)) for s in sessions]
            if sessions == [None]:
                targets = [k for (p, _), k in by_ref.items() if p == _label(row["participant_id"], "sub-")]
            targets = [t for t in targets if t]
            if not targets:
                problems.append(f"metadata row {number}: no scan for {row['participant_id']} {'' if _na(ses) else ses}")
            for key in targets:
                for source, value in row.items():
                    if source not in ("participant_id", "session_id"):
                        put(rows[key], add("sessions", source, Path(spreadsheet).name, None), value)
    specs["skull_stripped"] = ColumnSpec("SkullStripped", "skull_stripped", "sessions", "string", "",
                                         SKULL_STRIPPED["Description"])
    sidecars["skull_stripped"] = SKULL_STRIPPED
    meta = Metadata(Path(spreadsheet) if spreadsheet else None, list(specs.values()), rows, problems)
    meta.sidecars = sidecars
    return meta
