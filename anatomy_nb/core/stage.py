"""The stage protocol, written once: content key → reuse if complete → compute → manifest last → record.

Every stage's artifact is a folder ``run_dir/<stage>/<key>/`` whose key hashes everything it was
computed from. ``Stage`` owns the four steps that every stage used to spell out by hand:

1. ``stage.complete`` — a finished artifact with this key exists (its manifest says so);
2. ``stage.reuse()`` — then record it as the stage's latest and use it;
3. otherwise compute, writing files atomically through ``stage.write_*``;
4. ``stage.finish(manifest)`` — write ``manifest.json`` *last* (so a killed run never looks
   finished) and record the artifact in the run's index.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .files import atomic_save_npy, atomic_write_json, atomic_write_parquet, read_json

if TYPE_CHECKING:  # pragma: no cover
    from .run import RunPaths

__all__ = ["MANIFEST", "Artifact", "check_format", "Stage", "StepTimer", "relative", "show_progress", "terminal"]

MANIFEST = "manifest.json"


class Stage:
    """One stage's artifact in a run directory (see the module docstring)."""

    def __init__(self, run: RunPaths, name: str, key: str, format: int = 1):
        self.run, self.name, self.key, self.format = run, name, key, format
        self.path = run.path / name / key

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, key={self.key!r}, complete={self.complete})"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def complete(self) -> bool:
        try:
            return bool(read_json(self.manifest_path).get("complete"))
        except (FileNotFoundError, ValueError):
            return False

    def manifest(self) -> dict:
        return read_json(self.manifest_path)

    def reuse(self, force: bool = False, **record: Any) -> bool:
        """True (and the artifact recorded as the stage's latest) when it is already complete."""
        if force or not self.complete:
            return False
        self.run.record(self.name, self.key, **record)
        return True

    def begin(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        atomic_write_json(self.path / name, obj)
        return self.path / name

    def write_parquet(self, name: str, df) -> Path:
        path = self.path / (name if name.endswith(".parquet") else f"{name}.parquet")
        atomic_write_parquet(path, df)
        return path

    def save_npy(self, name: str, array: np.ndarray) -> Path:
        path = self.path / (name if name.endswith(".npy") else f"{name}.npy")
        atomic_save_npy(path, array)
        return path

    def finish(self, manifest: dict[str, Any], **record: Any) -> dict[str, Any]:
        """Write the manifest (last) and record the artifact; returns the manifest as written."""
        full = {"complete": True, "stage": self.name, "format": self.format, "key": self.key, **manifest}
        atomic_write_json(self.manifest_path, full)
        self.run.record(self.name, self.key, **record)
        return full


@dataclass
class Artifact:
    """A finished stage artifact as a reader sees it: its folder and manifest (read from the folder
    when not given), and whether the call that returned it reused it rather than computing it."""

    path: Path
    manifest: dict | None = None
    reused: bool = False
    #: (oldest, newest) artifact format the reader understands; None: any
    readable_formats: ClassVar[tuple[int, int] | None] = None

    def __post_init__(self):
        self.path = Path(self.path)
        if self.manifest is None:
            self.manifest = read_json(self.path / MANIFEST)
        if self.readable_formats is not None:
            check_format(self.path, self.manifest, *self.readable_formats)

    @property
    def key(self) -> str:
        return self.manifest["key"]


def check_format(path: Path, manifest: Mapping[str, Any], oldest: int, newest: int) -> None:
    """A reader's check of the artifact format it was handed: one written by a newer anatomy_nb (or an
    older one it no longer reads) is an error naming the folder, not a KeyError further on."""
    found = manifest.get("format", 1)
    if not oldest <= found <= newest:
        raise ValueError(
            f"{path}: {manifest.get('stage', 'artifact')} format {found}; this version of anatomy_nb reads formats "
            f"{oldest}–{newest} (re-run the stage, or use the anatomy_nb that wrote it)"
        )


def relative(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` when it lies inside it, else as given (for manifests)."""
    p, r = Path(path), Path(root)
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(p)


def terminal(message: str) -> None:
    """A progress line for the person running a stage: to the process's own stderr, so that in a
    notebook (papermill or JupyterLab) it reaches the terminal and stays out of the shared output."""
    print(message, file=sys.__stderr__ or sys.stderr, flush=True)


def show_progress(wanted: bool) -> bool:
    """Whether to draw a progress bar: when asked for, except in a headless notebook kernel, whose
    environment says TQDM_DISABLE (``ui.notebooks.HEADLESS_ENV``; the terminal shows papermill's)."""
    return bool(wanted) and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true")


@dataclass
class StepTimer:
    """Wall-clock seconds per named step of a stage, kept in its manifest: where the time goes at
    a user's scale, without a profiler (``benchmarks/scale.py`` reads them)."""

    seconds: dict[str, float] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("anatomy_nb"))

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + took, 3)
            self.log.info("%s: %.1f s", name, took)
