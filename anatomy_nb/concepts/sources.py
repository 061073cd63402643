"""Concept sources: one interface for every way of naming a concept, so that stage 2 can test any
of them and stage 4 can act on any of them.

A source gives

- a **score** s_c(y) ∈ [0, 1] of a response (``score_texts``; per pair, ``pair_scores``), which
  reward shaping, filtering, stage 2's tests and stage 5's read-outs use, and
- where the concept lives in the residual stream, its **directions** at a ``layer``
  (``directions()``: orthonormal rows; ``steering_vector()``: one unit vector), which steering and
  ablation (CAFT) use.

Kinds today (the ``ref`` prefix of a plan entry):

- ``sae:<id>`` — :class:`SAEConcept`: the fraction of the concept's member SAE features that fire
  anywhere in the response (the quantity stage 2 tests), read from the feature store for the pairs
  it holds and computed with the model and SAE for other text; directions = the members' decoder
  rows.
- ``text:<name>`` — :class:`TextConcept`: a regex's presence (0/1), or a text statistic of
  ``data.textstats.TEXT_STATS`` divided by its largest value on the training responses. No direction.
- ``direction:<name>`` — :class:`DirectionConcept`: directions from a file, a probe, or the
  difference of means of two sets of texts (``from_difference_of_means``); the score is the mean
  projection of the response's residual stream on them, min–max scaled over the training responses.

Learned subspaces (DAS / HyperDAS) are the next kind: a source with ``directions()`` and a score.
Scales are recorded so other text is scored on the same axis (and clipped to [0, 1]).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.files import content_hash
from ..data.schema import PreferencePair
from ..data.textstats import TEXT_STATS
from ..lm.models import LoadedModel
from ..lm.ops import response_residuals
from ..results.extract import FeatureStore
from ..results.plan import parse_concept

__all__ = [
    "ConceptSource",
    "DirectionConcept",
    "SAEConcept",
    "TextConcept",
    "load_subspace",
    "orthonormal",
    "store_rows",
]

MAX_RESPONSE_TOKENS = 512  # as stage 1 stores responses


def orthonormal(rows: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (k, d) of the span of ``rows`` (n, d), k ≤ n; near-dependent rows drop out."""
    rows = rows.detach().double()
    q, r = torch.linalg.qr(rows.T)  # (d, n), (n, n)
    keep = r.diagonal().abs() > tol * max(1.0, float(r.diagonal().abs().max()) if r.numel() else 1.0)
    return q[:, keep].T.float().contiguous()


def _unit_rows(d: torch.Tensor) -> torch.Tensor:
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _scaled(raw: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    if scale is None:
        return raw
    lo, hi = scale
    return np.clip((raw - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(raw)


def store_rows(store: FeatureStore, pairs: Sequence[PreferencePair]) -> np.ndarray | None:
    """Row of each pair in the feature store (by id and content), or None if any is missing."""
    held = {p.id: (i, p.chosen, p.rejected) for i, p in enumerate(store.pairs())}
    rows = []
    for p in pairs:
        hit = held.get(p.id)
        if hit is None or hit[1] != p.chosen or hit[2] != p.rejected:
            return None
        rows.append(hit[0])
    return np.asarray(rows, dtype=np.int64)


class ConceptSource(ABC):
    """A concept: a per-response score and, where it lives in the residual stream, directions."""

    ref: str
    label: str = ""
    layer: int | None = None

    @property
    def kind(self) -> str:
        return parse_concept(self.ref)[0]

    def describe(self) -> dict[str, Any]:
        """What identifies the source in an artifact key."""
        return {"ref": self.ref, "layer": self.layer}

    @abstractmethod
    def score_texts(
        self, prompts: Sequence[Sequence[dict]], responses: Sequence[str], *, lm: LoadedModel | None = None
    ) -> np.ndarray:
        """s_c of arbitrary (prompt, response) texts: generations, held-out pairs."""

    def pair_scores(
        self,
        pairs: Sequence[PreferencePair],
        *,
        store: FeatureStore | None = None,
        lm: LoadedModel | None = None,
        fit_scale: bool = True,
    ) -> np.ndarray:
        """(n_pairs, 2) scores (chosen, rejected). ``fit_scale``: a source with a scale sets it from
        these responses (the training pairs); otherwise the recorded one is used."""
        prompts = [p.prompt for p in pairs]
        return np.stack(
            [
                self.score_texts(prompts, [p.chosen for p in pairs], lm=lm),
                self.score_texts(prompts, [p.rejected for p in pairs], lm=lm),
            ],
            1,
        )

    def directions(self) -> torch.Tensor | None:
        """Orthonormal rows (k, d_model) spanning the concept at ``layer``; None without one."""
        return None

    def steering_vector(self) -> torch.Tensor:
        """The unit concept direction v_c (steering adds α·v_c)."""
        raise ValueError(f"{self.ref}: a {self.kind} concept has no residual direction")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ref!r})"


class SAEConcept(ConceptSource):
    """A cluster of SAE features (stage 2's concepts)."""

    def __init__(self, ref: str, features: Sequence[int], *, sae: Any = None, label: str = ""):
        self.ref, self.features, self.sae, self.label = ref, [int(f) for f in features], sae, label
        self.layer = None if sae is None else sae.layer
        if not self.features:
            raise ValueError(f"{ref}: an SAE concept needs its member features")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "features": self.features, "sae": getattr(self.sae, "fingerprint", None)}

    def from_firing(self, fires: np.ndarray) -> np.ndarray:
        """Scores from a (responses × d_sae) 0/1 firing matrix that is already computed."""
        return np.asarray(fires[:, self.features], dtype=np.float64).mean(1)

    @torch.no_grad()
    def score_texts(self, prompts, responses, *, lm=None) -> np.ndarray:
        if lm is None or self.sae is None:
            raise ValueError(f"{self.ref}: scoring new text needs the model and the SAE (lm=, and the source's sae)")
        feats = torch.tensor(self.features)
        out = []
        for resid in response_residuals(
            lm, self.sae.layer, list(zip(prompts, responses)), max_response_tokens=MAX_RESPONSE_TOKENS
        ):
            if resid.shape[0] == 0:
                out.append(0.0)
                continue
            acts = self.sae.encode(resid.to(self.sae.sae.W_enc.device)).float()
            out.append(float((acts[:, feats.to(acts.device)] > 0).any(0).float().mean()))
        return np.asarray(out)

    def pair_scores(self, pairs, *, store=None, lm=None, fit_scale=True) -> np.ndarray:
        """From the feature store when it holds these pairs (nothing recomputed), else computed."""
        rows = store_rows(store, pairs) if store is not None else None
        if rows is None:
            if lm is None or self.sae is None:
                raise ValueError(
                    f"{self.ref}: the feature store does not hold these pairs; pass lm= and sae= to compute the scores"
                )
            return super().pair_scores(pairs, lm=lm)
        if max(self.features) >= store.d_sae:
            raise ValueError(
                f"{self.ref}: feature {max(self.features)} is out of range for the feature store (d_sae={store.d_sae})"
            )
        out = np.zeros((len(pairs), 2))
        for j, side in enumerate(("chosen", "rejected")):
            fires = store.pooled("fires", side)[rows][:, self.features]
            out[:, j] = np.asarray(fires.sum(1)).ravel() / len(self.features)
        return out

    def _decoder_rows(self) -> torch.Tensor:
        if self.sae is None:
            raise ValueError(f"{self.ref}: its directions are the SAE's decoder rows: pass the SAE")
        return self.sae.decoder_directions[self.features].float().cpu()

    def directions(self) -> torch.Tensor:
        return orthonormal(self._decoder_rows())

    def steering_vector(self) -> torch.Tensor:
        """The normalised sum of the unit member directions."""
        v = _unit_rows(self._decoder_rows()).sum(0)
        return v / v.norm().clamp_min(1e-12)


class TextConcept(ConceptSource):
    """A regex (presence, 0/1) or a text statistic's name (scaled by its training maximum)."""

    def __init__(self, ref: str, pattern: str, *, label: str = "", scale: tuple[float, float] | None = None):
        self.ref, self.pattern, self.label, self.scale = ref, pattern, label, scale
        self.is_statistic = pattern in TEXT_STATS
        if not self.is_statistic:
            self._rx = re.compile(pattern)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pattern": self.pattern}

    def raw(self, texts: Sequence[str]) -> np.ndarray:
        if self.is_statistic:
            fn = TEXT_STATS[self.pattern]
            return np.asarray([fn(t) for t in texts], dtype=np.float64)
        return np.asarray([1.0 if self._rx.search(t) else 0.0 for t in texts], dtype=np.float64)

    def score_texts(self, prompts, responses, *, lm=None) -> np.ndarray:
        return _scaled(self.raw(responses), self.scale)

    def pair_scores(self, pairs, *, store=None, lm=None, fit_scale=True) -> np.ndarray:
        raw = self.raw([p.chosen for p in pairs] + [p.rejected for p in pairs])
        if fit_scale and self.is_statistic:  # statistics are >= 0: divide by the largest, so 0/1 ones stay as they are
            self.scale = (0.0, float(raw.max()) if raw.max() > 0 else 1.0)
        return _scaled(raw, self.scale).reshape(2, -1).T


class DirectionConcept(ConceptSource):
    """Directions in the residual stream after block ``layer`` (n, d_model)."""

    def __init__(
        self,
        ref: str,
        directions: torch.Tensor,
        layer: int,
        *,
        label: str = "",
        scale: tuple[float, float] | None = None,
    ):
        d = torch.as_tensor(directions).float()
        self.ref, self.raw_directions, self.layer, self.label, self.scale = (
            ref,
            d[None] if d.ndim == 1 else d,
            int(layer),
            label,
            scale,
        )

    @classmethod
    def from_file(cls, ref: str, path: str | Path, layer: int, **kwargs: Any) -> DirectionConcept:
        """Directions from a safetensors file with a tensor named ``directions`` ((n, d_model) or (d_model,))."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: direction file not found")
        try:
            tensors = load_file(str(path))
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
        if "directions" not in tensors:
            raise KeyError(f"{path} has no tensor named 'directions' (has: {', '.join(sorted(tensors)) or 'none'})")
        return cls(ref, tensors["directions"], layer, **kwargs)

    @classmethod
    def from_subspace(cls, result: Any, attribute: str, method: str = "DAS") -> DirectionConcept:
        """A subspace ``learn_subspace`` learned (read from its ``SubspaceResult``) as a concept: stage 2's
        ``sources=``, or a plan entry (``SubspaceResult.plan_entry``)."""
        return load_subspace(result.concept_path(attribute, method), result.concept_ref(attribute, method))

    @classmethod
    @torch.no_grad()
    def from_difference_of_means(
        cls,
        ref: str,
        lm: LoadedModel,
        layer: int,
        positive: Sequence[tuple[Sequence[dict], str]],
        negative: Sequence[tuple[Sequence[dict], str]],
        **kwargs: Any,
    ) -> DirectionConcept:
        """The difference of the mean residual (over response tokens) between responses that show
        the concept and responses that do not: the simplest probe, and often as good as a fitted one."""

        def mean(items):
            total, n = torch.zeros(lm.d_model, dtype=torch.float64), 0
            for x in response_residuals(lm, layer, items, max_response_tokens=MAX_RESPONSE_TOKENS):
                total += x.double().sum(0).cpu()
                n += x.shape[0]
            if n == 0:
                raise ValueError(f"{ref}: no response tokens to average")
            return total / n

        return cls(ref, (mean(positive) - mean(negative)).float(), layer, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "directions": content_hash(self.raw_directions.numpy().round(6).tobytes())}

    def directions(self) -> torch.Tensor:
        return orthonormal(self.raw_directions)

    def steering_vector(self) -> torch.Tensor:
        v = _unit_rows(self.raw_directions).sum(0)
        return v / v.norm().clamp_min(1e-12)

    def raw(self, prompts, responses, lm: LoadedModel | None) -> np.ndarray:
        if lm is None:
            raise ValueError(f"{self.ref}: scoring text needs the model (lm=)")
        unit, basis = _unit_rows(self.raw_directions), self.directions()
        out = []
        for x in response_residuals(
            lm, self.layer, list(zip(prompts, responses)), max_response_tokens=MAX_RESPONSE_TOKENS
        ):
            if x.shape[0] == 0:
                out.append(0.0)
            elif len(unit) == 1:
                out.append(float((x @ unit[0].to(x)).mean()))
            else:
                out.append(float((x @ basis.to(x).T).norm(dim=1).mean()))
        return np.asarray(out)

    def score_texts(self, prompts, responses, *, lm=None) -> np.ndarray:
        return _scaled(self.raw(prompts, responses, lm), self.scale)

    def pair_scores(self, pairs, *, store=None, lm=None, fit_scale=True) -> np.ndarray:
        prompts = [p.prompt for p in pairs] * 2
        raw = self.raw(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], lm)
        if fit_scale:
            self.scale = (float(raw.min()), float(raw.max()))
        return _scaled(raw, self.scale).reshape(2, -1).T


def load_subspace(path: str | Path, ref: str | None = None) -> Any:
    """A saved subspace as a ``DirectionConcept`` (layer and label from its JSON), ready for stage 2's
    ``sources=`` or a plan's ``direction_file``."""
    path = Path(path).with_suffix("")
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path}: no subspace metadata (layer, provenance) beside {path.with_suffix('.safetensors')}"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    prov = meta.get("provenance", {})
    label = f"{prov.get('method', 'subspace')} {prov.get('attribute', path.name)} (dim {meta.get('dim')})"
    return DirectionConcept.from_file(
        ref or f"direction:{path.name}", path.with_suffix(".safetensors"), int(meta["layer"]), label=label
    )
