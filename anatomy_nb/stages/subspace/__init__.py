"""The subspace stage (notebook 06, ``anb.learn_subspace``): concept subspaces learned from
counterfactual pairs — DAS and HyperDAS on RAVEL — scored beside the SAE's features. One folder:

- ``learn.py``: the stage's run (``learn_subspace``: content key → reuse → write → manifest last);
- ``ravel_task.py``: RAVEL as a known-answer task (known examples, splits, scores, whole-residual ceiling);
- ``latents.py``: the SAE's features as RAVEL rows (``select_latents``);
- ``das.py``, ``hyperdas.py``, ``sae_mask.py``: the three learners (DAS's rotation, the hypernetwork,
  the learned SAE-latent mask); ``planted_task.py``: a task whose answer is planted, for tests;
- the artifact's reader is ``results.subspace.SubspaceResult`` (no torch).
"""

from __future__ import annotations

from .latents import SAE_SELECTIONS, entity_latents, select_latents
from .learn import STAGE, learn_subspace
from .ravel_task import RavelSplits, known_examples, ravel_scores, ravel_splits, whole_residual_by_layer

__all__ = [
    "SAE_SELECTIONS",
    "STAGE",
    "RavelSplits",
    "entity_latents",
    "known_examples",
    "learn_subspace",
    "ravel_scores",
    "ravel_splits",
    "select_latents",
    "whole_residual_by_layer",
]
