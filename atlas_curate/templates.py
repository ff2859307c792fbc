"""The template registry (``templates/registry.json``): offline templates and their tissue maps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

from . import io
from .naming import TEMPLATE_KEY
from .resources import data_dir


@dataclass(frozen=True)
class Template:
    key: str
    name: str
    t1w: Path
    gm: Path
    wm: Path
    shape: tuple[int, int, int]

    def load(self, which: str = "T1w") -> nib.Nifti1Image:
        path = {"T1w": self.t1w, "GM": self.gm, "WM": self.wm}[which]
        return nib.load(path)

    @property
    def affine(self) -> np.ndarray:
        return nib.load(self.t1w).affine


def _provider_dir(provider: str) -> Path:
    if provider == "nilearn":
        return Path(str(resources.files("nilearn.datasets") / "data"))
    raise ValueError(f"unknown template provider {provider!r}")


@lru_cache(maxsize=None)
def registry() -> dict:
    return json.loads((data_dir("templates") / "registry.json").read_text())


@lru_cache(maxsize=None)
def get_template(key: str = TEMPLATE_KEY) -> Template:
    """Resolve a registry key (e.g. ``mni2009``) or template name to local files; never downloads."""
    entries = registry()
    for entry_key, entry in entries.items():
        if key in (entry_key, entry["name"]):
            base = _provider_dir(entry["provider"])
            files = {k: base / v for k, v in entry["files"].items()}
            for path in files.values():
                if not path.is_file():
                    raise FileNotFoundError(f"template file missing from {entry['provider']}: {path}")
            return Template(entry_key, entry["name"], files["T1w"], files["GM"], files["WM"],
                            tuple(entry["shape"]))
    raise KeyError(f"unknown template {key!r}; known: {', '.join(entries)}")


@lru_cache(maxsize=4)
def template_arrays(key: str = TEMPLATE_KEY) -> dict[str, np.ndarray]:
    """Template T1 (0..1), GM and WM probability (0..1) as float32 arrays, cached per process."""
    tpl = get_template(key)
    out = {}
    for which in ("T1w", "GM", "WM"):
        arr = np.asarray(tpl.load(which).dataobj, dtype=np.float32) / 255.0
        arr.setflags(write=False)
        out[which] = arr
    return out


@dataclass(frozen=True, eq=False)
class TemplateGrid:
    """The template's voxel grid, the one every template-space image of every stage lies on: shape, affine
    (both read from the template's header once), the header image and the template brain mask.

    :meth:`check` is the single grid test (shape and affine within :data:`atlas_curate.io.GRID_TOLERANCE_MM`).
    """

    template: Template
    header: nib.Nifti1Image = field(repr=False)

    @property
    def key(self) -> str:
        return self.template.key

    @property
    def space(self) -> str:
        return self.template.name

    @cached_property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.header.shape[:3])

    @cached_property
    def affine(self) -> np.ndarray:
        affine = np.array(self.header.affine, dtype=np.float64)
        affine.setflags(write=False)
        return affine

    @cached_property
    def voxel_mm3(self) -> float:
        return io.voxel_volume(self.header)

    @cached_property
    def brain(self) -> np.ndarray:
        """The template brain (template T1w > 0), read-only."""
        brain = template_arrays(self.key)["T1w"] > 0
        brain.setflags(write=False)
        return brain

    def problem(self, img) -> str | None:
        """``None`` when ``img`` lies on this grid, else the reason (shape or affine)."""
        return io.grid_difference(self.header, img)

    def check(self, img, path, what: str = "", hint: str = "") -> None:
        """Raise :class:`atlas_curate.io.InputError` naming ``path`` when ``img`` is not on this grid."""
        problem = self.problem(img)
        if problem:
            raise io.InputError(path, f"{what + ' ' if what else ''}not on the {self.space} grid: {problem}{hint}")

    def image(self, data: np.ndarray, dtype, *, xform_code: int = 4) -> nib.Nifti1Image:
        """``data`` as a NIfTI image on this grid (sform and qform = the affine, ``xform_code``, units mm)."""
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), self.affine)
        img.set_sform(self.affine, code=xform_code)
        img.set_qform(self.affine, code=xform_code)
        img.header.set_xyzt_units("mm", "sec")
        return img


def template_grid(key: str = TEMPLATE_KEY) -> TemplateGrid:
    """The cached :class:`TemplateGrid` of a registry key (one header read per process)."""
    return _template_grid(key)


@lru_cache(maxsize=4)
def _template_grid(key: str) -> TemplateGrid:
    template = get_template(key)
    return TemplateGrid(template, nib.load(template.t1w))
