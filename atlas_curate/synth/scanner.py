"""Put a real head through a simulated scanner: a random pose, a scanner's grid and field of view, a
bias field, noise and a painted lesion, with the exact map back to the original head.

The synthetic heads of ``head.py`` are built on the template, so a registration tuned on them can still
fail on real heads (scalp, fat, face, a neck cut by the field of view). This module takes any real T1
head (and, optionally, a brain mask of it) and produces the variety a stroke cohort shows:

* pose: rotation about each axis up to ``max_rotation_deg``, translation up to ``max_shift_mm``,
  per-axis scale (head size) in ``scale_range``;
* grid: 1 mm or 0.9 x 0.9 x 3 mm (the thick axis along any of the three voxel axes), any of the 48
  orientation codes (axis order and signs), each voxel of a thick slice the mean over the slice
  profile (partial volume), not a point sample;
* field of view: the head plus a 6-16 mm margin, the neck cut at a random height or left where the
  original scan ends; optionally a large field of view with shoulders below the neck;
* intensity: a smooth multiplicative bias field spanning a given range (0.6-1.6x by default), Rician
  noise;
* a lesion painted into the brain: a chronic-stroke cavity (CSF-dark core, a grey-matter-like gliotic
  rim, partial-volume edge) of a requested volume, up to a quarter of a hemisphere and beyond.

``scan_head`` returns the scan, its lesion mask on the scan grid and ``Q``, the 4x4 map from the scan's
world (RAS mm) to the original head's world: a registration ``A`` of the scan to a template recovers
the original head's registration as ``A @ inv(Q)``, the same matrix for every scan of the head.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

GRIDS = ("1mm", "0.9x0.9x3")


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """3x3 rotation: about x by ``ax``, then y by ``ay``, then z by ``az`` (radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def orientation_codes() -> list[str]:
    """The 48 orientation codes (``RAS``, ``LPS``, ``PIR``, ...)."""
    names = {0: "LR", 1: "PA", 2: "IS"}
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((0, 1), repeat=3):
            out.append("".join(names[a][s] for a, s in zip(perm, signs)))
    return out


@dataclass
class ScanSpec:
    """What the simulated scanner does; every field has a realistic default."""
    grid: str = "1mm"                   # "1mm" or "0.9x0.9x3"
    orientation: str = "RAS"            # nibabel axis codes of the voxel axes
    thick_axis: int = 2                 # voxel axis of the 3 mm slices (0.9x0.9x3 only)
    rotation_deg: tuple = (0.0, 0.0, 0.0)
    shift_mm: tuple = (0.0, 0.0, 0.0)
    scales: tuple = (1.0, 1.0, 1.0)
    margin_mm: float = 10.0             # field of view: the head's box plus this margin
    neck_cut_mm: float | None = None    # cut the head this far below the brain's lowest point (None: keep)
    shoulders: bool = False             # add shoulders below the neck and a large field of view
    bias_range: tuple = (0.6, 1.6)      # min and max of the multiplicative field over the head
    noise: float = 0.02                 # Rician noise sd, fraction of the head's 99th percentile
    lesion_mm3: float = 0.0             # 0: no lesion
    lesion_centre: tuple | None = None  # original-world mm; None: chosen at random in the brain
    lesion_seed: int | None = None      # the lesion's own seed: the same head (same lesion) in other scans
    seed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Scan:
    image: nib.Nifti1Image
    lesion: nib.Nifti1Image             # uint8 0/1 on the scan grid (empty when no lesion was painted)
    q: np.ndarray                       # scan world RAS -> original head world RAS
    spec: ScanSpec
    lesion_mm3: float                   # painted volume in the original head (mm3)


def random_spec(rng: np.random.Generator, *, max_rotation_deg: float = 12.0, max_shift_mm: float = 15.0,
                scale_range=(0.93, 1.07), lesion_mm3=None, grid: str | None = None,
                orientation: str | None = None, **overrides) -> ScanSpec:
    """A random ``ScanSpec`` over the whole variety (see the module docstring)."""
    grid = grid or str(rng.choice(GRIDS))
    spec = ScanSpec(
        grid=grid,
        orientation=orientation or str(rng.choice(orientation_codes())),
        thick_axis=int(rng.integers(3)),
        rotation_deg=tuple(rng.uniform(-max_rotation_deg, max_rotation_deg, 3)),
        shift_mm=tuple(rng.uniform(-max_shift_mm, max_shift_mm, 3)),
        scales=tuple(rng.uniform(*scale_range, 3)),
        margin_mm=float(rng.uniform(6.0, 16.0)),
        neck_cut_mm=None if rng.random() < 0.5 else float(rng.uniform(25.0, 70.0)),
        bias_range=(float(rng.uniform(0.55, 0.95)), float(rng.uniform(1.05, 1.6))),
        lesion_mm3=float(np.exp(rng.uniform(np.log(200.0), np.log(250_000.0)))) if lesion_mm3 is None
        else float(lesion_mm3),
        seed=int(rng.integers(2 ** 31)),
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def _pose_matrix(spec: ScanSpec, centre: np.ndarray) -> np.ndarray:
    """Original world -> scan world: rotation and scale about ``centre``, then the shift."""
    linear = rotation(*np.deg2rad(spec.rotation_deg)) @ np.diag(spec.scales)
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ centre + np.asarray(spec.shift_mm, float)
    return out


def _grid_affine(spec: ScanSpec, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel->world affine of a grid in ``spec.orientation`` covering the world box [lo, hi]."""
    axes = nib.orientations.axcodes2ornt(tuple(spec.orientation))     # (world axis, sign) per voxel axis
    spacing = np.ones(3)
    if spec.grid == "0.9x0.9x3":
        spacing[:] = 0.9
        spacing[spec.thick_axis] = 3.0
    elif spec.grid != "1mm":
        raise ValueError(f"unknown grid {spec.grid!r}; known: {', '.join(GRIDS)}")
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    for k, (axis, sign) in enumerate(axes):
        axis = int(axis)
        n = int(np.ceil((hi[axis] - lo[axis]) / spacing[k])) + 1
        shape.append(n)
        affine[axis, k] = sign * spacing[k]
        affine[axis, 3] = lo[axis] if sign > 0 else lo[axis] + (n - 1) * spacing[k]
    return tuple(shape), affine


def _paint_lesion(data: np.ndarray, brain: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
                  volume_mm3: float, centre_mm) -> tuple[np.ndarray, np.ndarray]:
    """(head with a chronic-stroke lesion painted in, lesion mask), both on the original grid."""
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    want = volume_mm3 / voxel_mm3
    inside = ndimage.binary_erosion(brain, iterations=3)
    if centre_mm is None:
        # a hemisphere's lateral half, above the cerebellum: where MCA strokes are
        idx = np.argwhere(inside)
        world = idx @ affine[:3, :3].T + affine[:3, 3]
        ok = (np.abs(world[:, 0]) > 15) & (world[:, 2] > -20)
        pick = idx[ok][rng.integers(int(ok.sum()))]
    else:
        pick = np.round(np.linalg.solve(affine[:3, :3], np.asarray(centre_mm, float) - affine[:3, 3])).astype(int)
    # a blob: distance from the centre, perturbed by smooth noise, thresholded to the wanted volume and
    # kept inside the brain and in the centre's hemisphere side (lesions rarely cross the midline)
    noise = ndimage.gaussian_filter(rng.standard_normal(data.shape).astype(np.float32), 6.0)
    noise /= noise.std() + 1e-6
    grid = np.indices(data.shape, dtype=np.float32)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    dist = np.sqrt(sum(((g - c) * z) ** 2 for g, c, z in zip(grid, pick, zooms)))
    radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    score = dist / max(radius, 1.0) + 0.35 * noise
    candidates = inside.copy()
    xw = (grid[0] * affine[0, 0] + grid[1] * affine[0, 1] + grid[2] * affine[0, 2] + affine[0, 3])
    side = np.sign(pick @ affine[0, :3] + affine[0, 3]) or 1.0
    candidates &= (np.sign(xw) == side) | (np.abs(xw) < 2)
    values = np.sort(score[candidates])
    if values.size == 0:
        return data, np.zeros(data.shape, bool)
    threshold = values[min(int(want), values.size - 1)]
    lesion = candidates & (score <= threshold)
    labels, n = ndimage.label(lesion)
    if n > 1:   # one connected lesion: the component holding the most voxels
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        lesion = labels == int(np.argmax(sizes))
    # intensities: white matter ~ the 90th percentile of the brain; core like CSF, a rim like grey matter
    wm = float(np.percentile(data[brain], 90))
    inner = ndimage.distance_transform_edt(lesion, sampling=zooms)
    core = np.clip((inner - 1.0) / 2.5, 0.0, 1.0)           # 0 at the edge -> 1 from 3.5 mm inwards
    value = (1 - core) * 0.62 * wm + core * 0.18 * wm
    out = data.copy()
    soft = ndimage.gaussian_filter(lesion.astype(np.float32), 0.7)   # partial volume at the edge
    painted = np.where(lesion, value, out)
    out = (1 - soft) * out + soft * painted
    return out.astype(np.float32), lesion


def _bias(points: np.ndarray, rng: np.random.Generator, lo: float, hi: float,
          within: np.ndarray | None = None) -> np.ndarray:
    """A smooth multiplicative field over ``points`` (N x 3 mm), spanning [lo, hi] over ``points[within]``
    (all points when ``within`` is None or empty) and clipped to [lo, hi] elsewhere."""
    centre = points.mean(axis=0)
    p = (points - centre) / 100.0
    x, y, z = p.T
    terms = np.stack([x, y, z, x * y, x * z, y * z, x * x, y * y, z * z], axis=1)
    log = terms @ rng.normal(size=terms.shape[1])
    ref = log[within] if within is not None and within.any() else log
    span = ref.max() - ref.min()
    if span <= 0:
        return np.ones(len(points), np.float32)
    log = (log - ref.min()) / span * (np.log(hi) - np.log(lo)) + np.log(lo)
    return np.exp(np.clip(log, np.log(lo), np.log(hi))).astype(np.float32)


def scan_head(head: nib.Nifti1Image, spec: ScanSpec, brain: nib.Nifti1Image | None = None) -> Scan:
    """Scan ``head`` (a real T1 with scalp and face) as ``spec`` says; ``brain`` (same grid, > 0 in the
    brain) places the lesion and measures the neck cut, else both use a head threshold."""
    rng = np.random.default_rng(spec.seed)
    data = np.asarray(head.dataobj, dtype=np.float32).reshape(head.shape[:3])
    affine = head.affine
    top = float(np.percentile(data, 99))
    head_mask = ndimage.binary_fill_holes(data > 0.08 * top)
    brain_mask = (np.asarray(brain.dataobj).reshape(brain.shape[:3]) > 0) if brain is not None else \
        ndimage.binary_erosion(head_mask, iterations=15)
    lesion = np.zeros(data.shape, bool)
    if spec.lesion_mm3 > 0:
        paint_rng = rng if spec.lesion_seed is None else np.random.default_rng(spec.lesion_seed)
        data, lesion = _paint_lesion(data, brain_mask, affine, paint_rng, spec.lesion_mm3, spec.lesion_centre)
    lesion_mm3 = float(lesion.sum() * abs(np.linalg.det(affine[:3, :3])))

    # head in the original world; the neck cut: everything below a plane (in the scan's frame) goes
    idx = np.argwhere(head_mask)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre = world.mean(axis=0)
    pose = _pose_matrix(spec, centre)                  # original -> scan world
    posed = world @ pose[:3, :3].T + pose[:3, 3]
    lo, hi = posed.min(axis=0), posed.max(axis=0)
    if spec.neck_cut_mm is not None and not spec.shoulders:
        bidx = np.argwhere(brain_mask)
        bworld = bidx @ affine[:3, :3].T + affine[:3, 3]
        brain_bottom = float((bworld @ pose[:3, :3].T + pose[:3, 3])[:, 2].min())
        lo[2] = max(lo[2], brain_bottom - spec.neck_cut_mm)
    if spec.shoulders:
        lo[2] -= 60.0
        lo[:2] -= 40.0
        hi[:2] += 40.0
    lo -= spec.margin_mm
    hi += spec.margin_mm
    if spec.neck_cut_mm is not None and not spec.shoulders:
        lo[2] += spec.margin_mm                      # the field of view's lower edge is the cut
    shape, grid = _grid_affine(spec, lo, hi)
    q = np.linalg.inv(pose)                          # scan world -> original world

    # partial volume: each voxel the mean of samples across its extent along thick axes
    zooms = np.sqrt((grid[:3, :3] ** 2).sum(axis=0))
    counts = [max(int(round(z)), 1) if z > 1.5 else 1 for z in zooms]
    offsets = [(np.arange(n) + 0.5) / n - 0.5 for n in counts]     # the centres of n equal parts of the voxel
    vox = np.linalg.inv(affine) @ q @ grid           # scan voxel -> original voxel
    out = np.zeros(shape, np.float32)
    mask_out = np.zeros(shape, np.float32)
    samples = list(itertools.product(*offsets))
    for off in samples:
        shift = vox[:3, :3] @ np.asarray(off) + vox[:3, 3]
        out += ndimage.affine_transform(data, vox[:3, :3], shift, output_shape=shape, order=1, cval=0.0)
        mask_out += ndimage.affine_transform(lesion.astype(np.float32), vox[:3, :3], shift, output_shape=shape,
                                             order=1, cval=0.0)
    out /= len(samples)
    mask_out /= len(samples)
    if spec.neck_cut_mm is not None and not spec.shoulders:
        ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
        z = (grid[2, :3] @ ijk + grid[2, 3]).reshape(shape)
        out[z < lo[2]] = 0.0
    head_in_scan = ndimage.binary_fill_holes(out > 0.08 * top)     # where the bias field spans its range
    if spec.shoulders:
        out = np.maximum(out, _shoulders(shape, grid, q, affine, world, top))

    points = (np.indices(shape, dtype=np.float32).reshape(3, -1).T @ grid[:3, :3].T + grid[:3, 3])
    out *= _bias(points, rng, *spec.bias_range, within=head_in_scan.ravel()).reshape(shape)
    sd = spec.noise * top
    out = np.sqrt((out + rng.normal(0, sd, shape)) ** 2 + rng.normal(0, sd, shape) ** 2).astype(np.float32)
    image = nib.Nifti1Image(out, grid)
    image.header.set_xyzt_units("mm", "sec")
    mask = nib.Nifti1Image((mask_out >= 0.5).astype(np.uint8), grid)
    mask.header.set_xyzt_units("mm", "sec")
    return Scan(image, mask, q, spec, lesion_mm3)


def _shoulders(shape, grid, q, affine, head_world, top) -> np.ndarray:
    """Shoulders and upper chest below the head: a wide soft-tissue slab under the neck, in the original
    world, muscle-like with a bright fat layer."""
    points = np.indices(shape, dtype=np.float32).reshape(3, -1).T @ grid[:3, :3].T + grid[:3, 3]
    orig = points @ q[:3, :3].T + q[:3, 3]
    bottom = float(head_world[:, 2].min())
    cx, cy = float(np.median(head_world[:, 0])), float(np.median(head_world[:, 1]))
    x, y, z = orig[:, 0] - cx, orig[:, 1] - cy, orig[:, 2] - bottom
    body = ((x / 170.0) ** 2 + (y / 80.0) ** 2 <= 1.0) & (z < 8.0) & (z > -80.0)
    shell = body & ~(((x / 160.0) ** 2 + (y / 70.0) ** 2 <= 1.0) & (z < -4.0))
    value = np.where(shell, 0.9 * top, np.where(body, 0.4 * top, 0.0))
    return value.reshape(shape).astype(np.float32)
