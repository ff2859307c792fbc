"""``normalize``: BIDS T1w + lesion masks -> MNI152NLin2009aSym derivatives, QC table and HTML report.

Per scan: N4 bias correction, brain-aware affine registration (see ``register``), resampling onto the
template grid (T1 linear, lesion labels nearest neighbour), intensity standardisation (white-matter
peak inside the template brain, lesion excluded, mapped to 100), defacing and automatic QC.
Standard-space inputs skip registration after their grid is verified.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pandas as pd

from .. import __version__, io, naming
from ..executor import Skip, run_map
from ..qc_decisions import with_recorded
from ..templates import get_template, template_arrays
from . import qc
from .deface import deface
from .register import register, template_images, to_ants, wm_peak

SPACE = "MNI152NLin2009aSym"
WM_TARGET = 100.0
T1_NAME = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)_ses-(?P<ses>[A-Za-z0-9]+)_"
                     r"(?:space-(?P<space>[A-Za-z0-9]+)_)?T1w\.nii\.gz$")


@dataclass(frozen=True)
class NormJob:
    root: str
    subject: str
    session: str
    t1: str
    space: str            # orig | MNI152NLin2009aSym
    deface: bool = True
    overwrite: bool = False

    @property
    def key(self) -> str:
        return f"sub-{self.subject}_ses-{self.session}"


def find_inputs(root: Path, participant_labels: list[str] | None = None) -> list[tuple[str, str, str, str]]:
    """(subject, session, T1 path, space) of every T1 from bids-convert, native or template space."""
    found = []
    for path in sorted(root.glob("sub-*/ses-*/anat/*_T1w.nii.gz")):
        m = T1_NAME.match(path.name)
        if m and not m["space"]:
            found.append((m["sub"], m["ses"], str(path), "orig"))
    for path in sorted((root / naming.LESION_DERIVATIVE).glob("sub-*/ses-*/anat/*_T1w.nii.gz")):
        m = T1_NAME.match(path.name)
        if m and m["space"] == SPACE:
            found.append((m["sub"], m["ses"], str(path), SPACE))
    if participant_labels:
        wanted = {p.removeprefix("sub-") for p in participant_labels}
        unknown = sorted(wanted - {f[0] for f in found})
        if unknown:
            raise ValueError(f"{root}: no T1w image for participant label(s) {', '.join(unknown)}")
        found = [f for f in found if f[0] in wanted]
    return found


def output_paths(subject: str, session: str) -> dict[str, Path]:
    base = naming.PIPELINE_DERIVATIVE
    return {
        "t1": base / naming.bids_path(subject, session, "T1w", space=SPACE, desc="preproc"),
        "mask": base / naming.bids_path(subject, session, "mask", space=SPACE, label="L", desc="T1lesion"),
        "dseg": base / naming.bids_path(subject, session, "dseg", space=SPACE, desc="lesions"),
        "raw_mask": base / naming.bids_path(subject, session, "mask", space=SPACE, label="L", desc="T1lesionRaw"),
        "xfm": base / naming.bids_path(subject, session, "xfm", ".mat",
                                       **{"from": "T1w", "to": SPACE, "mode": "image"}),
        "figure": base / f"sub-{subject}" / "figures" / f"sub-{subject}_ses-{session}_desc-normalize_T1w.png",
    }


def lesion_inputs(root: Path, subject: str, session: str, space: str) -> dict[str, Path]:
    lesions = root / naming.LESION_DERIVATIVE
    return {
        "mask": lesions / naming.bids_path(subject, session, "mask", space=space, label="L", desc="T1lesion"),
        "dseg": lesions / naming.bids_path(subject, session, "dseg", space=space, desc="lesions"),
        "raw_mask": lesions / naming.bids_path(subject, session, "mask", space=space, label="L", desc="T1lesionRaw"),
    }


def _manifest(root: Path, key: str) -> Path:
    return root / naming.STATE_DIR / "normalize" / f"{key}.json"


def _fingerprint(paths: list[Path], options: dict) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps({"version": __version__, **options}, sort_keys=True).encode())
    for path in paths:
        stat = path.stat() if path.exists() else None
        digest.update(f"{path}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}".encode())
    return digest.hexdigest()


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


def _to_template(corrected, transform_file: str) -> tuple[np.ndarray, np.ndarray]:
    """The native image on the template grid (linear) and the template voxels its field of view covers."""
    fixed = template_images()["t1"]
    moved = ants.apply_transforms(fixed, corrected, [transform_file], interpolator="linear").numpy()
    ones = corrected.new_image_like(np.ones(corrected.shape, np.float32))
    coverage = ants.apply_transforms(fixed, ones, [transform_file], interpolator="nearestNeighbor").numpy() > 0.5
    return moved, coverage


def qc_of_transform(corrected, transform_file: str, affine_ras: np.ndarray,
                    lesion_img: nib.Nifti1Image | None = None) -> dict:
    """normalize's QC figures (``qc.metrics``) of the bias-corrected native T1 ``corrected`` (an ANTs image,
    ``Registration.corrected``) brought to the template with an ANTs affine ``transform_file`` whose
    native->template RAS matrix is ``affine_ras``: what ``qc.tsv`` would say of that transform. Used to
    calibrate the thresholds on correct and deliberately wrong transforms."""
    fixed = template_images()["t1"]
    arrays = template_arrays()
    brain = arrays["T1w"] > 0
    moved, coverage = _to_template(corrected, transform_file)
    lesion, native_mm3 = None, None
    if lesion_img is not None:
        lesion = ants.apply_transforms(fixed, to_ants(lesion_img), [transform_file],
                                       interpolator="nearestNeighbor").numpy() > 0.5
        native_mm3 = float((np.asanyarray(lesion_img.dataobj) > 0).sum()) * io.voxel_volume(lesion_img)
    keep = brain & (~lesion if lesion is not None else True)
    standard, _ = standardise(moved, keep)
    return qc.metrics(t1=standard, template=arrays["T1w"], brain=brain, lesion=lesion, affine_ras=affine_ras,
                      native_lesion_mm3=native_mm3, coverage=coverage, grid_affine=get_template().affine)


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    io.save_array(data, affine, path, dtype, xform_code=4)


def _json(doc: dict, path: Path) -> None:
    io.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", path)


def normalize_scan(job: NormJob) -> dict:
    """Normalise one scan; returns its QC row. Raises Skip when its outputs are current."""
    root = Path(job.root)
    outputs = output_paths(job.subject, job.session)
    inputs = lesion_inputs(root, job.subject, job.session, job.space)
    manifest = _manifest(root, job.key)
    fingerprint = _fingerprint([Path(job.t1), *inputs.values()], {"deface": job.deface, "space": job.space})
    if not job.overwrite and manifest.is_file():
        done = json.loads(manifest.read_text())
        if done.get("fingerprint") == fingerprint and all((root / p).is_file() for p in done["outputs"]):
            raise Skip("already normalised", value=done["qc"])

    tpl = get_template()
    arrays = template_arrays()
    brain = arrays["T1w"] > 0
    t1 = io.load_nifti(job.t1)
    lesion_img = io.load_nifti(inputs["mask"]) if inputs["mask"].is_file() else None
    native_lesion_mm3 = None
    if lesion_img is not None:
        native_lesion_mm3 = float((np.asanyarray(lesion_img.dataobj) > 0).sum()) * io.voxel_volume(lesion_img)
    written: list[Path] = []
    tmp = tempfile.mkdtemp(prefix="atlas-curate-norm-")
    try:
        fixed = template_images()["t1"]
        if job.space == SPACE:
            problem = io.grid_difference(nib.load(tpl.t1w), t1)
            if problem:
                raise io.InputError(job.t1, f"not on the {SPACE} grid: {problem}")
            affine_ras = np.eye(4)
            moved = np.asarray(t1.dataobj, dtype=np.float32)
            xfm_file = None
            coverage = np.ones(brain.shape, bool)
            warp = lambda img, interp: np.asanyarray(img.dataobj)  # noqa: E731 - already on the grid
        else:
            reg = register(t1, lesion_img, workdir=tmp)
            affine_ras, xfm_file = reg.affine_ras, reg.transform_file
            moved, coverage = _to_template(reg.corrected, xfm_file)

            def warp(img, interp):
                return ants.apply_transforms(fixed, to_ants(img), [xfm_file], interpolator=interp).numpy()

        lesion = None
        if lesion_img is not None:
            lesion = warp(lesion_img, "nearestNeighbor") > 0.5
        keep = brain & (~lesion if lesion is not None else True)
        standard, peak = standardise(moved, keep)
        defaced = deface(standard) if job.deface else standard

        _save(defaced, tpl.affine, root / outputs["t1"], np.float32)
        _json({"SkullStripped": False, "Defaced": job.deface,
               "Sources": [f"bids::{Path(job.t1).relative_to(root).as_posix()}"],
               "SpatialReference": SPACE, "IntensityScale": f"white-matter peak inside the template brain (lesion "
               f"excluded) mapped to {WM_TARGET:g}; 0 stays 0", "WhiteMatterPeakNative": peak,
               "Description": "N4 bias-corrected, affinely registered, intensity-standardised"
               + (", defaced" if job.deface else "")}, root / naming.sidecar(outputs["t1"]))
        written += [outputs["t1"], naming.sidecar(outputs["t1"])]
        if lesion is not None:
            _save(lesion, tpl.affine, root / outputs["mask"], np.uint8)
            _json({"Type": "Lesion", "Sources": [f"bids::{inputs['mask'].relative_to(root).as_posix()}"],
                   "Resampling": "nearest neighbour"}, root / naming.sidecar(outputs["mask"]))
            written += [outputs["mask"], naming.sidecar(outputs["mask"])]
            for key in ("dseg", "raw_mask"):
                if inputs[key].is_file():
                    labels = warp(io.load_nifti(inputs[key]), "nearestNeighbor")
                    _save(np.rint(labels), tpl.affine, root / outputs[key], np.uint8)
                    _json({"Sources": [f"bids::{inputs[key].relative_to(root).as_posix()}"],
                           "Resampling": "nearest neighbour"}, root / naming.sidecar(outputs[key]))
                    written += [outputs[key], naming.sidecar(outputs[key])]
        if xfm_file is not None:
            io.copy_file(xfm_file, root / outputs["xfm"])
            _json({"AffineRAS": np.round(affine_ras, 8).tolist(), "FromSpace": "T1w", "ToSpace": SPACE,
                   "Convention": "AffineRAS maps native world RAS mm to template world RAS mm; the .mat is an ANTs "
                   "affine (maps template points to native points, LPS), usable with antsApplyTransforms",
                   "Sources": [f"bids::{Path(job.t1).relative_to(root).as_posix()}"]},
                  root / naming.sidecar(outputs["xfm"]))
            written += [outputs["xfm"], naming.sidecar(outputs["xfm"])]

        values = qc.metrics(t1=standard, template=arrays["T1w"], brain=brain, lesion=lesion, affine_ras=affine_ras,
                            native_lesion_mm3=native_lesion_mm3, coverage=coverage, grid_affine=tpl.affine)
        passed, reasons = qc.verdict(values)
        from .report import scan_figure

        scan_figure(standard, defaced, arrays["T1w"], brain, lesion, root / outputs["figure"],
                    title=f"{job.key}: {'PASS' if passed else 'FAIL ' + '; '.join(reasons)}")
        written.append(outputs["figure"])
        row = {"scan": job.key, "participant_id": f"sub-{job.subject}", "session_id": f"ses-{job.session}",
               "space_in": job.space, "qc_pass": passed, "qc_reasons": "; ".join(reasons),
               **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in values.items()},
               "figure": outputs["figure"].relative_to(naming.PIPELINE_DERIVATIVE).as_posix()}
        _json({"fingerprint": fingerprint, "outputs": [p.as_posix() for p in written], "qc": row}, manifest)
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


QC_COLUMNS = ["scan", "participant_id", "session_id", "space_in", "status", "qc_pass", "qc_reasons", "ncc_brain",
              "alignment_gain",
              "brain_coverage", "scale_min", "scale_max", "shear", "determinant", "lesion_mm3_native",
              "lesion_mm3_template", "lesion_volume_ratio", "lesion_outside_brain", "figure", "error"]


def _dataset_description(out: Path) -> None:
    _json({"Name": "atlas-curate normalize", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
           "GeneratedBy": [{"Name": "atlas-curate", "Version": __version__,
                            "Description": "N4, brain-aware affine registration to MNI152NLin2009aSym, intensity "
                                           "standardisation, defacing, QC"}],
           "SourceDatasets": [{"URL": "bids:raw:"}], "DatasetLinks": {"raw": "../../"}},
          out / "dataset_description.json")
    io.write_text("atlas-curate normalize outputs: template-space T1w, lesion masks, transforms, qc.tsv, report.html\n",
                  out / "README")
    io.write_text("qc.tsv\nreport.html\n**/figures\noverlap\nsplit.tsv\nsplit.json\n", out / ".bidsignore")


def _earlier_rows(path: Path, *, done: set[str], present: set[str]) -> pd.DataFrame:
    """Rows of an earlier ``qc.tsv`` for scans this run did not touch (``--participant-label``) whose input
    is still there, so that the table keeps covering the dataset and a QC failure is never forgotten. (The
    rater's ``human_*`` columns of every scan still there are carried over by ``with_recorded``.)"""
    if not path.is_file():
        return pd.DataFrame(columns=QC_COLUMNS)
    earlier = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
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


def normalize(bids_root: os.PathLike | str, *, template: str = "mni2009", participant_labels: list[str] | None = None,
              jobs: int = 1, executor: str = "local", scheduler: str | None = None, deface: bool = True,
              overwrite: bool = False, progress: bool = True) -> NormalizeResult:
    """Normalise every T1 of a bids-convert output to the template; see the module docstring."""
    if get_template(template).name != SPACE:
        raise ValueError(f"only {SPACE} is supported (template {template!r})")
    root = Path(bids_root).resolve()
    found = find_inputs(root, participant_labels)
    if not found:
        raise FileNotFoundError(f"{root}: no T1w images from bids-convert found")
    job_list = [NormJob(str(root), sub, ses, t1, space, deface, overwrite) for sub, ses, t1, space in found]
    outcomes = run_map(normalize_scan, job_list, key=lambda j: j.key, jobs=jobs, executor=executor,
                       scheduler=scheduler, desc="normalize", progress=progress)
    rows = []
    for job, outcome in zip(job_list, outcomes):
        if outcome.value is not None:
            row = {**outcome.value, "status": "ok"}  # the same table whether this run redid the scan or not
        else:
            row = {"scan": job.key, "participant_id": f"sub-{job.subject}", "session_id": f"ses-{job.session}",
                   "space_in": job.space, "status": "failed", "qc_pass": False, "error": outcome.reason}
        rows.append(row)
    out = root / naming.PIPELINE_DERIVATIVE
    _dataset_description(out)
    earlier = _earlier_rows(out / "qc.tsv", done={row["scan"] for row in rows},
                            present={f"sub-{sub}_ses-{ses}" for sub, ses, _, _ in find_inputs(root)})
    table = pd.DataFrame(rows).reindex(columns=QC_COLUMNS)
    if len(earlier):
        table = pd.concat([table, earlier.reindex(columns=QC_COLUMNS)], ignore_index=True)
    table = table.sort_values("scan", kind="stable", ignore_index=True)
    table = with_recorded(table, out / "qc.tsv")   # a rater's decisions (qc-apply) stay with their scans
    io.write_text(table.to_csv(sep="\t", index=False, na_rep="n/a"), out / "qc.tsv")
    from .report import write_report

    report = write_report(table, out)
    from ..index import refresh_index
    refresh_index(root)
    return NormalizeResult(out, table, report, sum(o.status == "skipped" for o in outcomes))
