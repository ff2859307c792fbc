"""Defacing in template space: remove the face (skin, muscle and bone anterior/inferior to the brain).

The face region is defined once on the template grid from a profile kept as data in
``templates/registry.json`` (``deface_profile``): below z = -25 mm, everything anterior to the anterior
edge of the ICBM 2009c skull-without-face mask (minus a margin) is face. Voxels near the template brain
are never touched, so defacing cannot change the brain.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from ..anatomy import world_coords
from ..templates import get_template, registry, template_arrays


@lru_cache(maxsize=2)
def face_mask(key: str = "mni2009") -> np.ndarray:
    """Boolean face region on the template grid."""
    profile = registry()[get_template(key).key]["deface_profile"]
    arrays = template_arrays(key)
    x, y, z = world_coords(arrays["T1w"].shape, get_template(key).affine)
    y_max = np.interp(z, profile["z_mm"], profile["y_max_mm"]) - profile["margin_mm"]
    face = np.broadcast_to(y > y_max, arrays["T1w"].shape).copy()
    brain = arrays["T1w"] > 0
    protected = ndimage.binary_dilation(brain, iterations=int(round(profile["brain_margin_mm"])))
    face &= ~protected
    face.setflags(write=False)
    return face


def deface(data: np.ndarray, key: str = "mni2009") -> np.ndarray:
    """A copy of a template-grid image with the face set to 0."""
    out = np.array(data, copy=True)
    out[face_mask(key)] = 0
    return out
