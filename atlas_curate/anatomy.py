"""Lesion anatomy in template space: hemisphere, cortical / subcortical / other, vascular territory.

One definition, used both by the synthetic release (to fill its spreadsheet) and by the dataset
tables (to recompute the spreadsheet's counts from the masks), so the two can be compared.

Rules (template-space millimetres, RAS: +x is the subject's right):

* hemisphere: sign of the lesion centroid's x (``Left`` if x < 0); ``Bilateral`` when at least
  20 % of the lesion lies on each side of the midline.
* other (brainstem / cerebellum): at least half of the lesion lies in the infratentorial region,
  approximated geometrically: below the plane z = -12 - 0.25 (y + 40) behind y = -10
  (brainstem: |x| <= 15 within that region, cerebellum otherwise).
* cortical: the lesion reaches cortex, i.e. at least 5 voxels (or 1 % of it) in the template's grey
  matter (probability >= 0.5) outside the deep grey box (basal ganglia and thalami:
  |x| < 33, -35 < y < 28, -12 < z < 22); otherwise subcortical.
* vascular territory (a coarse atlas-free rule for synthetic metadata): cerebellum SCA,
  brainstem basilar (``BA``), occipital/inferior-posterior PCA, medial superior frontal-parietal
  ACA, otherwise MCA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .naming import TEMPLATE_KEY
from .templates import template_arrays, template_grid

DEEP_GREY_BOX = ((-33.0, 33.0), (-35.0, 28.0), (-12.0, 22.0))
CORTICAL_MIN_VOXELS = 5
CORTICAL_MIN_FRACTION = 0.01
BILATERAL_FRACTION = 0.2


@dataclass(frozen=True)
class Anatomy:
    affine: np.ndarray
    brain: np.ndarray      # bool
    cortex: np.ndarray     # bool
    infratentorial: np.ndarray  # bool
    tissue: np.ndarray     # bool: grey or white matter (not CSF)


def world_coords(shape, affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable x, y, z world coordinates (mm) of an axis-aligned grid."""
    if np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))):
        raise ValueError("world_coords expects an axis-aligned grid")
    axes = [affine[i, i] * np.arange(n, dtype=np.float32) + affine[i, 3] for i, n in enumerate(shape[:3])]
    return (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])


def infratentorial_region(x, y, z):
    return (y < -10.0) & (z < -12.0 - 0.25 * (y + 40.0))


def deep_grey_region(x, y, z):
    (x0, x1), (y0, y1), (z0, z1) = DEEP_GREY_BOX
    return (x > x0) & (x < x1) & (y > y0) & (y < y1) & (z > z0) & (z < z1)


@lru_cache(maxsize=2)
def template_anatomy(key: str = TEMPLATE_KEY) -> Anatomy:
    arrays = template_arrays(key)
    grid = template_grid(key)
    affine, brain = grid.affine, grid.brain
    x, y, z = world_coords(grid.shape, affine)
    gm = arrays["GM"] >= 0.5
    tissue = (arrays["GM"] + arrays["WM"]) >= 0.5
    infra = infratentorial_region(x, y, z) & brain
    cortex = gm & ~deep_grey_region(x, y, z) & ~infra
    return Anatomy(affine, brain, cortex, infra, tissue)


@dataclass(frozen=True)
class LesionAnatomy:
    volume_mm3: float
    centroid_mm: tuple[float, float, float]
    hemisphere: str   # Left | Right | Bilateral | Brainstem
    location: str     # cortical | subcortical | other
    other_site: str   # brainstem | cerebellum | ""
    territory: str

    def as_dict(self) -> dict:
        return {
            "volume_mm3": round(self.volume_mm3, 3),
            "centroid_mm": [round(c, 2) for c in self.centroid_mm],
            "hemisphere": self.hemisphere,
            "location": self.location,
            "other_site": self.other_site,
            "territory": self.territory,
        }


def classify_lesion(mask: np.ndarray, key: str = TEMPLATE_KEY) -> LesionAnatomy:
    """Describe one lesion given as a boolean mask on the template grid."""
    anat = template_anatomy(key)
    if mask.shape != anat.brain.shape:
        raise ValueError(f"mask shape {mask.shape} is not the template grid {anat.brain.shape}")
    return classify_voxels(np.argwhere(mask), key)


def classify_voxels(idx: np.ndarray, key: str = TEMPLATE_KEY) -> LesionAnatomy:
    """Describe one lesion given as its (n, 3) voxel indices on the template grid (the same rules as
    :func:`classify_lesion`, without a full-grid mask: cheap when a label image holds many lesions)."""
    anat = template_anatomy(key)
    idx = np.asarray(idx)
    if idx.size == 0:
        raise ValueError("empty lesion mask")
    world = idx @ anat.affine[:3, :3].T + anat.affine[:3, 3]
    n = len(idx)
    centroid = world.mean(axis=0)
    left = np.count_nonzero(world[:, 0] < 0) / n
    where = tuple(idx.T)
    in_infra = np.count_nonzero(anat.infratentorial[where]) / n
    in_cortex = int(np.count_nonzero(anat.cortex[where]))
    other_site = ""
    if in_infra >= 0.5:
        location = "other"
        brainstem = np.count_nonzero(np.abs(world[:, 0]) <= 15.0) / n >= 0.5
        other_site = "brainstem" if brainstem else "cerebellum"
    elif in_cortex >= max(CORTICAL_MIN_VOXELS, CORTICAL_MIN_FRACTION * n):
        location = "cortical"
    else:
        location = "subcortical"
    if other_site == "brainstem":
        hemisphere = "Brainstem"
    elif min(left, 1 - left) >= BILATERAL_FRACTION:
        hemisphere = "Bilateral"
    else:
        hemisphere = "Left" if centroid[0] < 0 else "Right"
    x, y, z = centroid
    if other_site == "cerebellum":
        territory = "SCA"
    elif other_site == "brainstem":
        territory = "BA"
    elif y < -60 or (y < -30 and z < -5):
        territory = "PCA"
    elif abs(x) < 20 and z > 25 and y > -40:
        territory = "ACA"
    else:
        territory = "MCA"
    return LesionAnatomy(float(n * abs(np.linalg.det(anat.affine[:3, :3]))), tuple(map(float, centroid)),
                         hemisphere, location, other_site, territory)
