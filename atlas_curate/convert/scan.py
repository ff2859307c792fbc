"""Convert one scan: T1 into the BIDS dataset, lesion tracings into the lesion derivative.

Pure function of its job (paths in, files out, a report row back), so it runs unchanged in a
process pool or on a Dask worker, and is skipped when its manifest says it is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .. import __version__, io, naming
from ..executor import Skip
from .discover import SourceScan

TEMPLATE_SPACE = "MNI152NLin2009aSym"
MASK_PREFERENCE = ("nii.gz", "nii", "voi")
MAX_LABEL = 255   # label images are uint8
# (union mask, dseg) sidecar descriptions: per-lesion release files (R1.1) or one merged mask (R2.0)
MASK_DESCRIPTIONS = {
    False: ("Union of the release's smoothed lesion masks (hand tracings smoothed with a 2 mm FWHM Gaussian, "
            "thresholded at 0.5)",
            "Lesion identity: 1 = primary lesion, 2.. = secondary lesions in release order (largest to smallest)"),
    True: ("The release's lesion mask (one mask per scan, all lesions merged), binarised with > 0",
           "Lesion identity DERIVED from the release's merged mask, not given by the release: the 26-connected "
           "components, 1 = the largest (taken as primary), 2.. in decreasing size"),
}
DSEG_COLUMNS = {
    "volume_mm3": {"Description": "Lesion volume in the T1w's native space", "Units": "mm^3"},
    "source_file": {"Description": "Release file the label was decoded from (relative to the release root)"},
}


@dataclass(frozen=True)
class ScanJob:
    scan: SourceScan
    source_root: str
    output: str
    release: str          # R1.1-native | R1.1-standard
    overwrite: bool = False


def scan_outputs(scan: SourceScan) -> dict[str, Path]:
    """Output paths (relative to the BIDS root) of one scan; one function owns the naming."""
    sub, ses = scan.subject, scan.session
    lesions = naming.LESION_DERIVATIVE
    space = "orig" if scan.flavour == "native" else TEMPLATE_SPACE
    out = {
        "mask": lesions / naming.bids_path(sub, ses, "mask", space=space, label="L", desc="T1lesion"),
        "dseg": lesions / naming.bids_path(sub, ses, "dseg", space=space, desc="lesions"),
        "dseg_tsv": lesions / naming.bids_path(sub, ses, "dseg", ".tsv", space=space, desc="lesions"),
        "raw_mask": lesions / naming.bids_path(sub, ses, "mask", space=space, label="L", desc="T1lesionRaw"),
        "raw_dseg": lesions / naming.bids_path(sub, ses, "dseg", space=space, desc="lesionsRaw"),
        "raw_dseg_tsv": lesions / naming.bids_path(sub, ses, "dseg", ".tsv", space=space, desc="lesionsRaw"),
    }
    if scan.flavour == "native":
        out["t1"] = naming.bids_path(sub, ses, "T1w")
    else:
        out["t1"] = lesions / naming.bids_path(sub, ses, "T1w", space=TEMPLATE_SPACE)
    return out


def manifest_path(output: Path, scan: SourceScan) -> Path:
    return output / naming.STATE_DIR / "convert" / f"sub-{scan.subject}_ses-{scan.session}.json"


def _fingerprint(scan: SourceScan) -> str:
    files = [scan.t1 or ""] + [p for table in (scan.smooth, scan.raw) for d in table.values() for p in d.values()]
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(files):
        stat = os.stat(path) if path else None
        digest.update(f"{path}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}".encode())
    return digest.hexdigest()


def _bids_uri(path: Path) -> str:
    return f"bids:raw:{path.as_posix()}"


def _read_masks(files: dict[int, dict[str, str]], t1: nib.Nifti1Image, kind: str, checks: list[str],
                fatal: list[str], rel) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Read each lesion's mask (preferring NIfTI over VOI), checking grid, binarity and emptiness."""
    masks, sources = {}, {}
    for index in sorted(files):
        exts = files[index]
        label = "T1lesion_mask" if kind == "merged" else f"Lesion{kind}" + (f"_{index}" if index else "")
        ext = next(e for e in MASK_PREFERENCE if e in exts)
        try:
            mask, values, img = io.read_mask_values(exts[ext])
        except io.InputError as exc:
            fatal.append(f"unreadable_mask: {label}: {exc.reason}")
            continue
        problem = io.grid_difference(t1, img)
        if problem:
            fatal.append(f"mask_grid: {label}.{ext}: {problem} (T1 and mask disagree; masks not written)")
            continue
        if len(values) > 1 or np.any(values < 0):
            checks.append(f"not_binary: {label}.{ext} has values {np.asarray(values)[:6].tolist()}; "
                          "binarised with > 0")
        if not mask.any():
            fatal.append(f"empty_mask: {label}.{ext} has no voxel set")
            continue
        for other_ext in exts:
            if other_ext != ext and other_ext in MASK_PREFERENCE:
                try:
                    other, _ = io.read_mask(exts[other_ext])
                    if other.shape != mask.shape or np.any(other != mask):
                        checks.append(f"voi_nifti_differ: {label}.{other_ext} differs from {label}.{ext}")
                except io.InputError as exc:
                    checks.append(f"unreadable_mask: {label}.{other_ext}: {exc.reason} (used .{ext})")
        masks[index] = mask
        sources[index] = rel(exts[ext])
    expected = set(range(len(files)))
    if set(files) != expected and files:
        checks.append(f"lesion_numbering: {kind} indices {sorted(files)} are not 0..{len(files) - 1}")
    return masks, sources


def _dseg(masks: dict[int, np.ndarray], checks: list[str], kind: str) -> np.ndarray:
    """Label image: 1 = primary, 2.. = secondaries in release order; on overlap the lower label wins."""
    order = sorted(masks)
    out = np.zeros(masks[order[0]].shape, np.uint8, order="F")
    flat = out.ravel(order="F")  # a view: labels are written through it
    for label, index in enumerate(order, start=1):
        where = np.flatnonzero(masks[index].ravel(order="F"))
        current = flat[where]
        overlap = np.count_nonzero(current)
        if overlap:
            others = sorted(set(np.unique(current).tolist()) - {0})
            checks.append(f"overlap: {kind} lesion {label} overlaps lesion(s) {others} in {overlap} voxels")
        flat[where[current == 0]] = label
    return out


def _components(mask: np.ndarray, checks: list[str]) -> dict[int, np.ndarray]:
    """Lesions of a merged mask (R2.0 ships all of a scan's lesions in one file): its 26-connected components
    (voxels touching by a face, edge or corner are one lesion, as in the lesion-wise metrics), largest first,
    so index 0 ("primary") is the largest component by definition, not a designation read from the release.
    Equal sizes keep the order of their first voxel (C order). Components beyond the 255th (the label image
    is uint8) share the last label, with a check."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order: list = (np.argsort(-sizes, kind="stable") + 1).tolist()
    if count > MAX_LABEL:
        checks.append(f"dseg_capped: {count} connected components; the {count - MAX_LABEL + 1} smallest share "
                      f"label {MAX_LABEL}")
        order = order[:MAX_LABEL - 1] + [order[MAX_LABEL - 1:]]
    return {index: np.isin(labels, group) if isinstance(group, list) else labels == group
            for index, group in enumerate(order)}


def _save_label(data: np.ndarray, t1: nib.Nifti1Image, path: Path) -> None:
    img = nib.Nifti1Image(np.asfortranarray(data, dtype=np.uint8), t1.affine)
    img.set_sform(t1.get_sform(), code=int(t1.header["sform_code"]) or 1)
    img.set_qform(t1.get_qform(), code=int(t1.header["qform_code"]) or 1)
    space_unit, time_unit = t1.header.get_xyzt_units()
    img.header.set_xyzt_units(space_unit if space_unit != "unknown" else "mm", time_unit)
    io.save_nifti(img, path)


def _json(doc: dict, path: Path) -> None:
    io.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", path)


def _dseg_table(masks: dict[int, np.ndarray], sources: dict[int, str], voxel_mm3: float, kind: str) -> str:
    lines = ["index\tname\tvolume_mm3\tsource_file"]
    for label, index in enumerate(sorted(masks), start=1):
        name = "primary" if index == 0 else f"secondary{index}"
        lines.append(f"{label}\t{name}\t{masks[index].sum() * voxel_mm3:.3f}\t{sources[index]}")
    return "\n".join(lines) + "\n"


def convert_scan(job: ScanJob) -> dict:
    """Convert one scan; returns its conversion-report row (raises on an unreadable T1)."""
    scan, output, root = job.scan, Path(job.output), Path(job.source_root)
    outputs = scan_outputs(scan)
    manifest = manifest_path(output, scan)
    fingerprint = _fingerprint(scan)
    if not job.overwrite and manifest.is_file():
        done = json.loads(manifest.read_text())
        if done.get("fingerprint") == fingerprint and all((output / p).is_file() for p in done["outputs"]):
            raise Skip("already converted", value=done["report"])

    def rel(path: str) -> str:
        return Path(path).relative_to(root).as_posix()

    if scan.t1 is None:
        raise io.InputError(scan.folder, "no T1 image in the scan folder")
    t1 = io.load_nifti(scan.t1, squeeze=False)
    checks = list(scan.problems) + [f"unrecognised_file: {name}" for name in scan.unrecognised]
    fatal: list[str] = []
    reencode = t1.ndim == 4 and t1.shape[3] == 1
    if reencode:
        t1 = io.load_nifti(scan.t1)
        checks.append("reencoded_t1: trailing singleton 4th dimension dropped")
    elif t1.ndim != 3:
        raise io.InputError(scan.t1, f"expected a 3-D T1 image, got shape {t1.shape}")
    written: list[Path] = []

    t1_out = outputs["t1"]
    if reencode or not scan.t1.endswith(".nii.gz"):
        img = nib.Nifti1Image(np.asanyarray(t1.dataobj), t1.affine, t1.header)
        io.save_nifti(img, output / t1_out)
    else:
        io.copy_file(scan.t1, output / t1_out)
    t1_sidecar = {
        "ConversionSoftware": "atlas-curate",
        "ConversionSoftwareVersion": __version__,
        "ReleaseFile": rel(scan.t1),
        "ReleaseScanID": scan.key,
    }
    if scan.flavour != "native":   # standard (R1.1 FCP-INDI) and atlas2 (R2.0): template-space, defaced
        t1_sidecar.update({"SkullStripped": False, "Defaced": True,
                           "Description": "Release's defaced, intensity-normalised T1w, linearly registered "
                                          f"to {TEMPLATE_SPACE} by the ATLAS team"})
    _json(t1_sidecar, output / naming.sidecar(t1_out))
    written += [t1_out, naming.sidecar(t1_out)]

    smooth, smooth_src = _read_masks(scan.smooth, t1, "merged" if scan.merged_mask else "Smooth", checks, fatal, rel)
    raw, raw_src = _read_masks(scan.raw, t1, "Raw", checks, fatal, rel)
    if scan.merged_mask and smooth:
        smooth = _components(smooth[0], checks)
        smooth_src = {index: smooth_src[0] for index in smooth}
    if not scan.smooth and scan.mask_expected:
        fatal.append("no_lesion_mask: the scan folder holds no " + ("lesion mask" if scan.merged_mask
                                                                    else "LesionSmooth mask"))
    if scan.raw and set(scan.raw) != set(scan.smooth):
        checks.append(f"raw_smooth_mismatch: raw tracings {sorted(scan.raw)} vs smoothed masks {sorted(scan.smooth)}")
    voxel_mm3 = io.voxel_volume(t1)
    volumes = [float(smooth[i].sum()) * voxel_mm3 for i in sorted(smooth)]
    override = False
    if not fatal and len(volumes) > 1:
        secondaries = volumes[1:]
        if any(a < b for a, b in zip(secondaries, secondaries[1:])):
            checks.append("secondary_order: secondary lesions are not ordered largest to smallest")
        override = volumes[0] < volumes[1]

    if not fatal and smooth:
        t1_uri = (_bids_uri(t1_out) if scan.flavour == "native"
                  else f"bids::{t1_out.relative_to(naming.LESION_DERIVATIVE).as_posix()}")
        dseg = _dseg(smooth, checks, "smoothed")
        space_note = "native (scanner) space of the T1w" if scan.flavour == "native" else TEMPLATE_SPACE
        common = {"Sources": [t1_uri], "SpatialReference": space_note if scan.flavour == "native" else None}
        common = {k: v for k, v in common.items() if v is not None}
        _save_label(dseg > 0, t1, output / outputs["mask"])
        mask_text, dseg_text = MASK_DESCRIPTIONS[scan.merged_mask]
        release_files = list(dict.fromkeys(smooth_src[i] for i in sorted(smooth_src)))
        _json({**common, "Type": "Lesion", "Description": mask_text, "ReleaseFiles": release_files},
              output / naming.sidecar(outputs["mask"]))
        _save_label(dseg, t1, output / outputs["dseg"])
        _json({**common, **DSEG_COLUMNS, "Description": dseg_text, "ReleaseFiles": release_files,
               "PrimaryIsLargest": not override,
               **({"LesionIdentity": "derived (26-connected components by size), not from the release"}
                  if scan.merged_mask else {})},
              output / naming.sidecar(outputs["dseg"]))
        io.write_text(_dseg_table(smooth, smooth_src, voxel_mm3, "smooth"), output / outputs["dseg_tsv"])
        written += [outputs["mask"], naming.sidecar(outputs["mask"]), outputs["dseg"],
                    naming.sidecar(outputs["dseg"]), outputs["dseg_tsv"]]
        if raw and set(raw) == set(smooth):
            raw_dseg = _dseg(raw, checks, "raw")
            _save_label(raw_dseg > 0, t1, output / outputs["raw_mask"])
            _json({**common, "Type": "Lesion", "Description": "Union of the release's unsmoothed hand tracings",
                   "ReleaseFiles": [raw_src[i] for i in sorted(raw_src)]},
                  output / naming.sidecar(outputs["raw_mask"]))
            _save_label(raw_dseg, t1, output / outputs["raw_dseg"])
            _json({**common, **DSEG_COLUMNS,
                   "Description": "Unsmoothed hand tracings: 1 = primary, 2.. = secondary lesions",
                   "ReleaseFiles": [raw_src[i] for i in sorted(raw_src)]},
                  output / naming.sidecar(outputs["raw_dseg"]))
            io.write_text(_dseg_table(raw, raw_src, voxel_mm3, "raw"), output / outputs["raw_dseg_tsv"])
            written += [outputs["raw_mask"], naming.sidecar(outputs["raw_mask"]), outputs["raw_dseg"],
                        naming.sidecar(outputs["raw_dseg"]), outputs["raw_dseg_tsv"]]

    report = {
        "scan": scan.key,
        "participant_id": f"sub-{scan.subject}",
        "session_id": f"ses-{scan.session}",
        # no_mask (not a failure): no mask where the release withholds masks by design (R2.0 testing scans)
        "status": "masks_withheld" if fatal else "converted" if smooth else "no_mask",
        "reason": "; ".join(fatal) if fatal or smooth else
                  f"no lesion mask: the release withholds the masks of its {scan.part or 'unlabelled'} scans",
        "n_lesions": len(smooth) if not fatal else len(scan.smooth),
        "lesion_volumes_mm3": ";".join(f"{v:.1f}" for v in volumes),
        "primary_override": override,
        "checks": "; ".join(checks),
    }
    _json({"fingerprint": fingerprint, "outputs": [p.as_posix() for p in written], "report": report,
           "job": {"scan": asdict(scan)["key"], "release": job.release}}, manifest)
    return report
