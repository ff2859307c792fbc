"""``normalize``: BIDS T1w + lesion masks -> template-space derivatives, QC table and HTML report.

Per scan: N4 bias correction, brain-aware affine registration (see ``register``), resampling onto the
template grid (T1 linear, lesion labels nearest neighbour), intensity standardisation (white-matter
peak inside the template brain, lesion excluded, mapped to 100), defacing and automatic QC.
Standard-space inputs skip registration after their grid is verified.

Brain-extracted inputs (the T1w sidecar says ``"SkullStripped": true``; bids-convert records it) are registered
brain-to-brain without the head stage (``register_brain``) and not defaced (there is no face to remove); the
output sidecar says ``"Defaced": false`` and why (``DefacingSkipped``). QC and report are the same.

A scan is computed in memory (:func:`compute_scan` -> :class:`ScanResult`) and then written by one writer
driven by the naming spec (:func:`write_scan`: each output where ``metadata/outputs.json`` puts it, with the
spec's dtype and sidecar fields, and the scan's manifest record last).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import ants
import numpy as np
import pandas as pd

from .. import io, naming, tables
from ..executor import run_map
from ..qc_decisions import with_recorded
from ..templates import template_arrays, template_grid
from . import qc
from .deface import deface
from .register import register, register_brain, template_images, to_ants, wm_peak

STAGE = "normalize"
SPACE = naming.SPACE
WM_TARGET = 100.0
T1_SOURCES = ((naming.NATIVE_SPACE, "t1w"), (SPACE, "standard_t1w"))   # (space, naming-spec key) of the inputs
T1_GLOBS = ("sub-*/ses-*/anat/*_T1w.nii.gz", "sub-*/anat/*_T1w.nii.gz")
LESION_OUTPUTS = {"lesion_mask": "norm_mask", "lesion_dseg": "norm_dseg", "raw_mask": "norm_raw_mask"}
NO_FACE = "brain-extracted input: no face to remove"


class T1Input(NamedTuple):
    """One T1w to normalise: its scan, its path and its space (``orig`` or the template space)."""

    scan: naming.ScanRef
    t1: str
    space: str


@dataclass(frozen=True)
class NormJob:
    root: str
    scan: naming.ScanRef
    t1: str
    space: str            # orig | the template space
    deface: bool = True
    overwrite: bool = False

    @property
    def key(self) -> str:
        return self.scan.key


def _dataset_folder(root: Path, output: str) -> Path:
    return root / naming.spec()["datasets"][naming.output_spec(output)["dataset"]]


def find_inputs(root: Path, participant_labels: list[str] | None = None) -> list[T1Input]:
    """Every T1 from bids-convert, native (the raw dataset) or template space (the lesion derivative): each file
    named as the naming spec names the scan's ``t1w`` / ``standard_t1w``, with or without a session."""
    found = []
    for space, output in T1_SOURCES:
        folder = _dataset_folder(root, output)
        for path in sorted(p for pattern in T1_GLOBS for p in folder.glob(pattern)):
            scan = naming.ScanRef.from_name(path.name)
            if scan is not None and root / scan.path(output, space=space) == path:
                found.append(T1Input(scan, str(path), space))
    if participant_labels:
        wanted = {p.removeprefix("sub-") for p in participant_labels}
        unknown = sorted(wanted - {f.scan.sub for f in found})
        if unknown:
            raise ValueError(f"{root}: no T1w image for participant label(s) {', '.join(unknown)}")
        found = [f for f in found if f.scan.sub in wanted]
    return found


def skull_stripped(t1: os.PathLike | str) -> bool:
    """Whether the T1w at ``t1`` is brain-extracted: its JSON sidecar's ``SkullStripped`` (``false`` when the
    sidecar or the field is absent). A sidecar that is not JSON, or a field that is not a boolean, is an
    ``io.InputError`` naming the sidecar."""
    path = naming.sidecar(Path(t1))
    if not path.is_file():
        return False
    try:
        doc = tables.read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise io.InputError(path, f"unreadable JSON sidecar ({exc})") from exc
    value = doc.get("SkullStripped", False) if isinstance(doc, dict) else None
    if not isinstance(value, bool):
        raise io.InputError(path, f"SkullStripped must be true or false, not {json.dumps(value)}")
    return value


def lesion_inputs(root: Path, scan: naming.ScanRef, space: str) -> dict[str, Path]:
    """The lesion derivative's masks of ``scan`` in ``space`` (naming-spec key -> path; they may not exist)."""
    return {key: root / scan.path(key, space=space) for key in LESION_OUTPUTS}


# --- compute ---------------------------------------------------------------------------------------------

def standardise(image: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, float]:
    """The intensity scale of normalize's outputs: the white-matter peak (:func:`wm_peak`) of the positive
    voxels in ``keep`` (template brain, lesion excluded) → ``WM_TARGET``, negatives → 0. Returns the
    standardised float32 image and the peak."""
    image = np.asarray(image, dtype=np.float32)
    values = image[keep & (image > 0)]
    if values.size == 0:
        raise ValueError("no positive intensities inside the template brain")
    peak = wm_peak(values)
    if not peak > 0:
        raise ValueError("white-matter peak is not positive")
    return np.clip(image / peak * WM_TARGET, 0, None).astype(np.float32), peak


def _keep(lesion: np.ndarray | None) -> np.ndarray:
    """The voxels the white-matter peak is taken from: the template brain without the lesion."""
    brain = template_grid().brain
    return brain & ~lesion if lesion is not None else brain


def to_template(corrected, transform_file: str, lesion: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """The bias-corrected native T1 ``corrected`` (an ANTs image) on the template grid (linear, through the ANTs
    affine ``transform_file``) and standardised (:func:`standardise`, the template-grid ``lesion`` left out):
    ``(standardised image, template voxels its field of view covers, white-matter peak)``."""
    fixed = template_images()["t1"]
    moved = ants.apply_transforms(fixed, corrected, [transform_file], interpolator="linear").numpy()
    ones = corrected.new_image_like(np.ones(corrected.shape, np.float32))
    coverage = ants.apply_transforms(fixed, ones, [transform_file], interpolator="nearestNeighbor").numpy() > 0.5
    standard, peak = standardise(moved, _keep(lesion))
    return standard, coverage, peak


def warp_labels(img, transform_file: str | None) -> np.ndarray:
    """A label image on the template grid (nearest neighbour); ``transform_file`` None: already on it."""
    if transform_file is None:
        return np.asanyarray(img.dataobj)
    return ants.apply_transforms(template_images()["t1"], to_ants(img), [transform_file],
                                 interpolator="nearestNeighbor").numpy()


def _qc(standard: np.ndarray, lesion: np.ndarray | None, lesion_img, affine_ras: np.ndarray,
        coverage: np.ndarray) -> dict:
    grid = template_grid()
    native_mm3 = None
    if lesion_img is not None:
        native_mm3 = float((np.asanyarray(lesion_img.dataobj) > 0).sum()) * io.voxel_volume(lesion_img)
    return qc.metrics(t1=standard, template=template_arrays()["T1w"], brain=grid.brain, lesion=lesion,
                      affine_ras=affine_ras, native_lesion_mm3=native_mm3, coverage=coverage, grid_affine=grid.affine)


def qc_of_transform(corrected, transform_file: str, affine_ras: np.ndarray, lesion_img=None) -> dict:
    """normalize's QC figures (``qc.metrics``) of the bias-corrected native T1 ``corrected`` (an ANTs image,
    ``Registration.corrected``) brought to the template with an ANTs affine ``transform_file`` whose
    native->template RAS matrix is ``affine_ras``: what ``qc.tsv`` would say of that transform. Used to
    calibrate the thresholds on correct and deliberately wrong transforms."""
    lesion = warp_labels(lesion_img, transform_file) > 0.5 if lesion_img is not None else None
    standard, coverage, _ = to_template(corrected, transform_file, lesion)
    return _qc(standard, lesion, lesion_img, affine_ras, coverage)


@dataclass(frozen=True)
class Output:
    """One file of a scan: an array for the template grid (saved with the naming spec's dtype) or the file's
    bytes, and the per-scan fields of its JSON sidecar (``None``: no sidecar)."""

    data: np.ndarray | bytes
    sidecar: dict | None = None


@dataclass(frozen=True, kw_only=True)
class ScanResult:
    """What :func:`compute_scan` makes of one scan, for :func:`write_scan`. Every field named after a naming-spec
    output holds that output (``None``: not made for this scan), written in field order; adding an output is
    one spec entry and one field here."""

    scan: naming.ScanRef
    row: dict                     # the scan's qc.tsv row (QC values and verdict)
    preproc_t1w: Output
    norm_mask: Output | None = None
    norm_dseg: Output | None = None
    norm_raw_mask: Output | None = None
    xfm: Output | None = None
    figure: Output | None = None

    def outputs(self) -> list[tuple[str, Output]]:
        """``(naming-spec key, output)`` of every output this scan has, in field order."""
        return [(key, getattr(self, key)) for key in OUTPUTS if getattr(self, key) is not None]


#: The naming-spec keys of normalize's per-scan outputs: the fields of :class:`ScanResult` named after one.
OUTPUTS = tuple(f.name for f in dataclasses.fields(ScanResult) if f.name in naming.spec()["outputs"])


def output_paths(scan: naming.ScanRef) -> dict[str, Path]:
    """Where normalize writes each output of ``scan`` (naming-spec key -> path relative to the BIDS root)."""
    return {key: scan.path(key, space=SPACE) for key in OUTPUTS}


def _scan_columns(job: NormJob) -> dict:
    return {"scan": job.key, "participant_id": job.scan.participant_id, "session_id": job.scan.session_id,
            "space_in": job.space}


def compute_scan(job: NormJob) -> ScanResult:
    """Normalise one scan in memory (see the module docstring); writes nothing in the dataset."""
    root = Path(job.root)
    grid = template_grid()
    inputs = {key: path for key, path in lesion_inputs(root, job.scan, job.space).items() if path.is_file()}
    stripped = skull_stripped(job.t1)
    t1 = io.load_nifti(job.t1)
    lesion_img = io.load_nifti(inputs["lesion_mask"]) if "lesion_mask" in inputs else None
    with tempfile.TemporaryDirectory(prefix="atlas-curate-norm-", ignore_cleanup_errors=True) as tmp:
        if job.space == SPACE:
            grid.check(t1, job.t1)
            affine_ras, transform, corrected = np.eye(4), None, None
        elif stripped:
            try:
                reg = register_brain(t1, lesion_img, workdir=tmp)
            except ValueError as exc:
                raise io.InputError(job.t1, str(exc)) from exc
            affine_ras, transform, corrected = reg.affine_ras, reg.transform_file, reg.corrected
        else:
            reg = register(t1, lesion_img, workdir=tmp)
            affine_ras, transform, corrected = reg.affine_ras, reg.transform_file, reg.corrected
        labels = {}
        if lesion_img is not None:
            labels["lesion_mask"] = warp_labels(lesion_img, transform) > 0.5
            for key in ("lesion_dseg", "raw_mask"):
                if key in inputs:
                    labels[key] = np.rint(warp_labels(io.load_nifti(inputs[key]), transform))
        lesion = labels.get("lesion_mask")
        if transform is None:
            standard, peak = standardise(np.asarray(t1.dataobj, dtype=np.float32), _keep(lesion))
            coverage, xfm = np.ones(grid.shape, bool), None
        else:
            standard, coverage, peak = to_template(corrected, transform, lesion)
            xfm = Path(transform).read_bytes()
    defacing = job.deface and not stripped
    defaced = deface(standard) if defacing else standard
    values = _qc(standard, lesion, lesion_img, affine_ras, coverage)
    passed, reasons = qc.verdict(values)
    from .report import scan_figure

    def sources(path) -> list[str]:
        return [f"bids::{Path(path).relative_to(root).as_posix()}"]

    row = {**_scan_columns(job), "qc_pass": passed, "qc_reasons": "; ".join(reasons),
           **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in values.items()},
           "figure": output_paths(job.scan)["figure"].relative_to(naming.PIPELINE_DERIVATIVE).as_posix()}
    t1_fields = {"Defaced": defacing, "Sources": sources(job.t1), "SpatialReference": SPACE,
                 "IntensityScale": f"white-matter peak inside the template brain (lesion excluded) mapped to "
                                   f"{WM_TARGET:g}; 0 stays 0", "WhiteMatterPeakNative": peak,
                 "Description": "N4 bias-corrected, affinely registered, intensity-standardised"
                                + (", defaced" if defacing else "")}
    if stripped:
        t1_fields.update({"SkullStripped": True, "DefacingSkipped": NO_FACE,
                          "Description": t1_fields["Description"]
                          + (" (brain-extracted input, registered brain to brain)" if transform else
                             " (brain-extracted input)")})
    xfm_fields = {"AffineRAS": np.round(affine_ras, 8).tolist(), "Sources": sources(job.t1),
                  "Convention": "AffineRAS maps native world RAS mm to template world RAS mm; the .mat is an ANTs "
                                "affine (maps template points to native points, LPS), usable with antsApplyTransforms"}
    figure = scan_figure(standard, defaced, grid.brain, lesion,
                         title=f"{job.key}: {'PASS' if passed else 'FAIL ' + '; '.join(reasons)}")
    return ScanResult(scan=job.scan, row=row, preproc_t1w=Output(defaced, t1_fields),
                      xfm=Output(xfm, xfm_fields) if xfm is not None else None, figure=Output(figure),
                      **{LESION_OUTPUTS[key]: Output(data, {"Sources": sources(inputs[key])})
                         for key, data in labels.items()})


# --- write -----------------------------------------------------------------------------------------------

def _save(data: np.ndarray, path: Path, dtype) -> None:
    io.save_nifti(template_grid().image(data, dtype), path)


def write_scan(root: Path, result: ScanResult, manifest: tables.Manifest, digest: str) -> dict:
    """Write every output ``result`` holds where the naming spec puts it (an array on the template grid with the
    spec's dtype, or bytes), each with its sidecar (the spec's fields and the scan's), then the manifest
    record last: a crash before it leaves the scan to be redone. Returns the scan's QC row."""
    written: list[Path] = []
    paths = output_paths(result.scan)
    for key, output in result.outputs():
        path = paths[key]
        if isinstance(output.data, bytes):
            io.write_bytes(output.data, root / path)
        else:
            _save(output.data, root / path, naming.output_spec(key)["dtype"])
        written.append(path)
        if output.sidecar is not None:
            tables.write_json(naming.output_sidecar(key, space=SPACE, **output.sidecar), root / naming.sidecar(path))
            written.append(naming.sidecar(path))
    manifest.record(digest, written, qc=result.row)
    return result.row


def normalize_scan(job: NormJob) -> dict:
    """Normalise one scan; returns its QC row. Raises Skip when its outputs are current."""
    root = Path(job.root)
    params = {"deface": job.deface, "space": job.space}
    if skull_stripped(job.t1):   # (only then: the digests of whole-head scans stay what they were)
        params["skull_stripped"] = True
    digest = tables.fingerprint([Path(job.t1), *lesion_inputs(root, job.scan, job.space).values()], params)
    manifest = tables.Manifest(root, STAGE, job.key)
    manifest.skip_if_current(digest, "already normalised", "qc", overwrite=job.overwrite)
    return write_scan(root, compute_scan(job), manifest, digest)


QC_COLUMNS = ["scan", "participant_id", "session_id", "space_in", "status", "qc_pass", "qc_reasons", "ncc_brain",
              "alignment_gain",
              "brain_coverage", "scale_min", "scale_max", "shear", "determinant", "lesion_mm3_native",
              "lesion_mm3_template", "lesion_volume_ratio", "lesion_outside_brain", "figure", "error"]


def _write_dataset_files(out: Path) -> None:
    tables.write_dataset_description(out, "atlas-curate normalize",
                                     description=f"N4, brain-aware affine registration to {SPACE}, intensity "
                                                 "standardisation, defacing, QC")
    io.write_text("atlas-curate normalize outputs: template-space T1w, lesion masks, transforms, qc.tsv, report.html\n",
                  out / "README")
    io.write_text("qc.tsv\nreport.html\n**/figures\noverlap\nsplit.tsv\nsplit.json\n", out / ".bidsignore")


def _earlier_rows(path: Path, *, done: set[str], present: set[str]) -> pd.DataFrame:
    """Rows of an earlier ``qc.tsv`` for scans this run did not touch (``--participant-label``) whose input
    is still there, so that the table keeps covering the dataset and a QC failure is never forgotten. (The
    rater's ``human_*`` columns of every scan still there are carried over by ``with_recorded``.)"""
    if not path.is_file():
        return pd.DataFrame(columns=QC_COLUMNS)
    earlier = tables.read_tsv(path, typed=True)
    return earlier[~earlier["scan"].isin(done) & earlier["scan"].isin(present)]


@dataclass
class NormalizeResult:
    output: Path
    qc: pd.DataFrame
    report: Path
    skipped: int = 0

    @property
    def n_failed(self) -> int:
        return int((self.qc["status"] == "failed").sum())


def normalize(bids_root: os.PathLike | str, *, participant_labels: list[str] | None = None, jobs: int = 1,
              executor: str = "local", scheduler: str | None = None, deface: bool = True, overwrite: bool = False,
              progress: bool = True) -> NormalizeResult:
    """Normalise every T1 of a bids-convert output to the template; see the module docstring."""
    root = Path(bids_root).resolve()
    found = find_inputs(root, participant_labels)
    if not found:
        raise FileNotFoundError(f"{root}: no T1w images from bids-convert found")
    job_list = [NormJob(str(root), scan, t1, space, deface, overwrite) for scan, t1, space in found]
    outcomes = run_map(normalize_scan, job_list, key=lambda j: j.key, jobs=jobs, executor=executor,
                       scheduler=scheduler, desc="normalize", progress=progress)
    rows = []
    for job, outcome in zip(job_list, outcomes):
        if outcome.value is not None:
            row = {**outcome.value, "status": "ok"}  # the same table whether this run redid the scan or not
        else:
            row = {**_scan_columns(job), "status": "failed", "qc_pass": False, "error": outcome.reason}
        rows.append(row)
    out = root / naming.PIPELINE_DERIVATIVE
    _write_dataset_files(out)
    earlier = _earlier_rows(out / "qc.tsv", done={row["scan"] for row in rows},
                            present={t1.scan.key for t1 in find_inputs(root)})
    table = pd.DataFrame(rows).reindex(columns=QC_COLUMNS)
    if len(earlier):
        table = pd.concat([table, earlier.reindex(columns=QC_COLUMNS)], ignore_index=True)
    table = table.sort_values("scan", kind="stable", ignore_index=True)
    table = with_recorded(table, out / "qc.tsv")   # a rater's decisions (qc-apply) stay with their scans
    tables.write_tsv(table, out / "qc.tsv")
    from .report import write_report

    report = write_report(table, out)
    from ..index import refresh_index
    refresh_index(root)
    return NormalizeResult(out, table, report, sum(o.status == "skipped" for o in outcomes))
