"""Brain-aware affine registration of a whole-head T1 to a skull-stripped template.

A plain ``ants.registration(type_of_transform='Affine')`` of a head with scalp, skull and face to a
skull-stripped template shrinks the head onto the brain (ATLAS-FACTS.md: scale ~0.8, 15 mm error on
the real Colin27 head). Here registration is done in stages:

1. bias field: N4 on a 4 mm copy inside a head mask, the smooth field interpolated to full resolution;
2. head stage: the head (4 mm) is aligned to a *head-shaped* target, the template brain wrapped in a
   14 mm shell of constant intensity, so that scalp and skull have somewhere to go (affine, Mattes MI,
   single-threaded in a subprocess: see ``head_stage``);
3. brain stages (twice): the template brain mask, dilated, is mapped back to the T1 with the current
   transform; the skull-stripped T1 (2 mm) is registered to the template brain (affine) with a
   fixed-image mask (the dilated template brain) and a moving-image mask that excludes the lesion
   (cost-function masking, as sMRIPrep does), each stage starting from the previous transform.

Deterministic: a one-threaded head stage, then the global-correlation metric (see ``METRIC``) with seeded
regular sampling.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import ants
import nibabel as nib
import numpy as np
from scipy import ndimage

from ..templates import get_template, template_arrays

SEED = 20200101
# Global correlation, not Mattes MI: ANTs accumulates the multithreaded MI histogram in an order that
# changes between runs (the same inputs gave up to 0.9 mm different transforms); GC gives identical
# transforms run to run with all threads, at the same accuracy on T1-to-T1 registration.
METRIC = "GC"
HEAD_ITERATIONS = (300, 150)
HEAD_SHELL_MM = 14.0
HEAD_SHELL_VALUE = 0.5


def to_ants(img: nib.Nifti1Image, dtype=np.float32) -> ants.ANTsImage:
    data = np.asarray(img.dataobj, dtype=dtype)
    return ants.from_nibabel_nifti(nib.Nifti1Image(data, img.affine))


def from_ants(img: ants.ANTsImage) -> nib.Nifti1Image:
    return ants.to_nibabel_nifti(img)


@lru_cache(maxsize=2)
def template_images(key: str = "mni2009") -> dict[str, ants.ANTsImage]:
    """Template T1 (0..1), brain masks and the head-shaped target, as ANTs images (per process)."""
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
    images = {
        "t1": nib.Nifti1Image(arrays["T1w"].astype(np.float32), affine),
        "brain": nib.Nifti1Image(brain.astype(np.float32), affine),
        "brain_dil2": nib.Nifti1Image(ndimage.binary_dilation(brain, iterations=2).astype(np.float32), affine),
        "brain_dil4": nib.Nifti1Image(ndimage.binary_dilation(brain, iterations=4).astype(np.float32), affine),
        "head": nib.Nifti1Image(head.astype(np.float32), head_affine),
    }
    out = {k: to_ants(v) for k, v in images.items()}
    out["t1_2mm"] = ants.resample_image(out["t1"], (2, 2, 2), use_voxels=False, interp_type=0)
    out["brain_dil2_2mm"] = ants.resample_image(out["brain_dil2"], (2, 2, 2), use_voxels=False, interp_type=1)
    out["head_4mm"] = ants.resample_image(out["head"], (4, 4, 4), use_voxels=False, interp_type=0)
    return out


def robust_scale(img: ants.ANTsImage) -> ants.ANTsImage:
    data = img.numpy()
    top = float(np.percentile(data[data > 0], 99.5)) if np.any(data > 0) else 1.0
    return img / (top if top > 0 else 1.0)


def head_mask(img: ants.ANTsImage) -> ants.ANTsImage:
    data = img.numpy()
    threshold = 0.15 * float(np.percentile(data, 98))
    return ants.get_mask(img, low_thresh=threshold, high_thresh=float(data.max()) + 1, cleanup=2)


def bias_correct(img: ants.ANTsImage) -> tuple[ants.ANTsImage, ants.ANTsImage]:
    """N4 on a 4 mm copy inside a head mask; returns (corrected full-resolution image, head mask 4 mm)."""
    small = ants.resample_image(img, (4, 4, 4), use_voxels=False, interp_type=0)
    mask = head_mask(small)
    field = ants.n4_bias_field_correction(small, mask=mask, shrink_factor=2, return_bias_field=True)
    field = ants.resample_image_to_target(field, img, interp_type="linear")
    values = field.numpy()
    values[~(values > 1e-3)] = 1.0
    return img.new_image_like(img.numpy() / values), mask


def head_stage(fixed, moving, *, initial: str | None, outprefix: str) -> dict:
    """The coarse 4 mm head stage with Mattes MI (GC lacks the capture range here: it failed on a quarter
    of synthetic scans), run single-threaded in a subprocess so that it is deterministic."""
    fixed_path, moving_path = outprefix + "fixed.nii.gz", outprefix + "moving.nii.gz"
    ants.image_write(fixed, fixed_path)
    ants.image_write(moving, moving_path)
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "atlas_curate.normalize._headstage", fixed_path, moving_path,
                           outprefix, initial or ""], env=env, capture_output=True, text=True)
    path = outprefix + "0GenericAffine.mat"
    if done.returncode != 0 or not os.path.isfile(path):
        raise RuntimeError(f"head registration stage failed: {done.stderr.strip()[-500:]}")
    return {"fwdtransforms": [path], "invtransforms": [path]}


@dataclass
class Registration:
    transform_file: str          # ANTs affine .mat (template -> native points, as ANTs stores it)
    affine_ras: np.ndarray       # native world RAS mm -> template world RAS mm
    corrected: ants.ANTsImage    # bias-corrected, robustly scaled native T1


def ants_affine_to_ras(path: str) -> np.ndarray:
    """The native->template RAS matrix of an ANTs affine (which maps template LPS to native LPS)."""
    tx = ants.read_transform(path)
    params = np.asarray(tx.parameters, dtype=float)
    matrix = params[:9].reshape(3, 3)
    translation = params[9:12]
    centre = np.asarray(tx.fixed_parameters, dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    template_to_native = flip @ lps @ flip
    return np.linalg.inv(template_to_native)


def _register(fixed, moving, *, initial, fixed_mask=None, moving_mask=None, shrink=(2, 1), iterations=(200, 100),
              outprefix: str, step: float = 0.1, sampling: float = 0.25, metric: str | None = None) -> dict:
    """One affine antsRegistration stage (``METRIC``, seeded regular sampling, optional masks)."""
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
        "--metric", (f"GC[{fixed_str},{moving_str},1,1,Regular,{sampling}]" if (metric or METRIC) == "GC" else
                     f"Mattes[{fixed_str},{moving_str},1,32,Regular,{sampling}]"),
        "--transform", "Affine[%s]" % step,
        "--convergence", "[%s,1e-7,10]" % "x".join(str(i) for i in iterations),
        "--shrink-factors", "x".join(str(s) for s in shrink),
        "--smoothing-sigmas", "x".join(str(max(s - 1, 0)) for s in shrink) + "vox",
        "--masks", masks,
        "--winsorize-image-intensities", "[0.005,0.995]",
        "--use-histogram-matching", "0",
        "--random-seed", str(SEED),
        "-z", "1",
        "--output", "[%s]" % outprefix,
    ]
    code = get_lib_fn("antsRegistration")(process_arguments(args))
    if code != 0:
        raise RuntimeError(f"antsRegistration failed with code {code}")
    path = outprefix + "0GenericAffine.mat"
    if not os.path.isfile(path):
        raise RuntimeError(f"antsRegistration wrote no transform to {path}")
    return {"fwdtransforms": [path], "invtransforms": [path]}


def register(t1: nib.Nifti1Image, lesion: nib.Nifti1Image | None = None, *, template: str = "mni2009",
             initial: str | None = None, brain_passes: int = 2, workdir: str | None = None) -> Registration:
    """Affine registration of a native whole-head T1 to the template (see module docstring).

    Intermediate files go to ``workdir`` (a new temporary folder when None, which the caller removes
    after reading ``transform_file``)."""
    ants.config._random_seed = SEED
    tpl = template_images(template)
    native = robust_scale(to_ants(t1))
    corrected, _ = bias_correct(native)
    corrected = robust_scale(corrected)
    tmp = workdir or tempfile.mkdtemp(prefix="atlas-curate-reg-")
    os.makedirs(tmp, exist_ok=True)
    moving_4mm = ants.resample_image(corrected, (4, 4, 4), use_voxels=False, interp_type=0)
    stage = head_stage(tpl["head_4mm"], moving_4mm, initial=initial, outprefix=os.path.join(tmp, "head_"))
    lesion_keep = None
    if lesion is not None:
        grown = ndimage.binary_dilation(np.asarray(lesion.dataobj) > 0, iterations=2)
        lesion_keep = to_ants(nib.Nifti1Image((~grown).astype(np.float32), lesion.affine))
    for n in range(brain_passes):
        brain = ants.apply_transforms(corrected, tpl["brain_dil4"], stage["invtransforms"], whichtoinvert=[True],
                                      interpolator="nearestNeighbor")
        stripped = corrected * brain
        moving = ants.resample_image(stripped, (2, 2, 2), use_voxels=False, interp_type=0)
        moving_mask = None
        if lesion_keep is not None:
            keep = ants.resample_image_to_target(lesion_keep, moving, interp_type="nearestNeighbor")
            moving_mask = keep * ants.resample_image_to_target(brain, moving, interp_type="nearestNeighbor")
        stage = _register(tpl["t1_2mm"], moving, initial=stage["fwdtransforms"][0],
                          fixed_mask=tpl["brain_dil2_2mm"], moving_mask=moving_mask,
                          shrink=(2, 1), iterations=(200, 100),
                          outprefix=os.path.join(tmp, f"brain{n}_"))
    final = os.path.join(tmp, "final.mat")
    shutil.copyfile(stage["fwdtransforms"][0], final)
    return Registration(final, ants_affine_to_ras(final), corrected)
