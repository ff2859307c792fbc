"""Irregular stroke lesions in a subject's anatomy (template world, 1 mm lattice).

A lesion is the connected top of a smooth random field around a centre, restricted to the
subject's grey/white matter, with a CSF-like necrotic core, a brighter gliotic rim and a
partial-volume boundary, so that no intensity threshold alone separates it from CSF or grey matter.
Without pathology the core is 0.12 and the rim 0.5 (template units, white matter ~0.87); with pathology
(:mod:`.pathology`) the core is the subject's CSF level and the rim close to grey matter (0.55-0.68).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .head import Deformation, HeadModel, sample

CSF_LEVEL = 0.12
GLIOSIS_LEVEL = 0.5
MIN_CM3, MAX_CM3 = 0.2, 60.0


@dataclass
class Lesion:
    origin: np.ndarray     # world mm of local voxel (0, 0, 0); integer mm on the template lattice
    mask: np.ndarray       # bool, local 1 mm box
    fraction: np.ndarray   # float32 partial-volume fraction (0..1)
    intensity: np.ndarray  # float32 lesion intensity where fraction > 0
    core_level: float = CSF_LEVEL      # the cavity's intensity (before texture)
    rim_level: float = GLIOSIS_LEVEL   # the gliotic rim's

    @property
    def volume_mm3(self) -> float:
        return float(np.count_nonzero(self.mask))

    def world_points(self) -> np.ndarray:
        return np.argwhere(self.mask) + self.origin

    def sample(self, name: str, points: np.ndarray, order: int = 1) -> np.ndarray:
        """Sample ``fraction``, ``intensity`` or ``mask`` at world points (..., 3); 0 outside the box."""
        arr = getattr(self, name)
        arr = arr.astype(np.float32) if arr.dtype == bool else arr
        idx = np.moveaxis(points - self.origin, -1, 0)
        return ndimage.map_coordinates(arr, idx, order=order, mode="constant", cval=0.0)


def _local_grid(centre: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    origin = np.round(centre) - half
    ax = np.arange(2 * half + 1, dtype=np.float32)
    pts = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1) + origin.astype(np.float32)
    return origin, pts


def make_lesion(rng: np.random.Generator, model: HeadModel, deform: Deformation, centre: np.ndarray,
                volume_mm3: float, *, core: float = CSF_LEVEL, rim: float = GLIOSIS_LEVEL,
                rim_mm: float = 1.5) -> Lesion | None:
    """One lesion of about ``volume_mm3`` around ``centre``: intensity ``rim`` at its edge falling to ``core``
    (the cavity's CSF) over about ``rim_mm`` (the intensities draw no random numbers: the shape is the same
    whatever they are)."""
    radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    half = int(np.ceil(1.9 * radius + 4))
    origin, pts = _local_grid(centre, half)
    warped = pts + deform(pts)
    tissue = sample(model.tissue, model, warped)
    axes = radius * rng.uniform(0.7, 1.35, 3)
    rot = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix().astype(np.float32)
    rel = (pts - centre) @ rot
    ellipsoid = 1.0 - np.sum((rel / axes) ** 2, axis=-1)
    noise = ndimage.gaussian_filter(rng.standard_normal(tissue.shape).astype(np.float32), max(1.0, radius / 3))
    noise *= 0.7 / (noise.std() + 1e-6)
    field = np.where(tissue >= 0.4, ellipsoid + noise, -np.inf)
    target = int(round(volume_mm3))
    finite = np.isfinite(field)
    if np.count_nonzero(finite) < target:
        return None
    threshold = np.partition(field[finite], -target)[-target]
    candidate = field >= threshold
    labels, n = ndimage.label(candidate)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(candidate, labels, index=np.arange(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    if np.count_nonzero(mask) < 0.5 * target:
        return None
    fraction = ndimage.gaussian_filter(mask.astype(np.float32), 0.7)
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1].astype(np.float32)
    texture = 1.0 + 0.08 * ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), 1.0) * 3
    level = core + (rim - core) * np.exp(-np.maximum(depth - 0.5, 0) / rim_mm)
    intensity = (level * texture).astype(np.float32)
    return Lesion(origin.astype(np.float32), mask, fraction.astype(np.float32), intensity, float(core), float(rim))


def lesion_volumes(rng: np.random.Generator, count: int) -> list[float]:
    """Log-uniform volumes (mm³) between 0.2 and 60 cm³, largest first."""
    vols = np.exp(rng.uniform(np.log(MIN_CM3), np.log(MAX_CM3), count)) * 1000.0
    return sorted(vols.tolist(), reverse=True)


def place_lesions(rng: np.random.Generator, model: HeadModel, deform: Deformation, volumes: list[float],
                  centres: Callable[[float], np.ndarray], max_tries: int = 40,
                  styles: list[dict] | None = None) -> list[Lesion]:
    """Place non-overlapping lesions (≥ 2 mm apart); ``centres(volume)`` gives candidate centres and
    ``styles[k]`` the intensities (``core``, ``rim``, ``rim_mm`` of :func:`make_lesion`) of the k-th volume."""
    placed: list[Lesion] = []
    occupied: set[tuple[int, int, int]] = set()
    for k, volume in enumerate(volumes):
        style = styles[k] if styles else {}
        candidates = centres(volume)
        for _ in range(max_tries):
            centre = candidates[rng.integers(len(candidates))].astype(np.float32)
            if sample(model.tissue, model, (centre + deform(centre[None]))[0][None])[0] < 0.6:
                continue
            lesion = make_lesion(rng, model, deform, centre, volume, **style)
            if lesion is None:
                continue
            grown = ndimage.binary_dilation(np.pad(lesion.mask, 2), iterations=2)
            pts = {tuple(p) for p in (np.argwhere(grown) + lesion.origin - 2).astype(int).tolist()}
            if pts & occupied:
                continue
            occupied |= pts
            placed.append(lesion)
            break
    return placed
