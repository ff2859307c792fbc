"""The one place that builds and parses file names: the ATLAS releases' and BIDS's.

Release layouts (docs/formats.md):

* native (ICPSR R1.1): ``cXXXX/cXXXXsXXXXtXX/ID.nii.gz``, ``ID_LesionRaw[_k].voi``,
  ``ID_LesionSmooth[_k].voi``, ``ID_LesionSmooth[_k].nii.gz`` (k = 1.. secondaries);
* standard (FCP-INDI R1.1): ``ATLAS_R1.1/SiteN/SSSSSS/tNN/SSSSSS_t1w_deface_stx.nii.gz``,
  ``SSSSSS_LesionSmooth[_k]_stx.nii.gz``;
* R2.0: ``ATLAS_2/{Training,Testing}/RNNN/sub-rNNNsNNN/ses-N/anat/`` with
  ``sub-…_ses-…_space-MNI152NLin2009aSym_T1w.nii.gz`` and (training only) one mask per scan,
  ``…_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz``; ``dataset_description.json`` per
  cohort folder; the metadata table and the template ``MNI152NLin2009aSym.nii.gz`` in ``ATLAS_2/``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .ids import Atlas2ScanId, IndiScanId, ScanId
from .resources import data_dir


@lru_cache(maxsize=None)
def spec() -> dict:
    """The naming spec (``metadata/outputs.json``): every file one stage writes for another, by key."""
    return json.loads((data_dir("metadata") / "outputs.json").read_text())


def _space_of(template_key: str) -> str:
    return json.loads((data_dir("templates") / "registry.json").read_text())[template_key]["name"]


#: The template every stage works in (a key of ``templates/registry.json``), its BIDS space name, the BIDS
#: version of every dataset written, and the space label of scanner-space images: defined here only.
TEMPLATE_KEY: str = spec()["template"]
SPACE: str = _space_of(TEMPLATE_KEY)
BIDS_VERSION: str = spec()["bids_version"]
NATIVE_SPACE: str = spec()["native_space"]

NATIVE_METADATA_NAME = "20171106_ATLAS_Meta-Data_Release_1.1_Updated.xlsx"
STANDARD_ROOT = "ATLAS_R1.1"
STANDARD_METADATA_NAME = "ATLAS_Meta-Data_Release_1.1_standard_mni.csv"
ATLAS2_ROOT = "ATLAS_2"
ATLAS2_PARTS = {"training": "Training", "testing": "Testing"}   # part -> folder
ATLAS2_METADATA_NAME = "20220425_ATLAS_2.0_MetaData.xlsx"
ATLAS2_SPACE = "MNI152NLin2009aSym"   # the release's own space label (a fact of R2.0, not our template choice)
ATLAS2_TEMPLATE_NAME = f"{ATLAS2_SPACE}.nii.gz"

NATIVE_MASK = re.compile(r"^(?P<id>c\d{4}s\d{4}t\d{2})_Lesion(?P<kind>Raw|Smooth)(?:_(?P<index>\d+))?"
                         r"\.(?P<ext>voi|nii\.gz|nii)$")
STANDARD_MASK = re.compile(r"^(?P<id>\d{6})_Lesion(?P<kind>Raw|Smooth)(?:_(?P<index>\d+))?_stx"
                           r"\.(?P<ext>nii\.gz|nii)$")


@dataclass(frozen=True)
class MaskName:
    """A parsed release lesion file name: kind ``Raw``/``Smooth``, index 0 = primary, k = ``_k``."""

    scan: str
    kind: str
    index: int
    ext: str


def parse_mask_name(name: str) -> MaskName | None:
    for pattern in (NATIVE_MASK, STANDARD_MASK):
        match = pattern.match(name)
        if match:
            return MaskName(match["id"], match["kind"], int(match["index"] or 0), match["ext"])
    return None


def native_scan_dir(scan: ScanId) -> Path:
    return Path(scan.cohort_id) / str(scan)


def native_t1(scan: ScanId) -> Path:
    return native_scan_dir(scan) / f"{scan}.nii.gz"


def native_mask(scan: ScanId, kind: str, index: int = 0, ext: str = "voi") -> Path:
    suffix = f"_{index}" if index else ""
    return native_scan_dir(scan) / f"{scan}_Lesion{kind}{suffix}.{ext}"


def standard_scan_dir(scan: IndiScanId) -> Path:
    return Path(STANDARD_ROOT) / f"Site{scan.site}" / scan.subject_id / f"t{scan.timepoint:02d}"


def standard_t1(scan: IndiScanId) -> Path:
    return standard_scan_dir(scan) / f"{scan.file_stem}_t1w_deface_stx.nii.gz"


def standard_mask(scan: IndiScanId, index: int = 0, kind: str = "Smooth") -> Path:
    suffix = f"_{index}" if index else ""
    return standard_scan_dir(scan) / f"{scan.file_stem}_Lesion{kind}{suffix}_stx.nii.gz"


def atlas2_scan_dir(scan: Atlas2ScanId, part: str) -> Path:
    """``ATLAS_2/<Training|Testing>/R001/sub-r001s001/ses-1/anat``."""
    return (Path(ATLAS2_ROOT) / ATLAS2_PARTS[part] / scan.cohort_id / f"sub-{scan.subject_id}"
            / f"ses-{scan.session}" / "anat")


def atlas2_t1_name(scan: Atlas2ScanId, ext: str = ".nii.gz") -> str:
    return bids_name(*scan.bids_labels(), "T1w", ext, space=ATLAS2_SPACE)


def atlas2_mask_name(scan: Atlas2ScanId, ext: str = ".nii.gz") -> str:
    return bids_name(*scan.bids_labels(), "mask", ext, space=ATLAS2_SPACE, label="L", desc="T1lesion")


def atlas2_t1(scan: Atlas2ScanId, part: str) -> Path:
    return atlas2_scan_dir(scan, part) / atlas2_t1_name(scan)


def atlas2_mask(scan: Atlas2ScanId, part: str) -> Path:
    return atlas2_scan_dir(scan, part) / atlas2_mask_name(scan)


# --- BIDS ---------------------------------------------------------------------------------------

BIDS_ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "run", "from", "to", "mode", "hemi",
                     "space", "res", "den", "label", "desc")
LESION_DERIVATIVE = Path(spec()["datasets"]["lesions"])
PIPELINE_DERIVATIVE = Path(spec()["datasets"]["pipeline"])
STATE_DIR = Path(spec()["state_dir"])
BIDS_LABEL = re.compile(r"^[A-Za-z0-9]+$")
SCAN_PREFIX = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?(?=_|\.|$)")
BIDS_NAME = re.compile(r"^(?P<entities>(?:[A-Za-z0-9]+-[A-Za-z0-9]+_)*)(?P<suffix>[A-Za-z0-9]+)"
                       r"(?P<ext>(?:\.[A-Za-z0-9]+)+)$")


@dataclass(frozen=True)
class ScanRef:
    """One scan of a BIDS dataset: subject label and optional session label (without ``sub-``/``ses-``).

    ``key`` is the scan's name in every table (``sub-X_ses-Y``, or ``sub-X`` for a session-less scan).
    """

    sub: str
    ses: str | None = None

    def __post_init__(self) -> None:
        for name, value in (("sub", self.sub), ("ses", self.ses)):
            if value is not None and not BIDS_LABEL.match(str(value)):
                raise ValueError(f"invalid BIDS label for {name}: {value!r}")

    @classmethod
    def parse(cls, text: str) -> "ScanRef":
        """``sub-X`` or ``sub-X_ses-Y`` (exactly) → the record; anything else is a ``ValueError``."""
        match = SCAN_PREFIX.match(str(text))
        if not match or match.end() != len(str(text)):
            raise ValueError(f"not a scan name (sub-<label>[_ses-<label>]): {text!r}")
        return cls(match["sub"], match["ses"])

    @classmethod
    def from_name(cls, name: str) -> "ScanRef | None":
        """The scan a BIDS file name belongs to (``sub-X[_ses-Y]_...``), or ``None``."""
        match = SCAN_PREFIX.match(str(name))
        return cls(match["sub"], match["ses"]) if match else None

    @property
    def key(self) -> str:
        return f"sub-{self.sub}" + (f"_ses-{self.ses}" if self.ses else "")

    @property
    def participant_id(self) -> str:
        return f"sub-{self.sub}"

    @property
    def session_id(self) -> str | None:
        return f"ses-{self.ses}" if self.ses else None

    def __str__(self) -> str:
        return self.key

    def folder(self, datatype: str = "anat") -> Path:
        """``sub-X/ses-Y/<datatype>`` (``sub-X/<datatype>`` without a session)."""
        return Path(self.participant_id) / (self.session_id or "") / datatype

    def path(self, output: str, *, space: str | None = None, **entities: str | None) -> Path:
        """Path of the spec's ``output`` for this scan, relative to the BIDS root (``space`` fills ``{space}``)."""
        return output_path(output, self, space=space, **entities)


def parse_bids_name(name: str) -> tuple[dict[str, str], str, str] | None:
    """``(entities, suffix, extension)`` of a BIDS file name, or ``None`` when it is not one."""
    match = BIDS_NAME.match(name)
    if not match:
        return None
    pairs = [part.split("-", 1) for part in match["entities"].split("_") if part]
    return dict(pairs), match["suffix"], match["ext"]


def _fill(value, space: str | None):
    if isinstance(value, str) and "{space}" in value:
        if space is None:
            raise ValueError("this output needs a space (orig or the template space)")
        return value.replace("{space}", space)
    return value


def output_spec(output: str) -> dict:
    try:
        return spec()["outputs"][output]
    except KeyError:
        raise KeyError(f"unknown output {output!r}; known: {', '.join(spec()['outputs'])}") from None


def output_path(output: str, scan: ScanRef, *, space: str | None = None, **entities: str | None) -> Path:
    """The spec's ``output`` for ``scan`` relative to the BIDS root: ``{dataset}/sub-X/[ses-Y/]<datatype>/name``.
    ``entities`` override or add to the spec's (``None`` drops one)."""
    entry = output_spec(output)
    values = {key: _fill(value, space) for key, value in entry["entities"].items()}
    values.update(entities)
    datatype = entry.get("datatype", "anat")
    ses_folder = scan.ses if entry.get("session_folder", True) else None
    name = bids_name(scan.sub, scan.ses, entry["suffix"], entry.get("extension", ".nii.gz"), **values)
    folder = Path(f"sub-{scan.sub}") / (f"ses-{ses_folder}" if ses_folder else "") / datatype
    return Path(spec()["datasets"].get(entry["dataset"], entry["dataset"])) / folder / name


def output_sidecar(output: str, *, space: str | None = None, **fields) -> dict:
    """The sidecar of ``output``: the spec's fixed fields (``{space}`` filled) updated with ``fields``."""
    doc = {key: _fill(value, space) for key, value in output_spec(output).get("sidecar", {}).items()}
    doc.update(fields)
    return doc


def bids_name(sub: str, ses: str | None, suffix: str, ext: str, **entities: str | None) -> str:
    """``sub-X[_ses-Y][_key-value...]_suffix.ext`` with entities in BIDS order."""
    values = {"sub": sub, "ses": ses, **entities}
    unknown = set(values) - set(BIDS_ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities: {sorted(unknown)}")
    parts = []
    for key in BIDS_ENTITY_ORDER:
        value = values.get(key)
        if value is None:
            continue
        if not BIDS_LABEL.match(str(value)):
            raise ValueError(f"invalid BIDS label for {key}: {value!r}")
        parts.append(f"{key}-{value}")
    return "_".join(parts) + f"_{suffix}{ext}"


def bids_path(sub: str, ses: str | None, suffix: str, ext: str = ".nii.gz", *, datatype: str = "anat",
              **entities: str | None) -> Path:
    """Path relative to a dataset root: ``sub-X/ses-Y/<datatype>/<name>``."""
    return ScanRef(sub, ses).folder(datatype) / bids_name(sub, ses, suffix, ext, **entities)


def sessions_table(sub: str) -> Path:
    return Path(ScanRef(sub).participant_id) / f"sub-{sub}_sessions.tsv"


def sidecar(path: Path) -> Path:
    """The JSON sidecar of a ``.nii.gz``/``.tsv`` file."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv", ".mat", ".h5"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    raise ValueError(f"no sidecar rule for {path}")
