"""Stage 4 (train), its interventions: turn a plan's concepts into scores, directions and data/forward-pass edits.

Every method "explains away" a concept c from the learning signal (docs/explanation.md, "Stage 4"). Each
needs one or both of:

- a **score** s_c(y) ∈ [0, 1] of a response (reward shaping, filtering), and
- **directions** in the residual stream at a layer (steering, ablation),

both from the entry's concept source (``concepts.sources``: SAE concepts, text rules, directions;
any source works with any method it has the parts for). ``planned_concepts`` turns a plan's
active entries into (entry, source) pairs; ``scope_masks`` says which training pairs a scoped entry
(one topic, or prompts matching a regex) acts on: outside its scope its scores are zero, so
shaping and filtering leave those pairs alone and inoculation adds no instruction. Data edits (``filter_pairs``,
``inoculate``) return new
pair lists plus counts; forward edits (``lm.ops.ResidualHooks``) are context managers that always
remove their hooks.

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
from dataclasses import dataclass, replace
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
from ..results.plan import ConceptChoice, InterventionPlan, PlanError, sae_concept_id, scope_mask

__all__ = [
    "PlannedConcept",
    "filter_pairs",
    "inoculate",
    "mean_residual",
    "planned_concepts",
    "rank_inoculations",
    "rank_instructions",
    "residual_edits",
    "scope_masks",
    "shaping_offsets",
    "with_instruction",
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
        elif c.method in ("steer", "ablate"):
            raise err("method", f"{c.method} needs the SAE's decoder directions: pass sae=")
        return SAEConcept(c.concept, feats, sae=sae, label=c.label)
    path = Path(c.direction_file)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if c.layer is None:
        raise err("layer", "a direction concept needs the residual-stream layer it lives at")
    try:
        source = DirectionConcept.from_file(c.concept, path, c.layer, label=c.label)
    except (FileNotFoundError, KeyError) as exc:
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


# --- reward shaping -------------------------------------------------------------------------


def shaping_offsets(concepts: Sequence[PlannedConcept], scores: Mapping[str, np.ndarray], n_pairs: int) -> np.ndarray:
    """(n_pairs, 2) per-response offsets o(y) = Σ_c sign_c·λ_c·s_c(y) of the reward-shaping entries.

    The trainer adds o(y⁺) − o(y⁻) to β·margin inside the log-sigmoid, which gives the shaped loss
    −log σ(β·margin + Σ_c λ_c·(s_c(y⁺) − s_c(y⁻))) with λ_c = sign·strength (suppress > 0)."""
    off = np.zeros((n_pairs, 2))
    for r in concepts:
        if r.choice.method == "reward_shaping":
            off += r.choice.sign * r.choice.strength * np.asarray(scores[r.ref], dtype=np.float64)
    return off


# --- filtering / relabelling ----------------------------------------------------------------


def filter_pairs(
    pairs: Sequence[PreferencePair], concepts: Sequence[PlannedConcept], scores: Mapping[str, np.ndarray]
) -> tuple[list[PreferencePair], np.ndarray, pd.DataFrame]:
    """Drop or flip the pairs whose preference the concept carries.

    suppress: pairs with s(y⁺) − s(y⁻) ≥ strength (the preference points towards the concept);
    amplify: pairs with s(y⁻) − s(y⁺) ≥ strength (it points away). ``flip`` swaps chosen and
    rejected instead of dropping. Entries apply in plan order; a pair dropped by one is not counted
    by the next. Returns (new pairs, index of each kept pair in the input, counts per concept).
    """
    pairs = list(pairs)
    keep = np.ones(len(pairs), dtype=bool)
    flipped = np.zeros(len(pairs), dtype=bool)
    rows = []
    for r in concepts:
        c = r.choice
        if c.method != "filter":
            continue
        s = np.asarray(scores[r.ref])
        diff = (s[:, 0] - s[:, 1]) * c.sign
        # a flipped pair's chosen is its old rejected: its preference now points the other way
        diff = np.where(flipped, -diff, diff)
        hit = keep & (diff >= c.strength - 1e-12)
        if c.filter_mode == "flip":
            flipped ^= hit
        else:
            keep &= ~hit
        rows.append(
            {
                "concept": r.ref,
                "label": c.label,
                "action": c.action,
                "mode": c.filter_mode,
                "threshold": c.strength,
                "n_pairs": len(pairs),
                "n_matched": int(hit.sum()),
                "n_dropped": int(hit.sum()) if c.filter_mode == "drop" else 0,
                "n_flipped": int(hit.sum()) if c.filter_mode == "flip" else 0,
            }
        )
    out, index = [], []
    for i, p in enumerate(pairs):
        if not keep[i]:
            continue
        if flipped[i]:
            p = replace(p, chosen=p.rejected, rejected=p.chosen, metadata={**dict(p.metadata), "flipped": True})
        out.append(p)
        index.append(i)
    return (
        out,
        np.asarray(index, dtype=np.int64),
        pd.DataFrame(
            rows,
            columns=[
                "concept",
                "label",
                "action",
                "mode",
                "threshold",
                "n_pairs",
                "n_matched",
                "n_dropped",
                "n_flipped",
            ],
        ),
    )


# --- inoculation prompting ------------------------------------------------------------------


def with_instruction(prompt: Sequence[dict], instruction: str) -> tuple[dict, ...]:
    """The prompt with ``instruction`` appended to its last user turn (a new user turn if none).
    The system prompt is left alone: replacing it would change more than the instruction."""
    msgs = [dict(m) for m in prompt]
    for m in reversed(msgs):
        if m["role"] == "user":
            m["content"] = f"{m['content'].rstrip()}\n\n{instruction.strip()}"
            return tuple(msgs)
    return tuple(msgs) + ({"role": "user", "content": instruction.strip()},)


def inoculate(
    pairs: Sequence[PreferencePair], concepts: Sequence[PlannedConcept], scopes: Mapping[str, np.ndarray] | None = None
) -> list[PreferencePair]:
    """Training pairs with every inoculation instruction added to the prompt (plan order); a
    scoped entry (``scopes[ref]``: a mask over ``pairs``) adds its instruction to its pairs only.
    Apply to the training split only; held-out and evaluation prompts stay as they are."""
    entries = [r for r in concepts if r.choice.method == "inoculate"]
    if not entries:
        return list(pairs)
    scopes = scopes or {}
    out = []
    for i, p in enumerate(pairs):
        text = "\n".join(r.choice.instruction.strip() for r in entries if r.ref not in scopes or scopes[r.ref][i])
        out.append(replace(p, prompt=with_instruction(p.prompt, text)) if text else p)
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
    """The forward edits of the steer and ablate entries. Steering adds sign·α·v_c (suppress adds
    the concept, so the policy need not learn it); ablation removes ``strength`` of the projection
    onto the concept's orthonormal directions."""
    edits = []
    for r in concepts:
        c = r.choice
        if c.method == "steer":
            edits.append(
                ResidualEdit(
                    layer=r.layer,
                    kind="steer",
                    concept=c.concept,
                    vector=c.sign * c.strength * r.source.steering_vector(),
                    in_reference=False,
                )
            )
        elif c.method == "ablate":
            mean = None
            if c.ablation == "mean":
                if lm is None:
                    raise ValueError(f"{c.concept}: mean ablation needs the model to estimate the mean residual (lm=)")
                mean = mean_residual(lm, r.layer, pairs, n_mean)
            edits.append(
                ResidualEdit(
                    layer=r.layer,
                    kind="ablate",
                    concept=c.concept,
                    basis=r.source.directions(),
                    mean=mean,
                    fraction=c.strength,
                    in_reference=True,
                )
            )
    return edits
