"""Find the scans of a release folder and what files each has (reading nothing but names).

One reader per release layout turns a folder into :class:`SourceScan` records; everything after that
(reading, checking and writing) is shared. Layouts (see ``naming.py``):

* ``native``: R1.1 ICPSR, ``cXXXX/cXXXXsXXXXtXX/``;
* ``standard``: R1.1 FCP-INDI, ``[ATLAS_R1.1/]SiteN/SSSSSS/tNN/``;
* ``atlas2``: R2.0, ``[ATLAS_2/]{Training,Testing}/RNNN/sub-rNNNsNNN/ses-N/anat/``. Its single mask per
  scan (all lesions merged) is recorded as lesion 0 with ``merged_mask``; testing scans
  (``part="testing"``) have no mask by design (``mask_expected=False``). Its file rules are the ``atlas2``
  profile of the BIDS reader (``bids.py``, ``metadata/lesion-rules.json``);
* ``bids``: any BIDS dataset, or one per cohort folder (``bids.py``).

Empty subject/session/scan folders are not scans: they are reported (``empty`` of :func:`discover`).

Every folder name that becomes a label is parsed by a strict pattern (``ids.py``); a folder that does not
match is an error naming the folder, never a label built from raw text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import naming
from ..ids import ATLAS2_COHORT, Atlas2ScanId, IdError, IndiScanId, ScanId

FLAVOURS = ("auto", "native", "standard", "atlas2", "bids")
COHORT_DIR = re.compile(r"^c\d{4}$")
SITE_DIR = re.compile(r"^Site\d{1,3}$")


class ReleaseError(Exception):
    """The source folder is not a release this tool can read."""


@dataclass
class SourceScan:
    """One scan of a release: its IDs and the paths of its files (absolute, as strings)."""

    key: str                 # the release's scan ID: c0001s0001t01, Site1/031768/t01 or sub-r001s001_ses-1
    flavour: str             # native | standard | atlas2
    cohort: str
    ref: naming.ScanRef      # the scan in the BIDS dataset (sub-X_ses-Y)
    folder: str
    t1: str | None = None
    smooth: dict[int, dict[str, str]] = field(default_factory=dict)   # index -> {ext: path}
    raw: dict[int, dict[str, str]] = field(default_factory=dict)
    unrecognised: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    part: str = ""                 # atlas2: training | testing
    merged_mask: bool = False      # one mask holds every lesion (R2.0): identity is derived, not read
    mask_expected: bool = True     # False where the release withholds masks by design (R2.0 testing)
    space: str = ""                # bids: the T1w's space (naming.NATIVE_SPACE or naming.SPACE); "" = by flavour
    fatal: list[str] = field(default_factory=list)    # found while reading names: masks not written
    missing_t1: str = ""           # why no T1 was taken (reason of the failure), "" = the default reason
    sidecar: dict = field(default_factory=dict)       # the source T1w's JSON sidecar (bids)

    @property
    def subject(self) -> str:
        """BIDS subject label (without ``sub-``)."""
        return self.ref.sub

    @property
    def session(self) -> str | None:
        """BIDS session label (without ``ses-``); ``None`` for a session-less scan."""
        return self.ref.ses


def atlas2_root(root: Path) -> Path:
    """The folder holding ``Training/`` and ``Testing/``: the archive's ``ATLAS_2`` or the given folder."""
    return root / naming.ATLAS2_ROOT if (root / naming.ATLAS2_ROOT).is_dir() else root


def _atlas2_parts(root: Path) -> list[tuple[str, Path]]:
    base = atlas2_root(root)
    return [(part, base / folder) for part, folder in naming.ATLAS2_PARTS.items() if (base / folder).is_dir()]


def detect_flavour(root: Path) -> str:
    """``bids`` (a BIDS dataset at the root or in each cohort folder one or two levels down, whose T1w are not
    R2.0's template-space ones), ``native`` (cXXXX/ folders), ``standard`` ([ATLAS_R1.1/]SiteN/) or ``atlas2``
    ([ATLAS_2/]Training/ or Testing/ holding RNNN/ cohort folders)."""
    if not root.is_dir():
        raise ReleaseError(f"{root}: not a folder")
    from .bids import is_bids_tree

    if is_bids_tree(root):
        return "bids"
    if any(COHORT_DIR.match(p.name) and p.is_dir() for p in root.iterdir()):
        return "native"
    std = root / naming.STANDARD_ROOT if (root / naming.STANDARD_ROOT).is_dir() else root
    if any(SITE_DIR.match(p.name) and p.is_dir() for p in std.iterdir()):
        return "standard"
    if any(ATLAS2_COHORT.match(p.name) and p.is_dir() for _, folder in _atlas2_parts(root) for p in folder.iterdir()):
        return "atlas2"
    raise ReleaseError(f"{root}: neither a BIDS dataset (dataset_description.json and sub-* folders, here or in "
                       "each cohort folder one or two levels down), a native release (cXXXX/cXXXXsXXXXtXX/ "
                       f"folders), a standard-space release ({naming.STANDARD_ROOT}/SiteN/ folders) nor an R2.0 "
                       f"release ({naming.ATLAS2_ROOT}/Training/RNNN/ or {naming.ATLAS2_ROOT}/Testing/RNNN/ folders)")


def standard_root(root: Path) -> Path:
    """The folder holding ``SiteN/``: the archive's ``ATLAS_R1.1`` or the given folder itself."""
    return root / naming.STANDARD_ROOT if (root / naming.STANDARD_ROOT).is_dir() else root


def _add_files(scan: SourceScan, folder: Path, t1_names: tuple[str, ...], stem: str) -> None:
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.name in t1_names:
            if scan.t1 is not None:
                scan.problems.append(f"duplicate_t1: {path.name}")
            scan.t1 = str(path)
            continue
        parsed = naming.parse_mask_name(path.name)
        if parsed is None or parsed.scan != stem:
            scan.unrecognised.append(path.name)
            continue
        table = scan.smooth if parsed.kind == "Smooth" else scan.raw
        table.setdefault(parsed.index, {})[parsed.ext] = str(path)


def _folders(parent: Path) -> list[Path]:
    """Sub-folders, hidden ones left out."""
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_files(folder: Path) -> bool:
    """The folder holds a file (hidden ones left out) at any depth."""
    return any(p.is_file() and not any(piece.startswith(".") for piece in p.relative_to(folder).parts)
               for p in folder.rglob("*"))


def _note_empty(empty: list | None, folder: Path, root: Path) -> None:
    """Record an empty subject/session folder (reported, not a scan)."""
    if empty is not None:
        empty.append((folder.relative_to(root).as_posix(), None))


def _atlas2_scan(session_dir: Path, cohort_dir: Path, part: str, naming_scheme: str) -> SourceScan:
    try:
        sid = Atlas2ScanId.parse_parts(session_dir.parent.name, session_dir.name)
    except IdError as exc:
        raise ReleaseError(f"{session_dir}: {exc}") from exc
    if session_dir.parts[-2:] != naming.atlas2_scan_dir(sid, part).parts[-3:-1]:
        raise ReleaseError(f"{session_dir}: folders must be named sub-rNNNsNNN/ses-N")
    scan = SourceScan(str(sid), "atlas2", sid.cohort_id, naming.ScanRef(*sid.bids_labels(naming_scheme)),
                      str(session_dir), part=part, merged_mask=True, mask_expected=part == "training")
    if sid.cohort_id != cohort_dir.name:
        scan.problems.append(f"cohort_folder: scan {sid} is filed under {cohort_dir.name}")
    from .bids import collect_session  # R2.0 is a configuration (profile) of the BIDS reader

    return collect_session(scan, session_dir, "atlas2", labels=sid.bids_labels())


def _discover_atlas2(root: Path, naming_scheme: str, empty: list | None = None) -> list[SourceScan]:
    """R2.0: every ``{Training,Testing}/RNNN/sub-rNNNsNNN/ses-N/`` folder. Files beside the cohort folders
    (``dataset_description.json``, README, …) are not scans; any other folder is an error."""
    parts = _atlas2_parts(root)
    if not parts:
        raise ReleaseError(f"{root}: no {naming.ATLAS2_ROOT}/Training or {naming.ATLAS2_ROOT}/Testing folder")
    scans = []
    for part, part_dir in parts:
        for cohort_dir in _folders(part_dir):
            if not ATLAS2_COHORT.match(cohort_dir.name):
                raise ReleaseError(f"{cohort_dir}: not an R2.0 cohort folder (expected e.g. R001)")
            for subject_dir in _folders(cohort_dir):
                sessions = _folders(subject_dir)
                if not sessions and not _has_files(subject_dir):
                    try:
                        sid = Atlas2ScanId.parse_parts(subject_dir.name, "ses-1")
                    except IdError as exc:
                        raise ReleaseError(f"{subject_dir}: {exc}") from exc
                    if subject_dir.name != naming.atlas2_scan_dir(sid, part).parts[-3]:
                        raise ReleaseError(f"{subject_dir}: folders must be named sub-rNNNsNNN/ses-N")
                    _note_empty(empty, subject_dir, root)
                    continue
                if not sessions:
                    raise ReleaseError(f"{subject_dir}: no ses-N folder")
                for session_dir in sessions:
                    scan = _atlas2_scan(session_dir, cohort_dir, part, naming_scheme)   # checks the names first
                    if _has_files(session_dir):
                        scans.append(scan)
                    else:
                        _note_empty(empty, session_dir, root)
    return scans


def discover(root: Path, flavour: str = "auto", *, naming_scheme: str = "native",
             t1w_filter: dict[str, str] | None = None,
             empty: list[tuple[str, naming.ScanRef | None]] | None = None) -> tuple[str, list[SourceScan]]:
    """All scans of the release at ``root``, sorted by key. Empty subject/session/scan folders are not scans:
    they are appended to ``empty`` (folder relative to ``root``, the scan it would be or ``None``).
    ``t1w_filter`` (bids only): keep the T1w carrying these entities."""
    root = Path(root)
    if flavour == "auto":
        flavour = detect_flavour(root)
    scans: list[SourceScan] = []
    if flavour == "native":
        for cohort_dir in sorted(p for p in root.iterdir() if p.is_dir() and COHORT_DIR.match(p.name)):
            for folder in sorted(p for p in cohort_dir.iterdir() if p.is_dir()):
                try:
                    sid = ScanId.parse(folder.name)
                except IdError as exc:
                    raise ReleaseError(f"{folder}: {exc}") from exc
                if not _has_files(folder):
                    _note_empty(empty, folder, root)
                    continue
                scan = SourceScan(str(sid), "native", sid.cohort_id, naming.ScanRef(*sid.bids_labels(naming_scheme)),
                                  str(folder))
                if sid.cohort_id != cohort_dir.name:
                    scan.problems.append(f"cohort_folder: scan {sid} is filed under {cohort_dir.name}")
                _add_files(scan, folder, (f"{sid}.nii.gz", f"{sid}.nii"), str(sid))
                scans.append(scan)
    elif flavour == "standard":
        base = standard_root(root)
        for site_dir in sorted(p for p in base.iterdir() if p.is_dir() and SITE_DIR.match(p.name)):
            for subject_dir in sorted(p for p in site_dir.iterdir() if p.is_dir()):
                if not _has_files(subject_dir):
                    try:
                        IndiScanId.parse_parts(site_dir.name, subject_dir.name, "t01")
                    except IdError as exc:
                        raise ReleaseError(f"{subject_dir}: {exc}") from exc
                    _note_empty(empty, subject_dir, root)
                    continue
                for session_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
                    try:
                        sid = IndiScanId.parse_parts(site_dir.name, subject_dir.name, session_dir.name)
                    except IdError as exc:
                        raise ReleaseError(f"{session_dir}: {exc}") from exc
                    if subject_dir.name != sid.subject_id:
                        raise ReleaseError(f"{subject_dir}: subject folder is not zero-padded to 6 digits")
                    if not _has_files(session_dir):
                        _note_empty(empty, session_dir, root)
                        continue
                    scan = SourceScan(str(sid), "standard", sid.cohort_id,
                                      naming.ScanRef(*sid.bids_labels(naming_scheme)), str(session_dir))
                    stem = sid.file_stem
                    _add_files(scan, session_dir, (f"{stem}_t1w_deface_stx.nii.gz", f"{stem}_t1w_deface_stx.nii"),
                               stem)
                    scans.append(scan)
    elif flavour == "atlas2":
        scans = _discover_atlas2(root, naming_scheme, empty)
    elif flavour == "bids":
        from .bids import discover_bids

        scans = discover_bids(root, t1w_filter=t1w_filter, empty=empty)
    else:
        raise ReleaseError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    seen: dict[naming.ScanRef, str] = {}
    for scan in scans:
        other = seen.setdefault(scan.ref, scan.key)
        if other != scan.key:
            raise ReleaseError(f"scans {other} and {scan.key} map to the same BIDS scan {scan.ref.key}")
    return flavour, sorted(scans, key=lambda s: s.key)


def find_metadata(root: Path, flavour: str) -> Path | None:
    """The release's metadata table at the archive root (xlsx or csv), if any."""
    if flavour in ("native", "atlas2"):
        folders = [Path(root)] if flavour == "native" else list(dict.fromkeys([atlas2_root(Path(root)), Path(root)]))
        candidates = [p for folder in folders for p in sorted(folder.glob("*.xlsx"))
                      if "meta" in p.name.lower() and not p.name.startswith(("~$", "."))]
        candidates += [p for folder in folders for p in sorted(folder.glob("*.csv")) if "meta" in p.name.lower()]
    else:
        candidates = sorted(p for p in standard_root(Path(root)).glob("*.csv") if "meta" in p.name.lower())
        candidates += sorted(p for p in Path(root).glob("*.csv") if "meta" in p.name.lower())
    return candidates[0] if candidates else None
