"""Render one synthetic scan: a subject (deformation + lesions) seen through a pose and a scanner grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache, partial

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..anatomy import classify_lesion, template_anatomy
from ..templates import get_template
from .head import Deformation, HeadModel, head_model, random_deformation
from .lesions import Lesion, lesion_volumes, place_lesions
from .pathology import Pathology, build_pathology, draw_params

ORIENTATIONS = {"RAS": (1, 1, 1), "LAS": (-1, 1, 1), "LPS": (-1, -1, 1)}
SMOOTH_FWHM_MM = 2.0
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
NECK_CUT_MM = -105.0  # scanner field of view ends in the upper neck (template z)
MIDLINE_MM = 10.0     # lesion centres stay off the midline (bilateral strokes are rare)
INFRATENTORIAL_FRACTION = 0.08
SUBCORTICAL_FRACTION = 0.65  # share of lesions placed to stay clear of the cortex when they fit


@dataclass(frozen=True)
class Cohort:
    number: int
    zooms: tuple[float, float, float]
    orientation: str
    dtype: str
    voi: str            # unit | percent
    singleton_4d: bool
    scale: float
    field_strength: float
    scanner: str


COHORTS = (
    Cohort(1, (1.0, 1.0, 1.0), "RAS", "int16", "unit", False, 1000.0, 3.0, "Siemens Trio"),
    Cohort(2, (1.0, 1.0, 1.0), "LAS", "float32", "percent", True, 371.5, 3.0, "GE Signa HDxt"),
    Cohort(3, (0.9, 0.9, 3.0), "LPS", "int16", "unit", False, 800.0, 1.5, "Philips Achieva"),
    Cohort(4, (0.9, 0.9, 3.0), "RAS", "float32", "percent", False, 1.0, 1.5, "Siemens Avanto"),
)


@dataclass
class Subject:
    deformation: Deformation
    lesions: list[Lesion]           # release order: primary first, then secondaries largest -> smallest
    override: bool                  # primary is not the largest lesion
    params: dict = field(default_factory=dict)
    pathology: Pathology | None = None   # the subject's brain with atrophy, WMH, PVS, ex vacuo (None: clean)


def make_subject(seed: int, index: int, n_lesions: int, override: bool, model: HeadModel | None = None, *,
                 pathology: bool = False) -> Subject:
    """Deterministic anatomy and lesions of subject ``index`` (shared by all its sessions).

    ``pathology`` adds what a chronic-stroke brain shows besides the lesions (:mod:`.pathology`) and gives the
    lesions a CSF-level cavity and a grey-matter-like rim; it draws from its own random stream, so the
    deformation and the lesion masks are the same either way. Without it the subject is rendered exactly as
    before pathology existed (the plain head model)."""
    model = model or head_model()
    rng = np.random.default_rng([seed, index, 0])
    extra = draw_params(seed, index) if pathology else None
    amplitude = float(rng.uniform(1.5, 3.0))
    ventricle = float(rng.uniform(-0.1, 0.45))
    deform = random_deformation(rng, model, amplitude=amplitude, ventricle=ventricle)
    deform = deform.with_affine_removed(_brain_sample())
    volumes = lesion_volumes(rng, n_lesions)
    if override and n_lesions >= 2:
        # make the override visible: the primary clearly smaller than the largest secondary
        volumes[1] = min(volumes[1], 0.6 * volumes[0])
    styles = [extra.lesion_style(k) for k in range(len(volumes))] if extra else None
    lesions = place_lesions(rng, model, deform, volumes, partial(_centres, rng), styles=styles)
    lesions.sort(key=lambda les: -les.volume_mm3)
    if override and len(lesions) >= 2:
        lesions = [lesions[1], lesions[0], *lesions[2:]]
    built = build_pathology(extra, model, deform, lesions) if extra else None
    return Subject(deform, lesions, override and len(lesions) >= 2,
                   {"deformation_mm": amplitude, "ventricle_scale": ventricle}, built)


@lru_cache(maxsize=1)
def _brain_sample() -> np.ndarray:
    """Every 8th template brain voxel (world mm): where a deformation's affine part is measured."""
    anat = template_anatomy()
    idx = np.argwhere(anat.brain)[::8]
    return (idx + get_template().affine[:3, 3]).astype(np.float32)


@lru_cache(maxsize=1)
def _centre_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Supratentorial tissue voxels off the midline (world mm), their distance (mm) to the nearest
    cortex, and infratentorial tissue voxels (brainstem, cerebellum)."""
    anat = template_anatomy()
    to_cortex = ndimage.distance_transform_edt(~anat.cortex)
    origin = get_template().affine[:3, 3]
    idx = np.argwhere(anat.tissue & anat.brain & ~anat.infratentorial)
    pts = (idx + origin).astype(np.float32)
    keep = np.abs(pts[:, 0]) > MIDLINE_MM
    infra = np.argwhere(anat.tissue & anat.infratentorial)
    infra = infra[ndimage.distance_transform_edt(anat.infratentorial)[tuple(infra.T)] > 6]
    return pts[keep], to_cortex[tuple(idx[keep].T)].astype(np.float32), (infra + origin).astype(np.float32)


def _centres(rng: np.random.Generator, volume_mm3: float) -> np.ndarray:
    """Candidate centres for one lesion: most lesions are meant to stay subcortical, so their
    centres keep a lesion radius away from the cortex when that is possible."""
    pts, to_cortex, infra = _centre_maps()
    radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    draw = rng.random()
    if draw < INFRATENTORIAL_FRACTION and volume_mm3 < 15000:
        pts = infra
    elif draw < INFRATENTORIAL_FRACTION + SUBCORTICAL_FRACTION:
        deep = to_cortex > 1.3 * radius + 3
        if np.count_nonzero(deep) > 50:
            pts = pts[deep]
    return pts[rng.choice(len(pts), min(2000, len(pts)), replace=False)]


def random_pose(rng: np.random.Generator, centre=(0.0, -18.0, 18.0)) -> np.ndarray:
    """A native-world -> template-world affine: rotations <= 12 deg, translations <= 15 mm,
    scaling 0.93-1.07 per axis, about the brain centre."""
    angles = rng.uniform(-12.0, 12.0, 3)
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    scales = rng.uniform(0.93, 1.07, 3)
    shift = rng.uniform(-15.0, 15.0, 3)
    linear = rot @ np.diag(scales)
    c = np.asarray(centre)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = c - linear @ c + shift
    return affine


def native_grid(cohort: Cohort, native_to_template: np.ndarray, model: HeadModel,
                margin_mm: float = 8.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Axis-aligned scanner grid (shape, voxel->native world affine) covering the posed head."""
    head_pts = np.argwhere(model.head[::4, ::4, ::4]) * 4 @ model.affine[:3, :3].T + model.affine[:3, 3]
    head_pts = head_pts[head_pts[:, 2] > NECK_CUT_MM]
    inv = np.linalg.inv(native_to_template)
    native_pts = head_pts @ inv[:3, :3].T + inv[:3, 3]
    lo = native_pts.min(axis=0) - margin_mm
    hi = native_pts.max(axis=0) + margin_mm
    zooms = np.asarray(cohort.zooms)
    shape = np.ceil((hi - lo) / zooms).astype(int) + 1
    signs = np.asarray(ORIENTATIONS[cohort.orientation], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * zooms)
    affine[:3, 3] = np.where(signs > 0, lo, lo + (shape - 1) * zooms)
    return tuple(int(s) for s in shape), affine


def _bias_field(rng: np.random.Generator, points: np.ndarray) -> np.ndarray:
    rel = (points - points.reshape(-1, 3).mean(axis=0)) / 100.0
    coef = rng.normal(0.0, 0.18, 9)
    x, y, z = rel[..., 0], rel[..., 1], rel[..., 2]
    poly = (coef[0] * x + coef[1] * y + coef[2] * z + coef[3] * x * y + coef[4] * y * z
            + coef[5] * x * z + coef[6] * (x * x - y * y) + coef[7] * (z * z) + coef[8] * x * y * z)
    return np.exp(np.clip(poly, -0.45, 0.45)).astype(np.float32)


@dataclass
class Rendered:
    image: np.ndarray                 # float32, template intensity units, with bias and noise
    affine: np.ndarray                # voxel -> native world
    raw_masks: list[np.ndarray]       # bool per lesion, release order
    smooth_masks: list[np.ndarray]
    face: np.ndarray | None = None    # bool, where the synthetic face is (standard flavour)
    brain: np.ndarray | None = None   # bool, the subject's brain on this grid (``brain_mask=True``)


def smooth_mask(raw: np.ndarray, zooms) -> np.ndarray:
    """ATLAS's smoothed masks: Gaussian FWHM 2 mm on the raw tracing, thresholded at 0.5."""
    sigma = [SMOOTH_FWHM_MM * FWHM_TO_SIGMA / z for z in zooms]
    out = np.zeros(raw.shape, bool)
    boxes = ndimage.find_objects(raw.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return out
    pad = [int(np.ceil(4 * s)) + 1 for s in sigma]
    box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(boxes[0], pad, raw.shape))
    out[box] = ndimage.gaussian_filter(raw[box].astype(np.float32), sigma, mode="constant") >= 0.5
    return out


def _interp_weights(n: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Coarse sample positions (every ``step`` voxels, covering 0..n-1) and the (n, m) linear weights."""
    coarse = np.arange(0, n - 1 + step, step)
    pos = np.arange(n) / step
    lo = np.minimum(np.floor(pos).astype(int), len(coarse) - 2) if len(coarse) > 1 else np.zeros(n, int)
    w = np.zeros((n, len(coarse)), np.float32)
    if len(coarse) == 1:
        w[:, 0] = 1
        return coarse, w
    frac = pos - lo
    w[np.arange(n), lo] = 1 - frac
    w[np.arange(n), lo + 1] = frac
    return coarse, w


def _upsample(field: np.ndarray, weights) -> np.ndarray:
    """Separable linear interpolation of a coarse 3-D field to the full grid."""
    out = np.tensordot(weights[0], field, axes=(1, 0))
    out = np.tensordot(weights[1], out, axes=(1, 1)).transpose(1, 0, 2)
    out = np.tensordot(out, weights[2], axes=(2, 1))
    return np.ascontiguousarray(out, dtype=np.float32)


def _voxel_box(vox_to_world: np.ndarray, lo: np.ndarray, hi: np.ndarray, shape) -> tuple[slice, ...] | None:
    """Voxel slices of a grid covering the world box [lo, hi]."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    inv = np.linalg.inv(vox_to_world)
    vox = corners @ inv[:3, :3].T + inv[:3, 3]
    start = np.maximum(np.floor(vox.min(axis=0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 2, np.array(shape))
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def render(subject: Subject, model: HeadModel, shape, affine: np.ndarray, native_to_template: np.ndarray,
           rng: np.random.Generator, *, slice_thickness_mm: float = 1.0, noise: float = 0.025,
           bias: bool = True, face_mask: bool = False, brain_mask: bool = False) -> Rendered:
    """Sample the subject on a grid whose voxels map to template world by ``native_to_template @ affine``.

    Smooth fields (deformation, bias) are evaluated on a 4 mm lattice and interpolated; thick slices
    are averaged over 1 mm sub-slices (partial volume along the slice axis). ``brain_mask`` also samples
    the head model's brain mask the same way (``Rendered.brain``); it draws no random numbers, so the
    image is the same with or without it.
    """
    vox_to_tpl = native_to_template @ affine
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    steps = [max(1, int(round(4.0 / z))) for z in zooms]
    coarse, weights = zip(*(_interp_weights(n, st) for n, st in zip(shape, steps)))
    cgrid = np.stack(np.meshgrid(*coarse, indexing="ij"), axis=-1).astype(np.float32)
    cpts = cgrid @ vox_to_tpl[:3, :3].T.astype(np.float32) + vox_to_tpl[:3, 3].astype(np.float32)
    disp = subject.deformation(cpts)
    head_inv = np.linalg.inv(model.affine)
    # head-grid index of each voxel = M @ ijk + t + Hinv3 @ d
    m = (head_inv @ vox_to_tpl).astype(np.float32)
    disp_idx = disp @ head_inv[:3, :3].T.astype(np.float32)
    disp_full = [_upsample(disp_idx[..., c], weights) for c in range(3)]
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]

    head_t1 = subject.pathology.t1 if subject.pathology is not None else model.t1
    n_sub = max(1, int(round(slice_thickness_mm)))
    offsets = (np.arange(n_sub) - (n_sub - 1) / 2.0) * (slice_thickness_mm / n_sub) / zooms[2]
    image = np.zeros(shape, np.float32)
    fractions = [np.zeros(shape, np.float32) for _ in subject.lesions]
    face = np.zeros(shape, np.float32) if face_mask else None
    brain = np.zeros(shape, np.float32) if brain_mask else None
    for off in offsets:
        kk = k + np.float32(off)
        coords = [m[c, 0] * i + m[c, 1] * j + m[c, 2] * kk + m[c, 3] + disp_full[c] for c in range(3)]
        part = ndimage.map_coordinates(head_t1, coords, order=1, mode="constant", cval=0.0)
        if face is not None:
            face += ndimage.map_coordinates(model.face.astype(np.uint8), coords, order=0, mode="constant")
        if brain is not None:
            brain += ndimage.map_coordinates(model.brain, coords, order=1, mode="constant", cval=0.0)
        del coords
        sub_affine = vox_to_tpl.copy()
        sub_affine[:3, 3] += sub_affine[:3, 2] * off
        for frac, lesion in zip(fractions, subject.lesions):
            box = _voxel_box(sub_affine, lesion.origin - 1, lesion.origin + np.array(lesion.mask.shape) + 1, shape)
            if box is None:
                continue
            ijk = np.stack(np.meshgrid(*(np.arange(b.start, b.stop, dtype=np.float32) for b in box),
                                       indexing="ij"), axis=-1)
            pts = ijk @ sub_affine[:3, :3].T.astype(np.float32) + sub_affine[:3, 3].astype(np.float32)
            f = lesion.sample("fraction", pts)
            part[box] = (1 - f) * part[box] + f * lesion.sample("intensity", pts, order=0)
            frac[box] += lesion.sample("mask", pts)
        image += part
    image /= n_sub
    if bias:
        image *= _upsample(_bias_field(rng, cpts), weights)
    if noise > 0:
        sigma = np.float32(noise)
        real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)
    raws = [f / n_sub >= 0.5 for f in fractions]
    smooths = [smooth_mask(r, zooms) for r in raws]
    return Rendered(image, affine, raws, smooths, None if face is None else face / n_sub >= 0.5,
                    None if brain is None else brain / n_sub >= 0.5)


def template_dseg(subject: Subject) -> np.ndarray:
    """The subject's lesions on the template grid (labels 1.. in release order): affine-only truth."""
    anat = template_anatomy()
    out = np.zeros(anat.brain.shape, np.uint8)
    origin = get_template().affine[:3, 3]
    for label, lesion in enumerate(subject.lesions, start=1):
        idx = (np.argwhere(lesion.mask) + lesion.origin - origin).astype(int)
        keep = np.all((idx >= 0) & (idx < np.array(out.shape)), axis=1)
        idx = idx[keep]
        out[idx[:, 0], idx[:, 1], idx[:, 2]] = np.where(out[idx[:, 0], idx[:, 1], idx[:, 2]] == 0, label,
                                                        out[idx[:, 0], idx[:, 1], idx[:, 2]])
    return out


def pathology_dseg(subject: Subject, model: HeadModel, *, clear_lesions: bool = True) -> np.ndarray:
    """The subject's pathology labels (:data:`.pathology.LABELS`) on the template grid (the lesions' space:
    template world before the subject's deformation), sampled nearest-neighbour through the deformation.
    ``clear_lesions`` sets every lesion voxel to 0 (the changes keep 2 mm away from the lesions, so this
    is a guarantee, not a correction)."""
    anat = template_anatomy()
    out = np.zeros(anat.brain.shape, np.uint8)
    if subject.pathology is None:
        return out
    affine = get_template().affine
    shape = out.shape
    coarse, weights = zip(*(_interp_weights(n, 4) for n in shape))
    cgrid = np.stack(np.meshgrid(*coarse, indexing="ij"), axis=-1).astype(np.float32)
    cpts = cgrid @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    head_inv = np.linalg.inv(model.affine)
    disp_idx = subject.deformation(cpts) @ head_inv[:3, :3].T.astype(np.float32)
    m = (head_inv @ affine).astype(np.float32)
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
    coords = [m[c, 0] * i + m[c, 1] * j + m[c, 2] * k + m[c, 3] + _upsample(disp_idx[..., c], weights)
              for c in range(3)]
    out = ndimage.map_coordinates(subject.pathology.labels, coords, order=0, mode="constant", cval=0)
    if clear_lesions:
        out[template_dseg(subject) > 0] = 0
    return out


def describe_lesions(dseg: np.ndarray, count: int) -> list[dict]:
    return [classify_lesion(dseg == label).as_dict() for label in range(1, count + 1)]
