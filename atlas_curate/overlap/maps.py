"""Streaming lesion overlap: one scan at a time into an int32 count volume on the template grid.

Per scan (:func:`read_scan`, a pure function of its :class:`ScanJob`, so it runs in a worker process):

* the union lesion mask (``label-L_desc-T1lesion_mask``) and the lesion label image (``desc-lesions_dseg``:
  label k = lesion k, 1 = the primary lesion) are decoded once each (stored uint8 values, no float copy)
  and checked to lie on the template grid (shape and affine, :meth:`atlas_curate.templates.TemplateGrid.check`);
* the voxels that go into the map are the mask's non-zero voxels (``lesions="all"``) or the dseg's label-1
  voxels (``lesions="primary"``), returned as flat (Fortran-order) indices, so that only lesion voxels
  travel between processes;
* per lesion (per dseg label): template voxel count and volume, centroid in MNI millimetres and the
  anatomy of :func:`atlas_curate.anatomy.classify_lesion` (the project's single definition of hemisphere,
  cortical / subcortical / other); the native volume comes from the converted native-space dseg, with the
  voxel volume of its own header.

:func:`accumulate` adds each scan's voxels into the count volume as soon as the scan is read
(:func:`atlas_curate.executor.run_stream`: in this process, a pool of worker processes or a Dask cluster,
results consumed as they finish, a bounded number of scans in flight); memory is a handful of template
volumes whatever the number of scans. Integer counts make the result independent of the order in which
scans finish. The probability map is ``count / n`` (float32), equal to the mean of the n binary masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from .. import io
from ..anatomy import classify_voxels, template_anatomy
from ..executor import Failed, Outcome, run_stream
from ..naming import TEMPLATE_KEY
from ..templates import template_grid

LESION_CHOICES = ("all", "primary")
UNREADABLE_HEADER = "unreadable header"


@dataclass(frozen=True)
class ScanJob:
    """What :func:`read_scan` needs: absolute paths and the map's lesion choice."""

    scan: str
    mask: str
    dseg: str
    native_dseg: str | None = None
    lesions: str = "all"  # all | primary
    template: str = TEMPLATE_KEY
    describe: bool = True  # False: the map only (no per-lesion stats; only the image the map needs is read)


@dataclass(frozen=True)
class LesionStats:
    """One lesion (dseg label) of one scan. ``voxels == 0``: the label exists only in native space."""

    label: int
    voxels: int
    volume_mm3: float
    native_voxels: int | None
    native_mm3: float | None
    centroid_mm: tuple[float, float, float] | None
    hemisphere: str     # classify_lesion: Left | Right | Bilateral | Brainstem ("" when not in template space)
    side: str           # Left | Right: sign of the centroid's x (x < 0 is Left), for per-hemisphere counts
    location: str       # cortical | subcortical | other
    other_site: str     # brainstem | cerebellum | ""


@dataclass
class ScanStats:
    """What one scan contributed: map voxel count, its lesions, and notes (e.g. mask and dseg differ)."""

    scan: str
    map_voxels: int
    lesions: list[LesionStats]
    notes: list[str] = field(default_factory=list)


def header_problem(path: str, key: str = TEMPLATE_KEY) -> str | None:
    """Why the image at ``path`` cannot be used as it is (not on the template grid), from its header only."""
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types for bad headers
        return f"{UNREADABLE_HEADER} ({type(exc).__name__}: {exc})"
    if len(img.shape) not in (3, 4) or (len(img.shape) == 4 and img.shape[3] != 1):
        return f"expected a 3-D image, got shape {img.shape}"
    return template_grid(key).problem(img)


def _values(img: nib.Nifti1Image, *, labels: bool) -> np.ndarray:
    """Voxel values without a float copy: a mask's stored values when scaling keeps their sign (only the
    sign matters), a label image's scaled values (uint8 as stored for our derivatives)."""
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if not labels and hasattr(proxy, "get_unscaled") and slope > 0 and inter == 0:
        data = np.asarray(proxy.get_unscaled())
    else:
        data = np.asanyarray(proxy)
    return data.reshape(data.shape[:3])


def _on_grid(path: str, key: str, *, labels: bool = False) -> np.ndarray:
    """Decode an image that must lie on the template grid; its values as a flat Fortran-order view."""
    img = io.load_nifti(path)
    problem = template_grid(key).problem(img)
    if problem:
        raise io.InputError(path, f"not on the template grid: {problem}")
    return np.ravel(_values(img, labels=labels), order="F")


def _labels(values: np.ndarray, path: str) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False)
    rounded = np.rint(values)
    if np.any(rounded != values):
        raise io.InputError(path, "lesion label image holds non-integer values")
    return rounded.astype(np.int64)


def _split_by_label(index: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """``{label: sorted flat indices}`` for the non-zero voxels ``index`` holding ``labels``."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    values, starts = np.unique(sorted_labels, return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    return {int(v): index[order[s:e]] for v, s, e in zip(values, starts, bounds)}


def _classify(flat_index: np.ndarray, shape: tuple[int, int, int], key: str):
    """:func:`classify_voxels` on one lesion given as flat (Fortran-order) indices, in C order (the order
    ``np.argwhere`` gives ``classify_lesion``), so both give the same centroid to the last bit."""
    where = np.column_stack(np.unravel_index(np.sort(np.ravel_multi_index(
        np.unravel_index(flat_index, shape, order="F"), shape)), shape))
    return classify_voxels(where, key)


def _native_counts(path: str | None) -> tuple[dict[int, int], float] | None:
    if not path:
        return None
    img = io.load_nifti(path)
    values = np.ravel(_values(img, labels=True), order="K")
    nonzero = values[np.flatnonzero(values != 0)]
    labels = _labels(nonzero, path)
    if np.any(labels < 0):
        raise io.InputError(path, "lesion label image holds negative labels")
    counts = np.bincount(labels) if labels.size else np.zeros(1, np.int64)
    return {int(k): int(c) for k, c in enumerate(counts) if k and c}, io.voxel_volume(img)


def _dseg_voxels(job: ScanJob) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the dseg's labelled voxels and their labels."""
    dseg = _on_grid(job.dseg, job.template, labels=True)
    labelled = np.flatnonzero(dseg != 0)
    labels = _labels(dseg[labelled], job.dseg)
    if np.any(labels < 0):
        raise io.InputError(job.dseg, "lesion label image holds negative labels")
    return labelled, labels


def _describe(by_label: dict[int, np.ndarray], job: ScanJob, notes: list[str]) -> list[LesionStats]:
    """Per-lesion stats: template volume, centroid and anatomy (classify_lesion), native volume."""
    grid = template_grid(job.template)
    shape, voxel_mm3 = grid.shape, grid.voxel_mm3
    native = _native_counts(job.native_dseg)
    native_counts, native_mm3 = native if native else ({}, None)
    lesions = []
    for label in sorted(set(by_label) | set(native_counts)):
        index = by_label.get(label)
        n_native = native_counts.get(label, 0) if native else None
        vol_native = round(n_native * native_mm3, 3) if native else None
        if index is None:
            lesions.append(LesionStats(label, 0, 0.0, n_native, vol_native, None, "", "", "", ""))
            notes.append(f"lesion {label} is in the native dseg but not on the template grid")
            continue
        anatomy = _classify(index, shape, job.template)
        centroid = tuple(round(float(c), 3) for c in anatomy.centroid_mm)
        lesions.append(LesionStats(label, int(index.size), round(index.size * voxel_mm3, 3), n_native, vol_native,
                                   centroid, anatomy.hemisphere, "Left" if anatomy.centroid_mm[0] < 0 else "Right",
                                   anatomy.location, anatomy.other_site))
    return lesions


def read_scan(job: ScanJob) -> tuple[np.ndarray, ScanStats]:
    """The flat (Fortran-order) template indices of the voxels this scan adds to the map, and its stats.

    Raises :class:`atlas_curate.io.InputError` (file + reason) for an unreadable or off-grid image.
    """
    if job.lesions not in LESION_CHOICES:
        raise ValueError(f"lesions must be one of {LESION_CHOICES}, not {job.lesions!r}")
    union = np.flatnonzero(_on_grid(job.mask, job.template) > 0) if job.lesions == "all" or job.describe else None
    if not job.describe and union is not None:
        return union, ScanStats(job.scan, int(union.size), [])
    labelled, labels = _dseg_voxels(job)
    by_label = _split_by_label(labelled, labels)
    primary = by_label.get(1, np.zeros(0, np.int64))
    if not job.describe:
        return primary, ScanStats(job.scan, int(primary.size), [])
    notes = []
    if not np.array_equal(union, labelled):
        differ = np.setxor1d(union, labelled, assume_unique=True).size
        notes.append(f"mask and dseg differ in {differ} voxels (the map uses the "
                     f"{'mask' if job.lesions == 'all' else 'dseg'})")
    if job.lesions == "primary" and 1 not in by_label:
        notes.append("no primary lesion (label 1) on the template grid: the scan adds no voxel to the map")
    lesions = _describe(by_label, job, notes)
    voxels = union if job.lesions == "all" else primary
    return voxels, ScanStats(job.scan, int(voxels.size), lesions, notes)


def scan_voxels(job: ScanJob) -> tuple[np.ndarray, ScanStats]:
    """:func:`read_scan` as the executor's per-scan function: an unusable file fails the scan with the file's
    name and the reason."""
    try:
        return read_scan(job)
    except io.InputError as exc:
        raise Failed(f"{exc.path.name}: {exc.reason}") from exc


def accumulate(jobs: list[ScanJob], *, workers: int = 1, progress: bool = False, template: str = TEMPLATE_KEY,
               executor: str = "local", scheduler: str | None = None) -> tuple[np.ndarray, list[Outcome]]:
    """Stream every scan into an int32 count volume (template grid); outcomes sorted by scan.

    Each outcome's ``value`` is the scan's :class:`ScanStats` (its voxels are added and dropped as it
    arrives). A scan that cannot be read is a failed outcome (with the file and the reason) and adds nothing.
    ``workers``, ``executor`` and ``scheduler`` are :func:`atlas_curate.executor.run_stream`'s ``jobs``,
    ``executor`` and ``scheduler``.
    """
    count = np.zeros(template_grid(template).shape, np.int32, order="F")
    flat = count.ravel(order="F")  # a view
    template_anatomy(template)  # built once here, inherited by forked workers
    outcomes = []
    for outcome in run_stream(scan_voxels, jobs, key=lambda job: job.scan, jobs=workers, executor=executor,
                              scheduler=scheduler, desc="overlap-map", progress=progress):
        if outcome.ok:
            voxels, outcome.value = outcome.value
            flat[voxels] += 1  # indices are unique within a scan
        outcomes.append(outcome)
    return count, sorted(outcomes, key=lambda o: o.key)


def probability(count: np.ndarray, n: int) -> np.ndarray:
    """``count / n`` as float32: the fraction of the n scans whose lesion covers each voxel.

    Divided in float32 (no float64 volume): both operands are exact, so the quotient is the correctly
    rounded fraction, the same value as the float32 of a float64 mean of the n binary masks."""
    if n <= 0:
        raise ValueError("the probability map needs at least one scan")
    prob = count.astype(np.float32)
    prob /= np.float32(n)
    return prob
