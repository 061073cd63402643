"""Per-pair concept activity from a feature store, in memory (numpy and scipy only).

The quantity stage 2 tests and stage 3 predicts with: for each pair and concept, the fraction of
the concept's member features that fire on the chosen and on the rejected response (anywhere, or
only in the response's opening / ending tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..core.stats import group_means, length_regressors
from ..results.store import FeatureStore
from .clustering import membership_matrix

__all__ = ["PairFeatures", "concept_activity", "length_diffs"]


@dataclass
class PairFeatures:
    """What stage 2 needs from stage 1, in memory: binary firing per response side, lengths,
    prompt groups, prompt features and texts. Built from a FeatureStore or assembled directly."""

    fires_chosen: sp.csr_matrix  # n_pairs × d_sae, 0/1
    fires_rejected: sp.csr_matrix
    ntok: np.ndarray  # n_pairs × 2 (chosen, rejected) response token counts
    groups: np.ndarray  # n_pairs: distinct-prompt index
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    prompt_features: sp.csr_matrix | None = None  # n_pairs × d_sae (mean over prompt contents)
    # per response edge ("opening" / "ending": the first / last ExtractConfig.edge_tokens tokens),
    # binary firing there as (chosen, rejected); empty for stores written without edges
    edges: dict[str, tuple[sp.csr_matrix, sp.csr_matrix]] = field(default_factory=dict)

    @classmethod
    def from_store(cls, store: FeatureStore) -> "PairFeatures":
        pairs = store.pairs()
        return cls(
            fires_chosen=store.pooled("fires", "chosen").tocsr(),
            fires_rejected=store.pooled("fires", "rejected").tocsr(),
            ntok=store.token_counts().astype(np.int64),
            groups=store.prompt_groups(),
            prompts=[p.prompt_text for p in pairs],
            chosen=[p.chosen for p in pairs],
            rejected=[p.rejected for p in pairs],
            prompt_features=store.pooled("mean", prefix="prompt").tocsr() if store.has_prompts else None,
            edges={edge: (store.pooled("fires", "chosen", prefix=f"resp_{edge}").tocsr(), store.pooled("fires", "rejected", prefix=f"resp_{edge}").tocsr()) for edge in store.edges},
        )

    @property
    def n_pairs(self) -> int:
        return self.fires_chosen.shape[0]

    @property
    def d_sae(self) -> int:
        return self.fires_chosen.shape[1]


def concept_activity(pf: PairFeatures, labels: np.ndarray, edge: str | None = None, dense: bool = True) -> tuple[np.ndarray, np.ndarray] | tuple[sp.csc_matrix, sp.csc_matrix]:
    """Per pair and concept, the fraction of the concept's features firing on chosen / rejected:
    anywhere in the response, or with ``edge`` only in its opening / ending tokens. ``dense=False``
    returns sparse (CSC) matrices: at 100k pairs × 20k concepts a dense pair is 32 GB."""
    M = membership_matrix(labels)
    Fc, Fr = pf.edges[edge] if edge else (pf.fires_chosen, pf.fires_rejected)
    Uc, Ur = Fc.astype(np.float64) @ M, Fr.astype(np.float64) @ M
    if not dense:
        return sp.csc_matrix(Uc), sp.csc_matrix(Ur)
    return np.asarray(Uc.todense()), np.asarray(Ur.todense())


def length_diffs(ntok: np.ndarray, groups: np.ndarray | None, degree: int) -> np.ndarray:
    """Per unit (prompt group, or pair), the regressors of the length control: chosen − rejected
    differences of powers of log token count (``stats.length_regressors``)."""
    return group_means(length_regressors(np.log(np.maximum(ntok, 1)), degree), groups)
