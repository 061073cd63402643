"""Stage 4a: turn a plan's concepts into scores, directions and data/forward-pass edits.

Every method "explains away" a concept c from the learning signal (DESIGN.md §1 step 3). Each
needs one or both of:

- a **score** s_c(y) ∈ [0, 1] of a response:
  ``sae:<id>``: the fraction of the concept's member features that fire anywhere in the response
  (the same quantity stage 2 tests), read from the stage-1 feature store for the pairs it holds —
  nothing is recomputed — and computed with the model + SAE only for other text (held-out pairs,
  generations). ``text:<name>``: presence (0/1) of a regex match, or a text statistic from
  ``textstats.TEXT_STATS`` divided by its largest value on the training responses (0/1 statistics
  stay as they are). ``direction:<name>``: the
  mean over response tokens of the residual stream's projection onto the direction (the norm of
  the projection for several directions), min–max scaled over the training responses. The scale
  is recorded so other text is scored on the same axis (and clipped to [0, 1]).
- **directions** in the residual stream at a layer (sae and direction kinds): the orthonormalised
  decoder rows of the member features (or the rows of the direction file).

Data edits (``filter_pairs``, ``inoculate``) return new pair lists plus counts; forward edits
(``ResidualHooks``) are context managers that always remove their hooks.

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
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .data import PreferencePair
from .models import LoadedModel, decoder_layers, render_example, truncated_to_layer
from .plan import ConceptChoice, InterventionPlan, PlanError
from .textstats import TEXT_STATS

__all__ = [
    "ResolvedConcept",
    "ResidualEdit",
    "ResidualHooks",
    "resolve_plan",
    "pair_scores",
    "score_texts",
    "shaping_offsets",
    "filter_pairs",
    "inoculate",
    "rank_instructions",
    "residual_edits",
    "mean_residual",
    "orthonormal",
    "as_pairs",
]

log = logging.getLogger(__name__)


def as_pairs(pairs: Sequence[PreferencePair | Mapping[str, Any]]) -> list[PreferencePair]:
    """PreferencePair objects from pairs or their dicts (``FeatureStore.pairs()`` rows)."""
    out = []
    for p in pairs:
        if isinstance(p, PreferencePair):
            out.append(p)
        else:
            out.append(PreferencePair(id=str(p["id"]), prompt=tuple(dict(m) for m in p["prompt"]), chosen=p["chosen"], rejected=p["rejected"], metadata=dict(p.get("metadata") or {})))
    return out


def orthonormal(rows: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (k, d) of the span of ``rows`` (n, d), k ≤ n; near-dependent rows drop out."""
    rows = rows.detach().double()
    q, r = torch.linalg.qr(rows.T)  # (d, n), (n, n)
    keep = r.diagonal().abs() > tol * max(1.0, float(r.diagonal().abs().max()) if r.numel() else 1.0)
    return q[:, keep].T.float().contiguous()


# --- resolving plan entries -----------------------------------------------------------------


@dataclass
class ResolvedConcept:
    """A plan entry with what the methods need: member features, layer, directions, score scale."""

    choice: ConceptChoice
    features: list[int] = field(default_factory=list)
    layer: int | None = None
    directions: torch.Tensor | None = None  # (k, d_model), orthonormal rows
    raw_directions: torch.Tensor | None = None  # (n, d_model) as given (unit-normalised), for the steering vector
    scale: tuple[float, float] | None = None  # (lo, hi) of the raw score on the training responses

    @property
    def concept(self) -> str:
        return self.choice.concept

    @property
    def steering_vector(self) -> torch.Tensor:
        """The unit concept direction v_c: the normalised sum of the unit member directions."""
        if self.raw_directions is None:
            raise PlanError(None, self.concept, "concept", "a text concept has no residual direction")
        v = self.raw_directions.sum(0)
        return v / v.norm().clamp_min(1e-12)


def _hypotheses_features(hypotheses, concept_id: int) -> list[int]:
    table = hypotheses.table if hasattr(hypotheses, "table") else hypotheses
    rows = table[(table["concept"] == concept_id) & (table["view"] == "overall")] if "view" in table else table[table["concept"] == concept_id]
    if rows.empty:
        return []
    return [int(f) for f in rows.iloc[0]["features"]]


def _load_directions(c: ConceptChoice, base_dir: Path | None) -> torch.Tensor:
    from safetensors.torch import load_file

    path = Path(c.direction_file)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if not path.exists():
        raise PlanError(None, c.concept, "direction_file", f"file not found: {path}")
    tensors = load_file(str(path))
    if "directions" not in tensors:
        raise PlanError(None, c.concept, "direction_file", f"{path} has no tensor named 'directions' (has: {', '.join(sorted(tensors)) or 'none'})")
    d = tensors["directions"].float()
    return d[None] if d.ndim == 1 else d


def resolve_plan(
    plan: InterventionPlan,
    *,
    hypotheses: Any = None,
    sae: Any = None,
    d_model: int | None = None,
    base_dir: str | Path | None = None,
) -> list[ResolvedConcept]:
    """Resolve the active entries: fill SAE member features from the hypotheses table when the
    plan omits them, take layers and directions from the SAE or the direction file."""
    out = []
    for i, c in enumerate(plan.active):
        r = ResolvedConcept(choice=c, layer=c.layer)
        if c.kind == "sae":
            feats = list(c.features) or (_hypotheses_features(hypotheses, int(c.name)) if hypotheses is not None else [])
            if not feats:
                raise PlanError(i, c.concept, "features", "no member features: fill them from the hypotheses table (or pass hypotheses=)")
            r.features = feats
            if sae is not None:
                if max(feats) >= sae.d_sae:
                    raise PlanError(i, c.concept, "features", f"feature {max(feats)} is out of range for {sae.name} (d_sae={sae.d_sae})")
                if c.layer is not None and c.layer != sae.layer:
                    raise PlanError(i, c.concept, "layer", f"the SAE reads layer {sae.layer}, not {c.layer}")
                r.layer = sae.layer
                dec = sae.decoder_directions[feats].float().cpu()
                r.raw_directions = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
                r.directions = orthonormal(dec)
            elif c.method in ("steer", "ablate"):
                raise PlanError(i, c.concept, "method", f"{c.method} needs the SAE's decoder directions: pass sae=")
        elif c.kind == "direction":
            d = _load_directions(c, Path(base_dir) if base_dir else None)
            if d_model is not None and d.shape[1] != d_model:
                raise PlanError(i, c.concept, "direction_file", f"directions have width {d.shape[1]}, the model has d_model={d_model}")
            if c.layer is None:
                raise PlanError(i, c.concept, "layer", "a direction concept needs the residual-stream layer it lives at")
            r.raw_directions = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
            r.directions = orthonormal(d)
        out.append(r)
    return out


# --- scores ---------------------------------------------------------------------------------


def _text_raw(pattern: str, texts: Sequence[str]) -> tuple[np.ndarray, bool]:
    """Raw text scores and whether they are a regex's presence (already 0/1, never scaled)."""
    if pattern in TEXT_STATS:
        fn = TEXT_STATS[pattern]
        return np.asarray([fn(t) for t in texts], dtype=np.float64), False
    rx = re.compile(pattern)
    return np.asarray([1.0 if rx.search(t) else 0.0 for t in texts], dtype=np.float64), True


def _scaled(raw: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    if scale is None:
        return raw
    lo, hi = scale
    return np.clip((raw - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(raw)


@torch.no_grad()
def _residual_runs(lm: LoadedModel, layer: int, items: Sequence[tuple[Sequence[dict], str]], max_tokens: int = 512) -> Iterator[torch.Tensor]:
    """Per (prompt messages, response): the residual stream after block ``layer`` at the response tokens."""
    block = decoder_layers(lm.model)[layer]
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = block.register_forward_hook(hook)
    try:
        with truncated_to_layer(lm.model, layer) as base:
            for messages, response in items:
                r = render_example(lm.tokenizer, messages, response)
                resp = r.response_ids[:max_tokens]
                if not resp:
                    yield torch.zeros(0, lm.d_model)
                    continue
                ids = torch.tensor([r.prompt_ids + resp], device=lm.device)
                captured.clear()
                base(input_ids=ids)
                yield captured[-1][0, len(r.prompt_ids):].float()
    finally:
        handle.remove()


def _direction_raw(resid: torch.Tensor, basis: torch.Tensor, raw: torch.Tensor) -> float:
    if resid.shape[0] == 0:
        return 0.0
    if raw.shape[0] == 1:
        return float((resid @ raw[0].to(resid)).mean())
    return float((resid @ basis.to(resid).T).norm(dim=1).mean())


def score_texts(
    concept: ResolvedConcept,
    prompts: Sequence[Sequence[dict]],
    responses: Sequence[str],
    *,
    lm: LoadedModel | None = None,
    sae: Any = None,
) -> np.ndarray:
    """s_c of arbitrary (prompt, response) texts — generations, held-out pairs. Text concepts need
    nothing else; sae concepts need the model and SAE; direction concepts the model."""
    c = concept.choice
    if c.kind == "text":
        raw, _ = _text_raw(c.pattern, responses)
        return _scaled(raw, concept.scale)
    if lm is None:
        raise ValueError(f"{c.concept}: scoring new text needs the model (lm=)")
    items = list(zip(prompts, responses))
    if c.kind == "sae":
        if sae is None:
            raise ValueError(f"{c.concept}: scoring new text needs the SAE (sae=)")
        feats = torch.tensor(concept.features)
        out = []
        for resid in _residual_runs(lm, sae.layer, items):
            if resid.shape[0] == 0:
                out.append(0.0)
                continue
            acts = sae.encode(resid.to(sae.sae.W_enc.device)).float()
            out.append(float((acts[:, feats.to(acts.device)] > 0).any(0).float().mean()))
        return np.asarray(out)
    raw = np.asarray([_direction_raw(x, concept.directions, concept.raw_directions) for x in _residual_runs(lm, concept.layer, items)])
    return _scaled(raw, concept.scale)


def _store_rows(store, pairs: Sequence[PreferencePair]) -> np.ndarray | None:
    """Row of each pair in the feature store (by id and content), or None if any is missing."""
    index = {}
    for i, p in enumerate(store.pairs()):
        index[p["id"]] = (i, p["chosen"], p["rejected"])
    rows = []
    for p in pairs:
        hit = index.get(p.id)
        if hit is None or hit[1] != p.chosen or hit[2] != p.rejected:
            return None
        rows.append(hit[0])
    return np.asarray(rows, dtype=np.int64)


def pair_scores(
    concept: ResolvedConcept,
    pairs: Sequence[PreferencePair],
    *,
    store: Any = None,
    lm: LoadedModel | None = None,
    sae: Any = None,
    fit_scale: bool = True,
) -> np.ndarray:
    """(n_pairs, 2) scores (chosen, rejected). SAE concepts read the feature store when it holds
    these pairs (no recompute). ``fit_scale``: set the scale of text statistics and
    directions from these responses (training pairs); otherwise use the concept's recorded one."""
    c = concept.choice
    pairs = as_pairs(pairs)
    if c.kind == "sae":
        rows = _store_rows(store, pairs) if store is not None else None
        if rows is not None:
            feats = np.asarray(concept.features)
            if feats.max() >= store.d_sae:
                raise PlanError(None, c.concept, "features", f"feature {feats.max()} is out of range for the feature store (d_sae={store.d_sae})")
            out = np.zeros((len(pairs), 2))
            for j, side in enumerate(("chosen", "rejected")):
                fires = store.pooled("fires", side)[rows][:, feats]
                out[:, j] = np.asarray(fires.sum(1)).ravel() / len(feats)
            return out
        if lm is None or sae is None:
            raise ValueError(f"{c.concept}: the feature store does not hold these pairs; pass lm= and sae= to compute the scores")
    prompts = [p.prompt for p in pairs]
    if c.kind == "text":
        raw, regex = _text_raw(c.pattern, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        if fit_scale:  # statistics are >= 0: divide by the largest, so 0/1 statistics stay as they are
            concept.scale = None if regex else (0.0, float(raw.max()) if raw.max() > 0 else 1.0)
        return _scaled(raw, concept.scale).reshape(2, -1).T
    if c.kind == "direction":
        items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        raw = np.asarray([_direction_raw(x, concept.directions, concept.raw_directions) for x in _residual_runs(lm, concept.layer, items)])
        if fit_scale:
            concept.scale = (float(raw.min()), float(raw.max()))
        return _scaled(raw, concept.scale).reshape(2, -1).T
    return np.stack([score_texts(concept, prompts, [p.chosen for p in pairs], lm=lm, sae=sae), score_texts(concept, prompts, [p.rejected for p in pairs], lm=lm, sae=sae)], 1)


# --- reward shaping -------------------------------------------------------------------------


def shaping_offsets(concepts: Sequence[ResolvedConcept], scores: Mapping[str, np.ndarray], n_pairs: int) -> np.ndarray:
    """(n_pairs, 2) per-response offsets o(y) = Σ_c sign_c·λ_c·s_c(y) of the reward-shaping entries.

    The trainer adds o(y⁺) − o(y⁻) to β·margin inside the log-sigmoid, which gives the shaped loss
    −log σ(β·margin + Σ_c λ_c·(s_c(y⁺) − s_c(y⁻))) with λ_c = sign·strength (suppress > 0)."""
    off = np.zeros((n_pairs, 2))
    for r in concepts:
        if r.choice.method == "reward_shaping":
            off += r.choice.sign * r.choice.strength * np.asarray(scores[r.concept], dtype=np.float64)
    return off


# --- filtering / relabelling ----------------------------------------------------------------


def filter_pairs(
    pairs: Sequence[PreferencePair],
    concepts: Sequence[ResolvedConcept],
    scores: Mapping[str, np.ndarray],
) -> tuple[list[PreferencePair], np.ndarray, pd.DataFrame]:
    """Drop or flip the pairs whose preference the concept carries.

    suppress: pairs with s(y⁺) − s(y⁻) ≥ strength (the preference points towards the concept);
    amplify: pairs with s(y⁻) − s(y⁺) ≥ strength (it points away). ``flip`` swaps chosen and
    rejected instead of dropping. Entries apply in plan order; a pair dropped by one is not counted
    by the next. Returns (new pairs, index of each kept pair in the input, counts per concept).
    """
    pairs = as_pairs(pairs)
    keep = np.ones(len(pairs), dtype=bool)
    flipped = np.zeros(len(pairs), dtype=bool)
    rows = []
    for r in concepts:
        c = r.choice
        if c.method != "filter":
            continue
        s = np.asarray(scores[r.concept])
        diff = (s[:, 0] - s[:, 1]) * c.sign
        # a flipped pair's chosen is its old rejected: its preference now points the other way
        diff = np.where(flipped, -diff, diff)
        hit = keep & (diff >= c.strength - 1e-12)
        if c.filter_mode == "flip":
            flipped ^= hit
        else:
            keep &= ~hit
        rows.append({"concept": c.concept, "label": c.label, "action": c.action, "mode": c.filter_mode, "threshold": c.strength, "n_pairs": len(pairs), "n_matched": int(hit.sum()), "n_dropped": int(hit.sum()) if c.filter_mode == "drop" else 0, "n_flipped": int(hit.sum()) if c.filter_mode == "flip" else 0})
    out, index = [], []
    for i, p in enumerate(pairs):
        if not keep[i]:
            continue
        if flipped[i]:
            p = replace(p, chosen=p.rejected, rejected=p.chosen, metadata={**dict(p.metadata), "flipped": True})
        out.append(p)
        index.append(i)
    return out, np.asarray(index, dtype=np.int64), pd.DataFrame(rows, columns=["concept", "label", "action", "mode", "threshold", "n_pairs", "n_matched", "n_dropped", "n_flipped"])


# --- inoculation prompting ------------------------------------------------------------------


def _with_instruction(prompt: Sequence[dict], instruction: str) -> tuple[dict, ...]:
    """The prompt with ``instruction`` appended to its last user turn (a new user turn if none).
    The system prompt is left alone: replacing it would change more than the instruction."""
    msgs = [dict(m) for m in prompt]
    for m in reversed(msgs):
        if m["role"] == "user":
            m["content"] = f"{m['content'].rstrip()}\n\n{instruction.strip()}"
            return tuple(msgs)
    return tuple(msgs) + ({"role": "user", "content": instruction.strip()},)


def inoculate(pairs: Sequence[PreferencePair], concepts: Sequence[ResolvedConcept]) -> list[PreferencePair]:
    """Training pairs with every inoculation instruction added to the prompt (plan order).
    Apply to the training split only; held-out and evaluation prompts stay as they are."""
    instructions = [r.choice.instruction for r in concepts if r.choice.method == "inoculate"]
    if not instructions:
        return as_pairs(pairs)
    text = "\n".join(i.strip() for i in instructions)
    return [replace(p, prompt=_with_instruction(p.prompt, text)) for p in as_pairs(pairs)]


@torch.no_grad()
def _generate(lm: LoadedModel, prompts: Sequence[Sequence[dict]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tok.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True) for p in prompts[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
            gen = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def rank_instructions(
    concept: ResolvedConcept,
    candidates: Sequence[str],
    prompts: Sequence[Sequence[dict]],
    lm: LoadedModel,
    *,
    sae: Any = None,
    max_new_tokens: int = 48,
) -> pd.DataFrame:
    """Rank candidate inoculation instructions by how strongly they elicit the concept from the
    base model: greedy generations for ``prompts`` with and without each instruction, scored with
    s_c. ``lift`` = mean score with − mean score without; the best instruction comes first."""
    prompts = [tuple(dict(m) for m in p) for p in prompts]
    base = score_texts(concept, prompts, _generate(lm, prompts, max_new_tokens), lm=lm, sae=sae)
    rows = []
    for text in candidates:
        ps = [_with_instruction(p, text) for p in prompts]
        gens = _generate(lm, ps, max_new_tokens)
        s = score_texts(concept, ps, gens, lm=lm, sae=sae)
        rows.append({"instruction": text, "score_with": float(s.mean()), "score_without": float(base.mean()), "lift": float(s.mean() - base.mean()), "example": gens[0] if gens else ""})
    return pd.DataFrame(rows).sort_values("lift", ascending=False, kind="stable").reset_index(drop=True)


# --- steering and ablation hooks ------------------------------------------------------------


@dataclass
class ResidualEdit:
    """One edit of the residual stream after block ``layer``.

    steer: h + vector. ablate: h − fraction·((h − mean)·Qᵀ)·Q (zero ablation: mean = 0), i.e. the
    component in span(Q) is replaced by the mean's (scaled by ``fraction``)."""

    layer: int
    kind: str  # "steer" | "ablate"
    concept: str = ""
    vector: torch.Tensor | None = None  # steer: α·v (d_model)
    basis: torch.Tensor | None = None  # ablate: (k, d_model) orthonormal rows
    mean: torch.Tensor | None = None  # ablate="mean": the mean residual (d_model)
    fraction: float = 1.0
    in_reference: bool = False  # does the DPO reference pass see it? (see the module docstring)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "steer":
            return h + self.vector.to(device=h.device, dtype=h.dtype)
        Q = self.basis.to(device=h.device, dtype=h.dtype)
        centred = h if self.mean is None else h - self.mean.to(device=h.device, dtype=h.dtype)
        return h - self.fraction * (centred @ Q.T) @ Q


class ResidualHooks:
    """Forward hooks that apply ``edits`` on the decoder blocks of ``model`` while the context is
    open; removed on exit, also on error. ``reference()`` turns off the edits the reference pass
    must not see."""

    def __init__(self, model: torch.nn.Module, edits: Sequence[ResidualEdit]):
        self.model, self.edits = model, list(edits)
        self._handles: list = []
        self._reference = False

    def _hook_for(self, edits: list[ResidualEdit]) -> Callable:
        def hook(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            for e in edits:
                if self._reference and not e.in_reference:
                    continue
                h = e.apply(h)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        return hook

    def __enter__(self) -> "ResidualHooks":
        layers = decoder_layers(self.model)
        by_layer: dict[int, list[ResidualEdit]] = {}
        for e in self.edits:
            if not 0 <= e.layer < len(layers):
                raise ValueError(f"{e.concept}: layer {e.layer} out of range (the model has {len(layers)} layers)")
            by_layer.setdefault(e.layer, []).append(e)
        try:
            for layer, edits in sorted(by_layer.items()):
                self._handles.append(layers[layer].register_forward_hook(self._hook_for(edits)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def reference(self) -> Iterator[None]:
        """While open, only the edits with ``in_reference`` apply (ablation, not steering)."""
        prev, self._reference = self._reference, True
        try:
            yield
        finally:
            self._reference = prev


@torch.no_grad()
def mean_residual(lm: LoadedModel, layer: int, pairs: Sequence[PreferencePair], n: int = 32) -> torch.Tensor:
    """Mean residual after block ``layer`` over the response tokens of the first ``n`` pairs (both
    sides): the value mean-ablation replaces the concept component with."""
    items = [(p.prompt, r) for p in as_pairs(pairs)[:n] for r in (p.chosen, p.rejected)]
    total, count = torch.zeros(lm.d_model, dtype=torch.float64), 0
    for x in _residual_runs(lm, layer, items):
        total += x.double().sum(0).cpu()
        count += x.shape[0]
    return (total / max(count, 1)).float()


def residual_edits(
    concepts: Sequence[ResolvedConcept],
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
            edits.append(ResidualEdit(layer=r.layer, kind="steer", concept=c.concept, vector=c.sign * c.strength * r.steering_vector, in_reference=False))
        elif c.method == "ablate":
            mean = None
            if c.ablation == "mean":
                if lm is None:
                    raise ValueError(f"{c.concept}: mean ablation needs the model to estimate the mean residual (lm=)")
                mean = mean_residual(lm, r.layer, pairs, n_mean)
            edits.append(ResidualEdit(layer=r.layer, kind="ablate", concept=c.concept, basis=r.directions, mean=mean, fraction=c.strength, in_reference=True))
    return edits
