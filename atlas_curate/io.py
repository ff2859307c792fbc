"""Reading NIfTI and MRIcron VOI files, atomic writing, grid comparison.

Every reader raises :class:`InputError` naming the file and the reason, so a per-scan outcome table
can say exactly what was wrong with which file.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from isal import igzip, igzip_lib

GRID_TOLERANCE_MM = 1e-3
GZIP_LEVEL = 1  # ISA-L level 1: ~9x faster than zlib level 1 on noisy float T1s, smaller files on masks


class InputError(Exception):
    """A source file that cannot be used, with the file and the reason."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _decompress(path: Path) -> bytes:
    try:
        return igzip.decompress(path.read_bytes())
    except (EOFError, OSError, zlib.error, igzip_lib.IsalError) as exc:
        raise InputError(path, f"corrupt or truncated gzip stream ({exc})") from exc


def load_nifti(path: os.PathLike | str, *, squeeze: bool = True) -> nib.Nifti1Image:
    """Load ``.nii``, ``.nii.gz`` or an MRIcron ``.voi`` (gzipped NIfTI under another name).

    The whole file is decompressed once, so a truncated archive fails here, not halfway through
    a later stage. A trailing singleton 4th dimension (X, Y, Z, 1) is dropped when ``squeeze``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    name = path.name.lower()
    raw = _decompress(path) if name.endswith((".gz", ".voi")) else path.read_bytes()
    if len(raw) < 348:
        raise InputError(path, f"too short to be NIfTI ({len(raw)} bytes)")
    try:
        img = nib.Nifti1Image.from_bytes(raw)
        # touch the stored data (unscaled: no float copy) so a file cut inside the voxel block fails now
        proxy = img.dataobj
        data = np.asarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
    except Exception as exc:  # nibabel raises several types for bad headers/data
        raise InputError(path, f"not a readable NIfTI-1 image ({type(exc).__name__}: {exc})") from exc
    if squeeze and data.ndim == 4 and data.shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    elif data.ndim != 3 and squeeze:
        raise InputError(path, f"expected a 3-D image, got shape {data.shape}")
    return img


def read_mask(path: os.PathLike | str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A binary mask (``> 0``, so both VOI flavours, 1 and 100 × 0.01, decode alike) and its image."""
    mask, _, img = read_mask_values(path)
    return mask, img


def read_mask_values(path: os.PathLike | str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """``(mask, distinct non-zero stored values, image)``: the values tell whether the file was binary."""
    img = load_nifti(path)
    proxy = img.dataobj
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    if hasattr(proxy, "get_unscaled") and slope > 0 and inter == 0:
        stored = np.asarray(proxy.get_unscaled())  # same sign as the scaled data, without a float copy
    else:
        stored = np.asanyarray(proxy)
    mask = stored > 0
    # binary iff every non-zero voxel holds the maximum (cheap reductions; no boolean gather)
    top = stored.max() if stored.size else 0
    nonzero = np.count_nonzero(stored)
    if nonzero == 0:
        values = stored[:0].ravel()
    elif top > 0 and np.count_nonzero(stored == top) == nonzero:
        values = np.asarray([top])
    else:
        values = np.unique(stored[stored != 0])
    return mask, values, img


def grid_difference(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> str | None:
    """``None`` when two images share shape and affine (within 1e-3 mm), else a readable reason."""
    if tuple(a.shape[:3]) != tuple(b.shape[:3]):
        return f"shape {tuple(b.shape[:3])} differs from {tuple(a.shape[:3])}"
    delta = np.abs(np.asarray(a.affine) - np.asarray(b.affine)).max()
    if delta > GRID_TOLERANCE_MM:
        return f"affine differs by up to {delta:.3g} mm"
    return None


def voxel_volume(img: nib.spatialimages.SpatialImage) -> float:
    return float(abs(np.linalg.det(np.asarray(img.affine)[:3, :3])))


@lru_cache(maxsize=1)
def process_umask() -> int:
    """The process's file-creation mask, read once: the ``Umask:`` line of ``/proc/self/status`` (Linux), else
    by setting and restoring it (the only portable way to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename onto ``path`` on success.

    A crash or exception leaves no file under the final name and removes the temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~process_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip (no name, mtime 0) with ISA-L: the same bytes always give the same file."""
    return igzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def save_nifti(img: nib.Nifti1Image, path: os.PathLike | str) -> Path:
    """Atomic, deterministic save of a single-file NIfTI-1 (``.nii`` or ``.nii.gz``)."""
    name = str(path)
    if not name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: expected a .nii or .nii.gz name")
    data = img.to_bytes()
    return write_bytes(gzip_bytes(data) if name.endswith(".gz") else data, path)


def save_array(data: np.ndarray, affine: np.ndarray, path: os.PathLike | str, dtype, *, xform_code: int = 2) -> Path:
    """Save an array with ``affine`` as both sform and qform (``xform_code``: 2 aligned, 4 MNI), units mm."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_sform(affine, code=xform_code)
    img.set_qform(affine, code=xform_code)
    img.header.set_xyzt_units("mm", "sec")
    return save_nifti(img, path)


def write_bytes(data: bytes, path: os.PathLike | str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(text: str, path: os.PathLike | str) -> Path:
    return write_bytes(text.encode("utf-8"), path)


def copy_file(src: os.PathLike | str, path: os.PathLike | str) -> Path:
    with atomic_path(path) as tmp:
        shutil.copyfile(src, tmp)
    return Path(path)


VOI_FLAVOURS = ("unit", "percent")


def voi_bytes(mask: np.ndarray, affine: np.ndarray, *, flavour: str = "unit") -> bytes:
    """Encode a binary mask as an MRIcron VOI: gzipped single-file NIfTI-1, uint8, sform only.

    ``unit`` stores 1 with ``scl_slope`` 1 (files since 2007); ``percent`` stores 100 with
    ``scl_slope`` 0.01 (older files, like the MRIcron examples).
    """
    if flavour not in VOI_FLAVOURS:
        raise ValueError(f"VOI flavour must be one of {VOI_FLAVOURS}")
    value = 1 if flavour == "unit" else 100
    data = np.where(np.asarray(mask) > 0, value, 0).astype(np.uint8)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=4 if flavour == "percent" else 2)
    img.set_qform(None, code=0)
    img.header.set_data_dtype(np.uint8)
    raw = bytearray(img.to_bytes())
    # nibabel writes unscaled data; set the scale fields by hand as MRIcron did
    raw[112:120] = struct.pack("<ff", 1.0 if flavour == "unit" else 0.01, 0.0)
    return gzip.compress(bytes(raw), compresslevel=6, mtime=0)  # as MRIcron writes them (zlib), not ISA-L


def write_voi(mask: np.ndarray, affine: np.ndarray, path: os.PathLike | str, *, flavour: str = "unit") -> Path:
    return write_bytes(voi_bytes(mask, affine, flavour=flavour), path)
