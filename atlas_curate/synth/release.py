"""Write a synthetic ATLAS release (R1.1 native ICPSR, R1.1 standard FCP-INDI, or R2.0 layout) and its truth.

The release folder looks like the real one (see docs/formats.md). Flavours:

* ``native``: scanner-space heads in posed, cohort-specific grids, MRIcron VOIs and NIfTI masks per lesion;
* ``standard``: defaced heads already on the template grid (no pose), one NIfTI mask per lesion;
* ``atlas2`` (R2.0): the same template-space rendering as ``standard`` (R2.0 scans are defaced and in
  MNI152NLin2009aSym), filed as ``ATLAS_2/{Training,Testing}/R00N/sub-r00Ns00M/ses-1/anat/``, one
  session per subject, ONE mask per scan (the union of the subject's smoothed lesion masks: R2.0 merges
  all lesions and ships no raw tracing). Every third subject (k mod 3 = 2) is a *testing* scan: its
  T1 is in ``Testing/`` and its mask goes only to the truth folder (``testing_masks/``), as the real
  test masks are hidden. A ``dataset_description.json`` is written per cohort folder; ``ATLAS_2/``
  also holds the metadata spreadsheet ``20220425_ATLAS_2.0_MetaData.xlsx`` (``Subject ID``, the five
  ``# Lesions …`` columns, and ``Scanner``, a column name invented here: only the ``Subject ID`` and
  ``# Lesions`` names are known from public code) and the template ``MNI152NLin2009aSym.nii.gz`` (the
  nilearn file, copied). Lesion counts of testing rows are blank (assumed hidden with the masks). No
  primary-override scan: R2.0 cannot express which lesion is primary.

The truth goes to a separate folder (default ``<OUT>-truth``) so that no converter can read it by accident:

* ``truth.json``: per scan the true native-world -> template-world affine (4x4, RAS mm), the grid,
  and per lesion (release order) volumes, hemisphere, location, territory; the injected faults;
* ``lesions.tsv``: the same lesions, one row each;
* ``masks/<scan>_space-MNI152NLin2009aSym_desc-lesions_dseg.nii.gz``: the lesions on the template grid;
* ``masks/<scan>_space-MNI152NLin2009aSym_desc-pathology_dseg.nii.gz``: what else the subject's brain shows
  (white-matter hyperintensities, perivascular spaces, atrophy, ex-vacuo ventricle; labels in
  :data:`atlas_curate.synth.pathology.LABELS`, none of them on a lesion voxel), when rendered with pathology;
* ``pathology.tsv``: per scan the subject's pathology (Fazekas grades, as rendered and as reported in the
  metadata, intensities, atrophy, counts, volumes on the template grid).

Pathology (``pathology=True``, ``synth --pathology``; off by default for now, see the README;
:mod:`atlas_curate.synth.pathology`) works in every flavour:
the subject's brain is rendered with atrophy, white-matter hyperintensities following its Fazekas grades (the
grades the metadata reports), perivascular spaces and ex-vacuo enlargement of the ventricle beside a large
lesion, and its lesions get a CSF-dark cavity and a grey-matter-like rim. ``pathology=False`` renders the clean
head model and the old lesion intensities.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import asdict, dataclass
from functools import partial
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .. import io, naming
from ..executor import run_map, summarize
from ..ids import Atlas2ScanId, IndiScanId, ScanId
from ..templates import get_template
from .head import head_model
from .pathology import LABELS, fazekas_grades
from .render import (
    COHORTS,
    Cohort,
    Subject,
    describe_lesions,
    make_subject,
    native_grid,
    pathology_dseg,
    random_pose,
    render,
    template_dseg,
)

log = logging.getLogger(__name__)

FLAVOURS = ("native", "standard", "atlas2", "bids")   # bids: see synth/bids.py
FAULT_KINDS = ("truncated_gzip", "mask_grid", "empty_mask", "folder_without_row", "row_without_folder")
STROKE_TYPES = ("Ischemic", "Embolic", "Hemorrhagic")
NOTES = ("", "", "", "Motion artefact in posterior slices", "Chronic infarct with encephalomalacia",
         "Old lacunes also present")


@dataclass(frozen=True)
class ScanPlan:
    flavour: str
    seed: int
    subject_index: int
    cohort: int
    subject_number: int
    timepoint: int
    n_lesions: int
    override: bool
    fault: str = ""
    part: str = ""          # atlas2 only: training | testing
    pathology: bool = False  # atrophy, WMH, perivascular spaces, ex vacuo, realistic cavities (synth.pathology)

    @property
    def scan_id(self) -> ScanId | IndiScanId | Atlas2ScanId:
        if self.flavour == "native":
            return ScanId(self.cohort, self.subject_number, self.timepoint)
        if self.flavour == "atlas2":
            return Atlas2ScanId(self.cohort, self.subject_number, self.timepoint)
        return IndiScanId(self.cohort, self.subject_number, self.timepoint)

    @property
    def key(self) -> str:
        return str(self.scan_id)


def _indi_number(index: int) -> int:
    return 31000 + 137 * index


def _subject_number(flavour: str, index: int) -> int:
    if flavour == "standard":
        return _indi_number(index)
    return index // len(COHORTS) + 1


def plan_release(subjects: int, seed: int, flavour: str = "native", faults: bool = False,
                 pathology: bool = False) -> list[ScanPlan]:
    """Which scans the release holds. Subject k goes to cohort k mod 4; in R1.1 flavours every third
    subject has a second time point and subject 1 carries the primary-is-not-largest override; in
    ``atlas2`` every subject has one session and every third subject (k mod 3 = 2) is a testing scan.
    Fault scans (``faults``) are training scans. ``pathology`` goes to every plan."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}")
    if flavour == "bids":
        raise ValueError("the bids flavour is planned by atlas_curate.synth.bids.plan_bids")
    if subjects < 1:
        raise ValueError("need at least one subject")
    plans = []
    for k in range(subjects):
        rng = np.random.default_rng([seed, k, 99])
        n = int(rng.choice([1, 2, 3, 4], p=[0.55, 0.2, 0.15, 0.1]))
        override = flavour != "atlas2" and (k == 1 or (subjects == 1 and k == 0))
        if override:
            n = max(n, 2)
        cohort = COHORTS[k % len(COHORTS)].number
        number = _subject_number(flavour, k)
        if flavour == "atlas2":
            part = "testing" if k % 3 == 2 else "training"
            plans.append(ScanPlan(flavour, seed, k, cohort, number, 1, n, False, part=part, pathology=pathology))
            continue
        timepoints = (1, 2) if k % 3 == 2 else (1,)
        plans += [ScanPlan(flavour, seed, k, cohort, number, t, n, override, pathology=pathology)
                  for t in timepoints]
    if faults:
        for j, kind in enumerate(FAULT_KINDS):
            k = 9000 + j + 1
            cohort = COHORTS[j % len(COHORTS)].number
            number = {"native": k, "standard": 999000 + j + 1, "atlas2": 990 + j + 1}[flavour]
            plans.append(ScanPlan(flavour, seed, k, cohort, number, 1, 1, False, kind,
                                  part="training" if flavour == "atlas2" else "", pathology=pathology))
    return plans


def _cohort(number: int) -> Cohort:
    return next(c for c in COHORTS if c.number == number)


def _to_dtype(image: np.ndarray, cohort: Cohort) -> np.ndarray:
    scaled = image * cohort.scale
    if cohort.dtype == "int16":
        return np.clip(np.round(scaled), 0, 32767).astype(np.int16)
    return scaled.astype(np.float32)


def _save(data: np.ndarray, affine: np.ndarray, path: Path, *, code: int = 1) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    io.save_nifti(img, path)


def _release_order(volumes: list[float], override: bool) -> list[int]:
    """Indices in release order: secondaries largest -> smallest by native smoothed volume; the primary
    is the largest too, unless ``override`` keeps the designated (smaller) lesion 0 first."""
    if override:
        return [0, *sorted(range(1, len(volumes)), key=lambda i: -volumes[i])]
    return sorted(range(len(volumes)), key=lambda i: -volumes[i])


def _template_mask_fault(mask: np.ndarray, affine: np.ndarray, fault: str) -> tuple[np.ndarray, np.ndarray]:
    """A template-space mask and its affine with the scan's fault: ``empty_mask`` empties it, ``mask_grid`` puts
    it on a grid of half the resolution (every second voxel, 2 mm voxels)."""
    if fault == "empty_mask":
        return np.zeros_like(mask), affine
    if fault == "mask_grid":
        coarse = affine.copy()
        coarse[:3, :3] *= 2
        return mask[::2, ::2, ::2], coarse
    return mask, affine


def _write_atlas2(plan: ScanPlan, data: np.ndarray, affine: np.ndarray, smooths: list[np.ndarray], out_dir: Path,
                  truth_dir: Path) -> Path:
    """An R2.0 scan: the T1 and ONE mask, the union of the lesions (R2.0 merges them). A testing scan's
    mask goes to the truth folder only. Returns the T1's path."""
    scan = plan.scan_id
    t1_path = out_dir / naming.atlas2_t1(scan, plan.part)
    _save(data, affine, t1_path, code=4)
    union = np.logical_or.reduce(smooths) if smooths else np.zeros(data.shape, bool)
    union, mask_affine = _template_mask_fault(union, affine, plan.fault)
    if plan.part == "testing":
        target = truth_dir / "testing_masks" / naming.atlas2_mask_name(scan)
    else:
        target = out_dir / naming.atlas2_mask(scan, plan.part)
    _save(union.astype(np.uint8), mask_affine, target, code=4)
    return t1_path


def render_scan(plan: ScanPlan, out: str, truth: str) -> dict:
    """Render one scan into the release folder and its truth mask into the truth folder."""
    out_dir, truth_dir = Path(out), Path(truth)
    if plan.fault == "row_without_folder":
        return {"scan": plan.key, "plan": asdict(plan), "lesions": [], "fault": plan.fault}
    model = head_model()
    cohort = _cohort(plan.cohort)
    subject = make_subject(plan.seed, plan.subject_index, plan.n_lesions, plan.override, model,
                           pathology=plan.pathology)
    rng = np.random.default_rng([plan.seed, plan.subject_index, plan.timepoint])
    scan = plan.scan_id
    template = get_template()
    if plan.flavour == "native":
        pose = random_pose(rng)
        shape, affine = native_grid(cohort, pose, model)
        rendered = render(subject, model, shape, affine, pose, rng, slice_thickness_mm=cohort.zooms[2])
        data = _to_dtype(rendered.image, cohort)
        if cohort.singleton_4d:
            data = data[..., None]
    else:
        pose = np.eye(4)
        shape, affine = template.shape, template.affine
        rendered = render(subject, model, shape, affine, pose, rng, noise=0.01, bias=False, face_mask=True)
        image = np.where(rendered.face, 0.0, rendered.image)
        data = (np.clip(image, 0, None) * 100.0).astype(np.float32)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    native_volumes = [float(m.sum()) * voxel_mm3 for m in rendered.smooth_masks]
    order = _release_order(native_volumes, subject.override)
    raws = [rendered.raw_masks[i] for i in order]
    smooths = [rendered.smooth_masks[i] for i in order]
    subject.lesions = [subject.lesions[i] for i in order]

    if plan.flavour == "native":
        _save(data, affine, out_dir / naming.native_t1(scan))
        for index, (raw, smooth) in enumerate(zip(raws, smooths)):
            if plan.fault == "empty_mask":
                raw, smooth = np.zeros_like(raw), np.zeros_like(smooth)
            mask_affine = affine
            if plan.fault == "mask_grid":
                raw, smooth = raw[:, :, 5:], smooth[:, :, 5:]
                mask_affine = affine.copy()
                mask_affine[:3, 3] += affine[:3, 2] * 5 + np.array([0.0, 3.0, 0.0])
            io.write_voi(raw, mask_affine, out_dir / naming.native_mask(scan, "Raw", index), flavour=cohort.voi)
            io.write_voi(smooth, mask_affine, out_dir / naming.native_mask(scan, "Smooth", index), flavour=cohort.voi)
            _save(smooth.astype(np.uint8), mask_affine, out_dir / naming.native_mask(scan, "Smooth", index, "nii.gz"),
                  code=2)
        t1_path = out_dir / naming.native_t1(scan)
    elif plan.flavour == "atlas2":
        t1_path = _write_atlas2(plan, data, affine, smooths, out_dir, truth_dir)
    else:
        _save(data, affine, out_dir / naming.standard_t1(scan), code=4)
        for index, smooth in enumerate(smooths):
            smooth, mask_affine = _template_mask_fault(smooth, affine, plan.fault)
            _save(smooth.astype(np.uint8), mask_affine, out_dir / naming.standard_mask(scan, index), code=4)
        t1_path = out_dir / naming.standard_t1(scan)
    if plan.fault == "truncated_gzip":
        blob = t1_path.read_bytes()
        io.write_bytes(blob[: len(blob) * 2 // 5], t1_path)

    dseg = template_dseg(subject)
    stem = f"{plan.key.replace('/', '_')}_space-{template.name}"
    io.save_nifti(nib.Nifti1Image(dseg, template.affine), truth_dir / "masks" / f"{stem}_desc-lesions_dseg.nii.gz")
    lesions = truth_lesions(dseg, len(subject.lesions), raws, smooths, voxel_mm3)
    pathology = truth_pathology(subject, plan.seed, plan.subject_index, truth_dir / "masks" / stem)
    return {
        "scan": plan.key,
        "plan": asdict(plan),
        "part": plan.part,
        "native_to_template_ras": np.round(pose, 8).tolist(),
        "shape": [int(s) for s in data.shape],
        "affine": np.round(affine, 6).tolist(),
        "zooms": [float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "dtype": str(data.dtype),
        "primary_override": bool(subject.override),
        "deformation": subject.params,
        "pathology": pathology,
        "lesions": lesions,
        "fault": plan.fault,
    }


def truth_pathology(subject: Subject, seed: int, subject_index: int, stem: Path) -> dict:
    """The truth record of the subject's pathology: the grades (as rendered, and as the metadata reports them:
    ``""`` when left blank), its parameters, the ex-vacuo pushes, and the volume (mm³, template grid) of every
    label of :data:`LABELS`. With pathology, also writes the labels to ``<stem>_desc-pathology_dseg.nii.gz``.
    Without, the record says so and holds the grades the metadata reports (they are then not rendered)."""
    pvh, dwmh = fazekas_grades(seed, subject_index)
    doc: dict = {"rendered": subject.pathology is not None, "reported_pvh": pvh, "reported_dwmh": dwmh}
    if subject.pathology is None:
        return doc
    labels = pathology_dseg(subject, head_model())
    template = get_template()
    io.save_nifti(nib.Nifti1Image(labels, template.affine), Path(f"{stem}_desc-pathology_dseg.nii.gz"))
    counts = np.bincount(labels.ravel(), minlength=max(LABELS) + 1)
    voxel_mm3 = float(abs(np.linalg.det(template.affine[:3, :3])))
    doc.update(subject.pathology.params.as_dict())
    doc["lesion_rim_levels"] = [round(float(les.rim_level), 4) for les in subject.lesions]
    doc["ex_vacuo"] = subject.pathology.ex_vacuo
    doc.update({f"{name}_mm3": round(float(counts[label]) * voxel_mm3, 1) for label, name in LABELS.items()})
    return doc


def write_pathology_table(records: list[dict], truth_dir: Path) -> Path:
    """``truth_dir/pathology.tsv``: one row per scan with its subject's pathology record (lists as text)."""
    rows = []
    for record in records:
        if "pathology" not in record:
            continue
        row = {"scan": record["scan"]}
        for key, value in record["pathology"].items():
            row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        rows.append(row)
    return io.write_text(pd.DataFrame(rows).to_csv(sep="\t", index=False), truth_dir / "pathology.tsv")


def truth_lesions(dseg: np.ndarray, n: int, raws: list[np.ndarray], smooths: list[np.ndarray],
                  voxel_mm3: float) -> list[dict]:
    """The truth record of each lesion (release order): template-space description and native volumes."""
    lesions = []
    for index, (desc, raw, smooth) in enumerate(zip(describe_lesions(dseg, n), raws, smooths)):
        lesions.append({
            "index": index,
            "role": "primary" if index == 0 else "secondary",
            "volume_mm3_native_smooth": round(float(smooth.sum()) * voxel_mm3, 3),
            "volume_mm3_native_raw": round(float(raw.sum()) * voxel_mm3, 3),
            "volume_mm3_template": desc.pop("volume_mm3"),
            **desc,
        })
    return lesions

def write_lesion_table(records: list[dict], truth_dir: Path) -> Path:
    """``truth_dir/lesions.tsv``: one row per lesion of every scan record (centroid split into x, y, z)."""
    rows = [{"scan": r["scan"], **{k: v for k, v in les.items() if k != "centroid_mm"},
             "centroid_x": les["centroid_mm"][0], "centroid_y": les["centroid_mm"][1],
             "centroid_z": les["centroid_mm"][2]}
            for r in records for les in r["lesions"]]
    return io.write_text(pd.DataFrame(rows).to_csv(sep="\t", index=False), truth_dir / "lesions.tsv")

ORPHAN_LESION = {"hemisphere": "Left", "location": "subcortical", "other_site": "", "territory": "MCA",
                 "volume_mm3_template": 1000.0}


def location_counts(lesions: list[dict]) -> dict[str, int]:
    """Lesions per hemisphere and class, as the data paper counts them: keys ``LH cortical``,
    ``LH subcortical``, ``RH cortical``, ``RH subcortical`` and ``other`` (brainstem, cerebellum). A
    bilateral lesion counts on the side of its centroid."""
    counts = {"LH cortical": 0, "LH subcortical": 0, "RH cortical": 0, "RH subcortical": 0, "other": 0}
    for les in lesions:
        if les["location"] == "other":
            counts["other"] += 1
            continue
        side = "LH" if les["hemisphere"] == "Left" else "RH" if les["hemisphere"] == "Right" else \
            ("LH" if les.get("centroid_mm", [0])[0] < 0 else "RH")
        counts[f"{side} {'cortical' if les['location'] == 'cortical' else 'subcortical'}"] += 1
    return counts


def metadata_row(record: dict) -> dict:
    """One R1.1 spreadsheet row with the real column names, consistent with the scan's lesions."""
    plan = record["plan"]
    rng = np.random.default_rng([plan["seed"], plan["subject_index"], 7])
    lesions = record["lesions"] or [ORPHAN_LESION]
    located = location_counts(lesions)
    other = located["other"]
    counts = {"LH Cortical": located["LH cortical"], "LH subcortical": located["LH subcortical"],
              "RH Cortical": located["RH cortical"], "RH subcortical": located["RH subcortical"]}
    primary = lesions[0]
    location = {"cortical": "Cortical", "subcortical": "Subcortical"}.get(primary["location"]) or \
        primary["other_site"].capitalize()
    stroke = "Hemorrhagic" if rng.random() < 0.1 else (
        "Lacunar" if primary["location"] == "subcortical" and primary["volume_mm3_template"] < 1500
        else str(rng.choice(STROKE_TYPES[:2])))
    notes = NOTES[int(rng.integers(len(NOTES)))]
    pvh, dwmh = fazekas_grades(plan["seed"], plan["subject_index"])   # the grades the subject is rendered with
    if record.get("primary_override"):
        notes = "Primary lesion designated by neuroradiologist; not the largest lesion"
    row = {f"# Strokes {k}": v for k, v in counts.items()}
    row.update({
        "Other Location": other,
        "Stroke type": stroke,
        "Primary Stroke Location": location,
        "Primary Stroke Location Hemisphere": primary["hemisphere"],
        "Vascular territory": primary["territory"],
        "PVH": pvh,
        "DWMH": dwmh,
        "Notes": notes,
    })
    return row


ATLAS2_COUNT_COLUMNS = {
    "LH cortical": "# Lesions LH Cortical and White Matter",
    "LH subcortical": "# Lesions LH Subcortical",
    "RH cortical": "# Lesions RH Cortical and White Matter",
    "RH subcortical": "# Lesions RH Subcortical",
    "other": "# Lesions Other Location",
}
ATLAS2_SCANNER_COLUMN = "Scanner"   # invented name: the real scanner column's header is not known here


def atlas2_metadata_row(record: dict) -> dict:
    """One R2.0 spreadsheet row: ``Subject ID`` (``r001s001``), the lesion counts (blank for a testing
    scan, whose lesions are hidden) and the cohort's scanner."""
    plan = record["plan"]
    lesions = record["lesions"] or [ORPHAN_LESION]
    counts = location_counts(lesions)
    hidden = plan["part"] == "testing"
    row = {"Subject ID": Atlas2ScanId(plan["cohort"], plan["subject_number"], plan["timepoint"]).subject_id}
    row.update({column: None if hidden else counts[key] for key, column in ATLAS2_COUNT_COLUMNS.items()})
    row[ATLAS2_SCANNER_COLUMN] = _cohort(plan["cohort"]).scanner
    return row


FIXED_TIMESTAMP = "2017-11-06T00:00:00Z"


def _deterministic_zip(blob: bytes) -> bytes:
    """An xlsx with fixed document timestamps and zip entry dates, so equal tables give equal bytes."""
    out = BytesIO()
    with zipfile.ZipFile(BytesIO(blob)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*", rb"\g<1>" + FIXED_TIMESTAMP.encode(),
                              data)
            entry = zipfile.ZipInfo(info.filename, date_time=(2017, 11, 6, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = info.external_attr
            dst.writestr(entry, data)
    return out.getvalue()


def write_metadata(records: list[dict], out_dir: Path, flavour: str) -> Path:
    rows = []
    for record in sorted(records, key=lambda r: r["scan"]):
        if record.get("fault") == "folder_without_row":
            continue
        plan = record["plan"]
        if flavour == "atlas2":
            rows.append(atlas2_metadata_row(record))
            continue
        row = metadata_row(record)
        if flavour == "native":
            rows.append({"Subject ID": record["scan"], **row})
        else:
            session = f"t{plan['timepoint']:02d}"
            if plan["subject_index"] % 5 == 3:
                session = f" {session}"  # stray whitespace, as in the real csv
            rows.append({"INDI Site ID": f"Site{plan['cohort']}", "INDI Subject ID": plan["subject_number"],
                         "Session": session, **row})
    table = pd.DataFrame(rows)
    if flavour in ("native", "atlas2"):
        path = out_dir / (naming.NATIVE_METADATA_NAME if flavour == "native"
                          else Path(naming.ATLAS2_ROOT) / naming.ATLAS2_METADATA_NAME)
        buffer = BytesIO()
        table.to_excel(buffer, index=False, sheet_name="Sheet1", engine="openpyxl")
        io.write_bytes(_deterministic_zip(buffer.getvalue()), path)
    else:
        path = out_dir / naming.STANDARD_ROOT / naming.STANDARD_METADATA_NAME
        io.write_text(table.to_csv(index=False), path)
    return path


def write_atlas2_extras(records: list[dict], out_dir: Path) -> None:
    """R2.0's per-cohort ``dataset_description.json`` and the template at ``ATLAS_2/``."""
    folders = sorted({(r["plan"]["part"], r["plan"]["cohort"]) for r in records
                      if r.get("fault") != "row_without_folder"})
    for part, cohort in folders:
        cohort_id = f"R{cohort:03d}"
        doc = {"Name": f"ATLAS R2.0 {naming.ATLAS2_PARTS[part]} {cohort_id} (synthetic)", "BIDSVersion": "1.6.0",
               "DatasetType": "raw"}
        io.write_text(json.dumps(doc, indent=2) + "\n",
                      out_dir / naming.ATLAS2_ROOT / naming.ATLAS2_PARTS[part] / cohort_id / "dataset_description.json")
    io.copy_file(get_template().t1w, out_dir / naming.ATLAS2_ROOT / naming.ATLAS2_TEMPLATE_NAME)


def default_truth_dir(out: Path) -> Path:
    out = Path(out).resolve()
    return out.parent / f"{out.name}-truth"


def prepare_folders(out: os.PathLike | str, truth: os.PathLike | str | None) -> tuple[Path, Path]:
    """The release and truth folders, created: the release folder must be new or empty, and the truth
    folder must lie outside it."""
    out_dir = Path(out).resolve()
    truth_dir = Path(truth).resolve() if truth else default_truth_dir(out_dir)
    if truth_dir == out_dir or out_dir in truth_dir.parents:
        raise ValueError(f"the truth folder must not be inside the release folder: {truth_dir}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder is not empty: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, truth_dir


def synthesize(out: os.PathLike | str, *, subjects: int = 8, seed: int = 0, flavour: str = "native",
               faults: bool = False, truth: os.PathLike | str | None = None, jobs: int = 1,
               progress: bool = True, layout: str = "atlas3", brain_extracted: bool | None = None,
               masks: str = "anat", pathology: bool = False) -> dict:
    """Write a synthetic release to ``out`` and its truth to ``truth`` (default ``<out>-truth``).

    Returns the truth dictionary. Output is a pure function of (subjects, seed, flavour, faults, pathology) and,
    for ``flavour="bids"``, of ``layout``, ``brain_extracted`` and ``masks`` (see :mod:`atlas_curate.synth.bids`).
    ``pathology`` renders atrophy, white-matter hyperintensities, perivascular spaces, ex-vacuo
    ventricles and realistic lesion cavities (:mod:`atlas_curate.synth.pathology`); ``False`` the clean anatomy.
    """
    if flavour == "bids":
        from .bids import synthesize_bids

        if faults:
            raise ValueError("the bids flavour has no fault scans (--faults works with native, standard, atlas2)")
        return synthesize_bids(out, subjects=subjects, seed=seed, layout=layout, brain_extracted=brain_extracted,
                               masks=masks, truth=truth, jobs=jobs, progress=progress, pathology=pathology)
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}")
    out_dir, truth_dir = prepare_folders(out, truth)
    plans = plan_release(subjects, seed, flavour, faults, pathology)
    outcomes = run_map(partial(render_scan, out=str(out_dir), truth=str(truth_dir)), plans,
                       key=lambda p: p.key, jobs=jobs, desc="synth", progress=progress)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("synthesis failed:\n" + summarize(outcomes))
    records = [o.value for o in outcomes]
    write_metadata(records, out_dir, flavour)
    if flavour == "atlas2":
        write_atlas2_extras(records, out_dir)
    truth_doc = {
        "generator": "atlas-curate synth",
        "flavour": flavour,
        "seed": seed,
        "subjects": subjects,
        "pathology": pathology,
        "template": get_template().name,
        "release": str(out_dir),
        "transform_convention": "native_to_template_ras maps native world RAS mm to template world RAS mm",
        "faults": {r["scan"]: r["fault"] for r in records if r.get("fault")},
        "scans": {r["scan"]: r for r in records if r.get("fault") != "row_without_folder"},
    }
    io.write_text(json.dumps(truth_doc, indent=1, sort_keys=True), truth_dir / "truth.json")
    write_lesion_table(records, truth_dir)
    write_pathology_table(records, truth_dir)
    return truth_doc
