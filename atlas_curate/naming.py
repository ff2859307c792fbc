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

import re
from dataclasses import dataclass
from pathlib import Path

from .ids import Atlas2ScanId, IndiScanId, ScanId

NATIVE_METADATA_NAME = "20171106_ATLAS_Meta-Data_Release_1.1_Updated.xlsx"
STANDARD_ROOT = "ATLAS_R1.1"
STANDARD_METADATA_NAME = "ATLAS_Meta-Data_Release_1.1_standard_mni.csv"
ATLAS2_ROOT = "ATLAS_2"
ATLAS2_PARTS = {"training": "Training", "testing": "Testing"}   # part -> folder
ATLAS2_METADATA_NAME = "20220425_ATLAS_2.0_MetaData.xlsx"
ATLAS2_TEMPLATE_NAME = "MNI152NLin2009aSym.nii.gz"
ATLAS2_SPACE = "MNI152NLin2009aSym"

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
LESION_DERIVATIVE = Path("derivatives") / "lesions"
PIPELINE_DERIVATIVE = Path("derivatives") / "atlas-curate"
STATE_DIR = Path(".atlas-curate")
BIDS_LABEL = re.compile(r"^[A-Za-z0-9]+$")


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
    folder = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "") / datatype
    return folder / bids_name(sub, ses, suffix, ext, **entities)


def sessions_table(sub: str) -> Path:
    return Path(f"sub-{sub}") / f"sub-{sub}_sessions.tsv"


def sidecar(path: Path) -> Path:
    """The JSON sidecar of a ``.nii.gz``/``.tsv`` file."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv", ".mat", ".h5"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    raise ValueError(f"no sidecar rule for {path}")
