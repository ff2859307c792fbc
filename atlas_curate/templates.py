"""The template registry (``templates/registry.json``): offline templates and their tissue maps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

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
def get_template(key: str = "mni2009") -> Template:
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
def template_arrays(key: str = "mni2009") -> dict[str, np.ndarray]:
    """Template T1 (0..1), GM and WM probability (0..1) as float32 arrays, cached per process."""
    tpl = get_template(key)
    out = {}
    for which in ("T1w", "GM", "WM"):
        arr = np.asarray(tpl.load(which).dataobj, dtype=np.float32) / 255.0
        arr.setflags(write=False)
        out[which] = arr
    return out
