"""Reading a learned concept subspace (``stages.subspace.learn_subspace``) without torch: RAVEL's
table, the training curves, the counterfactual data card, and the saved concepts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.run import Run, RunLike
from ..core.stage import Artifact

__all__ = ["SubspaceResult"]


@dataclass
class SubspaceResult(Artifact):
    """A finished ``learn_subspace``."""

    @classmethod
    def from_run(cls, run: RunLike) -> "SubspaceResult":
        return cls(Run.of(run).latest("subspace"))

    def table(self) -> pd.DataFrame:
        """RAVEL's scores: a row per attribute × method (DAS, SAE features, no intervention) with
        Cause, Isolate, disentangle, the pairs they were scored on and the model's accuracy."""
        return pd.read_parquet(self.path / "ravel.parquet")

    def curves(self) -> pd.DataFrame:
        """DAS training: loss and interchange accuracy per step, per attribute."""
        return pd.read_parquet(self.path / "curves.parquet")

    def data_card(self) -> pd.DataFrame:
        """A few counterfactual pairs per attribute and split, as text."""
        return pd.read_parquet(self.path / "data_card.parquet")

    def knowledge(self) -> pd.DataFrame:
        """What the model knows: per attribute, examples answered right of those asked."""
        return pd.DataFrame([{"attribute": a, **v} for a, v in self.manifest["knowledge"].items()])

    def concept_path(self, attribute: str) -> Path:
        """The saved subspace of ``attribute`` (``.safetensors``; its ``.json`` beside it)."""
        concepts = self.manifest.get("concepts", {})
        if attribute not in concepts:
            raise KeyError(f"no subspace learned for {attribute!r}; learned: {sorted(concepts)}")
        return self.path / concepts[attribute]

    def concept(self, attribute: str) -> Any:
        """The subspace as a ``direction:`` concept (imports torch): stage 2's ``sources=``, or a
        plan entry's ``direction_file`` with its ``layer``."""
        from ..lm.das import load_subspace

        return load_subspace(self.concept_path(attribute), f"direction:ravel-{attribute.lower()}")

    def plan_entry(self, attribute: str, action: str = "suppress", method: str = "ablate", **fields: Any) -> dict:
        """A plan entry that acts on the subspace (CAFT by default)."""
        return {"concept": f"direction:ravel-{attribute.lower()}", "action": action, "method": method, "direction_file": str(self.concept_path(attribute)), "layer": int(self.manifest["layer"]), "label": f"DAS {attribute}", **fields}

    def __repr__(self) -> str:
        return f"SubspaceResult({', '.join(self.manifest.get('targets', []))}; layer {self.manifest.get('layer')}; path={str(self.path)!r})"
