"""What a chronic-stroke brain shows besides the stroke: the subject's own contrast, atrophy, white-matter
hyperintensities (hypointense on T1), perivascular spaces and ex-vacuo enlargement of the ventricle next to
a large lesion.

Each subject gets a :class:`PathologyParams` (drawn from its own random stream, so the deformation and the
lesions are the same with and without pathology) and a :class:`Pathology`: the head model's brain with every
change painted in, on the head grid (template world before the subject's deformation), which ``render``
samples through the deformation instead of the plain head. Intensities are in template units (white matter
about 0.87, grey matter about 0.62-0.65; the template's own CSF, partial-volumed, about 0.26). The amounts are
moderate on purpose: ``normalize`` registers these heads (atrophy, wide ventricles and a CSF darker than the
template's move its affine estimate away from the truth, which knows only the deformation; see
``benchmarks/README.md``):

* **contrast**: CSF at the subject's ``csf_level`` (0.16-0.24, i.e. 0.18-0.28 of white matter as on MPRAGE; the
  lesion cavities have the same level, so no threshold tells a cavity from CSF): intensities below grey matter are
  mapped linearly from [0, 0.26, 0.62] to [0, ``csf_level``, 0.62], so partial volumes stay partial;
* **lesions** (in :mod:`.lesions`): the cavity at the subject's ``csf_level``, the gliotic rim at 0.55-0.68 (close
  to grey matter) falling to it over 1-2.5 mm, per lesion;
* **atrophy**: the sulci widen (voxels of cortex within ``atrophy_mm`` × a smooth 0.5-1.5 field of a sulcus turn
  to CSF; sulci are the CSF inside the template brain and the dark valleys of its cortex, a 2 mm black top-hat;
  ``atrophy_mm`` 0.1-1.1 mm per subject, median 0.4, more with more small-vessel disease) and the ventricles
  widen (``ventricle_mm`` × a smooth 0.5-1.5 field; ``ventricle_mm`` 0-3.3 mm, median 1.1: lateral ventricle
  volumes differ several-fold between old brains);
* **ex vacuo**: the lateral ventricle on the side of each lesion of at least 3 cm³ grows towards it, by up to
  ``1.3 (V / cm³)^(1/3)`` mm (at most 6 mm; about 5 mm for 60 cm³), less when the lesion is farther from the
  ventricle and least on the ventricle's far side; the other ventricle does not change;
* **white-matter hyperintensities** (WMH; hypointense on T1: darker than white matter, brighter than CSF,
  ``wmh_level`` 0.50-0.66 with a soft 2 mm edge) following the subject's Fazekas grades: periventricular caps
  and bands (PVH 1: caps of 2-4 mm at the frontal and occipital horns, a pencil-thin lining elsewhere; 2: a smooth
  halo, 2-8 mm; 3: an irregular band of about 4-16 mm reaching into the deep white matter) and deep foci (DWMH 1:
  about 6 punctate foci of 1-2.3 mm radius; 2: about 16 foci of 1.5-3.4 mm, beginning to merge; 3: about 30
  foci of 2.4-5.4 mm, confluent). On one subject, WMH volume with PVH = DWMH = 0, 1, 2, 3: 0, 1.5, 12, 55 cm³;
* **perivascular spaces**: 6-59 CSF-dark tubes 0.8-2 mm wide and 3-10 mm long, near vertical in the basal
  ganglia and radial in the centrum semiovale, more with a higher DWMH grade.

The Fazekas grades are drawn first from the subject's stream (:func:`fazekas_grades`), so the metadata reports
the grades the subject is rendered with (or leaves one blank, 8 % of the time: it is still rendered).

The lesion is never overwritten: every change is kept 2 mm away from the subject's lesions (mapped onto the
head grid through the deformation), and ``render`` draws the lesion on top. The lesion masks stay the truth;
the changes are described by :data:`LABELS` (``Pathology.labels``, a voxel gets a label where the change makes
up at least half of it) and written to the truth folder beside the lesions.

With a higher WMH grade and the same subject the WMH only grow (the same random field, foci and thicknesses
scale with the grade), so WMH volume increases with grade.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.special import erf

from ..anatomy import deep_grey_region, infratentorial_region, world_coords
from ..naming import TEMPLATE_KEY
from ..templates import template_arrays
from .head import HEAD_PAD, Deformation, HeadModel

#: Pathology label values (truth ``desc-pathology_dseg``): none of them is lesion.
LABELS = {1: "wmh", 2: "pvs", 3: "sulcal_widening", 4: "ventricle_widening", 5: "ex_vacuo"}
CSF_TEMPLATE = 0.26          # the template's CSF intensity (partial-volumed), mapped to the subject's
GM_TEMPLATE = 0.62           # intensities from here up are kept (grey and white matter)
SULCUS_TOPHAT = 0.06         # a sulcus: this much darker than the cortex around it (2 mm black top-hat) ...
SULCUS_MAX = 0.6             # ... and darker than grey matter
CSF_RANGE = (0.16, 0.24)
WMH_RANGE = (0.50, 0.66)
ATROPHY_MM = (0.0, 1.2)
VENTRICLE_MM = (0.0, 3.5)
RIM_RANGE = (0.55, 0.68)     # gliotic rim: close to grey matter
RIM_MM = (1.0, 2.5)          # how fast the rim falls to the cavity's CSF level
PVH_THICKNESS_MM = (0.0, 2.0, 4.0, 7.5)      # periventricular band by PVH grade (x 0.5-1.5: most at the horns)
DWMH_FOCI = (0, 6, 16, 30)                   # deep foci by DWMH grade (x a per-subject 0.7-1.3)
DWMH_SCALE = (0.0, 1.3, 1.9, 3.0)            # their radius by grade (x a per-focus 0.8-1.8 mm)
MAX_FOCI = 48
EXVACUO_MIN_MM3 = 3000.0
EXVACUO_K = 1.3
EXVACUO_MAX_MM = 6.0
LESION_CLEARANCE_MM = 2      # distractors stay this far (head grid voxels) from a lesion
GRADE_P = (0.3, 0.35, 0.2, 0.15)
GRADE_MISSING = 0.08         # a grade left blank in the metadata (it is still rendered)
MAX_LESIONS = 8
VENTRICLE_REACH_MM = 20.0    # how far from the ventricles anything periventricular reaches (WMH bands, widening)


@dataclass(frozen=True)
class PathologyParams:
    seed: int
    subject_index: int
    fazekas_pvh: int
    fazekas_dwmh: int
    pvh_reported: bool
    dwmh_reported: bool
    csf_level: float
    wmh_level: float
    atrophy_mm: float
    ventricle_mm: float
    pvs_basal_ganglia: int
    pvs_centrum_semiovale: int
    dwmh_count_factor: float
    rim_levels: tuple[float, ...]     # per lesion, in the order the lesion volumes were drawn
    rim_mm: tuple[float, ...]

    @property
    def stream(self) -> list[int]:
        """The seed of the build's random streams (:func:`build_pathology` adds one number per change)."""
        return [self.seed, self.subject_index, 9]

    def as_dict(self) -> dict:
        doc = asdict(self)
        for key in ("seed", "subject_index", "rim_levels", "rim_mm", "dwmh_count_factor", "pvh_reported",
                    "dwmh_reported"):
            doc.pop(key)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in doc.items()}

    def lesion_style(self, k: int) -> dict:
        """The intensities of the lesion drawn k-th: cavity at the subject's CSF level, rim near grey matter."""
        return {"core": self.csf_level, "rim": self.rim_levels[k % MAX_LESIONS], "rim_mm": self.rim_mm[k % MAX_LESIONS]}


def _draw_grades(rng: np.random.Generator) -> tuple[int, int, bool, bool]:
    pvh = int(rng.choice(4, p=GRADE_P))
    dwmh = int(np.clip(pvh + rng.choice([-1, 0, 1], p=[0.25, 0.5, 0.25]), 0, 3))
    return pvh, dwmh, bool(rng.random() >= GRADE_MISSING), bool(rng.random() >= GRADE_MISSING)


def fazekas_grades(seed: int, subject_index: int) -> tuple[object, object]:
    """The PVH and DWMH grades the metadata reports for a subject (``""`` when left blank): the grades that
    :func:`draw_params` renders, drawn first from the same stream."""
    pvh, dwmh, pvh_seen, dwmh_seen = _draw_grades(np.random.default_rng([seed, subject_index, 8]))
    return (pvh if pvh_seen else ""), (dwmh if dwmh_seen else "")


def draw_params(seed: int, subject_index: int) -> PathologyParams:
    """A subject's pathology (its own random stream: the same for every session and flavour)."""
    rng = np.random.default_rng([seed, subject_index, 8])
    pvh, dwmh, pvh_seen, dwmh_seen = _draw_grades(rng)   # first: the metadata reads the same draw
    csf = float(rng.uniform(*CSF_RANGE))
    wmh = float(rng.uniform(*WMH_RANGE))
    # atrophy goes with small-vessel disease: older brains have both
    load = (pvh + dwmh) / 6.0
    atrophy = float(np.clip(rng.uniform(0.1, 0.8) * ATROPHY_MM[1] * (0.6 + 0.6 * load), *ATROPHY_MM))
    ventricle = float(np.clip(rng.uniform(0.0, 0.8) * VENTRICLE_MM[1] * (0.6 + 0.6 * load), *VENTRICLE_MM))
    bg = int(rng.integers(4, 12) + 5 * dwmh)
    cso = int(rng.integers(2, 10) + 8 * dwmh)
    factor = float(rng.uniform(0.7, 1.3))
    rims = tuple(float(v) for v in rng.uniform(*RIM_RANGE, MAX_LESIONS))
    rim_mm = tuple(float(v) for v in rng.uniform(*RIM_MM, MAX_LESIONS))
    return PathologyParams(seed, subject_index, pvh, dwmh, pvh_seen, dwmh_seen, csf, wmh, atrophy,
                           ventricle, bg, cso, factor, rims, rim_mm)


# --------------------------------------------------------------------------------------------- anatomy maps


@dataclass(frozen=True)
class _Maps:
    box: tuple[slice, slice, slice]     # the brain's box on the head grid
    origin: np.ndarray                  # world mm of the box's voxel (0, 0, 0)
    t1: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    tissue: np.ndarray
    ventricles: np.ndarray
    d_vent: np.ndarray                  # mm to the nearest ventricle voxel (up to VENTRICLE_REACH_MM, then 2x that)
    d_sulcal: np.ndarray                # mm to the nearest CSF voxel inside the brain (not ventricle)
    cortex: np.ndarray                  # cortical grey matter
    periventricular: np.ndarray         # white matter within 16 mm of a ventricle
    deep_wm: np.ndarray                 # white matter >= 2.5 mm inside, supratentorial, outside the deep grey
    vent_centres: dict                  # side (-1 left, +1 right) -> world mm centre of that lateral ventricle
    vent_boxes: dict                    # side -> that ventricle's box grown by VENTRICLE_REACH_MM
    bg_points: np.ndarray               # (n, 3) box voxel indices: basal ganglia
    cso_points: np.ndarray              # centrum semiovale
    dwm_points: np.ndarray              # deep white matter (WMH foci)


def _maps(model: HeadModel) -> _Maps:
    """The anatomy maps of ``model`` (built once per process and model)."""
    cached = _MAPS.get("maps")
    if cached is None or cached[0] is not model:
        _MAPS["maps"] = (model, _build_maps(model))
    return _MAPS["maps"][1]


_MAPS: dict[str, tuple[HeadModel, _Maps]] = {}


def _build_maps(model: HeadModel) -> _Maps:
    brain_full = model.brain > 0
    box = tuple(slice(max(s.start - 4, 0), min(s.stop + 4, n))
                for s, n in zip(ndimage.find_objects(brain_full.astype(np.uint8))[0], brain_full.shape))
    arrays = template_arrays(TEMPLATE_KEY)     # positional, as head_model asks for it: the same cached arrays
    gm = np.pad(arrays["GM"], HEAD_PAD)[box].copy()
    wm = np.pad(arrays["WM"], HEAD_PAD)[box].copy()
    t1 = model.t1[box]
    brain = brain_full[box]
    tissue = np.clip(gm + wm, 0, 1).astype(np.float32)
    origin = model.affine[:3, :3] @ np.array([s.start for s in box]) + model.affine[:3, 3]
    affine = model.affine.copy()
    affine[:3, 3] = origin
    x, y, z = world_coords(t1.shape, affine)
    ventricles = brain & (t1 < 0.35) & (np.abs(x) < 25) & (y > -45) & (y < 30) & (z > -5) & (z < 35)
    ventricles = ndimage.binary_opening(ventricles)
    # distances to the ventricles matter up to VENTRICLE_REACH_MM: measured in the ventricles' box grown by that
    near = _grown_box(ventricles, VENTRICLE_REACH_MM)
    d_vent = np.full(t1.shape, 2 * VENTRICLE_REACH_MM, np.float32)
    d_vent[near] = ndimage.distance_transform_edt(~ventricles[near])
    vent_boxes = {side: _grown_box(ventricles & (side * x > 2), VENTRICLE_REACH_MM) for side in (-1, 1)}
    # sulci: CSF inside the brain mask, and the dark valleys of the blurred template's cortex (black top-hat)
    r = np.arange(-2, 3)
    ball = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= 4.5
    valleys = (ndimage.grey_closing(t1, footprint=ball) - t1 > SULCUS_TOPHAT) & (t1 < SULCUS_MAX) & (gm >= 0.3)
    sulcal = brain & ((tissue < 0.5) | valleys) & (d_vent > 2)
    d_sulcal = ndimage.distance_transform_edt(~sulcal).astype(np.float32)
    deep = deep_grey_region(x, y, z)
    infra = infratentorial_region(x, y, z)
    cortex = brain & (gm >= 0.3) & ~deep & (d_vent > 4)
    white = brain & (wm >= 0.5) & ~ventricles
    periventricular = white & (d_vent <= 16) & ~infra
    within = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= 6   # closer than 2.5 mm
    inside_wm = ndimage.binary_erosion(wm >= 0.5, structure=within)                       # >= 2.5 mm inside
    deep_wm = white & inside_wm & ~deep & ~infra & (z > -5) & (d_vent > 3)
    centres = {}
    for side in (-1, 1):
        idx = np.argwhere(ventricles & (side * x > 2))
        centres[side] = idx.mean(axis=0) + origin
    bg = brain & (tissue >= 0.6) & (np.abs(x) >= 10) & (np.abs(x) <= 30) & (y > -12) & (y < 20) & (z > -8) \
        & (z < 8) & (d_vent > 3)
    cso = deep_wm & (z > 12) & (z < 45)
    for arr in (t1, gm, wm, tissue):
        arr.setflags(write=False)
    return _Maps(box, origin, t1, brain, gm, wm, tissue, ventricles, d_vent, d_sulcal, cortex, periventricular,
                 deep_wm, centres, vent_boxes, np.argwhere(bg), np.argwhere(cso), np.argwhere(deep_wm))


def _grown_box(mask: np.ndarray, margin: float) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels (clipped to the array)."""
    found = ndimage.find_objects(mask.astype(np.uint8))[0]
    m = int(np.ceil(margin))
    return tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, n in zip(found, mask.shape))


def _linear_weights(n: int, m: int) -> np.ndarray:
    """(n, m) weights interpolating m lattice values linearly onto n voxels (the lattice spans the voxels)."""
    pos = np.linspace(0, m - 1, n)
    lo = np.minimum(np.floor(pos).astype(int), m - 2)
    w = np.zeros((n, m), np.float32)
    w[np.arange(n), lo] = 1 - (pos - lo)
    w[np.arange(n), lo + 1] = pos - lo
    return w


def _smooth_field(rng: np.random.Generator, shape, lattice_mm: float = 10.0) -> np.ndarray:
    """A smooth field in [0, 1] (a Gaussian field's normal CDF) varying over ``lattice_mm``: normal values on a
    lattice, smoothed there and interpolated linearly (separably, without full-size temporaries)."""
    coarse = rng.standard_normal(tuple(int(np.ceil(n / lattice_mm)) + 2 for n in shape)).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, 0.7, mode="nearest")
    coarse /= coarse.std() + 1e-6
    wx, wy, wz = (_linear_weights(n, c) for n, c in zip(shape, coarse.shape))
    small = np.tensordot(np.tensordot(wx, coarse, axes=(1, 0)), wz, axes=(2, 1))    # (nx, my, nz)
    field = np.matmul(wy[None], small)                                              # (nx, ny, nz)
    field *= np.float32(1 / np.sqrt(2.0))
    erf(field, out=field)
    field += 1.0
    field *= 0.5
    return field


def _local_box(centre: np.ndarray, half: float, shape) -> tuple[slice, ...] | None:
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, np.array(shape))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _box_points(box) -> np.ndarray:
    return np.stack(np.meshgrid(*(np.arange(s.start, s.stop, dtype=np.float32) for s in box), indexing="ij"),
                    axis=-1)


def _capsule(fraction: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float) -> None:
    """Paint a tube (partial volume: 1 within ``radius`` - 0.5 of the segment, 0 beyond ``radius`` + 0.5)."""
    box = _local_box((start + end) / 2, np.linalg.norm(end - start) / 2 + radius + 2, fraction.shape)
    if box is None:
        return
    pts = _box_points(box)
    seg = end - start
    t = np.clip(((pts - start) @ seg) / max(float(seg @ seg), 1e-6), 0, 1)
    dist = np.linalg.norm(pts - (start + t[..., None] * seg), axis=-1)
    np.maximum(fraction[box], np.clip(radius + 0.5 - dist, 0, 1), out=fraction[box])


def _ellipsoid(fraction: np.ndarray, centre: np.ndarray, axes: np.ndarray, rot: np.ndarray, wobble: np.ndarray
               ) -> None:
    box = _local_box(centre, float(axes.max()) * 1.3 + 2, fraction.shape)
    if box is None:
        return
    rel = (_box_points(box) - centre) @ rot
    r = float(axes.mean())
    dist = np.sqrt(np.sum((rel / axes * r) ** 2, axis=-1))
    np.maximum(fraction[box], np.clip(r * wobble[box] + 0.5 - dist, 0, 1), out=fraction[box])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


# --------------------------------------------------------------------------------------------- the subject


@dataclass
class Pathology:
    params: PathologyParams
    t1: np.ndarray            # head grid, float32: the subject's brain with every change (what render samples)
    labels: np.ndarray        # head grid, uint8: LABELS where a change makes up at least half of a voxel
    ex_vacuo: list[dict]      # per lesion that pushed a ventricle: side, mm


def _lesion_region(lesions, deformation: Deformation, model: HeadModel, maps: _Maps) -> np.ndarray:
    """The lesions on the brain box of the head grid (through the deformation), grown by the clearance."""
    region = np.zeros(maps.t1.shape, bool)
    inv = np.linalg.inv(model.affine)
    start = np.array([s.start for s in maps.box])
    for lesion in lesions:
        pts = lesion.world_points().astype(np.float32)
        moved = pts + deformation(pts)
        idx = np.rint(moved @ inv[:3, :3].T + inv[:3, 3]).astype(int) - start
        keep = np.all((idx >= 0) & (idx < np.array(region.shape)), axis=1)
        region[tuple(idx[keep].T)] = True
    if not region.any():
        return region
    ball = ndimage.generate_binary_structure(3, 1)
    found = ndimage.find_objects(region.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - LESION_CLEARANCE_MM - 2, 0), min(s.stop + LESION_CLEARANCE_MM + 2, n))
                for s, n in zip(found, region.shape))
    grown = ndimage.binary_closing(region[box], structure=ball, iterations=1)
    region[box] = ndimage.binary_dilation(grown | region[box], structure=ndimage.generate_binary_structure(3, 2),
                                          iterations=LESION_CLEARANCE_MM)
    return region


def _ex_vacuo(lesions, deformation: Deformation, maps: _Maps, x) -> tuple[np.ndarray, list[dict]]:
    """How far (mm) each voxel's ipsilateral ventricle reaches towards the large lesions."""
    reach = np.zeros(maps.t1.shape, np.float32)
    pushed = []
    for k, lesion in enumerate(lesions):
        volume = lesion.volume_mm3
        if volume < EXVACUO_MIN_MM3:
            continue
        centroid = lesion.world_points().mean(axis=0).astype(np.float32)
        centre = centroid + deformation(centroid[None])[0]
        if abs(centre[0]) < 5 or infratentorial_region(*centre):
            continue
        side = 1 if centre[0] > 0 else -1
        vent = maps.vent_centres[side]
        radius = (3 * volume / (4 * np.pi)) ** (1 / 3)
        gap = max(float(np.linalg.norm(centre - vent)) - radius - 10.0, 0.0)
        amount = min(EXVACUO_MAX_MM, EXVACUO_K * (volume / 1000.0) ** (1 / 3)) * float(np.exp(-gap / 25.0))
        if amount < 0.5:
            continue
        towards = (centre - vent) / max(float(np.linalg.norm(centre - vent)), 1e-6)
        box = maps.vent_boxes[side]
        pts = _box_points(box) + maps.origin.astype(np.float32)
        rel = pts - vent
        cos = (rel @ towards) / np.maximum(np.linalg.norm(rel, axis=-1), 1e-6)
        weight = np.clip(0.2 + 0.8 * cos, 0, 1) * (side * x[box[0]] > 1)
        np.maximum(reach[box], amount * weight, out=reach[box])
        pushed.append({"lesion": k, "side": "right" if side > 0 else "left", "mm": round(amount, 3)})
    return reach, pushed


def build_pathology(params: PathologyParams, model: HeadModel, deformation: Deformation, lesions
                    ) -> Pathology:
    """The subject's brain with every change of the module docstring, on the head grid.

    Each change draws from its own random stream (``params.stream`` + its number), so changing one (a grade, a
    count) leaves the others as they were. Arrays are freed as soon as they are used (the synth worker's memory)."""
    maps = _maps(model)
    shape = maps.t1.shape

    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng([*params.stream, k])

    affine = model.affine.copy()
    affine[:3, 3] = maps.origin
    x, y, _ = world_coords(shape, affine)
    brain = maps.brain
    clear = ~_lesion_region(lesions, deformation, model, maps)
    tissue_voxel = brain & (maps.tissue >= 0.5) & ~maps.ventricles & clear

    # atrophy: wider sulci, wider ventricles; ex vacuo: the ipsilateral ventricle towards a large lesion
    sulci = params.atrophy_mm * (0.5 + _smooth_field(stream(1), shape, 12.0))
    sulci -= maps.d_sulcal
    np.clip(sulci, 0, 1, out=sulci)
    sulci[~(maps.cortex & clear)] = 0
    growable = brain & ~maps.ventricles & (maps.tissue >= 0.3) & clear & (maps.d_vent <= 14)
    wall = params.ventricle_mm * (0.5 + _smooth_field(stream(2), shape, 12.0))    # the ventricle's new wall (mm)
    vent_atrophy = np.clip(wall - maps.d_vent + 0.5, 0, 1)
    vent_atrophy[~growable] = 0
    reach, pushed = _ex_vacuo(lesions, deformation, maps, x)
    wall += reach
    del reach
    vent_total = np.clip(wall - maps.d_vent + 0.5, 0, 1)
    vent_total[~growable] = 0
    del growable

    # white-matter hyperintensities: periventricular caps/bands (from the widened wall, so that the widening does
    # not swallow them) and deep foci
    rng = stream(3)
    horns = np.clip(np.maximum(y / 15.0, (-25.0 - y) / 15.0), 0, 1).astype(np.float32)
    wobble = _smooth_field(rng, shape, 4.0)
    thickness = PVH_THICKNESS_MM[params.fazekas_pvh] * (0.5 + horns) * (0.6 + 0.8 * _smooth_field(rng, shape, 8.0))
    if params.fazekas_pvh >= 3:
        thickness *= 0.6 + 0.8 * wobble
    wmh = thickness
    wmh += wall
    wmh -= maps.d_vent
    wmh = np.clip(wmh / 2.0 + 0.5, 0, 1) if params.fazekas_pvh else np.zeros(shape, np.float32)
    wmh[~maps.periventricular] = 0
    del wall, thickness
    foci = rng.choice(len(maps.dwm_points), MAX_FOCI, replace=False)
    base_radius = rng.uniform(0.8, 1.8, MAX_FOCI)
    aspects = rng.uniform(0.7, 1.4, (MAX_FOCI, 3))
    rotations = [_random_rotation(rng) for _ in range(MAX_FOCI)]
    n_foci = min(MAX_FOCI, int(round(DWMH_FOCI[params.fazekas_dwmh] * params.dwmh_count_factor)))
    deep = np.zeros(shape, np.float32)
    wobble = 0.75 + 0.5 * wobble
    for i in range(n_foci):
        radius = base_radius[i] * DWMH_SCALE[params.fazekas_dwmh]
        _ellipsoid(deep, maps.dwm_points[foci[i]].astype(np.float32), radius * aspects[i], rotations[i], wobble)
    del wobble
    deep[~(brain & (maps.wm >= 0.35) & ~maps.ventricles)] = 0
    np.maximum(wmh, deep, out=wmh)
    del deep
    wmh[~clear] = 0

    # perivascular spaces: near vertical in the basal ganglia, radial in the centrum semiovale
    rng = stream(4)
    pvs = np.zeros(shape, np.float32)
    centre = np.array([0.0, -15.0, 15.0]) - maps.origin
    for points, count, vertical in ((maps.bg_points, params.pvs_basal_ganglia, True),
                                    (maps.cso_points, params.pvs_centrum_semiovale, False)):
        for _ in range(count):
            at = points[rng.integers(len(points))].astype(np.float32)
            direction = np.array([0.0, 0.0, 1.0]) if vertical else (at - centre) / np.linalg.norm(at - centre)
            direction = direction + rng.normal(0, 0.25, 3)
            direction /= np.linalg.norm(direction)
            length = rng.uniform(3.0, 10.0)
            radius = rng.uniform(0.4, 1.0)
            _capsule(pvs, at - direction * length / 2, at + direction * length / 2, radius)
    pvs[~(brain & (maps.tissue >= 0.5) & ~maps.ventricles & clear)] = 0

    # labels: where a change makes up at least half of a voxel (CSF-like changes win over WMH)
    csf_like = np.maximum(np.maximum(sulci, vent_total), pvs)
    wmh *= 1.0 - csf_like
    labels = np.zeros(shape, np.uint8)
    labels[(wmh >= 0.5) & tissue_voxel] = 1
    labels[(sulci >= 0.5) & tissue_voxel] = 3
    labels[(vent_atrophy >= 0.5) & tissue_voxel] = 4
    labels[(vent_total >= 0.5) & (vent_atrophy < 0.5) & tissue_voxel] = 5
    labels[(pvs >= 0.5) & tissue_voxel] = 2
    del sulci, vent_atrophy, vent_total, pvs, tissue_voxel

    # intensities: CSF (and the CSF part of partial volumes) at the subject's level; then CSF-like changes replace
    # tissue (and WMH), WMH replace white matter
    out = np.interp(maps.t1, [0.0, CSF_TEMPLATE, GM_TEMPLATE, 1.0],
                    [0.0, params.csf_level, GM_TEMPLATE, 1.0]).astype(np.float32)
    out *= 1.0 - csf_like - wmh
    texture = ndimage.gaussian_filter(stream(5).standard_normal(shape, dtype=np.float32), 1.0)
    texture /= texture.std() + 1e-6
    out += csf_like * (params.csf_level * (1.0 + 0.05 * texture))
    out += wmh * (params.wmh_level + 0.02 * texture)
    del texture, csf_like, wmh
    t1_full = np.array(model.t1, dtype=np.float32)
    t1_full[maps.box] = np.where(brain, out, maps.t1)
    labels_full = np.zeros(model.t1.shape, np.uint8)
    labels_full[maps.box] = labels
    return Pathology(params, t1_full, labels_full, pushed)
