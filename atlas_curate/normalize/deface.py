"""Defacing in template space: remove the face (skin, muscle and bone anterior/inferior to the brain).

The face region is defined once on the template grid from a profile kept as data in
``templates/registry.json`` (``deface_profile``): for each (x, z) column, everything anterior to the
anterior edge of the ICBM 2009c head-without-face mask (minus a margin) is face. Voxels near the
template brain are never touched, so defacing cannot change the brain.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator

from ..anatomy import world_coords
from ..naming import TEMPLATE_KEY
from ..templates import get_template, registry, template_arrays

NO_HEAD = -1000.0   # table value where the column holds no head: everything in front of min_y is face
ABOVE = 1000.0      # above the table nothing is removed


@lru_cache(maxsize=2)
def face_mask(key: str = TEMPLATE_KEY) -> np.ndarray:
    """Boolean face region on the template grid."""
    profile = registry()[get_template(key).key]["deface_profile"]
    arrays = template_arrays(key)
    shape = arrays["T1w"].shape
    x, y, z = world_coords(shape, get_template(key).affine)
    table = np.array([[NO_HEAD if v is None else v for v in row] for row in profile["y_max_mm"]], dtype=float)
    xs, zs = np.asarray(profile["x_mm"], float), np.asarray(profile["z_mm"], float)
    interp = RegularGridInterpolator((zs, xs), table, method="nearest", bounds_error=False, fill_value=None)
    zz, xx = np.meshgrid(z.ravel(), x.ravel())           # (nx, nz)
    y_max = interp(np.stack([np.clip(zz, zs[0], zs[-1]), np.clip(xx, xs[0], xs[-1])], axis=-1))
    y_max = np.where(zz > zs[-1], ABOVE, y_max) - profile["margin_mm"]
    y_max = np.maximum(y_max, profile["min_y_mm"])
    face = y > y_max[:, None, :]
    brain = arrays["T1w"] > 0
    face &= ~ndimage.binary_dilation(brain, iterations=int(round(profile["brain_margin_mm"])))
    face.setflags(write=False)
    return face


def deface(data: np.ndarray, key: str = TEMPLATE_KEY) -> np.ndarray:
    """A copy of a template-grid image with the face set to 0."""
    out = np.array(data, copy=True)
    out[face_mask(key)] = 0
    return out
