"""Convert one scan: T1 into the BIDS dataset, lesion tracings into the lesion derivative.

Pure function of its job (paths in, files out, a report row back), so it runs unchanged in a
process pool or on a Dask worker, and is skipped when its manifest says it is done. Reading and
checking (:func:`read_scan`) come first and write nothing; :func:`write_scan` then writes the T1 and
each lesion set (smoothed, and unsmoothed where the release has it) with one routine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .. import __version__, io, naming, tables
from .discover import SourceScan

MASK_PREFERENCE = ("nii.gz", "nii", "voi")
MAX_LABEL = 255   # label images are uint8
SMOOTH, RAW = "smooth", "raw"
#: the naming spec's (union mask, dseg, dseg table) outputs of each lesion set
LESION_OUTPUTS = {SMOOTH: ("lesion_mask", "lesion_dseg", "lesion_dseg_tsv"),
                  RAW: ("raw_mask", "raw_dseg", "raw_dseg_tsv")}
# (union mask, dseg) sidecar descriptions by (lesion set, merged mask): per-lesion release files (R1.1) or
# one merged mask (R2.0)
DESCRIPTIONS = {
    (SMOOTH, False): ("Union of the release's smoothed lesion masks (hand tracings smoothed with a 2 mm FWHM "
                      "Gaussian, thresholded at 0.5)",
                      "Lesion identity: 1 = primary lesion, 2.. = secondary lesions in release order (largest to "
                      "smallest)"),
    (SMOOTH, True): ("The release's lesion mask (one mask per scan, all lesions merged), binarised with > 0",
                     "Lesion identity DERIVED from the release's merged mask, not given by the release: the "
                     "26-connected components, 1 = the largest (taken as primary), 2.. in decreasing size"),
    (RAW, False): ("Union of the release's unsmoothed hand tracings",
                   "Unsmoothed hand tracings: 1 = primary, 2.. = secondary lesions"),
}
DERIVED_IDENTITY = "derived (26-connected components by size), not from the release"
DSEG_COLUMNS = {
    "volume_mm3": {"Description": "Lesion volume in the T1w's native space", "Units": "mm^3"},
    "source_file": {"Description": "Release file the label was decoded from (relative to the release root)"},
}
DSEG_TABLE_COLUMNS = ["index", "name", "volume_mm3", "source_file"]
#: conversion_report.tsv: ``scan`` is the BIDS scan key (as in every other table), ``release_scan`` the
#: release's own scan ID; a metadata row without a scan folder has no BIDS key (``n/a``)
#: ``tiny_components``: 26-connected components of the lesion mask under TINY_VOXELS voxels (counted, never
#: removed); ``skull_stripped`` (bids reader): whether the T1w is brain-extracted
REPORT_COLUMNS = ["scan", "release_scan", "participant_id", "session_id", "status", "reason", "n_lesions",
                  "lesion_volumes_mm3", "primary_override", "checks", "tiny_components", "skull_stripped"]
TINY_VOXELS = 10             # microbleed-sized mask components
OUTSIDE_HEAD_FRACTION = 0.5  # a mask with more than this fraction outside its T1's head/brain is reported
HEAD_THRESHOLD = 0.15        # head/brain foreground: intensity above this fraction of the 99th percentile
#: brain-extracted T1 test (when the source sidecar has no SkullStripped): the largest connected region of
#: non-zero voxels (holes filled) is under STRIPPED_MAX_ML and nearly every voxel outside it is exactly 0.
#: Calibration: synthetic brains 1744-2177 mL and Colin27 ch2bet 1736 mL; synthetic whole heads (noisy
#: background) 10306-13479 mL, Colin27 ch2 (zero background) 4152 mL.
STRIPPED_MAX_ML = 3000.0
STRIPPED_MIN_ZERO = 0.95


@dataclass(frozen=True)
class ScanJob:
    scan: SourceScan
    source_root: str
    output: str
    release: str          # R1.1-native | R1.1-standard | R2.0
    overwrite: bool = False


@dataclass
class LesionSet:
    """One kind of tracing of a scan, read and checked: a mask per lesion (index 0 = primary), the release
    file of each (relative to the release root) and, once it is to be written, the label image."""

    masks: dict[int, np.ndarray] = field(default_factory=dict)
    sources: dict[int, str] = field(default_factory=dict)
    dseg: np.ndarray | None = None


@dataclass
class ScanResult:
    """What :func:`read_scan` found: the T1 (and whether it must be re-encoded), the lesion sets, the
    checks (reported) and the fatal problems (masks withheld)."""

    t1: nib.Nifti1Image
    reencode: bool
    voxel_mm3: float
    smooth: LesionSet
    raw: LesionSet
    volumes: list[float]
    override: bool
    checks: list[str]
    fatal: list[str]
    tiny_components: int | None = None
    stripped: tuple[bool, str] | None = None    # (brain-extracted, how decided): bids reader only

    def lesion_sets(self) -> dict[str, LesionSet]:
        """The lesion sets to write (those given a label image), smoothed first."""
        return {kind: s for kind, s in ((SMOOTH, self.smooth), (RAW, self.raw)) if s.dseg is not None}


def scan_space(scan: SourceScan) -> str:
    """The space label of the scan's outputs: scanner space (native release, native BIDS T1w) or the
    template's."""
    if scan.space:
        return scan.space
    return naming.NATIVE_SPACE if scan.flavour == "native" else naming.SPACE


def t1_output(scan: SourceScan) -> str:
    """The naming spec's key of the scan's T1: raw T1w (native space) or the template-space derivative."""
    return "t1w" if scan_space(scan) == naming.NATIVE_SPACE else "standard_t1w"


# --- image tests -------------------------------------------------------------------------------------

def _largest(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(mask)


def head_foreground(data: np.ndarray) -> np.ndarray:
    """The head (or brain, for a brain-extracted T1): voxels above HEAD_THRESHOLD of the 99th percentile of the
    positive intensities, largest connected region, holes filled, dilated by 2 voxels."""
    positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, bool)
    region = _largest(data > HEAD_THRESHOLD * float(np.percentile(positive, 99)))
    return ndimage.binary_dilation(region, iterations=2)


def skull_stripped(t1: nib.Nifti1Image, sidecar: dict) -> tuple[bool, str]:
    """Whether the T1 is brain-extracted and how that was decided: the source sidecar's ``SkullStripped`` when it
    is a boolean, else the image test (see STRIPPED_MAX_ML)."""
    given = sidecar.get("SkullStripped")
    if isinstance(given, bool):
        return given, "SkullStripped field of the source T1w sidecar"
    data = np.asanyarray(t1.dataobj)
    support = _largest(data != 0)
    volume_ml = float(support.sum()) * io.voxel_volume(t1) / 1000.0
    outside = ~support
    zero = float(np.mean(data[outside] == 0)) if outside.any() else 0.0
    stripped = volume_ml < STRIPPED_MAX_ML and zero >= STRIPPED_MIN_ZERO
    return stripped, (f"image test: non-zero region {volume_ml:.0f} mL ({'<' if volume_ml < STRIPPED_MAX_ML else '>='} "
                      f"{STRIPPED_MAX_ML:.0f} mL), {zero:.1%} of the voxels outside it exactly 0 "
                      f"(brain-extracted: < {STRIPPED_MAX_ML:.0f} mL and >= {STRIPPED_MIN_ZERO:.0%})")


def defect_checks(t1: nib.Nifti1Image, mask: np.ndarray, checks: list[str]) -> int:
    """Report a mask lying mostly outside its T1's head/brain (misaligned) and count its tiny components
    (26-connected, under TINY_VOXELS voxels); returns that count. Changes nothing."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    total = int(mask.sum())
    if total:
        data = np.asanyarray(t1.dataobj)
        inside = int(np.count_nonzero(mask & head_foreground(data.reshape(mask.shape))))
        outside = 1.0 - inside / total
        if outside > OUTSIDE_HEAD_FRACTION:
            checks.append(f"mask_outside_head: {outside:.0%} of the lesion mask ({total - inside} of {total} voxels) "
                          "lies outside the T1's head/brain (misaligned mask?)")
    return int(np.count_nonzero(sizes < TINY_VOXELS))


def scan_outputs(scan: SourceScan) -> dict[str, Path]:
    """Output paths (relative to the BIDS root) of one scan, by naming-spec key."""
    keys = (t1_output(scan), *LESION_OUTPUTS[SMOOTH], *LESION_OUTPUTS[RAW])
    return {key: naming.output_path(key, scan.ref, space=scan_space(scan)) for key in keys}


def report_row(release_key: str, ref: naming.ScanRef | None, status: str, reason: str = "", **values) -> dict:
    """One ``conversion_report.tsv`` row (missing values empty, written ``n/a``)."""
    row = dict.fromkeys(REPORT_COLUMNS, "")
    if ref is not None:
        row.update(scan=ref.key, participant_id=ref.participant_id, session_id=ref.session_id or "")
    row.update(release_scan=release_key, status=status, reason=reason, **values)
    return row


# --- reading and checking ------------------------------------------------------------------------

def _read_masks(files: dict[int, dict[str, str]], t1: nib.Nifti1Image, kind: str, checks: list[str],
                fatal: list[str], root: Path) -> LesionSet:
    """Read each lesion's mask (preferring NIfTI over VOI), checking grid, binarity and emptiness."""
    found = LesionSet()
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
        found.masks[index] = mask
        found.sources[index] = Path(exts[ext]).relative_to(root).as_posix()
    expected = set(range(len(files)))
    if set(files) != expected and files:
        checks.append(f"lesion_numbering: {kind} indices {sorted(files)} are not 0..{len(files) - 1}")
    return found


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


def _template_grid_masks(scan: SourceScan, t1: nib.Nifti1Image, fatal: list[str]) -> None:
    """A mask on the template grid under a T1 that is not is a named error: masks are never resampled."""
    from ..templates import template_grid

    grid = template_grid()
    if grid.problem(t1) is None:
        return
    for exts in scan.smooth.values():
        for path in exts.values():
            try:
                header = nib.load(path)
            except Exception:   # unreadable: _read_masks reports it
                continue
            if grid.problem(header) is None:
                fatal.append(f"template_mask: {Path(path).name} is on the {grid.space} template grid but its T1w "
                             f"{Path(scan.t1).name} is not; masks are never resampled (masks not written)")
                return


def read_scan(scan: SourceScan, root: Path) -> ScanResult:
    """Read and check one scan's T1 and tracings (writes nothing; raises on an unusable T1)."""
    if scan.t1 is None:
        raise io.InputError(scan.folder, scan.missing_t1 or "no T1 image in the scan folder")
    t1 = io.load_nifti(scan.t1, squeeze=False)
    checks = list(scan.problems) + [f"unrecognised_file: {name}" for name in scan.unrecognised]
    fatal: list[str] = list(scan.fatal)
    reencode = t1.ndim == 4 and t1.shape[3] == 1
    if reencode:
        t1 = io.load_nifti(scan.t1)
        checks.append("reencoded_t1: trailing singleton 4th dimension dropped")
    elif t1.ndim != 3:
        raise io.InputError(scan.t1, f"expected a 3-D T1 image, got shape {t1.shape}")

    if scan.flavour == "bids" and not fatal:
        _template_grid_masks(scan, t1, fatal)
    smooth = _read_masks(scan.smooth, t1, "merged" if scan.merged_mask else "Smooth", checks, fatal, root)
    raw = _read_masks(scan.raw, t1, "Raw", checks, fatal, root)
    if scan.merged_mask and smooth.masks:
        masks = _components(smooth.masks[0], checks)
        smooth = LesionSet(masks, {index: smooth.sources[0] for index in masks})
    if not scan.smooth and scan.mask_expected:
        fatal.append("no_lesion_mask: the scan folder holds no " + ("lesion mask" if scan.merged_mask
                                                                    else "LesionSmooth mask"))
    if scan.raw and set(scan.raw) != set(scan.smooth):
        checks.append(f"raw_smooth_mismatch: raw tracings {sorted(scan.raw)} vs smoothed masks {sorted(scan.smooth)}")
    voxel_mm3 = io.voxel_volume(t1)
    volumes = [float(smooth.masks[i].sum()) * voxel_mm3 for i in sorted(smooth.masks)]
    override = False
    if not fatal and len(volumes) > 1:
        secondaries = volumes[1:]
        if any(a < b for a, b in zip(secondaries, secondaries[1:])):
            checks.append("secondary_order: secondary lesions are not ordered largest to smallest")
        override = volumes[0] < volumes[1]
    tiny = None
    if smooth.masks:
        tiny = defect_checks(t1, np.logical_or.reduce([smooth.masks[i] for i in sorted(smooth.masks)]), checks)
    stripped = skull_stripped(t1, scan.sidecar) if scan.flavour == "bids" else None
    if not fatal and smooth.masks:
        smooth.dseg = _dseg(smooth.masks, checks, "smoothed")
        if raw.masks and set(raw.masks) == set(smooth.masks):
            raw.dseg = _dseg(raw.masks, checks, "raw")
    return ScanResult(t1, reencode, voxel_mm3, smooth, raw, volumes, override, checks, fatal, tiny, stripped)


# --- writing ---------------------------------------------------------------------------------------

def _save_label(data: np.ndarray, t1: nib.Nifti1Image, path: Path) -> None:
    img = nib.Nifti1Image(np.asfortranarray(data, dtype=np.uint8), t1.affine)
    img.set_sform(t1.get_sform(), code=int(t1.header["sform_code"]) or 1)
    img.set_qform(t1.get_qform(), code=int(t1.header["qform_code"]) or 1)
    space_unit, time_unit = t1.header.get_xyzt_units()
    img.header.set_xyzt_units(space_unit if space_unit != "unknown" else "mm", time_unit)
    io.save_nifti(img, path)


def _write_t1(job: ScanJob, result: ScanResult, path: Path) -> list[Path]:
    """The T1 (copied byte for byte unless its header must change) and its sidecar."""
    scan, output = job.scan, Path(job.output)
    if result.reencode or not scan.t1.endswith(".nii.gz"):
        t1 = result.t1
        io.save_nifti(nib.Nifti1Image(np.asanyarray(t1.dataobj), t1.affine, t1.header), output / path)
    else:
        io.copy_file(scan.t1, output / path)
    fields = {"ConversionSoftware": "atlas-curate", "ConversionSoftwareVersion": __version__,
              "ReleaseFile": Path(scan.t1).relative_to(job.source_root).as_posix(), "ReleaseScanID": scan.key}
    if scan.flavour == "bids":
        stripped, how = result.stripped
        fields = {**{k: v for k, v in scan.sidecar.items() if k not in fields}, **fields,
                  "SkullStripped": stripped, "SkullStrippedDecision": how}
    elif scan.flavour != "native":   # standard (R1.1 FCP-INDI) and atlas2 (R2.0): template-space, defaced
        fields.update({"SkullStripped": False, "Defaced": True,
                       "Description": "Release's defaced, intensity-normalised T1w, linearly registered "
                                      f"to {naming.SPACE} by the ATLAS team"})
    tables.write_json(naming.output_sidecar(t1_output(scan), space=scan_space(scan), **fields),
                      output / naming.sidecar(path))
    return [path, naming.sidecar(path)]


def _write_lesion_set(job: ScanJob, result: ScanResult, kind: str, lesions: LesionSet,
                      outputs: dict[str, Path]) -> list[Path]:
    """One lesion set: union mask, label image (dseg) and its table, each image with its sidecar."""
    scan, output, space = job.scan, Path(job.output), scan_space(job.scan)
    mask_key, dseg_key, table_key = LESION_OUTPUTS[kind]
    t1_path = outputs[t1_output(scan)]
    if space == naming.NATIVE_SPACE:
        common = {"Sources": [f"bids:raw:{t1_path.as_posix()}"],
                  "SpatialReference": "native (scanner) space of the T1w"}
    else:
        common = {"Sources": [f"bids::{t1_path.relative_to(naming.LESION_DERIVATIVE).as_posix()}"]}
    mask_text, dseg_text = DESCRIPTIONS[kind, scan.merged_mask]
    files = list(dict.fromkeys(lesions.sources[i] for i in sorted(lesions.sources)))
    dseg_fields = {}
    if kind == SMOOTH:
        dseg_fields["PrimaryIsLargest"] = not result.override
        if scan.merged_mask:
            dseg_fields["LesionIdentity"] = DERIVED_IDENTITY

    _save_label(lesions.dseg > 0, result.t1, output / outputs[mask_key])
    tables.write_json(naming.output_sidecar(mask_key, space=space, **common, Description=mask_text,
                                            ReleaseFiles=files), output / naming.sidecar(outputs[mask_key]))
    _save_label(lesions.dseg, result.t1, output / outputs[dseg_key])
    tables.write_json(naming.output_sidecar(dseg_key, space=space, **common, **DSEG_COLUMNS, Description=dseg_text,
                                            ReleaseFiles=files, **dseg_fields),
                      output / naming.sidecar(outputs[dseg_key]))
    rows = [{"index": label, "name": "primary" if index == 0 else f"secondary{index}",
             "volume_mm3": f"{lesions.masks[index].sum() * result.voxel_mm3:.3f}",
             "source_file": lesions.sources[index]}
            for label, index in enumerate(sorted(lesions.masks), start=1)]
    tables.write_rows(rows, DSEG_TABLE_COLUMNS, output / outputs[table_key])
    return [outputs[mask_key], naming.sidecar(outputs[mask_key]), outputs[dseg_key],
            naming.sidecar(outputs[dseg_key]), outputs[table_key]]


def write_scan(job: ScanJob, result: ScanResult) -> list[Path]:
    """Write the scan's T1 and each lesion set to be written; the paths written, relative to the output."""
    outputs = scan_outputs(job.scan)
    written = _write_t1(job, result, outputs[t1_output(job.scan)])
    for kind, lesions in result.lesion_sets().items():
        written += _write_lesion_set(job, result, kind, lesions, outputs)
    return written


def scan_report(scan: SourceScan, result: ScanResult) -> dict:
    """The scan's ``conversion_report.tsv`` row."""
    smooth, fatal = result.smooth.masks, result.fatal
    # no_mask (not a failure): no mask where the release withholds masks by design (R2.0 testing scans)
    status = "masks_withheld" if fatal else "converted" if smooth else "no_mask"
    reason = ("; ".join(fatal) if fatal or smooth else
              f"no lesion mask: the release withholds the masks of its {scan.part or 'unlabelled'} scans")
    return report_row(scan.key, scan.ref, status, reason, n_lesions=len(smooth) if not fatal else len(scan.smooth),
                      lesion_volumes_mm3=";".join(f"{v:.1f}" for v in result.volumes),
                      primary_override=result.override, checks="; ".join(result.checks),
                      tiny_components="" if result.tiny_components is None else result.tiny_components,
                      skull_stripped="" if result.stripped is None else result.stripped[0])


def convert_scan(job: ScanJob) -> dict:
    """Convert one scan; returns its conversion-report row (raises on an unreadable T1)."""
    scan = job.scan
    manifest = tables.Manifest(job.output, "convert", scan.ref.key)
    inputs = [scan.t1 or ""] + [p for table in (scan.smooth, scan.raw) for d in table.values() for p in d.values()]
    digest = tables.fingerprint(sorted(inputs), {"scan": scan.key, "release": job.release})
    manifest.skip_if_current(digest, "already converted", "report", overwrite=job.overwrite)
    result = read_scan(scan, Path(job.source_root))
    written = write_scan(job, result)
    report = scan_report(scan, result)
    manifest.record(digest, written, report=report, job={"scan": scan.key, "release": job.release})
    return report
