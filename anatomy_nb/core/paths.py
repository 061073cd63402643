"""Where the project's files are: the notebooks, the widget front-end and the vendored data.

They sit beside the package in a source checkout; an environment variable points elsewhere
(``$ANATOMY_NB_NOTEBOOKS``, ``$ANATOMY_NB_WIDGETS``, ``$ANATOMY_NB_DATA``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PACKAGE_DIR", "data_dir", "notebook_dir", "widgets_dir"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _beside_package(folder: str, env: str) -> Path:
    override = os.environ.get(env)
    return Path(override) if override else PACKAGE_DIR.parent / folder


def notebook_dir() -> Path:
    """The stage notebooks (``notebooks/``)."""
    return _beside_package("notebooks", "ANATOMY_NB_NOTEBOOKS")


def widgets_dir() -> Path:
    """The widgets' ES modules and CSS (``widgets/``)."""
    return _beside_package("widgets", "ANATOMY_NB_WIDGETS")


def data_dir() -> Path:
    """The vendored data sets and eval sets (``data/``)."""
    return _beside_package("data", "ANATOMY_NB_DATA")
