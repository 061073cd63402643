"""Where the package's own files are: the notebooks, the widget front-end, the vendored data sets
and eval sets, the shipped SAE and the prompt templates.

They ship inside the package (a wheel carries them), found through ``importlib.resources``; in a
source checkout ``notebooks/``, ``widgets/`` and ``data/`` at the top of the repository are links to
the same folders. An environment variable points elsewhere (``$ANATOMY_NB_NOTEBOOKS``,
``$ANATOMY_NB_WIDGETS``, ``$ANATOMY_NB_DATA``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["PACKAGE_DIR", "data_dir", "notebook_dir", "package_file", "widgets_dir"]

PACKAGE_DIR = Path(str(resources.files("anatomy_nb")))


def package_file(*parts: str) -> Path:
    """A file or folder shipped inside the package."""
    return Path(str(resources.files("anatomy_nb").joinpath(*parts)))


def _shipped(folder: str, env: str) -> Path:
    override = os.environ.get(env)
    return Path(override) if override else package_file(folder)


def notebook_dir() -> Path:
    """The stage notebooks."""
    return _shipped("notebooks", "ANATOMY_NB_NOTEBOOKS")


def widgets_dir() -> Path:
    """The widgets' ES modules and CSS."""
    return _shipped("widgets", "ANATOMY_NB_WIDGETS")


def data_dir() -> Path:
    """The vendored data sets and eval sets (licences and provenance in its DATA.md)."""
    return _shipped("datasets", "ANATOMY_NB_DATA")
