"""Stage 4 (train), applying a plan: each entry's concept source, its scope, and the drivers that
ask every registered method (``anatomy_nb.methods``: one module per method) what it does.

Every method "explains away" a concept c from the learning signal (docs/explanation.md, "Stage 4"). Each
needs one or both of:

- a **score** s_c(y) ∈ [0, 1] of a response (``Method.scored``: reward shaping, filtering), and
- **directions** in the residual stream at a layer (``Method.needs_direction``: steering, ablation),

both from the entry's concept source (``concepts.sources``: SAE concepts, text rules, directions;
any source works with any method it has the parts for). ``planned_concepts`` turns a plan's
active entries into (entry, source) pairs; ``scope_masks`` says which training pairs a scoped entry
(one topic, or prompts matching a regex) acts on: outside its scope its scores are zero, so
shaping and filtering leave those pairs alone and inoculation adds no instruction. Data edits
(``select_pairs``, ``edit_prompts``) return new pair lists plus counts; ``reward_offsets`` sums the
per-response rewards; forward edits (``residual_edits`` → ``lm.ops.ResidualHooks``) are context
managers that always remove their hooks.

What the reference pass sees (DPO's π_ref): **steering is off in the reference, ablation is on**.
Preventative steering works by making the steered policy already prefer the concept-carrying
responses, so that part of the margin is explained before any weight changes; a steered reference
would cancel exactly that (the log-ratio at step 0 would be zero again). CAFT works by removing the
concept subspace from what training can use; an unablated reference would instead turn the
ablation's own effect on log-probs into a loss the policy must recover through other routes, so
reference and policy share the ablation and start at log-ratio 0.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..concepts.sources import ConceptSource, DirectionConcept, SAEConcept, TextConcept
from ..data.pairs import distinct_prompts
from ..data.schema import PreferencePair
from ..lm.models import LoadedModel
from ..lm.ops import ResidualEdit, generate, response_residuals
from ..methods import METHODS, Method, with_instruction
from ..results.plan import ConceptChoice, InterventionPlan, PlanError, sae_concept_id, scope_mask

__all__ = [
    "PlannedConcept",
    "edit_prompts",
    "mean_residual",
    "planned_concepts",
    "rank_inoculations",
    "rank_instructions",
    "residual_edits",
    "scope_masks",
    "reward_offsets",
    "select_pairs",
]

log = logging.getLogger(__name__)


@dataclass
class PlannedConcept:
    """An active plan entry with the concept source its method acts on."""

    choice: ConceptChoice
    source: ConceptSource

    @property
    def ref(self) -> str:
        return self.choice.concept

    @property
    def layer(self) -> int | None:
        return self.source.layer


def _member_features(hypotheses: Any, ref: str) -> list[int]:
    """A concept's member features from the hypotheses table (its whole-response row)."""
    cid = sae_concept_id(ref)
    if hypotheses is None or cid is None:
        return []
    table = hypotheses.table if hasattr(hypotheses, "table") else hypotheses
    rows = (
        table[(table["concept"] == cid) & (table["view"] == "overall")]
        if "view" in table
        else table[table["concept"] == cid]
    )
    return [] if rows.empty else [int(f) for f in rows.iloc[0]["features"]]


def source_for(
    c: ConceptChoice,
    index: int,
    *,
    hypotheses: Any = None,
    sae: Any = None,
    d_model: int | None = None,
    base_dir: Path | None = None,
) -> ConceptSource:
    """The concept source of one plan entry; a problem raises PlanError naming the entry and field."""

    def err(field: str, reason: str) -> PlanError:
        return PlanError(index, c.concept, field, reason)

    if c.kind == "text":
        return TextConcept(c.concept, c.pattern, label=c.label)
    if c.kind == "sae":
        feats = list(c.features) or _member_features(hypotheses, c.concept)
        if not feats:
            raise err("features", "no member features: fill them from the hypotheses table (or pass hypotheses=)")
        if sae is not None:
            if max(feats) >= sae.d_sae:
                raise err("features", f"feature {max(feats)} is out of range for {sae.name} (d_sae={sae.d_sae})")
            if c.layer is not None and c.layer != sae.layer:
                raise err("layer", f"the SAE reads layer {sae.layer}, not {c.layer}")
        elif METHODS[c.method].needs_direction:
            raise err("method", f"{c.method} needs the SAE's decoder directions: pass sae=")
        return SAEConcept(c.concept, feats, sae=sae, label=c.label)
    path = Path(c.direction_file)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if c.layer is None:
        raise err("layer", "a direction concept needs the residual-stream layer it lives at")
    try:
        source = DirectionConcept.from_file(c.concept, path, c.layer, label=c.label)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise err("direction_file", str(exc).strip("'\"")) from None
    if d_model is not None and source.raw_directions.shape[1] != d_model:
        raise err(
            "direction_file", f"directions have width {source.raw_directions.shape[1]}, the model has d_model={d_model}"
        )
    return source


def planned_concepts(
    plan: InterventionPlan,
    *,
    hypotheses: Any = None,
    sae: Any = None,
    d_model: int | None = None,
    base_dir: str | Path | None = None,
) -> list[PlannedConcept]:
    """The plan's active entries with their concept sources: SAE member features filled from the
    hypotheses table when the plan omits them, layers and directions from the SAE or the file."""
    base = Path(base_dir) if base_dir else None
    return [
        PlannedConcept(c, source_for(c, i, hypotheses=hypotheses, sae=sae, d_model=d_model, base_dir=base))
        for i, c in enumerate(plan.active)
    ]


# --- what the plan does to training: each method's hooks (``anatomy_nb.methods``), in registry order ---


def _by_method(concepts: Sequence[PlannedConcept]) -> list[tuple[Method, list[PlannedConcept]]]:
    """(method, its entries in plan order) for every registered method the plan uses."""
    return [
        (how, entries) for name, how in METHODS.items() if (entries := [r for r in concepts if r.choice.method == name])
    ]


def reward_offsets(concepts: Sequence[PlannedConcept], scores: Mapping[str, np.ndarray], n_pairs: int) -> np.ndarray:
    """(n_pairs, 2) per-response offsets o(y): the sum of every entry's ``Method.offsets``.

    The trainer adds o(y⁺) − o(y⁻) to β·margin inside the log-sigmoid; for reward shaping this is
    −log σ(β·margin + Σ_c λ_c·(s_c(y⁺) − s_c(y⁻))) with λ_c = sign·strength (suppress > 0)."""
    off = np.zeros((n_pairs, 2))
    for how, entries in _by_method(concepts):
        for r in entries:
            if how.scored and (o := how.offsets(r.choice, scores[r.ref])) is not None:
                off += o
    return off


def select_pairs(
    pairs: Sequence[PreferencePair], concepts: Sequence[PlannedConcept], scores: Mapping[str, np.ndarray]
) -> tuple[list[PreferencePair], np.ndarray, pd.DataFrame]:
    """The training pairs after every method that drops or relabels pairs (``Method.select_pairs``;
    filtering: suppress drops pairs with s(y⁺) − s(y⁻) ≥ strength, amplify those with s(y⁻) − s(y⁺) ≥
    strength, ``flip`` relabels instead). Returns (new pairs, index of each kept pair in the input, one
    row of counts per entry)."""
    pairs = list(pairs)
    index = np.arange(len(pairs), dtype=np.int64)
    rows: list[dict] = []
    for how, entries in _by_method(concepts):
        chosen = how.select_pairs(pairs, entries, {k: np.asarray(v)[index] for k, v in scores.items()})
        if chosen is not None:
            pairs, kept, more = chosen
            index = index[kept]
            rows += more
    return pairs, index, pd.DataFrame(rows)


def edit_prompts(
    pairs: Sequence[PreferencePair], concepts: Sequence[PlannedConcept], scopes: Mapping[str, np.ndarray] | None = None
) -> list[PreferencePair]:
    """Training pairs with every method's prompt edit applied (``Method.edit_prompts``; inoculation
    adds its instruction); a scoped entry (``scopes[ref]``: a mask over ``pairs``) edits its pairs
    only. Apply to the training split only; held-out and evaluation prompts stay as they are."""
    out = list(pairs)
    for how, entries in _by_method(concepts):
        edited = how.edit_prompts(out, entries, scopes or {})
        out = out if edited is None else edited
    return out


def scope_masks(
    concepts: Sequence[PlannedConcept],
    pairs: Sequence[PreferencePair],
    topic_of_prompt: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """For each scoped entry (``topic`` and/or ``prompts``), which of ``pairs`` it acts on
    (``results.plan.scope_mask``)."""
    masks = {r.ref: scope_mask(r.choice, pairs, topic_of_prompt, i) for i, r in enumerate(concepts)}
    return {ref: m for ref, m in masks.items() if m is not None}


def rank_instructions(
    source: ConceptSource,
    candidates: Sequence[str],
    prompts: Sequence[Sequence[dict]],
    lm: LoadedModel,
    *,
    max_new_tokens: int = 48,
) -> pd.DataFrame:
    """Rank candidate inoculation instructions by how strongly they elicit the concept from the
    base model: greedy generations for ``prompts`` with and without each instruction, scored with
    s_c. ``lift`` = mean score with − mean score without; the best instruction comes first."""
    prompts = [tuple(dict(m) for m in p) for p in prompts]

    def gen(ps):
        return generate(lm, ps, max_new_tokens=max_new_tokens, max_prompt_tokens=None)[0]

    base = source.score_texts(prompts, gen(prompts), lm=lm)
    rows = []
    for text in candidates:
        ps = [with_instruction(p, text) for p in prompts]
        gens = gen(ps)
        s = source.score_texts(ps, gens, lm=lm)
        rows.append(
            {
                "instruction": text,
                "score_with": float(s.mean()),
                "score_without": float(base.mean()),
                "lift": float(s.mean() - base.mean()),
                "example": gens[0] if gens else "",
            }
        )
    return pd.DataFrame(rows).sort_values("lift", ascending=False, kind="stable").reset_index(drop=True)


def rank_inoculations(
    run: Any, concept: int, lm: LoadedModel, sae: Any, *, n_prompts: int = 8, max_new_tokens: int = 32
) -> pd.DataFrame:
    """The inoculation instructions that ``stages.plan.inoculation_candidates`` writes from the
    audit's view of ``concept`` (a run's stage-2 concept id), ranked on ``n_prompts`` of the run's
    training prompts by how well each elicits the concept from the base model."""
    from .plan import inoculation_candidates

    hyp = run.hypotheses
    ref = f"sae:{int(concept)}"
    source = SAEConcept(ref, _member_features(hyp, ref), sae=sae)
    prompts = [prompt for _, prompt in distinct_prompts(run.store.pairs(), n_prompts)]
    return rank_instructions(source, inoculation_candidates(hyp, concept), prompts, lm, max_new_tokens=max_new_tokens)


# --- steering and ablation ------------------------------------------------------------------


@torch.no_grad()
def mean_residual(lm: LoadedModel, layer: int, pairs: Sequence[PreferencePair], n: int = 32) -> torch.Tensor:
    """Mean residual after block ``layer`` over the response tokens of the first ``n`` pairs (both
    sides): the value mean-ablation replaces the concept component with."""
    items = [(p.prompt, r) for p in list(pairs)[:n] for r in (p.chosen, p.rejected)]
    total, count = torch.zeros(lm.d_model, dtype=torch.float64), 0
    for x in response_residuals(lm, layer, items, max_response_tokens=512):
        total += x.double().sum(0).cpu()
        count += x.shape[0]
    return (total / max(count, 1)).float()


def residual_edits(
    concepts: Sequence[PlannedConcept],
    *,
    lm: LoadedModel | None = None,
    pairs: Sequence[PreferencePair] = (),
    n_mean: int = 32,
) -> list[ResidualEdit]:
    """The forward edits of the plan (``Method.forward_edit``): steering adds sign·α·v_c (suppress adds
    the concept, so the policy need not learn it); ablation removes ``strength`` of the projection
    onto the concept's orthonormal directions."""

    def mean_of(concept: str) -> Any:
        def mean(layer: int) -> torch.Tensor:
            if lm is None:
                raise ValueError(f"{concept}: mean ablation needs the model to estimate the mean residual (lm=)")
            return mean_residual(lm, layer, pairs, n_mean)

        return mean

    edits = []
    for how, entries in _by_method(concepts):
        for r in entries:
            spec = how.forward_edit(r.choice, r.source, mean_of(r.ref))
            if spec is not None:
                edits.append(ResidualEdit(layer=r.layer, concept=r.choice.concept, **spec))
    return edits
