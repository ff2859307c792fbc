"""Reading and writing NIfTI / MRIcron VOI files, grid comparison, atomic and deterministic saves."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_fixture

from atlas_curate import io
from atlas_curate.io import InputError, grid_difference, load_nifti, read_mask, save_nifti, voi_bytes

AFFINE = np.array([[-1.5, 0.0, 0.0, 30.0],
                   [0.0, 1.5, 0.0, -40.0],
                   [0.0, 0.0, 2.0, -10.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _blob_mask(shape=(9, 8, 7)) -> np.ndarray:
    rng = np.random.default_rng(0)
    mask = rng.random(shape) > 0.7
    mask[0, 0, 0] = True
    mask[-1, -1, -1] = False
    return mask


def _header_fields(raw: bytes) -> dict:
    return {
        "sizeof_hdr": struct.unpack("<i", raw[0:4])[0],
        "datatype": struct.unpack("<h", raw[70:72])[0],
        "vox_offset": struct.unpack("<f", raw[108:112])[0],
        "scl_slope": struct.unpack("<f", raw[112:116])[0],
        "scl_inter": struct.unpack("<f", raw[116:120])[0],
        "qform_code": struct.unpack("<h", raw[252:254])[0],
        "sform_code": struct.unpack("<h", raw[254:256])[0],
        "magic": raw[344:348],
    }


# --------------------------------------------------------------------------------------------- VOI


@pytest.mark.parametrize("flavour, stored, slope", [("unit", 1, 1.0), ("percent", 100, 0.01)])
def test_voi_bytes_header_and_round_trip(tmp_path, flavour, stored, slope):
    mask = _blob_mask()
    blob = voi_bytes(mask, AFFINE, flavour=flavour)
    assert blob[:2] == b"\x1f\x8b", "a VOI is a gzip stream"
    assert blob[4:8] == b"\0\0\0\0", "no time stamp: the same mask gives the same bytes"
    raw = gzip.decompress(blob)
    fields = _header_fields(raw)
    assert fields["sizeof_hdr"] == 348
    assert fields["magic"] == b"n+1\x00"
    assert fields["vox_offset"] == 352.0
    assert fields["scl_slope"] == pytest.approx(slope, rel=1e-6)
    assert fields["scl_inter"] == 0.0
    assert fields["qform_code"] == 0
    assert fields["sform_code"] > 0
    assert fields["datatype"] == 2, "NIfTI datatype 2 is uint8"
    # voxel block: exactly the stored value inside the mask, 0 outside (Fortran order)
    voxels = np.frombuffer(raw[352:352 + mask.size], np.uint8).reshape(mask.shape, order="F")
    assert len(raw) == 352 + mask.size
    np.testing.assert_array_equal(voxels, np.where(mask, stored, 0))

    path = tmp_path / f"lesion_{flavour}.voi"
    io.write_voi(mask, AFFINE, path, flavour=flavour)
    assert path.read_bytes() == blob
    decoded, img = read_mask(path)
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, mask)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, AFFINE)
    np.testing.assert_allclose(img.get_sform(), AFFINE)


def test_voi_flavours_decode_alike_and_unknown_flavour_rejected():
    mask = _blob_mask()
    unit = nib.Nifti1Image.from_bytes(gzip.decompress(voi_bytes(mask, AFFINE, flavour="unit")))
    percent = nib.Nifti1Image.from_bytes(gzip.decompress(voi_bytes(mask, AFFINE, flavour="percent")))
    np.testing.assert_allclose(np.asanyarray(unit.dataobj), np.asanyarray(percent.dataobj), atol=1e-6)
    with pytest.raises(ValueError):
        voi_bytes(mask, AFFINE, flavour="permille")


@pytest.mark.parametrize("name, expected", [("1.voi", 42008), ("2.voi", 21800)])
def test_real_mricron_voi(name, expected):
    path = shared_fixture("mricron", name)
    mask, img = read_mask(path)
    assert mask.shape == (181, 217, 181)
    assert int(np.count_nonzero(mask)) == expected
    # the real files are the old 'percent' flavour: what our writer must reproduce
    fields = _header_fields(gzip.open(path).read(352))
    assert fields["magic"] == b"n+1\x00"
    assert fields["vox_offset"] == 352.0
    assert fields["scl_slope"] == pytest.approx(0.01, rel=1e-6)
    assert fields["sform_code"] > 0


# -------------------------------------------------------------------------------------- load_nifti


def _image(shape=(6, 5, 4), dtype=np.int16) -> nib.Nifti1Image:
    data = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    return nib.Nifti1Image(data, AFFINE)


def test_load_nifti_truncated_gzip_raises_input_error(tmp_path):
    path = tmp_path / "scan.nii.gz"
    save_nifti(_image((20, 20, 20)), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError) as info:
        load_nifti(path)
    message = str(info.value)
    assert str(path) in message
    assert "truncated" in message or "corrupt" in message
    assert info.value.path == path


def test_load_nifti_missing_and_garbage(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_nifti(tmp_path / "absent.nii.gz")
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"\0" * 10)
    with pytest.raises(InputError) as info:
        load_nifti(junk)
    assert str(junk) in str(info.value)


def test_load_nifti_squeezes_trailing_singleton(tmp_path):
    data = np.random.default_rng(1).random((5, 6, 7, 1)).astype(np.float32)
    path = tmp_path / "four_d.nii.gz"
    save_nifti(nib.Nifti1Image(data, AFFINE), path)
    assert nib.load(path).shape == (5, 6, 7, 1)
    img = load_nifti(path)
    assert img.shape == (5, 6, 7)
    assert img.header["dim"][0] == 3
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data[..., 0])
    np.testing.assert_allclose(img.affine, AFFINE)
    assert load_nifti(path, squeeze=False).shape == (5, 6, 7, 1)


def test_load_nifti_rejects_real_4d(tmp_path):
    path = tmp_path / "series.nii.gz"
    save_nifti(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), AFFINE), path)
    with pytest.raises(InputError, match="3-D"):
        load_nifti(path)


# -------------------------------------------------------------------------------- grid_difference


def test_grid_difference():
    a = _image()
    assert grid_difference(a, nib.Nifti1Image(np.zeros(a.shape, np.uint8), AFFINE.copy())) is None
    tiny = AFFINE.copy()
    tiny[0, 3] += 1e-5
    assert grid_difference(a, nib.Nifti1Image(np.zeros(a.shape, np.uint8), tiny)) is None

    shifted = AFFINE.copy()
    shifted[1, 3] += 0.5
    reason = grid_difference(a, nib.Nifti1Image(np.zeros(a.shape, np.uint8), shifted))
    assert isinstance(reason, str) and "affine" in reason

    other_shape = nib.Nifti1Image(np.zeros((6, 5, 5), np.uint8), AFFINE)
    reason = grid_difference(a, other_shape)
    assert isinstance(reason, str) and "shape" in reason


# ------------------------------------------------------------------------------------------- save


def test_save_nifti_atomic_success(tmp_path):
    path = tmp_path / "sub" / "out.nii.gz"
    assert save_nifti(_image(), path) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.nii.gz"]
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), np.asanyarray(_image().dataobj))


def test_save_nifti_leaves_nothing_when_writing_raises(tmp_path, monkeypatch):
    seen = []

    def broken_write(self, data):
        seen.append(self)
        with open(self, "wb") as handle:  # a partial file, as a crash mid-write leaves
            handle.write(data[:10])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", broken_write)
    path = tmp_path / "out.nii.gz"
    with pytest.raises(OSError, match="disk full"):
        save_nifti(_image(), path)
    assert seen and seen[0] != path, "writing must go to a temporary name"
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_nifti_deterministic(tmp_path):
    img = _image((7, 7, 7), np.float32)
    a = save_nifti(img, tmp_path / "a" / "scan.nii.gz").read_bytes()
    b = save_nifti(img, tmp_path / "b" / "other_name.nii.gz").read_bytes()
    assert a == b
    assert a[4:8] == b"\0\0\0\0", "gzip header must not store a time stamp"
    assert not a[3] & 0x08, "gzip header must not store a file name"


def test_write_bytes_replaces_atomically(tmp_path):
    path = tmp_path / "table.tsv"
    io.write_text("first\n", path)
    io.write_text("second\n", path)
    assert path.read_text() == "second\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.tsv"]


def test_import_leaves_the_umask_alone():
    """Importing the module neither sets nor reads the umask (it is read once, at the first atomic write)."""
    import subprocess
    import sys

    code = ("import os\ncalls = []\nreal = os.umask\nos.umask = lambda m: calls.append(m) or real(m)\n"
            "import atlas_curate.io\nassert calls == [], calls\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_atomic_writes_get_the_umask_permissions(tmp_path):
    """mkstemp makes 0600 files; a finished output has the permissions of a plain open(): 0666 minus the umask."""
    import os
    import stat
    import subprocess
    import sys

    code = ("import os\nos.umask(0o027)\nfrom atlas_curate import io\n"
            f"io.write_text('x', {str(tmp_path / 'a.tsv')!r})\nprint(oct(io.process_umask()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "0o27", done.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "a.tsv").st_mode) == 0o640
    path = io.write_text("y", tmp_path / "b.tsv")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~io.process_umask()


def test_umask_without_proc(monkeypatch):
    """Where /proc/self/status cannot be read, the umask is read by setting and restoring it."""
    import os

    real = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self) == "/proc/self/status":
            raise OSError("no /proc here")
        return real(self, *args, **kwargs)

    before = os.umask(0o022)
    os.umask(0o077)
    monkeypatch.setattr(Path, "read_text", no_proc)
    io.process_umask.cache_clear()
    try:
        assert io.process_umask() == 0o077
        assert os.umask(0o077) == 0o077, "the umask must be restored"
    finally:
        os.umask(before)
        io.process_umask.cache_clear()
