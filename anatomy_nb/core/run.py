"""The run directory: one typed object through which every stage, notebook, viewer and report
reads and writes.

Layout (one folder per stage, named like the stage, its module and its notebook)::

    run_dir/
      index.json                 stage → key of its latest artifact
      extract/<key>/             the feature store            (RunDir.store)
      hypothesize/<key>/         concepts, tests, topics       (RunDir.hypotheses)
      plan/plan.json             the intervention plan         (RunDir.plan)
      train/<key>/               one folder per training run   (RunDir.trainings)
      evaluate/<key>/            the evaluation tables         (RunDir.evaluation)
      cache/                     shared caches (reference log-probs, viewer maps)
      notebooks/, report/        executed notebooks and the shareable report
      data/                      data written by the pipeline (a poisoned copy and its truth)

``RunPaths`` holds the paths and the index; the readers of the artifacts (``results.run.RunDir``) and
the loaders of the weights a store was built with (``lm.recorded``) sit in the layers above, which
own them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from .files import atomic_write_json, read_json
from .stage import Stage

__all__ = ["PLAN_FILE", "RunPaths", "RunLike"]

INDEX = "index.json"
R = TypeVar("R", bound="RunPaths")
PLAN_FILE = "plan.json"  # run_dir/plan/plan.json: the plan the next training run applies


class RunPaths:
    """A run directory's paths and index (see the module docstring); ``results.run.RunDir`` adds the
    readers. ``RunPaths(path)`` creates nothing until a stage writes."""

    def __init__(self, path: RunLike):
        self.path = Path(path.path if isinstance(path, RunPaths) else path)

    @classmethod
    def of(cls: type[R], run: RunLike) -> R:
        """``run`` itself if it is one of this class, else the run directory at that path."""
        return run if isinstance(run, cls) else cls(run)

    def __repr__(self) -> str:
        stages = ", ".join(self.index()) or "empty"
        return f"{type(self).__name__}({str(self.path)!r}: {stages})"

    def __fspath__(self) -> str:
        return str(self.path)

    # --- the index -------------------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.path / INDEX

    def index(self) -> dict[str, Any]:
        """Stage name → {key, path, ...} of the artifact that stage last produced or reused."""
        return read_json(self.index_path) if self.index_path.exists() else {}

    def has(self, stage: str) -> bool:
        return stage in self.index()

    def record(self, stage: str, key: str, **info: Any) -> None:
        index = self.index()
        index[stage] = {"key": key, "path": f"{stage}/{key}", **info}
        atomic_write_json(self.index_path, index)

    def latest(self, stage: str) -> Path:
        """The folder of the stage's latest artifact; a clear error when the stage has not run."""
        entry = self.index().get(stage)
        if entry is None:
            raise FileNotFoundError(f"{self.index_path}: no '{stage}' artifact recorded yet; run that stage first")
        return self.path / entry["path"]

    def stage(self, name: str, key: str, format: int = 1) -> Stage:
        """The artifact of stage ``name`` with content key ``key`` (see ``core.stage``)."""
        return Stage(self, name, key, format)

    @property
    def plan_path(self) -> Path:
        return self.path / "plan" / PLAN_FILE

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"


RunLike = RunPaths | str | os.PathLike
