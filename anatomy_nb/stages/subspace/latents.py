"""The SAE's features as RAVEL rows: the latents whose activation at the entity's last token tells an
attribute's values apart, chosen by ANOVA F or an L1 probe (``select_latents``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import f_oneway

from ...data.ravel import RavelData
from ...lm.models import LoadedModel
from ...lm.ops import ResidualCapture
from .ravel_task import Known

__all__ = ["PROBE_C", "SAE_SELECTIONS", "entity_latents", "select_latents"]

#: the RAVEL rows of the SAE's features, by how they are chosen (``select_latents``)
SAE_SELECTIONS = {"SAE features": "anova", "SAE features (L1 probe)": "probe"}
PROBE_C = (0.001, 0.01, 0.1, 1.0, 10.0)


@torch.no_grad()
def entity_latents(
    lm: LoadedModel, sae: Any, data: RavelData, attribute: str, known: list[Known], max_examples: int = 600
) -> tuple[np.ndarray, np.ndarray]:
    """The SAE's latents at the entity token of the known examples that ask ``attribute``, and each
    one's value of it; only values seen at least twice (a value seen once separates nothing)."""
    items = [(e, ids, pos) for a, _, e, ids, pos, _ in known if a == attribute][:max_examples]
    acts, values = [], []
    with ResidualCapture(lm, sae.layer) as cap:
        for e, ids, pos in items:
            h = cap(torch.tensor([ids], device=lm.device))[0, pos]
            acts.append(sae.encode(h[None].to(sae.sae.W_enc.device)).float()[0].cpu().numpy())
            values.append(data.entities[e][attribute])
    if not acts:
        return np.zeros((0, sae.d_sae)), np.zeros(0, dtype=object)
    A, values = np.array(acts), np.array(values)
    common = [v for v, n in zip(*np.unique(values, return_counts=True)) if n >= 2]
    keep = np.isin(values, common)
    return A[keep], values[keep]


def select_latents(A: np.ndarray, values: np.ndarray, dim: int, how: str = "anova") -> list[int]:
    """Up to ``dim`` latents that tell the attribute's values apart: ``anova`` ranks them by the
    one-way ANOVA F of their activation across values; ``probe`` is RAVEL's selection for SAEs, an
    L1-penalised linear SVM on the latents predicting the value, at the smallest C of ``PROBE_C``
    whose support reaches ``dim`` latents (else the largest C's), ranked by the largest |weight|.
    Empty when fewer than two values or no latent varies."""
    live = A.std(0) > 0 if len(A) else np.zeros(A.shape[1], bool)
    classes = sorted(set(values.tolist()))
    if len(classes) < 2 or not live.any():
        return []
    if how == "anova":
        F = np.zeros(A.shape[1])
        F[live] = np.nan_to_num(f_oneway(*[A[values == v][:, live] for v in classes]).statistic)
        return np.argsort(-F)[:dim].tolist()
    if how != "probe":
        raise ValueError(f"latent selection {how!r}: one of {sorted(set(SAE_SELECTIONS.values()))}")
    from sklearn.svm import LinearSVC

    for c in PROBE_C:
        coef = LinearSVC(C=c, penalty="l1", dual=False, max_iter=5000, tol=0.01).fit(A[:, live], values).coef_
        weight = np.zeros(A.shape[1])
        weight[live] = np.abs(coef).max(0)
        if (weight > 0).sum() >= dim:
            break
    return [int(i) for i in np.argsort(-weight)[:dim] if weight[i] > 0]
