"""Reading a learned concept subspace (``stages.subspace.learn_subspace``) without torch: RAVEL's
table, the training curves, the counterfactual data card, and the saved concepts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.run import RunLike, RunPaths
from ..core.stage import Artifact

__all__ = ["SubspaceResult"]


#: the format this stage writes (``stages``) and the newest this reader reads (2: the reference rows 'whole
#: residual' and 'all SAE latents'; 3: sources only entities whose value the model knows)
FORMAT = 3


@dataclass
class SubspaceResult(Artifact):
    """A finished ``learn_subspace``."""

    readable_formats = (1, FORMAT)

    @classmethod
    def from_run(cls, run: RunLike) -> SubspaceResult:
        return cls(RunPaths.of(run).latest("subspace"))

    def table(self) -> pd.DataFrame:
        """RAVEL's scores: a row per attribute × method (DAS, HyperDAS, SAE features, SAE
        latents (learned mask), no intervention, and the references "whole residual" and "all SAE
        latents") with Cause, Isolate, disentangle, the pairs they were scored on and the
        model's accuracy; HyperDAS rows add where it intervened (``edits_entity_token``,
        ``from_source_entity_token``, and the median distance from the prompt end of the edited token,
        ``edit_from_end``, beside the entity's, ``entity_from_end``) and how much of its per-example
        subspaces the saved one covers."""
        return pd.read_parquet(self.path / "ravel.parquet")

    def curves(self) -> pd.DataFrame:
        """Training: loss and interchange accuracy per step, per method and attribute (HyperDAS: one
        curve for all its attributes; the SAE latent mask adds how many latents it selects and its
        temperature)."""
        return pd.read_parquet(self.path / "curves.parquet")

    def data_card(self) -> pd.DataFrame:
        """A few counterfactual pairs per attribute and split, as text."""
        return pd.read_parquet(self.path / "data_card.parquet")

    def knowledge(self) -> pd.DataFrame:
        """What the model knows: per attribute, examples answered right of those asked (train
        entities), and for each target the entities whose value it knows on either split, the only
        ones a pair takes its source from (``source_entities_train`` / ``_test``)."""
        sources = self.manifest.get("source_entities") or {}
        return pd.DataFrame(
            [
                {"attribute": a, **v, **{f"source_entities_{s}": n for s, n in sources.get(a, {}).items()}}
                for a, v in self.manifest["knowledge"].items()
            ]
        )

    def concept_path(self, attribute: str, method: str = "DAS") -> Path:
        """The saved subspace of ``attribute`` (``.safetensors``; its ``.json`` beside it), learned by
        ``method``: "DAS", or "HyperDAS" (its principal subspace for the attribute)."""
        key = {"DAS": "concepts", "HyperDAS": "hyperdas_concepts"}.get(method)
        if key is None:
            raise ValueError(f"method {method!r}: one of 'DAS', 'HyperDAS'")
        concepts = self.manifest.get(key) or {}
        if attribute not in concepts:
            raise KeyError(f"no {method} subspace learned for {attribute!r}; learned: {sorted(concepts)}")
        return self.path / concepts[attribute]

    def concept_ref(self, attribute: str, method: str = "DAS") -> str:
        """The subspace's concept reference (``direction:ravel-<attribute>``; HyperDAS's end in ``-hyperdas``)."""
        return f"direction:ravel-{attribute.lower()}" + ("-hyperdas" if method == "HyperDAS" else "")

    def plan_entry(
        self,
        attribute: str,
        action: str = "suppress",
        method: str = "ablate",
        *,
        learned_by: str = "DAS",
        **fields: Any,
    ) -> dict:
        """A plan entry that acts on the subspace (CAFT by default)."""
        return {
            "concept": self.concept_ref(attribute, learned_by),
            "action": action,
            "method": method,
            "direction_file": str(self.concept_path(attribute, learned_by)),
            "layer": int(self.manifest["layer"]),
            "label": f"{learned_by} {attribute}",
            **fields,
        }

    def __repr__(self) -> str:
        return (
            f"SubspaceResult({', '.join(self.manifest.get('targets', []))}; layer {self.manifest.get('layer')}; "
            f"path={str(self.path)!r})"
        )
