"""Training data: the split table, the working grid, cached arrays and seeded random crops.

Working grid. Every scan is on the 1 mm template grid (:func:`atlas_curate.templates.template_grid`, 197 × 233 ×
189). Training and inference
see only the bounding box of the template brain plus ``box_margin`` mm (clipped to the grid): the rest is
scalp, neck and air. With ``voxel_size = f > 1`` the box is padded at its far end (edge values) to a
multiple of ``f`` and reduced by block averages of ``f³`` voxels (area averaging, no aliasing). The
training target of a working voxel is the fraction of its block that is lesion (a partial-volume target:
thresholding it at 0.5 would cost up to 0.05 Dice on small lesions at 2 mm). Probabilities go back to the
1 mm grid by linear interpolation between block centres (``scipy.ndimage.zoom(order=1, grid_mode=True)``)
and are zero outside the box, so metrics are always computed on the template grid.

Intensity. ``normalize`` maps the white-matter peak to 100, so ``intensity = "wm"`` divides by 100 (white
matter ≈ 1, background 0) and keeps intensities comparable between scans without per-scan statistics;
``"zscore"`` subtracts the mean and divides by the standard deviation of the voxels inside the template
brain.

Cache. Prepared arrays are stored as ``.npy`` files under ``RUN_DIR/cache`` (named by scan and a key over
the source files' size and mtime and the preprocessing settings) and memory-mapped, so DataLoader workers
share them through the page cache and a resumed run does not prepare them again.

Crops. Each item of an epoch is a crop of one training scan: scans are visited in a permutation drawn per
epoch; with probability ``lesion_crop_prob`` the crop is placed to contain a lesion voxel chosen at random
(at a uniformly random position inside the crop, so lesions are not centred), otherwise uniformly; volumes
smaller than the crop are zero-padded. Each configured axis is flipped with probability 0.5. The random
numbers of item ``i`` come from ``numpy.random.default_rng([seed, stage, epoch, i])``, so an epoch is the
same whatever the number of workers and whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from .. import io
from ..naming import TEMPLATE_KEY
from ..templates import template_grid

CACHE_VERSION = 2
SPLIT_COLUMNS = ("scan", "split", "t1", "mask")


# --------------------------------------------------------------------------------------------- split table

def read_split(path: os.PathLike | str, bids_root: os.PathLike | str | None = None) -> pd.DataFrame:
    """The split table (``scan, subject, session, split, [fold], cohort, lesion_volume_mm3, t1, mask``).

    Read with :func:`atlas_curate.split.load_split`. Relative ``t1``/``mask``
    paths are taken relative to ``bids_root``; when the table has no ``t1``/``mask`` columns they come from
    :func:`atlas_curate.dataset.scan_table` of ``bids_root``.
    """
    path = Path(path)
    if not path.is_file():
        raise io.InputError(path, "split table not found")
    from ..split import load_split

    try:
        table = load_split(path, bids_root)
    except io.InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise io.InputError(path, f"not a readable split table ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("scan", "split") if c not in table.columns]
    if missing:
        raise io.InputError(path, f"missing columns {missing}")
    root = Path(bids_root).resolve() if bids_root is not None else None
    if ("t1" not in table.columns or "mask" not in table.columns) and root is not None:
        from ..dataset import scan_table

        found = scan_table(root).set_index("scan")
        for column in ("t1", "mask"):
            if column not in table.columns:
                table[column] = table["scan"].map(found[column])
    for column in ("t1", "mask"):
        if column not in table.columns:
            raise io.InputError(path, f"no {column!r} column and no BIDS root to find the images")
        table[column] = [_resolve(value, root) for value in table[column]]
    return table.reset_index(drop=True)


def check_images(table: pd.DataFrame, *, need_mask: bool = True) -> None:
    """Every row's T1w (and mask) exists; else :class:`~atlas_curate.io.InputError` naming the file and scan."""
    for row in table.itertuples(index=False):
        if not row.t1 or not Path(row.t1).is_file():
            raise io.InputError(row.t1 or row.scan, f"T1w of {row.scan} not found")
        if (need_mask or row.mask) and (not row.mask or not Path(row.mask).is_file()):
            raise io.InputError(row.mask or row.scan, f"lesion mask of {row.scan} not found")


def _resolve(value, root: Path | None) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return None
    candidate = Path(str(value))
    if not candidate.is_absolute() and root is not None:
        candidate = root / candidate
    return str(candidate)


# --------------------------------------------------------------------------------------------- working grid

@dataclass(frozen=True)
class Geometry:
    """Where the working grid lies on the 1 mm template grid: ``box`` (start, stop per axis) and the factor."""

    template_shape: tuple[int, int, int]
    box_start: tuple[int, int, int]
    box_stop: tuple[int, int, int]
    factor: int

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.box_start, self.box_stop))  # type: ignore[return-value]

    @property
    def box_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.box_start, self.box_stop))  # type: ignore[return-value]

    @property
    def working_shape(self) -> tuple[int, int, int]:
        return tuple(-(-s // self.factor) for s in self.box_shape)  # type: ignore[return-value]


@lru_cache(maxsize=8)
def geometry(voxel_size: int = 1, box_margin: int = 4, template: str = TEMPLATE_KEY) -> Geometry:
    """The template brain's bounding box plus ``box_margin`` voxels (1 mm), clipped to the grid."""
    brain = template_grid(template).brain
    start, stop = [], []
    for axis in range(3):
        others = tuple(i for i in range(3) if i != axis)
        hits = np.flatnonzero(brain.any(axis=others))
        start.append(max(int(hits[0]) - box_margin, 0))
        stop.append(min(int(hits[-1]) + 1 + box_margin, brain.shape[axis]))
    return Geometry(tuple(brain.shape), tuple(start), tuple(stop), int(voxel_size))  # type: ignore[arg-type]


def geometry_of(config) -> Geometry:
    return geometry(config.voxel_size, config.box_margin)


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Means over ``factor³`` blocks; the far end is padded with edge values to a multiple of ``factor``."""
    array = np.asarray(array, dtype=np.float32)
    if factor == 1:
        return array
    pad = [(0, -s % factor) for s in array.shape]
    padded = np.pad(array, pad, mode="edge")
    x, y, z = (s // factor for s in padded.shape)
    return padded.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5), dtype=np.float32)


def intensity_normalise(t1_box: np.ndarray, brain_box: np.ndarray, mode: str) -> np.ndarray:
    """``wm``: T1 / 100 (normalize maps white matter to 100); ``zscore``: standardised inside the brain."""
    t1_box = np.asarray(t1_box, dtype=np.float32)
    if mode == "wm":
        return t1_box / 100.0
    if mode == "zscore":
        values = t1_box[brain_box]
        sd = float(values.std()) or 1.0
        return (t1_box - float(values.mean())) / sd
    raise ValueError(f"unknown intensity mode {mode!r}")


def template_brain_box(geo: Geometry) -> np.ndarray:
    return template_grid().brain[geo.box]


def image_to_working(t1: np.ndarray, geo: Geometry, intensity: str) -> np.ndarray:
    """A template-grid T1 (standardised by ``normalize``) as the network's input array."""
    if tuple(t1.shape) != geo.template_shape:
        raise ValueError(f"image shape {tuple(t1.shape)} is not the template grid {geo.template_shape}")
    box = np.asarray(t1[geo.box], dtype=np.float32)
    return np.ascontiguousarray(block_mean(intensity_normalise(box, template_brain_box(geo), intensity), geo.factor))


def mask_to_working(mask: np.ndarray, geo: Geometry) -> np.ndarray:
    """A template-grid mask on the working grid: the lesion fraction of each block (float32 in [0, 1];
    exactly the binary mask at 1 mm)."""
    box = (np.asarray(mask[geo.box]) > 0).astype(np.float32)
    return block_mean(box, geo.factor)


def prob_to_box(prob: np.ndarray, geo: Geometry) -> np.ndarray:
    """Working-grid probabilities back on the 1 mm box (linear between block centres)."""
    prob = np.asarray(prob, dtype=np.float32)
    if tuple(prob.shape) != geo.working_shape:
        raise ValueError(f"probability shape {prob.shape} is not the working grid {geo.working_shape}")
    if geo.factor > 1:
        prob = ndimage.zoom(prob, geo.factor, order=1, grid_mode=True, mode="nearest")
    return np.clip(prob[tuple(slice(0, s) for s in geo.box_shape)], 0.0, 1.0)


def prob_to_template(prob: np.ndarray, geo: Geometry) -> np.ndarray:
    """Working-grid probabilities on the whole 1 mm template grid (zero outside the box)."""
    out = np.zeros(geo.template_shape, dtype=np.float32)
    out[geo.box] = prob_to_box(prob, geo)
    return out


# --------------------------------------------------------------------------------------------- cache

@dataclass(frozen=True)
class PreparedScan:
    """A scan's cached arrays (``.npy`` paths) on the working grid, and its 1 mm truth inside the box."""

    scan: str
    image: str
    mask: str
    lesion_voxels: str          # (n, 3) int32 working-grid coordinates of voxels with any lesion
    truth_box: str              # uint8 1 mm truth inside the box (for dev Dice on the template grid)
    truth_voxels: int           # lesion voxels of the whole 1 mm mask (inside and outside the box)

    def load(self, name: str, mmap: bool = True) -> np.ndarray:
        return np.load(getattr(self, name), mmap_mode="r" if mmap else None)


def _file_key(path: str | None) -> str:
    if not path:
        return "none"
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(t1: str, mask: str | None, config) -> str:
    doc = {"version": CACHE_VERSION, "t1": _file_key(t1), "mask": _file_key(mask), "voxel_size": config.voxel_size,
           "box_margin": config.box_margin, "intensity": config.intensity}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _save_npy(array: np.ndarray, path: Path) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


@dataclass(frozen=True)
class PrepareJob:
    scan: str
    t1: str
    mask: str | None
    cache_dir: str
    voxel_size: int
    box_margin: int
    intensity: str
    key: str


def _template_grid_data(path: str, what: str) -> np.ndarray:
    """The voxels of an image on the template grid (:class:`~atlas_curate.io.InputError` when it is not on it)."""
    img = io.load_nifti(path)
    template_grid().check(img, path, what)
    return np.asanyarray(img.dataobj)


def prepare_scan(job: PrepareJob) -> PreparedScan:
    """Write (or reuse) the cached arrays of one scan; see the module docstring."""
    base = Path(job.cache_dir) / f"{job.scan}-{job.key}"
    prepared = PreparedScan(job.scan, f"{base}_image.npy", f"{base}_mask.npy", f"{base}_lesion.npy",
                            f"{base}_truth.npy", 0)
    meta = Path(f"{base}.json")
    if meta.is_file():
        return PreparedScan(**json.loads(meta.read_text()))
    geo = geometry(job.voxel_size, job.box_margin)
    t1 = _template_grid_data(job.t1, "T1w")
    if job.mask:
        truth = _template_grid_data(job.mask, "lesion mask") > 0
    else:
        truth = np.zeros(geo.template_shape, dtype=bool)
    image = image_to_working(np.asarray(t1, dtype=np.float32), geo, job.intensity)
    mask = mask_to_working(truth, geo)
    _save_npy(image.astype(np.float32), Path(prepared.image))
    _save_npy(mask.astype(np.float32), Path(prepared.mask))
    _save_npy(np.argwhere(mask > 0).astype(np.int32), Path(prepared.lesion_voxels))
    _save_npy(truth[geo.box].astype(np.uint8), Path(prepared.truth_box))
    prepared = PreparedScan(**{**asdict(prepared), "truth_voxels": int(np.count_nonzero(truth))})
    io.write_text(json.dumps(asdict(prepared), indent=1), meta)
    return prepared


def prepare_scans(table: pd.DataFrame, cache_dir: os.PathLike | str, config, *, jobs: int = 1,
                  progress: bool = False) -> list[PreparedScan]:
    """Prepare every row of ``table`` (columns ``scan, t1, mask``); a failure names the scan and the file."""
    from ..executor import run_map

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_images(table, need_mask=False)
    job_list = []
    for row in table.itertuples(index=False):
        job_list.append(PrepareJob(row.scan, row.t1, row.mask, str(cache_dir), config.voxel_size, config.box_margin,
                                   config.intensity, cache_key(row.t1, row.mask, config)))
    outcomes = run_map(prepare_scan, job_list, key=lambda j: j.scan, jobs=jobs, desc="prepare", progress=progress)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("could not prepare: " + "; ".join(f"{o.key}: {o.reason}" for o in failed))
    return [o.value for o in outcomes]


def data_fingerprint(table: pd.DataFrame, config) -> str:
    """A hash over the scans, their files (size, mtime) and the preprocessing settings."""
    digest = hashlib.sha256()
    for row in table.sort_values("scan").itertuples(index=False):
        digest.update(f"{row.scan}|{row.split}|{cache_key(row.t1, row.mask, config)}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- crops

def extract(array: np.ndarray, start: tuple[int, ...], size: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """``array[start : start + size]`` with out-of-range parts (negative starts too) filled with ``fill``."""
    out = np.full(size, fill, dtype=array.dtype)
    src, dst = [], []
    for s0, n, dim in zip(start, size, array.shape):
        lo, hi = max(s0, 0), min(s0 + n, dim)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s0, lo - s0 + max(hi - lo, 0)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def crop_start(rng: np.random.Generator, shape: tuple[int, ...], crop: tuple[int, ...],
               lesion_voxels: np.ndarray | None, lesion_prob: float) -> tuple[int, ...]:
    """Start corner of a crop (may be negative where the crop is larger than the volume)."""
    low = [min(0, s - c) for s, c in zip(shape, crop)]
    high = [max(0, s - c) for s, c in zip(shape, crop)]
    use_lesion = lesion_voxels is not None and len(lesion_voxels) > 0 and rng.random() < lesion_prob
    if use_lesion:
        voxel = lesion_voxels[rng.integers(len(lesion_voxels))]
        offset = [int(rng.integers(c)) for c in crop]
        return tuple(int(np.clip(v - o, lo, hi)) for v, o, lo, hi in zip(voxel, offset, low, high))
    return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high))


def random_crop(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, lesion_voxels: np.ndarray | None,
                crop: tuple[int, ...], lesion_prob: float, flip_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    start = crop_start(rng, image.shape, crop, lesion_voxels, lesion_prob)
    image_crop = extract(image, start, crop, 0.0)
    mask_crop = extract(mask, start, crop, 0.0)
    for axis in flip_axes:
        if rng.random() < 0.5:
            image_crop = np.flip(image_crop, axis)
            mask_crop = np.flip(mask_crop, axis)
    return np.ascontiguousarray(image_crop, dtype=np.float32), np.ascontiguousarray(mask_crop, dtype=np.float32)


class CropDataset(Dataset):
    """``length`` seeded random crops per epoch over ``scans``; call :meth:`set_epoch` before each epoch."""

    def __init__(self, scans: list[PreparedScan], crop: tuple[int, int, int], length: int, *, seed: int,
                 lesion_prob: float, flip_axes: tuple[int, ...]):
        if not scans:
            raise ValueError("no training scans")
        self.scans = list(scans)
        self.crop = tuple(crop)
        self.length = int(length)
        self.seed = int(seed)
        self.lesion_prob = float(lesion_prob)
        self.flip_axes = tuple(flip_axes)
        self.stage = 0
        self.epoch = 0
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = {}    # workers open their own memory maps instead of receiving copies
        return state

    def set_epoch(self, stage: int, epoch: int) -> None:
        self.stage, self.epoch = int(stage), int(epoch)

    def __len__(self) -> int:
        return self.length

    def _arrays_of(self, index: int):
        if index not in self._arrays:
            scan = self.scans[index]
            self._arrays[index] = (scan.load("image"), scan.load("mask"), scan.load("lesion_voxels", mmap=False))
        return self._arrays[index]

    def __getitem__(self, item: int):
        order = np.random.default_rng([self.seed, self.stage, self.epoch]).permutation(len(self.scans))
        rng = np.random.default_rng([self.seed, self.stage, self.epoch, int(item), 1])
        image, mask, lesion = self._arrays_of(int(order[item % len(order)]))
        image_crop, mask_crop = random_crop(rng, image, mask, lesion, self.crop, self.lesion_prob, self.flip_axes)
        return torch.from_numpy(image_crop[None]), torch.from_numpy(mask_crop[None])
