"""A synthetic whole head (brain, CSF, skull, scalp, face, neck) around the MNI152NLin2009aSym brain,
and per-subject smooth non-linear deformations of it (overall shape and ventricle size).

Intensities are in template units (template white matter ~0.85). Fat is brighter than white matter
and the face is large, as on real T1 heads: that is what makes whole-head registration to a
skull-stripped template fail unless it is brain-aware.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from ..anatomy import world_coords
from ..naming import TEMPLATE_KEY
from ..templates import get_template, template_arrays

# Padding (voxels = mm) added to the template grid for face, nose and neck: (low, high) per axis.
HEAD_PAD = ((0, 0), (0, 20), (60, 0))
# Shell layers outside the brain mask: (outer distance in mm, intensity).
SHELL = [(2.5, 0.12), (4.5, 0.05), (7.0, 0.45), (8.5, 0.05), (10.5, 0.35), (14.5, 0.92), (16.0, 0.55)]
SHELL_MM = SHELL[-1][0]
SKULL_MM = 8.5


@dataclass(frozen=True)
class HeadModel:
    affine: np.ndarray        # head grid voxel -> template world (1 mm, axis aligned)
    t1: np.ndarray            # float32 intensities
    tissue: np.ndarray        # float32 grey+white matter probability
    brain: np.ndarray         # float32 0/1 template brain mask
    face: np.ndarray          # bool: face, nose, jaw and neck tissue (what defacing removes)
    head: np.ndarray          # bool
    ventricle_centre: np.ndarray

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3]


def _ellipsoid(x, y, z, centre, radii):
    return (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2) <= 1.0


@lru_cache(maxsize=1)
def head_model(template: str = TEMPLATE_KEY) -> HeadModel:
    """Build (once per process) the synthetic head on the padded template grid."""
    arrays = template_arrays(template)
    tpl_affine = get_template(template).affine
    pad = np.array(HEAD_PAD)
    t1 = np.pad(arrays["T1w"], HEAD_PAD)
    gm = np.pad(arrays["GM"], HEAD_PAD)
    wm = np.pad(arrays["WM"], HEAD_PAD)
    affine = tpl_affine.copy()
    affine[:3, 3] -= pad[:, 0]
    x, y, z = world_coords(t1.shape, affine)

    brain = ndimage.binary_fill_holes(t1 > 0)
    dist = ndimage.distance_transform_edt(~brain).astype(np.float32)
    rng = np.random.default_rng(20171106)
    texture = ndimage.gaussian_filter(rng.standard_normal(t1.shape).astype(np.float32), 3.0)
    texture *= 0.08 / (texture.std() + 1e-6)

    out = np.where(brain, t1, 0).astype(np.float32)
    inner = 0.0
    for outer, value in SHELL:
        out[(dist > inner) & (dist <= outer)] = value
        inner = outer
    shell = dist <= SHELL_MM

    face_region = (_ellipsoid(x, y, z, (0, 58, -48), (60, 48, 52))
                   | _ellipsoid(x, y, z, (0, 96, -24), (11, 16, 20))
                   | _ellipsoid(x, y, z, (0, 55, -92), (44, 40, 26)))
    neck = ((x / 52.0) ** 2 + ((y + 12.0) / 58.0) ** 2 <= 1.0) & (z < -60)
    face = (face_region | neck) & (dist > SKULL_MM) & ~brain
    box = ndimage.find_objects(face.astype(np.uint8))[0]
    face_dist = np.zeros(face.shape, np.float32)
    face_dist[box] = ndimage.distance_transform_edt(np.pad(face[box], 1))[1:-1, 1:-1, 1:-1]
    face_vals = np.where(face_dist <= 4.0, 0.88, 0.42).astype(np.float32)
    eyes = _ellipsoid(x, y, z, (-31, 57, -12), (11, 11, 11)) | _ellipsoid(x, y, z, (31, 57, -12), (11, 11, 11))
    orbit_fat = (_ellipsoid(x, y, z, (-31, 52, -12), (16, 17, 15))
                 | _ellipsoid(x, y, z, (31, 52, -12), (16, 17, 15))) & ~eyes
    sinus = (_ellipsoid(x, y, z, (-24, 52, -42), (11, 14, 14)) | _ellipsoid(x, y, z, (24, 52, -42), (11, 14, 14))
             | _ellipsoid(x, y, z, (0, 72, -36), (7, 24, 14)))
    canal = ((x / 8.0) ** 2 + ((y + 38.0) / 8.0) ** 2 <= 1.0) & (z < -72)
    cord = ((x / 5.0) ** 2 + ((y + 38.0) / 5.0) ** 2 <= 1.0) & (z < -72)
    face_vals = np.where(orbit_fat, 0.92, face_vals)
    face_vals = np.where(eyes, 0.08, face_vals)
    face_vals = np.where(sinus, 0.0, face_vals)
    face_vals = np.where(canal, 0.12, face_vals)
    face_vals = np.where(cord, 0.6, face_vals)
    out = np.where(face & ~shell, face_vals, out)
    head = shell | face
    out = np.where(head & ~brain, out * (1.0 + texture), out).astype(np.float32)
    out[~head] = 0.0

    ventricles = brain & (t1 < 0.35) & (np.abs(x) < 25) & (y > -45) & (y < 30) & (z > -5) & (z < 35)
    centre = np.argwhere(ventricles).mean(axis=0)
    vent_world = affine[:3, :3] @ centre + affine[:3, 3]
    for arr in (out, gm, wm):
        arr.setflags(write=False)
    return HeadModel(affine, out, (gm + wm).astype(np.float32), brain.astype(np.float32),
                     face & ~shell, head, vent_world)


@dataclass(frozen=True)
class Deformation:
    """Smooth displacement (mm) from subject space to template space: u = p + d(p).

    A random field on a 4 mm lattice plus a radial ventricle term: ``ventricle`` > 0 enlarges the
    ventricles (samples are drawn from nearer their centre), < 0 shrinks them.
    """

    lattice: np.ndarray       # (3, nx, ny, nz) displacement on the lattice
    lattice_origin: np.ndarray
    spacing: float
    ventricle: float
    ventricle_centre: np.ndarray
    ventricle_sigma: float = 22.0
    linear: np.ndarray | None = None   # (4, 3) affine part removed so the truth affine is the best fit

    def with_affine_removed(self, points: np.ndarray) -> "Deformation":
        """The same deformation minus its least-squares affine part over ``points`` (N, 3), so that
        it is purely non-linear there and the pose affine stays the best affine fit (the truth)."""
        disp = self(points)
        design = np.c_[points, np.ones(len(points))]
        coef, *_ = np.linalg.lstsq(design, disp, rcond=None)
        base = self.linear if self.linear is not None else np.zeros((4, 3))
        return Deformation(self.lattice, self.lattice_origin, self.spacing, self.ventricle, self.ventricle_centre,
                           self.ventricle_sigma, (base + coef).astype(np.float32))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Displacement at world points of shape (..., 3)."""
        idx = (points - self.lattice_origin) / self.spacing
        coords = np.moveaxis(idx, -1, 0)
        disp = np.stack([ndimage.map_coordinates(self.lattice[i], coords, order=1, mode="nearest")
                         for i in range(3)], axis=-1)
        rel = points - self.ventricle_centre
        weight = np.exp(-np.sum(rel * rel, axis=-1) / (2 * self.ventricle_sigma ** 2))
        disp -= (self.ventricle * weight)[..., None] * rel
        if self.linear is not None:
            disp -= points @ self.linear[:3] + self.linear[3]
        return disp.astype(np.float32)


def random_deformation(rng: np.random.Generator, model: HeadModel, *, amplitude: float,
                       ventricle: float, control_mm: float = 24.0, spacing: float = 4.0) -> Deformation:
    shape = np.array(model.t1.shape)
    extent = shape * 1.0
    n_ctrl = np.ceil(extent / control_mm).astype(int) + 3
    ctrl = rng.standard_normal((3, *n_ctrl)).astype(np.float32) * amplitude
    factor = control_mm / spacing
    lattice = np.stack([ndimage.zoom(c, factor, order=3, mode="nearest") for c in ctrl])
    origin = model.origin - control_mm
    return Deformation(lattice, origin, spacing, ventricle, model.ventricle_centre)


def sample(model_array: np.ndarray, model: HeadModel, points: np.ndarray, *, order: int = 1) -> np.ndarray:
    """Sample a head-grid array at template-world points (..., 3); zero outside the grid."""
    inv = np.linalg.inv(model.affine)
    idx = points @ inv[:3, :3].T + inv[:3, 3]
    return ndimage.map_coordinates(model_array, np.moveaxis(idx, -1, 0), order=order, mode="constant", cval=0.0)
