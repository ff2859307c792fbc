"""Find the scans of a release folder and what files each has (reading nothing but names)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import naming
from ..ids import IdError, IndiScanId, ScanId

FLAVOURS = ("auto", "native", "standard")
COHORT_DIR = re.compile(r"^c\d{4}$")
SITE_DIR = re.compile(r"^Site\d{1,3}$")


class ReleaseError(Exception):
    """The source folder is not a release this tool can read."""


@dataclass
class SourceScan:
    """One scan of a release: its IDs and the paths of its files (absolute, as strings)."""

    key: str                 # the release's scan ID: c0001s0001t01 or Site1/031768/t01
    flavour: str             # native | standard
    cohort: str
    subject: str             # BIDS labels
    session: str
    folder: str
    t1: str | None = None
    smooth: dict[int, dict[str, str]] = field(default_factory=dict)   # index -> {ext: path}
    raw: dict[int, dict[str, str]] = field(default_factory=dict)
    unrecognised: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def detect_flavour(root: Path) -> str:
    if not root.is_dir():
        raise ReleaseError(f"{root}: not a folder")
    if any(COHORT_DIR.match(p.name) and p.is_dir() for p in root.iterdir()):
        return "native"
    std = root / naming.STANDARD_ROOT if (root / naming.STANDARD_ROOT).is_dir() else root
    if any(SITE_DIR.match(p.name) and p.is_dir() for p in std.iterdir()):
        return "standard"
    raise ReleaseError(f"{root}: neither a native release (cXXXX/cXXXXsXXXXtXX/ folders) nor a "
                       f"standard-space release ({naming.STANDARD_ROOT}/SiteN/ folders)")


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


def discover(root: Path, flavour: str = "auto", *, naming_scheme: str = "native") -> tuple[str, list[SourceScan]]:
    """All scans of the release at ``root``, sorted by key."""
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
                sub, ses = sid.bids_labels(naming_scheme)
                scan = SourceScan(str(sid), "native", sid.cohort_id, sub, ses, str(folder))
                if sid.cohort_id != cohort_dir.name:
                    scan.problems.append(f"cohort_folder: scan {sid} is filed under {cohort_dir.name}")
                _add_files(scan, folder, (f"{sid}.nii.gz", f"{sid}.nii"), str(sid))
                scans.append(scan)
    elif flavour == "standard":
        base = standard_root(root)
        for site_dir in sorted(p for p in base.iterdir() if p.is_dir() and SITE_DIR.match(p.name)):
            for subject_dir in sorted(p for p in site_dir.iterdir() if p.is_dir()):
                for session_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
                    try:
                        sid = IndiScanId.parse_parts(site_dir.name, subject_dir.name, session_dir.name)
                    except IdError as exc:
                        raise ReleaseError(f"{session_dir}: {exc}") from exc
                    if subject_dir.name != sid.subject_id:
                        raise ReleaseError(f"{subject_dir}: subject folder is not zero-padded to 6 digits")
                    sub, ses = sid.bids_labels(naming_scheme)
                    scan = SourceScan(str(sid), "standard", sid.cohort_id, sub, ses, str(session_dir))
                    stem = sid.file_stem
                    _add_files(scan, session_dir, (f"{stem}_t1w_deface_stx.nii.gz", f"{stem}_t1w_deface_stx.nii"),
                               stem)
                    scans.append(scan)
    else:
        raise ReleaseError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    seen: dict[tuple[str, str], str] = {}
    for scan in scans:
        other = seen.setdefault((scan.subject, scan.session), scan.key)
        if other != scan.key:
            raise ReleaseError(f"scans {other} and {scan.key} map to the same BIDS labels "
                               f"sub-{scan.subject} ses-{scan.session}")
    return flavour, sorted(scans, key=lambda s: s.key)


def find_metadata(root: Path, flavour: str) -> Path | None:
    """The release's metadata table at the archive root (xlsx or csv), if any."""
    if flavour == "native":
        candidates = sorted(p for p in Path(root).glob("*.xlsx")
                            if "meta" in p.name.lower() and not p.name.startswith(("~$", ".")))
        candidates += sorted(p for p in Path(root).glob("*.csv") if "meta" in p.name.lower())
    else:
        candidates = sorted(p for p in standard_root(Path(root)).glob("*.csv") if "meta" in p.name.lower())
        candidates += sorted(p for p in Path(root).glob("*.csv") if "meta" in p.name.lower())
    return candidates[0] if candidates else None
