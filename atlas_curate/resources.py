"""Locate the project's data folders (``templates/``, ``metadata/``) in a checkout or an install."""

from __future__ import annotations

import sys
from pathlib import Path


def data_dir(name: str) -> Path:
    """Folder ``name`` from the source tree (editable install) or ``<prefix>/share/atlas-curate``."""
    candidates = [
        Path(__file__).resolve().parent.parent / name,
        Path(sys.prefix) / "share" / "atlas-curate" / name,
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"atlas-curate data folder {name!r} not found in: "
                            + ", ".join(str(c) for c in candidates))
