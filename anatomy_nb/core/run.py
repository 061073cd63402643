"""The run directory: one typed object through which every stage, notebook, viewer and report
reads and writes.

Layout (one folder per stage, named like the stage, its module and its notebook)::

    run_dir/
      index.json                 stage → key of its latest artifact
      extract/<key>/             the feature store            (Run.store)
      hypothesize/<key>/         concepts, tests, topics       (Run.hypotheses)
      plan/plan.json             the intervention plan         (Run.plan)
      train/<key>/               one folder per training run   (Run.trainings)
      evaluate/<key>/            the evaluation tables         (Run.evaluation)
      cache/                     shared caches (reference log-probs, viewer maps)
      notebooks/, report/        executed notebooks and the shareable report
      data/                      data written by the pipeline (a poisoned copy and its truth)

Reading any artifact (``store``, ``hypotheses``, ``plan``, ``trainings``, ``evaluation``) never
imports torch; ``model()`` and ``sae()`` load the weights the store was built with and check
them against the fingerprints it recorded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_write_json, read_json
from .stage import Stage

if TYPE_CHECKING:  # pragma: no cover
    from ..results.evaluation import EvalResult
    from ..results.hypotheses import Hypotheses
    from ..results.plan import InterventionPlan
    from ..results.store import FeatureStore
    from ..results.subspace import SubspaceResult
    from ..results.training import TrainResult

__all__ = ["Run", "RunLike", "PLAN_FILE"]

INDEX = "index.json"
PLAN_FILE = "plan.json"  # run_dir/plan/plan.json: the plan the next training run applies


class Run:
    """A run directory (see the module docstring). ``Run(path)`` creates nothing until a stage writes."""

    def __init__(self, path: RunLike):
        self.path = Path(path.path if isinstance(path, Run) else path)

    @classmethod
    def of(cls, run: RunLike) -> Run:
        """``run`` itself if it is a Run, else the Run at that path."""
        return run if isinstance(run, Run) else cls(run)

    def __repr__(self) -> str:
        stages = ", ".join(self.index()) or "empty"
        return f"Run({str(self.path)!r}: {stages})"

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

    # --- reading results (no torch) ------------------------------------------------------------------

    @property
    def store(self) -> FeatureStore:
        """Stage 1's feature store."""
        from ..results.store import FeatureStore

        return FeatureStore(self.latest("extract"))

    @property
    def hypotheses(self) -> Hypotheses:
        """Stage 2's concepts, tests, topics and baselines."""
        from ..results.hypotheses import Hypotheses

        return Hypotheses(self.latest("hypothesize"))

    @property
    def plan(self) -> InterventionPlan | None:
        """Stage 3's plan (``plan/plan.json``), or None when none was written."""
        from ..results.plan import load_plan

        return load_plan(self.plan_path) if self.plan_path.exists() else None

    @property
    def trainings(self) -> dict[str, TrainResult]:
        """Every finished training run, named by its plan (``plain``, ``reward_shaping``, …)."""
        from ..results.training import TrainResult, training_runs

        return {name: TrainResult(path) for name, path in training_runs(self).items()}

    @property
    def evaluation(self) -> EvalResult:
        """Stage 5's latest evaluation."""
        from ..results.evaluation import EvalResult

        return EvalResult(self.latest("evaluate"))

    @property
    def subspace(self) -> SubspaceResult:
        """The latest concept subspaces learned from counterfactuals (notebook 06)."""
        from ..results.subspace import SubspaceResult

        return SubspaceResult(self.latest("subspace"))

    @property
    def planted(self) -> dict | None:
        """The ground truth of a poisoned run (kind, pattern, planted ids), or None."""
        from ..data.plant import planted_truth

        return planted_truth(self.path)

    # --- the weights the store was built with (these import torch) ------------------------------------

    def model(self, **kwargs: Any):
        """The store's model, checked against the fingerprint the store recorded."""
        from ..lm.models import load_model

        return self._recorded("model", load_model, **kwargs)

    def sae(self, **kwargs: Any):
        """The store's SAE, checked against the fingerprint the store recorded."""
        from ..lm.sae import load_sae

        return self._recorded("sae", load_sae, **kwargs)

    def _recorded(self, what: str, load, **kwargs: Any):
        recorded = self.store.manifest[what]
        loaded = load(recorded["name"], **kwargs)
        if what == "sae":  # an SAE may be known under an earlier formula's fingerprint (LoadedSAE.known_as)
            loaded = loaded.known_as(recorded["fingerprint"]) or loaded
        if loaded.fingerprint != recorded["fingerprint"]:
            raise ValueError(
                f"{self.path}: {what} {recorded['name']} is not the one the store was built with (fingerprint "
                f"{loaded.fingerprint}, recorded {recorded['fingerprint']})"
            )
        return loaded


RunLike = Run | str | os.PathLike
