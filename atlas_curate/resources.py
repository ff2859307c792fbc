"""Locate the project's data folders (``templates/``, ``metadata/``) in every install mode.

They are installed as the packages ``atlas_curate.data.templates`` and ``atlas_curate.data.metadata``
(``package_dir`` in ``setup.cfg`` maps them from the top-level folders of the source tree), so
``importlib.resources`` finds them wherever the package is: an editable install (the source folders
themselves), a wheel in a venv, ``pip install --user``, ``--prefix`` or ``--target``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DATA_FOLDERS = ("templates", "metadata")


def data_dir(name: str) -> Path:
    """The installed folder ``name`` (``templates`` or ``metadata``) as a path on disk."""
    if name not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {name!r}; known: {', '.join(DATA_FOLDERS)}")
    try:
        folder = resources.files(f"atlas_curate.data.{name}")
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"atlas-curate data folder {name!r} is not installed (reinstall the package: "
                                f"pip install .)") from exc
    path = Path(str(folder))
    if not path.is_dir():   # e.g. imported from a zip file
        raise FileNotFoundError(f"atlas-curate data folder {name!r} is not a folder on disk: {folder}")
    return path
