"""``RunDir``: a run directory with a reader for every stage's artifact (``anatomy_nb.RunDir``).

``core.run.RunPaths`` holds the paths and the index; this class adds the readers, looked up by stage
name in ``READERS`` (``run.read("hypothesize")``, or the named properties below). Nothing here
imports torch: the weights a store was built with are loaded by ``lm.recorded``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.run import RunLike, RunPaths
from ..data.plant import planted_truth
from .compare_audits import CompareResult
from .evaluate import EvalResult
from .extract import FeatureStore
from .hypothesize import Hypotheses
from .plan import InterventionPlan, load_plan
from .subspace import SubspaceResult
from .train import TrainResult, training_runs

__all__ = ["READERS", "RunDir", "RunLike"]

#: stage name → the reader of its latest artifact folder (a stage with its own reader registers here)
READERS: dict[str, Callable[[Path], Any]] = {
    "extract": FeatureStore,
    "hypothesize": Hypotheses,
    "evaluate": EvalResult,
    "subspace": SubspaceResult,
    "compare_audits": CompareResult,
}


class RunDir(RunPaths):
    """A run directory and the readers of what its stages wrote. ``RunDir(path)`` creates nothing
    until a stage writes; reading never imports torch."""

    def read(self, stage: str) -> Any:
        """The reader of ``stage``'s latest artifact; a clear error for a stage without one."""
        if stage not in READERS:
            raise KeyError(f"no reader for stage {stage!r}; stages with one: {sorted(READERS)}")
        return READERS[stage](self.latest(stage))

    @property
    def store(self) -> FeatureStore:
        """Stage 1's feature store."""
        return self.read("extract")

    @property
    def hypotheses(self) -> Hypotheses:
        """Stage 2's concepts, tests, topics and baselines."""
        return self.read("hypothesize")

    @property
    def plan(self) -> InterventionPlan | None:
        """Stage 3's plan (``plan/plan.json``), or None when none was written."""
        return load_plan(self.plan_path) if self.plan_path.exists() else None

    @property
    def trainings(self) -> dict[str, TrainResult]:
        """Every finished training run, named by its plan (``plain``, ``reward_shaping``, …)."""
        return {name: TrainResult(path) for name, path in training_runs(self).items()}

    @property
    def evaluation(self) -> EvalResult:
        """Stage 5's latest evaluation."""
        return self.read("evaluate")

    @property
    def subspace(self) -> SubspaceResult:
        """The latest concept subspaces learned from counterfactuals (notebook 06)."""
        return self.read("subspace")

    @property
    def planted(self) -> dict | None:
        """The ground truth of a poisoned run (kind, pattern, planted ids), or None."""
        return planted_truth(self.path)
