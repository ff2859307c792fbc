"""Brain-aware affine registration of a whole-head T1 to a skull-stripped template.

A plain ``ants.registration(type_of_transform='Affine')`` of a head with scalp, skull and face to a
skull-stripped template shrinks the head onto the brain (docs/formats.md: scale ~0.8, 15 mm error on
the real Colin27 head). Here registration is done in stages:

1. head stage: the head (4 mm) is aligned to a *head-shaped* target, the template brain wrapped in a
   14 mm shell of constant intensity, so that scalp and skull have somewhere to go (affine, Mattes MI,
   single-threaded in a helper process that the worker keeps for all its scans: see ``HeadStage``). Both
   are seen down to ``HEAD_TOP_MM`` below the top of the head only (``head_top``): a field of view that
   holds a long neck or the shoulders would otherwise pull the head down, and the stage starts from the
   centres of the two head tops, not from the centres of mass of whole fields of view. It runs on the
   uncorrected image, meanwhile
2. bias field: N4 on the 4 mm copy inside a head mask down to ``BIAS_TOP_MM`` below the top of the head (a
   field fitted over shoulders too is too coarse over the brain), on the box around that mask only (N4's
   B-spline mesh spans its whole input: over a large field of view with shoulders its elements are wider,
   and the brain gets another field than in a tight one), interpolated to full resolution;
3. brain stage, in rounds: on real heads the head stage is often 4-16 mm and several degrees off
   (scalp, fat and face differ from the shell), so the template's brain mask pulled back through it cuts
   brain on one side and keeps bright scalp on the other. So each round draws the brain from the image
   itself near the template brain pulled back through the current transform (``image_brain_mask``, 2 mm:
   tissue brighter than CSF and skull, bridges to the scalp cut by an erosion), and registers the
   skull-stripped, bias-corrected T1 (4 mm) to the template brain (affine, 16, 8 then 4 mm) with a
   fixed-image mask (the dilated template brain) and a moving-image mask that excludes the lesion
   (cost-function masking, as sMRIPrep does), from two starts (the current transform, and the same moved
   so that the brain found lands on the template brain's centre of mass); the better correlation is kept.
   Rounds stop (after the second) once the transform moves less than ``BRAIN_CONVERGED_MM``; the round kept
   is the one whose whole bias-corrected image (not skull-stripped: no round's mask enters the comparison)
   correlates best with the template brain outside the lesion, since a mask drawn far off can send a
   round away from the brain. The T1 and the template are blurred to the 4 mm grid's resolution before
   they are sampled on it (``downsample``), for this stage and the next, so that scans of any grid and
   thick-slice axis look alike there (the head stage keeps the plain 4 mm samples: its target is a
   synthetic shell, and it was measured to lose a tilted head when blurred);
4. least-squares refinement: brains differ from the template non-linearly (several mm), so "the" affine
   is defined as the least-squares affine fit of the true correspondence over the template's brain
   voxels, each voxel weighing the same. An intensity-driven affine stage instead weighs voxels by their
   edges and lands 0.5-1 mm (mean over the brain) away from that fit on anatomy that varies like real
   brains. So a coarse, strongly regularised SyN deformation (15 iterations on the 4 mm template
   grid cropped to the brain, cross-correlation, update field smoothed over 24 mm, same masks)
   is estimated on top of the brain affine, and the affine is replaced by ``brain affine o (identity +
   least-squares affine fit of the SyN displacement over every 4th template brain voxel)``. One such
   SyN recovers about half of the affine part still missing (the first moves 1-2 mm over the brain, the
   next a third of that), so it is repeated ``REFINE_ROUNDS`` times, each from the last refined affine:
   what is left depends far less on where the brain stage ended. The deformation itself is discarded:
   the output is one 12-parameter affine. The refinement's template is blurred ``SYN_TEMPLATE_BLUR`` times
   wider than a scan: the template is sharper than any scan (no point-spread function, no resampling into
   a scan's grid), and blurred alike, a scan's softer brain edge was read as scale: on synthetic scans the
   refined affine made the brain 0.4-0.5 % too large per axis (log-determinant of the error -0.012 to
   -0.015, 0.32 mm mean error; with the wider blur -0.002 to +0.002, 0.18 mm). The brain rounds keep the
   template blurred as the scan is: blurred wider there, they lost a tilted real head.

A brain mask given by the caller (a mask from another tool) replaces the image-driven one in step 3.

Brain-extracted T1s (zero outside the brain) go through ``register_brain`` instead: no head stage (nothing
outside the brain to align), N4 inside the non-zero voxels, a start that puts the brain's centre of mass on
the template brain's, then steps 3 (with the non-zero voxels as the brain mask) and 4 as above.

Accuracy on a real head scanned 24 ways (``benchmarks/bench_real_heads.py``) and timing: see
benchmarks/README.md.

Deterministic: a one-threaded head stage, then the global-correlation metric (see ``METRIC``) with seeded
regular sampling, and a dense cross-correlation SyN.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import ants
import nibabel as nib
import numpy as np
from scipy import ndimage

from ..naming import TEMPLATE_KEY
from ..templates import get_template, template_arrays
from .qc import ncc

SEED = 20200101
# Global correlation, not Mattes MI: ANTs accumulates the multithreaded MI histogram in an order that
# changes between runs (the same inputs gave up to 0.9 mm different transforms); GC gives identical
# transforms run to run with all threads, at the same accuracy on T1-to-T1 registration.
METRIC = "GC"
HEAD_ITERATIONS = (100, 50)
HEAD_SHELL_MM = 14.0
HEAD_SHELL_VALUE = 0.5
HEAD_TOP_MM = 150.0          # the head stage sees the head down to this far below its top (skull base: ~120 mm)
BIAS_TOP_MM = 190.0          # N4 sees the head down to this far below its top (the brain of a head tilted by 20 deg
                             # reaches ~150 mm): one smooth field fitted over shoulders too is too coarse over the brain
BRAIN_PASSES = 4             # at most this many brain rounds (image-driven mask, then brain affine from two starts)
BRAIN_CONVERGED_MM = 1.5     # rounds stop (after the second) once the transform moves less than this
BRAIN_SPACING_MM = 4.0       # grid of the brain affine stage
BRAIN_SHRINK = (4, 2, 1)
BRAIN_ITERATIONS = (200, 200, 100)
MASK_SPACING_MM = 2.0       # grid of the image-driven brain mask
MASK_REACH_MM = 10.0        # the mask stays within this distance of the pulled-back template brain
MASK_CUT_MM = 6.0           # erosion that cuts tissue bridges to scalp, eyes and neck
MASK_TISSUE = 0.5          # tissue threshold of that mask, a fraction of the white-matter peak
SYN_SPACING_MM = 4.0         # the coarse grid: N4, head stage (head_4mm) and SyN
REFINE_ROUNDS = 3            # SyN refinements, each from the last one's affine (see ``_brain_stage``)
SYN_ITERATIONS = (15,)       # at 4 mm (one level: the affine stages have done the coarse work)
SYN_STEP = 0.25              # gradient step
SYN_MARGIN = 2               # voxels of the 4 mm grid kept around the template brain
POINT_STRIDE = 4             # every 4th template brain voxel enters the least-squares fit
SYN_CC_RADIUS = 1             # voxels (4 mm)
SYN_FLOW_SIGMA = 6            # voxels of the 4 mm grid (24 mm: the scale of anatomical variation)
FWHM_PER_SIGMA = 2.3548      # a Gaussian's full width at half maximum over its sigma
SYN_TEMPLATE_BLUR = 1.3      # the refinement's template is blurred this many times wider than a scan (FWHM ~5.1 mm
                             # against 4; module docstring, step 4)
EXTRACTED_MIN_ML = 300.0     # a brain-extracted T1's non-zero region must be brain-sized (``extracted_brain``)
EXTRACTED_MAX_ML = 3000.0    # (a brain with a 2 mm rim is ~1.2-2.0 l; a whole head 4 l and more)
EXTRACTED_MARGIN_MM = 8.0    # a brain-extracted T1 is cropped to its non-zero box plus this margin


def to_ants(img: nib.Nifti1Image, dtype=np.float32) -> ants.ANTsImage:
    data = np.asarray(img.dataobj, dtype=dtype)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units("mm", "sec")  # world units are mm; unset units make antspy print a warning
    return ants.from_nibabel_nifti(out)


def from_ants(img: ants.ANTsImage) -> nib.Nifti1Image:
    return ants.to_nibabel_nifti(img)


def template_images(key: str = TEMPLATE_KEY) -> dict[str, ants.ANTsImage]:
    """Template T1 (0..1), brain masks and the head-shaped target, as ANTs images (built once per process)."""
    return _template_images(key)


@lru_cache(maxsize=2)
def _template_images(key: str) -> dict[str, ants.ANTsImage]:
    tpl = get_template(key)
    arrays = template_arrays(key)
    affine = tpl.affine
    brain = arrays["T1w"] > 0
    pad = 30  # room below the template grid for the head shell
    padded_brain = np.pad(brain, ((0, 0), (0, 0), (pad, 0)))
    padded_t1 = np.pad(arrays["T1w"], ((0, 0), (0, 0), (pad, 0)))
    head_affine = affine.copy()
    head_affine[2, 3] -= pad
    dist = ndimage.distance_transform_edt(~padded_brain)
    head = np.where(padded_brain, padded_t1, np.where(dist <= HEAD_SHELL_MM, HEAD_SHELL_VALUE, 0.0))
    # seen to the same depth below its top as a scan's head is (``head_top``)
    z = head_affine[2, 2] * np.arange(head.shape[2]) + head_affine[2, 3]
    top = z[np.flatnonzero(head.any(axis=(0, 1))).max()]
    head[:, :, z < top - HEAD_TOP_MM] = 0.0
    images = {
        "t1": nib.Nifti1Image(arrays["T1w"].astype(np.float32), affine),
        "brain": nib.Nifti1Image(brain.astype(np.float32), affine),
        "brain_dil2": nib.Nifti1Image(ndimage.binary_dilation(brain, iterations=2).astype(np.float32), affine),
        "head": nib.Nifti1Image(head.astype(np.float32), head_affine),
    }
    out = {k: to_ants(v) for k, v in images.items()}
    brain_spacing = (BRAIN_SPACING_MM,) * 3
    out["t1_brain"] = downsample(out["t1"], BRAIN_SPACING_MM)
    out["brain_dil2_brain"] = ants.resample_image(out["brain_dil2"], brain_spacing, use_voxels=False, interp_type=1)
    out["head_4mm"] = ants.resample_image(out["head"], (4, 4, 4), use_voxels=False, interp_type=0)
    spacing = (SYN_SPACING_MM,) * 3
    t1_syn = downsample(out["t1"], SYN_SPACING_MM, widen=SYN_TEMPLATE_BLUR)
    brain_syn = ants.resample_image(out["brain_dil2"], spacing, use_voxels=False, interp_type=1)
    # SyN's domain: the 4 mm template cropped to its (dilated) brain plus SYN_MARGIN voxels (a third fewer voxels)
    box = ants.iMath(brain_syn, "MD", SYN_MARGIN) if SYN_MARGIN else brain_syn
    out["t1_syn"] = ants.crop_image(t1_syn, box)
    out["brain_dil2_syn"] = ants.crop_image(brain_syn, box)
    return out


def downsample(img: ants.ANTsImage, spacing_mm: float, widen: float = 1.0) -> ants.ANTsImage:
    """``img`` on an isotropic ``spacing_mm`` grid, each voxel axis first blurred by a Gaussian that brings its
    resolution to that spacing (FWHM = ``spacing_mm``; an axis already as coarse is not blurred), its sigma
    multiplied by ``widen``.

    Sampling a 1 mm image every 4 mm keeps one voxel in 64 and aliases its fine structure differently for every
    pose and grid; a 0.9 x 0.9 x 3 mm scan sampled so is sharp in-plane and blurred along its thick axis,
    whatever way that axis points. Blurred first, the template and every scan look alike at the coarse grid."""
    sigma = [float(np.sqrt(max(spacing_mm ** 2 - s ** 2, 0.0))) / FWHM_PER_SIGMA * widen for s in img.spacing]
    if max(sigma) > 0:
        img = ants.smooth_image(img, sigma, sigma_in_physical_coordinates=True)
    return ants.resample_image(img, (spacing_mm,) * 3, use_voxels=False, interp_type=0)


def brain_points_lps(key: str = TEMPLATE_KEY) -> np.ndarray:
    """Every ``POINT_STRIDE``-th template brain voxel centre, in world LPS mm (ANTs' physical space)."""
    return _brain_points_lps(key)


@lru_cache(maxsize=2)
def _brain_points_lps(key: str) -> np.ndarray:
    tpl = get_template(key)
    idx = np.argwhere(template_arrays(key)["T1w"] > 0)[::POINT_STRIDE]
    ras = idx @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def robust_scale(img: ants.ANTsImage) -> ants.ANTsImage:
    """``img`` divided by its 99.5th percentile of positive values."""
    return img / _robust_top(img.numpy())


def _robust_top(data: np.ndarray, stride: int = 1) -> float:
    """99.5th percentile of the positive values among every ``stride``-th voxel per axis (1 if none)."""
    sample = data[::stride, ::stride, ::stride]
    sample = sample[sample > 0]
    top = float(np.percentile(sample, 99.5)) if sample.size else 1.0
    return top if top > 0 else 1.0


def _physical_points(img: ants.ANTsImage, index: np.ndarray) -> np.ndarray:
    """World LPS mm of voxel indices (N x 3) of an ANTs image."""
    matrix = np.asarray(img.direction) * np.asarray(img.spacing)
    return index @ matrix.T + np.asarray(img.origin)


def head_top(img: ants.ANTsImage, depth_mm: float = HEAD_TOP_MM) -> tuple[ants.ANTsImage, np.ndarray]:
    """The image with everything more than ``depth_mm`` below the top of the head set to 0 (shoulders,
    neck, whatever the field of view holds below the skull), and the centre (LPS mm) of the head above that
    level. "Up" is the world's superior axis: heads in scanners are tilted by tens of degrees at most."""
    data = img.numpy()
    mask = head_mask(img).numpy() > 0
    index = np.argwhere(mask)
    if len(index) == 0:
        raise RuntimeError("no head found in the image (empty after thresholding)")
    z = _physical_points(img, index)[:, 2]            # LPS z = superior
    top = float(np.percentile(z, 99.9))
    keep = z >= top - depth_mm
    all_z = _physical_points(img, np.indices(data.shape).reshape(3, -1).T)[:, 2].reshape(data.shape)
    data = np.where(all_z < top - depth_mm, 0.0, data).astype(data.dtype)
    return img.new_image_like(data), _physical_points(img, index[keep]).mean(axis=0)


@lru_cache(maxsize=2)
def _tpl_head_top(key: str) -> tuple:
    small = template_images(key)["head_4mm"]
    index = np.argwhere(small.numpy() > 0)
    points = _physical_points(small, index)
    top = float(np.percentile(points[:, 2], 99.9))
    return tuple(points[points[:, 2] >= top - HEAD_TOP_MM].mean(axis=0))


@lru_cache(maxsize=2)
def _tpl_brain_centre(key: str) -> tuple:
    brain = template_images(key)["brain"]
    return tuple(_physical_points(brain, np.argwhere(brain.numpy() > 0.5)).mean(axis=0))


def tpl_brain_centre(key: str = TEMPLATE_KEY) -> np.ndarray:
    """Centre of mass (LPS mm) of the template brain mask."""
    return np.asarray(_tpl_brain_centre(key))


def _brain_correlation(tpl: dict, moving: ants.ANTsImage, moving_mask, transform: str) -> float:
    """Correlation of the skull-stripped ``moving`` brought to the 4 mm template brain with ``transform``,
    inside the template brain (and outside the lesion when ``moving_mask`` is given)."""
    fixed = tpl["t1_brain"]
    warped = ants.apply_transforms(fixed, moving, [transform], interpolator="linear").numpy()
    region = tpl["brain_dil2_brain"].numpy() > 0.5
    if moving_mask is not None:
        region &= ants.apply_transforms(fixed, moving_mask, [transform],
                                        interpolator="nearestNeighbor").numpy() > 0.5
    return ncc(warped, fixed.numpy(), region)


def tpl_head_top(key: str = TEMPLATE_KEY) -> np.ndarray:
    """Centre (LPS mm) of the head-shaped target above ``HEAD_TOP_MM`` below its top."""
    return np.asarray(_tpl_head_top(key))


def head_mask(img: ants.ANTsImage) -> ants.ANTsImage:
    data = img.numpy()
    threshold = 0.15 * float(np.percentile(data, 98))
    return ants.get_mask(img, low_thresh=threshold, high_thresh=float(data.max()) + 1, cleanup=2)


def bias_field(small: ants.ANTsImage) -> ants.ANTsImage:
    """N4 bias field of a (4 mm) image inside its head mask; positive everywhere."""
    mask = head_mask(small)
    inside = np.argwhere(mask.numpy() > 0)
    lo = np.maximum(inside.min(axis=0) - 2, 0)
    hi = np.minimum(inside.max(axis=0) + 3, small.shape)
    field = ants.n4_bias_field_correction(ants.crop_indices(small, lo.tolist(), hi.tolist()),
                                          mask=ants.crop_indices(mask, lo.tolist(), hi.tolist()),
                                          shrink_factor=2, return_bias_field=True)
    values = field.numpy()
    values[~(values > 1e-3)] = 1.0
    # outside the box: the field at the box's nearest face (it multiplies neck and shoulders only)
    values = np.pad(values, [(a, n - b) for a, b, n in zip(lo, hi, small.shape)], mode="edge")
    return small.new_image_like(values.astype(np.float32))


def wm_peak(values: np.ndarray) -> float:
    """Intensity of the white-matter peak: the histogram mode of the brighter half of brain voxels."""
    values = values[np.isfinite(values) & (values > 0)]
    upper = values[values >= np.median(values)]
    hist, edges = np.histogram(upper, bins=128)
    smooth = np.convolve(hist, np.ones(5) / 5, mode="same")
    i = int(np.argmax(smooth))
    return float((edges[i] + edges[i + 1]) / 2)


def image_brain_mask(image: ants.ANTsImage, prior: ants.ANTsImage, lesion: ants.ANTsImage | None = None
                     ) -> ants.ANTsImage:
    """Brain mask of a bias-corrected head ``image`` (2 mm), from its intensities, near ``prior`` (the
    template brain pulled back through a rough registration, possibly 10 mm and several degrees off).

    Tissue (grey and white matter) is brighter than CSF and skull: voxels above ``MASK_TISSUE`` times the
    white-matter peak (measured deep inside the prior) within ``MASK_REACH_MM`` of the prior; the connections
    to scalp, eyes and neck are cut by a ``MASK_CUT_MM`` erosion, the component(s) reaching the prior's core
    kept, the erosion undone within tissue, then sulci, ventricles and dark lesions closed in, and the mask
    grown by 2 mm (the template's brain includes a rim of CSF). The lesion, when given, is always brain.
    Works on the box around the prior (plus the reach), so its cost does not grow with the field of view."""
    full = image.numpy()
    spacing = np.asarray(image.spacing, float)
    full_prior = prior.numpy() > 0.5
    if not full_prior.any():
        raise RuntimeError("the template brain mapped back lies outside the image (head stage failed)")
    pad = np.ceil((MASK_REACH_MM + 4.0) / spacing).astype(int)
    lo = np.maximum(np.argwhere(full_prior).min(axis=0) - pad, 0)
    hi = np.minimum(np.argwhere(full_prior).max(axis=0) + pad + 1, full.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    data, prior_arr = full[box], full_prior[box]

    def ball(mm):
        r = np.ceil(mm / spacing).astype(int)
        z = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
        return sum((zi * sp / mm) ** 2 for zi, sp in zip(z, spacing)) <= 1.0

    dist_out = ndimage.distance_transform_edt(~prior_arr, sampling=spacing)
    dist_in = ndimage.distance_transform_edt(prior_arr, sampling=spacing)
    core = dist_in > 12.0
    if core.sum() < 100:
        core = dist_in > 0.5 * dist_in.max()
    wm = wm_peak(data[core])
    region = dist_out <= MASK_REACH_MM
    tissue = region & (data > MASK_TISSUE * wm) & (data < 1.6 * wm)
    seeds = ndimage.binary_erosion(tissue, structure=ball(MASK_CUT_MM))
    labels, n = ndimage.label(seeds)
    if n == 0:
        return prior
    hits = np.bincount(labels[core & seeds], minlength=n + 1)
    hits[0] = 0
    keep_labels = np.flatnonzero(hits >= max(0.05 * hits.max(), 1))
    brain = np.isin(labels, keep_labels)
    brain = ndimage.binary_dilation(brain, structure=ball(MASK_CUT_MM + 1.0)) & tissue
    brain = ndimage.binary_closing(np.pad(brain, 4), structure=ball(4.0))[4:-4, 4:-4, 4:-4]
    brain = ndimage.binary_fill_holes(brain)
    brain = ndimage.binary_dilation(brain, structure=ball(2.0))
    out = np.zeros(full.shape, np.float32)
    out[box] = brain
    if lesion is not None:
        out[ants.resample_image_to_target(lesion, image, interp_type="nearestNeighbor").numpy() > 0.5] = 1.0
    return image.new_image_like(out)


class _Helper:
    """One ``_headstage`` helper process (see there); requests go in on stdin, replies come back on a pipe."""

    def __init__(self):
        read_fd, write_fd = os.pipe()
        env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
        # stderr to a file, not a pipe: a long-lived helper would block once a pipe's buffer filled up
        self.errors = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "atlas_curate.normalize._headstage", str(write_fd)],
                                         env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self.errors, pass_fds=(write_fd,), text=True)
        finally:
            os.close(write_fd)
        self.replies = os.fdopen(read_fd, "r")
        self.pid = os.getpid()

    def send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.replies.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            err = self.errors.read()
            raise RuntimeError(f"head registration helper exited (code {self.proc.returncode}): {err.strip()[-500:]}")
        return json.loads(line)

    def close(self) -> None:
        for stream in (self.proc.stdin, self.replies, self.errors):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_IDLE: list[_Helper] = []
_IDLE_LOCK = threading.Lock()


@atexit.register
def _close_helpers() -> None:
    with _IDLE_LOCK:
        while _IDLE:
            _IDLE.pop().close()


def _take_helper() -> _Helper:
    with _IDLE_LOCK:
        while _IDLE:
            helper = _IDLE.pop()
            if helper.pid == os.getpid() and helper.proc.poll() is None:
                return helper
    return _Helper()


def warm_up(template: str = TEMPLATE_KEY) -> None:
    """Pay this process's one-off costs now: the template images and a ready head-stage helper."""
    template_images(template)
    brain_points_lps(template)
    helper = _take_helper()
    try:
        helper.send({"ping": True})
        helper.receive()
    except BaseException:
        helper.close()
        raise
    with _IDLE_LOCK:
        _IDLE.append(helper)


class HeadStage:
    """The coarse 4 mm head stage with Mattes MI (GC lacks the capture range here: it failed on a quarter
    of synthetic scans), run single-threaded in a helper process so that it is deterministic. It runs while
    the caller goes on (``start`` returns at once, ``result`` waits). The helper is kept for the next scan
    of this process (one per concurrent caller), which saves its start-up of about 2 s per scan."""

    def __init__(self, fixed, moving, *, initial: str | None, outprefix: str):
        fixed_path, moving_path = outprefix + "fixed.nii.gz", outprefix + "moving.nii.gz"
        ants.image_write(fixed, fixed_path)
        ants.image_write(moving, moving_path)
        self.path = outprefix + "0GenericAffine.mat"
        self.seconds: float | None = None     # the stage's own time in the helper
        self.helper: _Helper | None = _take_helper()
        self.helper.send({"fixed": fixed_path, "moving": moving_path, "outprefix": outprefix, "initial": initial})

    def result(self) -> dict:
        helper, self.helper = self.helper, None
        if helper is None:
            raise RuntimeError("head registration stage already collected")
        try:
            answer = helper.receive()
        except BaseException:
            helper.close()
            raise
        with _IDLE_LOCK:
            _IDLE.append(helper)
        self.seconds = answer.get("seconds")
        if not answer.get("ok") or not os.path.isfile(self.path):
            raise RuntimeError(f"head registration stage failed: {answer.get('error', 'no transform written')}")
        return {"fwdtransforms": [self.path], "invtransforms": [self.path]}

    def cancel(self) -> None:
        """Stop a stage whose result is no longer wanted (the helper is killed, not reused)."""
        if self.helper is not None:
            self.helper.proc.kill()
            self.helper.close()
            self.helper = None


@dataclass
class Registration:
    transform_file: str          # ANTs affine .mat (template -> native points, as ANTs stores it)
    affine_ras: np.ndarray       # native world RAS mm -> template world RAS mm
    corrected: ants.ANTsImage    # bias-corrected, robustly scaled native T1
    # wall time of each step (head_stage: in its helper, alongside)
    seconds: dict = dataclasses.field(default_factory=dict)


class _Clock:
    def __init__(self):
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now


_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_ants_affine(path: str) -> np.ndarray:
    """The 4x4 template-LPS -> native-LPS matrix stored in an ANTs affine file."""
    tx = ants.read_transform(path)
    params = np.asarray(tx.parameters, dtype=float)
    matrix = params[:9].reshape(3, 3)
    translation = params[9:12]
    centre = np.asarray(tx.fixed_parameters, dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    return lps


def write_ants_affine(lps: np.ndarray, path: str) -> None:
    """Write a 4x4 template-LPS -> native-LPS matrix as an ANTs affine (centre 0)."""
    tx = ants.create_ants_transform(transform_type="AffineTransform", precision="float", dimension=3,
                                    parameters=np.r_[lps[:3, :3].ravel(), lps[:3, 3]],
                                    fixed_parameters=np.zeros(3))
    ants.write_transform(tx, path)


def write_ras_affine(affine_ras: np.ndarray, path: str) -> None:
    """Write a native->template RAS matrix as the ANTs affine that ``ants_affine_to_ras`` reads back."""
    write_ants_affine(_FLIP @ np.linalg.inv(affine_ras) @ _FLIP, path)


def ants_affine_to_ras(path: str) -> np.ndarray:
    """The native->template RAS matrix of an ANTs affine (which maps template LPS to native LPS)."""
    template_to_native = _FLIP @ read_ants_affine(path) @ _FLIP
    return np.linalg.inv(template_to_native)


def _ants_registration(fixed, moving, *, initial: str | None, fixed_mask, moving_mask, stage,
                       outprefix: str) -> None:
    """Run antsRegistration (float, seeded, collapsed output) with one stage, whose ``--metric``,
    ``--transform``, ... arguments ``stage(fixed_str, moving_str)`` returns; masks may be ``None``."""
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    fixed = fixed.clone("float")
    moving = moving.clone("float")
    # the images behind pointer strings must stay referenced until antsRegistration returns
    keep = [m != 0 if m is not None else None for m in (fixed_mask, moving_mask)]
    masks = "[%s,%s]" % tuple(get_pointer_string(m) if m is not None else "NA" for m in keep)
    fixed_str, moving_str = get_pointer_string(fixed), get_pointer_string(moving)
    init = initial if initial is not None else "[%s,%s,1]" % (fixed_str, moving_str)
    args = [
        "--dimensionality", "3", "--float", "1",
        "--initial-moving-transform", init,
        *stage(fixed_str, moving_str),
        "--masks", masks,
        "--use-histogram-matching", "0",
        "--random-seed", str(SEED),
        "-z", "1",
        "--output", "[%s]" % outprefix,
    ]
    code = get_lib_fn("antsRegistration")(process_arguments(args))
    if code != 0:
        raise RuntimeError(f"antsRegistration failed with code {code}")


def _register(fixed, moving, *, initial, fixed_mask=None, moving_mask=None, shrink=(2, 1), iterations=(200, 100),
              outprefix: str, step: float = 0.1, sampling: float = 0.25, metric: str | None = None) -> dict:
    """One affine antsRegistration stage (``METRIC``, seeded regular sampling, optional masks)."""

    def stage(fixed_str: str, moving_str: str) -> list[str]:
        return [
            "--metric", (f"GC[{fixed_str},{moving_str},1,1,Regular,{sampling}]" if (metric or METRIC) == "GC" else
                         f"Mattes[{fixed_str},{moving_str},1,32,Regular,{sampling}]"),
            "--transform", "Affine[%s]" % step,
            "--convergence", "[%s,1e-7,10]" % "x".join(str(i) for i in iterations),
            "--shrink-factors", "x".join(str(s) for s in shrink),
            "--smoothing-sigmas", "x".join(str(max(s - 1, 0)) for s in shrink) + "vox",
            "--winsorize-image-intensities", "[0.005,0.995]",
        ]

    _ants_registration(fixed, moving, initial=initial, fixed_mask=fixed_mask, moving_mask=moving_mask, stage=stage,
                       outprefix=outprefix)
    path = outprefix + "0GenericAffine.mat"
    if not os.path.isfile(path):
        raise RuntimeError(f"antsRegistration wrote no transform to {path}")
    return {"fwdtransforms": [path], "invtransforms": [path]}


def _syn_fit(fixed, moving, *, initial: str, fixed_mask, moving_mask, outprefix: str,
             keep: ants.ANTsImage | None = None) -> np.ndarray:
    """Coarse SyN on top of ``initial``; returns the 4x4 least-squares affine (template LPS -> template LPS)
    of ``x -> x + u(x)`` over the template brain points, ``u`` being SyN's displacement field in template
    space (ANTs composes ``initial(x + u(x))``)."""
    shrink = [2 ** (len(SYN_ITERATIONS) - 1 - i) for i in range(len(SYN_ITERATIONS))]

    def stage(fixed_str: str, moving_str: str) -> list[str]:
        return [
            "--metric", f"CC[{fixed_str},{moving_str},1,{SYN_CC_RADIUS}]",
            "--transform", f"SyN[{SYN_STEP},{SYN_FLOW_SIGMA},0]",
            "--convergence", "[%s,1e-6,5]" % "x".join(str(i) for i in SYN_ITERATIONS),
            "--shrink-factors", "x".join(str(f) for f in shrink),
            "--smoothing-sigmas", "x".join(str(max(f - 1, 0)) for f in shrink) + "vox",
        ]

    _ants_registration(fixed, moving, initial=initial, fixed_mask=fixed_mask, moving_mask=moving_mask, stage=stage,
                       outprefix=outprefix)
    # with -z 1 the initial affine is written first (0GenericAffine.mat), then the warp (1Warp.nii.gz)
    warps = [outprefix + f"{n}Warp.nii.gz" for n in (1, 0) if os.path.isfile(outprefix + f"{n}Warp.nii.gz")]
    if not warps:
        raise RuntimeError(f"antsRegistration (SyN refinement) wrote no warp to {outprefix}*Warp.nii.gz")
    warp = ants.image_read(warps[0])
    field = warp.numpy()                      # (x, y, z, 3) displacement, LPS mm
    points = brain_points_lps()
    if keep is not None:
        # only where the moving image has evidence: template points whose native point (through ``initial``)
        # is outside the lesion; in a lesion, SyN's displacement is smoothed-over extrapolation
        start = read_ants_affine(initial)
        native = points @ start[:3, :3].T + start[:3, 3]
        to_keep = np.linalg.inv(np.asarray(keep.direction) * np.asarray(keep.spacing))
        idx = np.rint((native - np.asarray(keep.origin)) @ to_keep.T).astype(int)
        inside = np.all((idx >= 0) & (idx < np.asarray(keep.shape)), axis=1)
        ok = np.ones(len(points), bool)
        ok[inside] = keep.numpy()[tuple(idx[inside].T)] > 0.5
        if ok.sum() >= 0.25 * len(points):
            points = points[ok]
    to_index = np.linalg.inv(np.asarray(warp.direction) * np.asarray(warp.spacing))
    index = (points - np.asarray(warp.origin)) @ to_index.T
    disp = np.stack([ndimage.map_coordinates(field[..., c], index.T, order=1, mode="nearest") for c in range(3)],
                    axis=1)
    design = np.c_[points, np.ones(len(points))]
    coef, *_ = np.linalg.lstsq(design, disp, rcond=None)
    fit = np.eye(4)
    fit[:3, :3] += coef[:3].T
    fit[:3, 3] = coef[3]
    return fit


def register(t1: nib.Nifti1Image, lesion: nib.Nifti1Image | None = None, *, template: str = TEMPLATE_KEY,
             initial: str | None = None, brain_passes: int = BRAIN_PASSES, refine: bool = True,
             workdir: str | None = None, brain_mask: nib.Nifti1Image | None = None) -> Registration:
    """Affine registration of a native whole-head T1 to the template (see module docstring).

    At most ``brain_passes`` brain rounds (each: a native brain mask, ``brain_mask`` when given, else
    ``image_brain_mask`` drawn near the current transform; then brain-to-brain affine stages from two starts)
    run between the head stage and the refinement;
    ``refine=False`` skips the refinement. Intermediate files go to ``workdir`` (a new temporary folder when
    None, which the caller removes after reading ``transform_file``)."""
    ants.config._random_seed = SEED
    tpl = template_images(template)
    clock = _Clock()
    native = to_ants(t1)
    tmp = workdir or tempfile.mkdtemp(prefix="atlas-curate-reg-")
    os.makedirs(tmp, exist_ok=True)
    small = ants.resample_image(native, (SYN_SPACING_MM,) * 3, use_voxels=False, interp_type=0)
    small = robust_scale(small)
    # the head stage sees the top of the head only (no shoulders, no long neck), and starts from the
    # centres of the top of both heads, not from the centres of mass of whole fields of view
    head_only, top_centre = head_top(small)
    if initial is None:
        initial = os.path.join(tmp, "init.mat")
        shift = top_centre - tpl_head_top(template)
        write_ants_affine(np.block([[np.eye(3), shift[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]]), initial)
    # the head stage (one thread, own process) does not need the bias correction at 4 mm: it runs on the
    # raw image while N4 runs here
    head = HeadStage(tpl["head_4mm"], head_only, initial=initial, outprefix=os.path.join(tmp, "head_"))
    clock.lap("prepare")
    try:
        bias = bias_field(head_top(small, BIAS_TOP_MM)[0])
        # the brain rounds and the refinement see the scan blurred to the 4 mm grid's resolution (``downsample``)
        small_corrected = robust_scale(downsample(native, SYN_SPACING_MM) / bias)
        corrected, lesion_keep = _corrected(native, bias, lesion)
        clock.lap("bias_field")
        stage = head.result()
        clock.lap("head_stage_wait")
        clock.seconds["head_stage"] = head.seconds
    finally:
        head.cancel()

    given = to_ants(brain_mask) if brain_mask is not None else None
    return _brain_stage(tpl, template, stage, small_corrected, corrected, lesion, lesion_keep, given,
                        brain_passes=brain_passes, refine=refine, tmp=tmp, clock=clock)


def _corrected(native: ants.ANTsImage, bias: ants.ANTsImage, lesion: nib.Nifti1Image | None
               ) -> tuple[ants.ANTsImage, ants.ANTsImage | None]:
    """The native image divided by the (4 mm) ``bias`` field brought to its grid and scaled to its robust top,
    and the native-grid mask of the voxels away from the lesion (the lesion grown by 2 voxels; None without)."""
    full_field = ants.resample_image_to_target(bias, native, interp_type="linear").numpy()
    full_field[~(full_field > 1e-3)] = 1.0
    data = native.numpy()
    np.divide(data, full_field, out=data)
    data /= _robust_top(data, stride=2)
    lesion_keep = None
    if lesion is not None:
        grown = ndimage.binary_dilation(np.asarray(lesion.dataobj) > 0, iterations=2)
        lesion_keep = to_ants(nib.Nifti1Image((~grown).astype(np.float32), lesion.affine))
    return native.new_image_like(data), lesion_keep


def _mean_move(points: np.ndarray, delta: np.ndarray) -> float:
    """Mean length of ``delta``'s displacement (the difference of two 4x4 affines) over ``points`` (n x 3)."""
    return float(np.linalg.norm(points @ delta[:3, :3].T + delta[:3, 3], axis=1).mean())


def _brain_stage(tpl: dict, template: str, stage: dict, small_corrected: ants.ANTsImage,
                 corrected: ants.ANTsImage, lesion: nib.Nifti1Image | None, lesion_keep: ants.ANTsImage | None,
                 given: ants.ANTsImage | None, *, brain_passes: int, refine: bool, tmp: str,
                 clock: _Clock) -> Registration:
    """Steps 3 and 4 of the module docstring (brain rounds, least-squares refinement), from the transform
    ``stage`` (the head stage's, or a brain-extracted scan's initial alignment), on the bias-corrected
    ``small_corrected`` (4 mm) and ``corrected`` (native grid); ``given``: a native brain mask used instead
    of the image-driven one."""
    lesion_native = None
    if lesion is not None:
        lesion_native = to_ants(nib.Nifti1Image((np.asarray(lesion.dataobj) > 0).astype(np.float32), lesion.affine))

    def pulled_back(image, mask="brain"):
        return ants.apply_transforms(image, tpl[mask], stage["invtransforms"], whichtoinvert=[True],
                                     interpolator="nearestNeighbor")

    def stripped(image, brain):
        moving_mask = None
        if lesion_keep is not None:
            moving_mask = ants.resample_image_to_target(lesion_keep, image, interp_type="nearestNeighbor") * brain
        return image * brain, moving_mask

    # brain stage, in rounds: a brain mask drawn from the image itself near the template brain pulled back
    # through the current transform (the head stage can be 10+ mm and degrees off on real heads, so the
    # template's mask pulled back through it cuts brain and keeps scalp), then brain-to-brain from 16 mm,
    # from two starts: the current transform, and its linear part moved so that the brain found in the image
    # lands on the template brain (centres of mass); the better correlation with the template brain is kept.
    # Rounds go on (at least 2, at most ``brain_passes``) until the transform moves less than
    # ``BRAIN_CONVERGED_MM`` over the brain: each round's mask is drawn nearer the brain than the last.
    mid = ants.resample_image(corrected, (MASK_SPACING_MM,) * 3, use_voxels=False, interp_type=0)
    image = small_corrected
    points = brain_points_lps(template)[::8]
    # the rounds' results are compared by the correlation of the whole (not skull-stripped) corrected image
    # with the template brain, outside the lesion: unlike each round's own score it does not depend on the
    # round's brain mask. The best round is kept (a mask drawn far off can send a round away from the brain).
    whole_keep = (None if lesion_keep is None else
                  ants.resample_image_to_target(lesion_keep, image, interp_type="nearestNeighbor"))
    best_round = None
    if given is not None:
        own = ants.iMath(ants.resample_image_to_target(given, mid, interp_type="nearestNeighbor"), "MD", 1)
    for n in range(max(brain_passes, 1)):
        if given is None:
            own = image_brain_mask(mid, pulled_back(mid), lesion_native)
        own_small = ants.resample_image_to_target(own, image, interp_type="nearestNeighbor")
        moving, moving_mask = stripped(image, own_small)
        current = read_ants_affine(stage["fwdtransforms"][0])
        own_centre = _physical_points(own_small, np.argwhere(own_small.numpy() > 0.5)).mean(axis=0)
        moved = current.copy()
        moved[:3, 3] += own_centre - (current[:3, :3] @ tpl_brain_centre(template) + current[:3, 3])
        centred = os.path.join(tmp, f"centred{n}.mat")
        write_ants_affine(moved, centred)
        best = None
        for m, start in enumerate((stage["fwdtransforms"][0], centred)):
            candidate = _register(tpl["t1_brain"], moving, initial=start, fixed_mask=tpl["brain_dil2_brain"],
                                  moving_mask=moving_mask, shrink=BRAIN_SHRINK, iterations=BRAIN_ITERATIONS,
                                  outprefix=os.path.join(tmp, f"brain{n}{'ab'[m]}_"))
            score = _brain_correlation(tpl, moving, moving_mask, candidate["fwdtransforms"][0])
            if best is None or score > best[0]:
                best = (score, candidate)
        stage = best[1]
        whole = _brain_correlation(tpl, image, whole_keep, stage["fwdtransforms"][0])
        clock.seconds[f"brain_round{n}_ncc"] = round(whole, 4)
        if best_round is None or whole > best_round[0]:
            best_round = (whole, stage)
        new = read_ants_affine(stage["fwdtransforms"][0])
        change = _mean_move(points, new - current)
        clock.seconds[f"brain_round{n}_change_mm"] = round(change, 3)
        if n >= 1 and change < BRAIN_CONVERGED_MM:
            break
    stage = best_round[1]
    # the refinement's mask: drawn near the final brain transform
    if given is None:
        own = image_brain_mask(mid, pulled_back(mid), lesion_native)
    own_small = ants.resample_image_to_target(own, image, interp_type="nearestNeighbor")
    clock.lap("brain_stage")
    final = os.path.join(tmp, "final.mat")
    if refine:
        moving, moving_mask = stripped(small_corrected, own_small)
        current = stage["fwdtransforms"][0]
        for r in range(REFINE_ROUNDS):
            fit = _syn_fit(tpl["t1_syn"], moving, initial=current, fixed_mask=tpl["brain_dil2_syn"],
                           moving_mask=moving_mask, outprefix=os.path.join(tmp, f"syn{r}_"), keep=lesion_keep)
            refined = os.path.join(tmp, f"refined{r}.mat")
            write_ants_affine(read_ants_affine(current) @ fit, refined)
            clock.seconds[f"refine_round{r}_change_mm"] = round(_mean_move(points, fit - np.eye(4)), 3)
            current = refined
        shutil.copyfile(current, final)
    else:
        shutil.copyfile(stage["fwdtransforms"][0], final)
    clock.lap("refinement")
    return Registration(final, ants_affine_to_ras(final), corrected, clock.seconds)


def extracted_brain(data: np.ndarray, zooms) -> np.ndarray:
    """The brain of a brain-extracted image: its non-zero voxels (the largest connected region, and any other
    of at least a tenth of its size, holes filled). Raises ``ValueError`` when that is not brain-sized: empty,
    under ``EXTRACTED_MIN_ML`` or over ``EXTRACTED_MAX_ML`` (a whole head, or a background that is not 0)."""
    nonzero = np.isfinite(data) & (data != 0)
    labels, n = ndimage.label(nonzero)
    if n == 0:
        raise ValueError("the brain-extracted T1 has no non-zero voxel")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    brain = np.isin(labels, np.flatnonzero(sizes >= 0.1 * sizes.max()))
    brain = ndimage.binary_fill_holes(brain)
    ml = float(brain.sum() * np.prod(np.asarray(zooms, float))) / 1000.0
    if not EXTRACTED_MIN_ML <= ml <= EXTRACTED_MAX_ML:
        raise ValueError(f"the non-zero region of a brain-extracted T1 is {ml:.0f} ml, not brain-sized "
                         f"({EXTRACTED_MIN_ML:g}-{EXTRACTED_MAX_ML:g} ml): is the image really brain-extracted "
                         "(zero outside the brain)?")
    return brain


def _crop_to_nonzero(img: nib.Nifti1Image, margin_mm: float = EXTRACTED_MARGIN_MM) -> nib.Nifti1Image:
    """``img`` cropped to the box of its non-zero voxels plus ``margin_mm`` (a brain-extracted image is 0 around
    the brain: the steps after this touch fewer voxels). Raises ``ValueError`` when every voxel is 0."""
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    nonzero = np.isfinite(data) & (data != 0)
    if not nonzero.any():
        raise ValueError("the brain-extracted T1 has no non-zero voxel")
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        pad = int(np.ceil(margin_mm / zooms[axis]))
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + pad + 1, data.shape[axis])))
    return nib.Nifti1Image(data[tuple(box)], img.slicer[tuple(box)].affine)


def register_brain(t1: nib.Nifti1Image, lesion: nib.Nifti1Image | None = None, *, template: str = TEMPLATE_KEY,
                   brain_passes: int = BRAIN_PASSES, refine: bool = True, workdir: str | None = None
                   ) -> Registration:
    """Affine registration of a native *brain-extracted* T1 (zero outside the brain) to the template brain.

    There is no scalp, skull or face to mislead a brain-to-brain registration, so there is no head stage and no
    image-driven brain mask: the image is cropped to its non-zero voxels (``_crop_to_nonzero``) and the brain
    is those voxels (``extracted_brain``, on a 2 mm grid). N4 runs inside that mask (4 mm, as in ``register``);
    the start is the translation that puts the brain's centre of mass on the template brain's; then the same
    brain rounds (with that mask) and least-squares refinement as ``register`` (module docstring, steps 3 and
    4). Returns the same ``Registration`` (``corrected`` on the cropped grid)."""
    ants.config._random_seed = SEED
    tpl = template_images(template)
    clock = _Clock()
    native = to_ants(_crop_to_nonzero(t1))
    # the brain mask on the 2 mm grid of the brain rounds' masks (nearest neighbour: 0 stays 0)
    mid = ants.resample_image(native, (MASK_SPACING_MM,) * 3, use_voxels=False, interp_type=1)
    brain = extracted_brain(mid.numpy(), mid.spacing)
    tmp = workdir or tempfile.mkdtemp(prefix="atlas-curate-reg-")
    os.makedirs(tmp, exist_ok=True)
    given = mid.new_image_like(brain.astype(np.float32))
    centre = _physical_points(mid, np.argwhere(brain)).mean(axis=0)
    initial = os.path.join(tmp, "init.mat")
    shift = centre - tpl_brain_centre(template)
    write_ants_affine(np.block([[np.eye(3), shift[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]]), initial)
    stage = {"fwdtransforms": [initial], "invtransforms": [initial]}
    small = robust_scale(ants.resample_image(native, (SYN_SPACING_MM,) * 3, use_voxels=False, interp_type=0))
    clock.lap("prepare")
    small_mask = ants.resample_image_to_target(given, small, interp_type="nearestNeighbor")
    field = ants.n4_bias_field_correction(small, mask=small_mask, shrink_factor=2, return_bias_field=True)
    values = field.numpy()
    values[~(values > 1e-3)] = 1.0
    bias = field.new_image_like(values)
    small_corrected = robust_scale(downsample(native, SYN_SPACING_MM) / bias)
    corrected, lesion_keep = _corrected(native, bias, lesion)
    clock.lap("bias_field")
    return _brain_stage(tpl, template, stage, small_corrected, corrected, lesion, lesion_keep, given,
                        brain_passes=brain_passes, refine=refine, tmp=tmp, clock=clock)
