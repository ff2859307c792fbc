"""The simulated scanner (``atlas_curate.synth.scanner``) on a small synthetic head phantom.

The phantom is a 1 mm head in LAS voxel order: an ellipsoidal scalp, a darker skull shell, an ellipsoidal
brain and, inside the brain, a bright off-centre landmark ball whose centroid is known in the original
world. A smaller ball (optionally with a thin bright sheet) serves the intensity checks.

Every check is computed from the definitions: ``q`` maps the scan's world to the original world, the grid
is ``spec.orientation`` with the requested spacing, the field of view is the head's box plus ``margin_mm``
(or cut ``neck_cut_mm`` below the brain), the painted lesion has the requested volume inside the brain,
the bias field spans ``bias_range`` over the head, thick slices average over their thickness.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from atlas_curate.synth.scanner import ScanSpec, orientation_codes, random_spec, scan_head

SHAPE = (80, 100, 84)
# voxel -> world, LAS: voxel (39.5, 50, 42) is the world origin
AFFINE = np.array([[-1.0, 0.0, 0.0, 39.5],
                   [0.0, 1.0, 0.0, -50.0],
                   [0.0, 0.0, 1.0, -42.0],
                   [0.0, 0.0, 0.0, 1.0]])
SCALP, SKULL, BRAIN, LANDMARK = 0.7, 0.15, 0.8, 1.6
HEAD_AXES = (36.0, 46.0, 38.0)                        # centred on the world origin
SKULL_CENTRE, SKULL_AXES = (0.0, 0.0, 3.0), (32.0, 42.0, 34.0)
BRAIN_CENTRE, BRAIN_AXES = (0.0, 0.0, 5.0), (28.0, 38.0, 29.0)
LANDMARK_CENTRE, LANDMARK_RADIUS = (12.0, 16.0, 14.0), 5.0
BALL_RADIUS = 22.0                                    # the small phantom: a ball of brain at the world origin
CLEAN = dict(noise=0.0, bias_range=(1.0, 1.0))          # a scan whose intensities are the phantom's


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _world(shape, affine) -> np.ndarray:
    """World coordinates of every voxel, shape + (3,)."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    return _apply(affine, ijk).reshape(tuple(shape) + (3,))


def _ellipsoid(world: np.ndarray, centre, axes) -> np.ndarray:
    return (((world - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(axis=-1) <= 1.0


@dataclasses.dataclass
class Phantom:
    head: nib.Nifti1Image
    brain: nib.Nifti1Image
    head_mask: np.ndarray
    brain_mask: np.ndarray
    world: np.ndarray                  # world mm of every voxel

    def data(self) -> np.ndarray:
        return np.asarray(self.head.dataobj, dtype=np.float32)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    world = _world(SHAPE, AFFINE)
    head = _ellipsoid(world, (0.0, 0.0, 0.0), HEAD_AXES)
    skull = _ellipsoid(world, SKULL_CENTRE, SKULL_AXES)
    brain = _ellipsoid(world, BRAIN_CENTRE, BRAIN_AXES)
    landmark = _ellipsoid(world, LANDMARK_CENTRE, (LANDMARK_RADIUS,) * 3)
    assert (landmark <= ndimage.binary_erosion(brain, iterations=5)).all()   # surrounded by brain only
    data = np.zeros(SHAPE, np.float32)
    data[head] = SCALP
    data[skull] = SKULL
    data[brain] = BRAIN
    data[landmark] = LANDMARK
    return Phantom(nib.Nifti1Image(data, AFFINE), nib.Nifti1Image(brain.astype(np.uint8), AFFINE),
                   head, brain, world)


def _landmark_centroid(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World centroid of the landmark's excess over the brain around it (linear in the intensities, so
    interpolation and slice averaging leave it in place)."""
    weight = np.clip(np.asarray(data, np.float64) - BRAIN, 0.0, None)
    ijk = np.argwhere(weight > 0)
    w = weight[tuple(ijk.T)]
    return _apply(affine, (ijk * w[:, None]).sum(axis=0, keepdims=True) / w.sum())[0]


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def _to_scan_voxels(scan, world_original: np.ndarray) -> np.ndarray:
    """Original-world points -> continuous scan voxel indices."""
    return _apply(np.linalg.inv(scan.image.affine) @ np.linalg.inv(scan.q), world_original)


def _resample_to_scan(data: np.ndarray, scan, order: int) -> np.ndarray:
    """Original-grid data on the scan grid (scan voxel -> scan world -> original world -> original voxel)."""
    vox = np.linalg.inv(AFFINE) @ scan.q @ scan.image.affine
    return ndimage.affine_transform(np.asarray(data, np.float32), vox[:3, :3], vox[:3, 3],
                                    output_shape=scan.image.shape, order=order, cval=0.0)


# ----------------------------------------------------------------------------------------------------------
# geometry, orientation, spacing and field of view (noise-free, bias-free scans without a lesion)

GEOMETRY_SPECS = {
    "1mm-RAS": dict(grid="1mm", orientation="RAS"),
    "1mm-LPS-rotated-scaled": dict(grid="1mm", orientation="LPS", rotation_deg=(12.0, -8.0, 5.0),
                                   shift_mm=(6.0, -9.0, 4.0), scales=(1.06, 0.94, 1.03), margin_mm=7.0),
    "thick-PIR-axis0": dict(grid="0.9x0.9x3", orientation="PIR", thick_axis=0, rotation_deg=(-7.0, 11.0, -12.0),
                            scales=(0.95, 1.05, 0.97), margin_mm=12.0),
    "thick-ASL-axis1": dict(grid="0.9x0.9x3", orientation="ASL", thick_axis=1, rotation_deg=(4.0, 9.0, 12.0),
                            shift_mm=(-12.0, 3.0, 10.0), scales=(1.07, 1.0, 0.93), margin_mm=15.0),
    "thick-ILA-axis2": dict(grid="0.9x0.9x3", orientation="ILA", thick_axis=2, rotation_deg=(-12.0, -12.0, 6.0),
                            scales=(0.93, 0.96, 1.05), margin_mm=6.0),
}


def _random_geometry_spec(seed: int) -> ScanSpec:
    return random_spec(np.random.default_rng(seed), lesion_mm3=0.0, neck_cut_mm=None, **CLEAN)


@pytest.fixture(scope="module")
def geometry_scans(phantom):
    specs = {name: ScanSpec(**kw, **CLEAN) for name, kw in GEOMETRY_SPECS.items()}
    specs["random-1"] = _random_geometry_spec(1)
    return {name: scan_head(phantom.head, spec, phantom.brain) for name, spec in specs.items()}


GEOMETRY_NAMES = [*GEOMETRY_SPECS, "random-1"]


@pytest.mark.parametrize("name", GEOMETRY_NAMES)
def test_landmark_maps_back_through_q(phantom, geometry_scans, name):
    scan = geometry_scans[name]
    original = _landmark_centroid(phantom.data(), AFFINE)
    assert np.allclose(original, LANDMARK_CENTRE, atol=0.1)
    in_scan = _landmark_centroid(scan.image.get_fdata(), scan.image.affine)
    assert np.linalg.norm(_apply(scan.q, in_scan[None])[0] - original) < 1.0
    # the pose moved it (except for the identity pose): q is not trivially the identity
    if any(scan.spec.rotation_deg) or any(scan.spec.shift_mm):
        assert np.linalg.norm(in_scan - original) > 2.0


@pytest.mark.parametrize("name", GEOMETRY_NAMES)
def test_orientation_and_spacing(geometry_scans, name):
    scan = geometry_scans[name]
    spec = scan.spec
    assert "".join(nib.aff2axcodes(scan.image.affine)) == spec.orientation
    assert "".join(nib.aff2axcodes(scan.lesion.affine)) == spec.orientation
    assert np.allclose(scan.lesion.affine, scan.image.affine) and scan.lesion.shape == scan.image.shape
    expected = np.ones(3)
    if spec.grid == "0.9x0.9x3":
        expected[:] = 0.9
        expected[spec.thick_axis] = 3.0
    assert np.allclose(_voxel_sizes(scan.image.affine), expected)
    assert np.allclose(scan.image.header.get_zooms()[:3], expected, atol=1e-5)
    # the grid is aligned with the world (a permuted, signed diagonal): the pose lives in q only
    assert np.count_nonzero(np.round(scan.image.affine[:3, :3], 9)) == 3
    assert np.isclose(abs(np.linalg.det(scan.q[:3, :3])), 1.0 / np.prod(spec.scales))
    # no lesion asked, none painted
    assert scan.lesion_mm3 == 0.0 and not np.asarray(scan.lesion.dataobj).any()


@pytest.mark.parametrize("name", GEOMETRY_NAMES)
def test_field_of_view_holds_the_head_with_its_margin(phantom, geometry_scans, name):
    scan = geometry_scans[name]
    shape = np.array(scan.image.shape)
    head_world = phantom.world[phantom.head_mask]
    ijk = _to_scan_voxels(scan, head_world)
    assert (ijk >= -0.5).all() and (ijk <= shape - 0.5).all()
    # the margin on each side of each world axis, in the scan's world
    posed = _apply(np.linalg.inv(scan.q), head_world)
    corners = _apply(scan.image.affine, np.array([[0, 0, 0], shape - 1], float))
    grid_lo, grid_hi = corners.min(axis=0), corners.max(axis=0)
    spacing = np.abs(scan.image.affine[:3, :3]).max(axis=1)                 # per world axis
    margin = scan.spec.margin_mm
    below = posed.min(axis=0) - grid_lo
    above = grid_hi - posed.max(axis=0)
    assert (below >= margin - 1.0).all() and (below <= margin + spacing + 1.0).all(), below
    assert (above >= margin - 1.0).all() and (above <= margin + spacing + 1.0).all(), above
    # and the scan shows the head there: tissue in the scan where the posed head is
    centre = np.round(_to_scan_voxels(scan, np.array([[0.0, 0.0, 0.0]]))[0]).astype(int)
    assert scan.image.get_fdata()[tuple(centre)] > 0.5 * BRAIN


def test_neck_cut(phantom):
    cut = 8.0
    spec = ScanSpec(grid="0.9x0.9x3", orientation="PIR", thick_axis=1, rotation_deg=(8.0, -6.0, 4.0),
                    scales=(1.0, 1.04, 0.97), margin_mm=10.0, neck_cut_mm=cut, **CLEAN)
    scan = scan_head(phantom.head, spec, phantom.brain)
    shape = np.array(scan.image.shape)
    inv_q = np.linalg.inv(scan.q)
    brain_bottom = _apply(inv_q, phantom.world[phantom.brain_mask])[:, 2].min()
    world = _world(scan.image.shape, scan.image.affine)
    z = world[..., 2]
    # the field of view's lowest edge is the cut, in the scan's frame
    assert abs(z.min() - (brain_bottom - cut)) <= 1.0
    data = scan.image.get_fdata()
    assert not (data[z < brain_bottom - cut - 1.0] > 0).any()
    # the head went on below the cut: part of it is out of view, and the lowest slab cuts through tissue
    head_world = phantom.world[phantom.head_mask]
    ijk = _to_scan_voxels(scan, head_world)
    posed_z = _apply(inv_q, head_world)[:, 2]
    assert (posed_z < z.min() - 2.0).sum() > 1000
    kept = posed_z >= z.min() + 0.5
    assert (ijk[kept] >= -0.5).all() and (ijk[kept] <= shape - 0.5).all()
    lowest = np.isclose(z, z.min())
    assert data[lowest].max() > 0.5 * SCALP
    # the top of the head keeps its margin
    assert z.max() - posed_z.max() >= spec.margin_mm - 1.0


# ----------------------------------------------------------------------------------------------------------
# thick slices: each voxel the mean over its thickness (partial volume conserves the signal)


def _ball(sheet: float = 0.0) -> nib.Nifti1Image:
    """A 1 mm ball of brain intensity centred on the world origin; ``sheet`` > 0 adds that much along a
    1 mm axial sheet through the centre (world z = 0)."""
    shape = (56, 56, 56)
    affine = np.eye(4)
    affine[:3, 3] = -28.0                              # voxel 28 at the world origin
    world = _world(shape, affine)
    data = np.where(np.linalg.norm(world, axis=-1) <= BALL_RADIUS, BRAIN, 0.0).astype(np.float32)
    data[..., 28] += sheet * (data[..., 28] > 0)
    return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize("margin", [10.0, 11.0, 12.0])      # the three phases of 1 mm rows in 3 mm slices
@pytest.mark.parametrize("orientation, thick_axis", [("RAS", 2), ("IPL", 0)])
def test_thick_slices_average_over_their_thickness(margin, orientation, thick_axis):
    excess = 0.8
    spec = ScanSpec(grid="0.9x0.9x3", orientation=orientation, thick_axis=thick_axis, margin_mm=margin, **CLEAN)
    scan = scan_head(_ball(sheet=excess), spec)
    thick = scan.image.affine[:3, thick_axis]
    assert np.allclose(np.abs(thick), [0, 0, 3.0])      # the 3 mm axis runs along world z
    centre = _apply(np.linalg.inv(scan.image.affine), np.zeros((1, 3)))[0]
    index = [int(round(c)) for c in centre]
    index[thick_axis] = slice(None)
    profile = scan.image.get_fdata()[tuple(index)]      # through the centre, across the sheet
    z = scan.image.affine[2, 3] + thick[2] * np.arange(profile.size)
    near = np.abs(z) <= 6.0
    rows = profile[near] - BRAIN
    assert np.isclose(rows.sum() * 3.0, excess * 1.0, rtol=0.05), rows       # signal conserved
    assert rows.max() <= excess / 3.0 * 1.05, rows                           # diluted by the thickness
    assert rows.min() >= -1e-4


# ----------------------------------------------------------------------------------------------------------
# the lesion

LESION_SPECS = {
    "20000-random-centre": dict(grid="1mm", orientation="LPS", rotation_deg=(6.0, -4.0, 10.0),
                                scales=(1.03, 0.97, 1.0), lesion_mm3=20_000.0, seed=11),
    "1000-given-centre": dict(grid="0.9x0.9x3", orientation="ASL", thick_axis=1, rotation_deg=(-5.0, 8.0, 3.0),
                              lesion_mm3=1_000.0, lesion_centre=(-18.0, 8.0, 4.0), seed=4),
}


@pytest.fixture(scope="module")
def lesion_scans(phantom):
    return {name: scan_head(phantom.head, ScanSpec(**kw), phantom.brain) for name, kw in LESION_SPECS.items()}


@pytest.mark.parametrize("name", list(LESION_SPECS))
def test_lesion(phantom, lesion_scans, name):
    scan = lesion_scans[name]
    wanted = scan.spec.lesion_mm3
    assert abs(scan.lesion_mm3 - wanted) <= 0.25 * wanted
    mask = np.asarray(scan.lesion.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    voxel_mm3 = float(np.prod(_voxel_sizes(scan.lesion.affine)))
    assert abs(mask.sum() * voxel_mm3 - scan.lesion_mm3) <= 0.30 * scan.lesion_mm3
    # inside the brain, on one side of the midline
    ijk = np.argwhere(mask)
    original = _apply(scan.q, _apply(scan.lesion.affine, ijk.astype(float)))
    vox = np.round(_apply(np.linalg.inv(AFFINE), original)).astype(int)
    assert phantom.brain_mask[tuple(vox.T)].all()
    x = original[:, 0]
    assert (x <= 3.0).all() or (x >= -3.0).all()
    one_connected = ndimage.label(mask)[1]
    assert one_connected == 1
    if scan.spec.lesion_centre is not None:
        assert np.linalg.norm(original.mean(axis=0) - np.asarray(scan.spec.lesion_centre)) < 5.0
    # darker than the brain around it
    data = scan.image.get_fdata()
    brain = _resample_to_scan(phantom.brain_mask, scan, order=0) > 0.5
    around = ndimage.binary_dilation(mask > 0, iterations=3) & brain & (mask == 0)
    assert around.sum() > 100
    assert data[mask > 0].mean() < 0.8 * data[around].mean()


def test_lesion_scales_with_the_requested_volume(lesion_scans):
    small, large = lesion_scans["1000-given-centre"], lesion_scans["20000-random-centre"]
    assert 10.0 < large.lesion_mm3 / small.lesion_mm3 < 30.0


# ----------------------------------------------------------------------------------------------------------
# intensities


def test_bias_field_spans_its_range_over_the_head():
    base = dict(grid="1mm", orientation="RPI", rotation_deg=(5.0, -3.0, 7.0), noise=0.0, margin_mm=10.0)
    low, high = 0.6, 1.6
    for seed in (5, 6):
        biased = scan_head(_ball(), ScanSpec(**base, bias_range=(low, high), seed=seed)).image.get_fdata()
        flat = scan_head(_ball(), ScanSpec(**base, bias_range=(1.0, 1.0), seed=seed)).image.get_fdata()
        head = ndimage.binary_fill_holes(flat > 0.08 * BRAIN)
        assert abs(head.sum() - 4 / 3 * np.pi * BALL_RADIUS ** 3) < 0.1 * head.sum()
        ratio = np.ones(flat.shape)
        ratio[head] = biased[head] / flat[head]
        assert ratio[head].min() >= low * 0.99 and ratio[head].max() <= high * 1.01
        assert ratio[head].min() <= low * 1.03 and ratio[head].max() >= high * 0.97
        # smooth: no jumps between neighbouring voxels
        for axis in range(3):
            both = head & np.roll(head, 1, axis=axis)
            step = np.abs(np.log(ratio) - np.log(np.roll(ratio, 1, axis=axis)))[both]
            assert step.max() < np.log(high / low) / 8


def test_noise_is_rician_and_scaled():
    spec = ScanSpec(grid="1mm", orientation="RAS", noise=0.05, bias_range=(1.0, 1.0), seed=2)
    scan = scan_head(_ball(), spec)
    data = scan.image.get_fdata()
    sd = 0.05 * BRAIN                                   # the ball's 99th percentile is its intensity
    radius = np.linalg.norm(_world(scan.image.shape, scan.image.affine), axis=-1)
    background = data[radius > BALL_RADIUS + 3.0]
    assert background.size > 10_000 and (background >= 0).all()
    # Rician with no signal: a Rayleigh distribution, mean sd * sqrt(pi / 2)
    assert np.isclose(background.mean(), sd * np.sqrt(np.pi / 2), rtol=0.05)
    inside = data[radius < BALL_RADIUS - 3.0]
    assert np.isclose(inside.mean(), BRAIN, rtol=0.02) and np.isclose(inside.std(), sd, rtol=0.1)


# ----------------------------------------------------------------------------------------------------------
# determinism, random specs, orientation codes


def test_same_spec_same_scan(phantom, lesion_scans):
    first = lesion_scans["1000-given-centre"]
    again = scan_head(phantom.head, ScanSpec(**LESION_SPECS["1000-given-centre"]), phantom.brain)
    assert np.array_equal(first.image.get_fdata(), again.image.get_fdata())
    assert np.array_equal(np.asarray(first.lesion.dataobj), np.asarray(again.lesion.dataobj))
    assert np.array_equal(first.q, again.q) and first.lesion_mm3 == again.lesion_mm3


def test_random_spec_is_deterministic_and_in_range():
    assert random_spec(np.random.default_rng(7)) == random_spec(np.random.default_rng(7))
    assert random_spec(np.random.default_rng(7)) != random_spec(np.random.default_rng(8))
    codes = set(orientation_codes())
    rng = np.random.default_rng(123)
    specs = [random_spec(rng, max_rotation_deg=10.0, max_shift_mm=5.0, scale_range=(0.9, 1.1)) for _ in range(200)]
    for spec in specs:
        assert spec.grid in ("1mm", "0.9x0.9x3") and spec.orientation in codes and spec.thick_axis in (0, 1, 2)
        assert np.all(np.abs(spec.rotation_deg) <= 10.0) and np.all(np.abs(spec.shift_mm) <= 5.0)
        assert np.all((np.asarray(spec.scales) >= 0.9) & (np.asarray(spec.scales) <= 1.1))
        assert 6.0 <= spec.margin_mm <= 16.0
        assert spec.neck_cut_mm is None or 25.0 <= spec.neck_cut_mm <= 70.0
        low, high = spec.bias_range
        assert 0.55 <= low <= 0.95 and 1.05 <= high <= 1.6
        assert 200.0 <= spec.lesion_mm3 <= 250_000.0
    assert {s.grid for s in specs} == {"1mm", "0.9x0.9x3"}
    assert any(s.neck_cut_mm is None for s in specs) and any(s.neck_cut_mm is not None for s in specs)
    assert len({s.orientation for s in specs}) > 30 and len({s.seed for s in specs}) == len(specs)
    # the keyword arguments and overrides are honoured
    spec = random_spec(np.random.default_rng(1), lesion_mm3=0.0, grid="1mm", orientation="PIR", noise=0.0,
                       neck_cut_mm=None)
    assert (spec.lesion_mm3, spec.grid, spec.orientation, spec.noise, spec.neck_cut_mm) == (0.0, "1mm", "PIR", 0.0,
                                                                                             None)
    with pytest.raises(ValueError, match="unknown grid"):
        scan_head(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), ScanSpec(grid="2mm"))


def test_orientation_codes():
    codes = orientation_codes()
    assert len(codes) == 48 and len(set(codes)) == 48
    assert {"RAS", "LPS", "PIR", "ASL", "ILA", "LAS"} <= set(codes)
    for code in codes:
        ornt = nib.orientations.axcodes2ornt(tuple(code))
        assert sorted(ornt[:, 0].astype(int)) == [0, 1, 2]
        assert "".join(nib.orientations.ornt2axcodes(ornt)) == code
