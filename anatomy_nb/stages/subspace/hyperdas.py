"""HyperDAS (Sun, Huang, Baskaran, D'Oosterlinck, Potts, Sklar, Geiger; ICLR 2025, arXiv 2503.10894):
one hypernetwork that, given a concept *in words* ("the country of the city"), decides where to
intervene and which subspace to interchange, for any of the concepts it was trained on.

DAS (``das``) learns one fixed subspace per concept at a position given by hand. HyperDAS learns,
with the target model frozen, its four parts end to end:

1. **Concept encoder** — the concept text's token embeddings (the target model's own, frozen) pass
   through transformer blocks that attend to themselves and, by cross-attention, to the target
   model's hidden states at ``layer`` on the base and the counterfactual prompt.
2. **Token-position selection** — per base token, a distribution over the counterfactual's tokens
   and "keep" (a null column), conditioned on the encoded concept (the authors' design). Soft in
   training, the argmax per base token at evaluation. ``selection="factored"`` (the default) scores
   each token once with one scorer for both prompts and adds the two scores (keep's logit 0): what
   is learnt on the base side, where an edit at the wrong token shows at once, carries to the
   counterfactual, whose entity plays the same role. ``"pairwise"`` scores every (base, source) pair
   as the authors do. This project's first design, one token per side sampled apart
   (straight-through Gumbel), and the authors' annealed boundary both failed on the planted task
   (``planted_task``; docs/explanation.md) and are gone.
3. **Subspace construction** — a learned matrix R with orthonormal rows (k × d), reflected by
   ``reflections`` Householder vectors (k by default; one can only tilt R's span along one
   direction) that the encoder writes from the concept. Its rows stay orthonormal; the subspace
   depends on the concept (and on the prompts it read).
4. **Interchange intervention** — at every base position i, h_i ← h_i + ((m_i − h_i)·Qᵀ)·Q with
   m_i = Σ_j w_ij·h_cf,j + w_i,null·h_i (``ops.ResidualEdit(kind="interchange", positions=None)``).

The loss is the cross-entropy of the expected answer at the base's last position, as for DAS, on
examples of several concepts at once, so that the concept text has to matter; cause pairs weigh 3.5
and isolate pairs 0.5 (the authors' weights). The learning rate matters most: at 3·10⁻³ each
selection collapsed to "keep" or read the wrong source token on the planted task; at 3·10⁻⁴ they learn.

Since the subspace depends on the inputs, a fixed concept for stage 2 or a plan is made from it by
``principal_subspace``: the k directions that best cover the per-example subspaces of one concept
(with the share they cover, so the approximation is visible).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...lm.models import LoadedModel
from ...lm.ops import ResidualCapture, ResidualEdit, ResidualHooks
from .das import Example, Subspace, check_subspace_shape, frozen, last_logits, pad_id, padded, shuffled_batches

#: how the hypernetwork chooses where to intervene (module docstring, 2.)
SELECTIONS = ("factored", "pairwise")

__all__ = [
    "SELECTIONS",
    "HyperDAS",
    "HyperDASResult",
    "concept_text",
    "hyperdas_predictions",
    "hyperdas_subspace",
    "principal_subspace",
    "train_hyperdas",
]


def concept_text(attribute: str, entity_type: str) -> str:
    """The words that name a RAVEL attribute for the hypernetwork: "the country of the city"."""
    return f"the {attribute.lower().replace('_', ' ')} of the {entity_type.replace('_', ' ')}"


class HyperDAS(nn.Module):
    """The hypernetwork (module docstring). ``width`` and ``layers`` size it: 256 × 2 trains on two
    CPU cores; the paper's is a copy of the target model's own decoder."""

    MAX_POSITIONS = 256  # positions further from either end share the last embedding

    def __init__(
        self,
        d_model: int,
        dim: int,
        *,
        width: int = 256,
        layers: int = 2,
        heads: int = 4,
        given_positions: bool = False,
        selection: str = "factored",
        read_embeddings: bool = True,
        reflections: int | None = None,
    ):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"HyperDAS selection {selection!r}: one of {SELECTIONS}")
        self.selection, self.read_embeddings = selection, read_embeddings
        if width % heads:
            raise ValueError(f"HyperDAS width {width} must be a multiple of heads {heads}")
        self.dim, self.width = dim, width
        # the examples' positions are used, not selected (train_hyperdas(positions="entity"))
        self.given_positions = given_positions
        self.read_states = nn.Linear(d_model, width)
        self.read_text = nn.Linear(d_model, width)
        self.side = nn.Embedding(2, width)  # base / counterfactual
        self.position = nn.Embedding(self.MAX_POSITIONS, width)  # from the start of its prompt
        self.from_end = nn.Embedding(self.MAX_POSITIONS, width)  # from its last token
        block = dict(
            d_model=width, nhead=heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**block), layers)
        self.selector = nn.TransformerDecoderLayer(**block)
        self.pick = nn.Linear(width, 1)  # factored selection: one token scorer for both prompts
        # every token scores 0 at the start, as "keep" does: no initialisation can start the network
        # where edits have almost no weight and so no gradient (seed 1 did, with a random scorer)
        nn.init.zeros_(self.pick.weight)
        nn.init.zeros_(self.pick.bias)
        # pairwise selection (the authors'): a key per (base token, source token) pair and one for
        # "keep the base token", a query from the encoded concept; a softmax per base token
        self.pair = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, width))
        self.keep = nn.Linear(width, width)
        self.query = nn.Linear(width, width)
        self.layer_mark = nn.Embedding(2, width)  # the intervention layer's states / the token embeddings
        # the concept's subspace: the shared rows R reflected by ``reflections`` Householder vectors the
        # encoder writes (one reflection moves a k-dim subspace only along one direction; k of them can
        # take R's span anywhere)
        self.reflections = reflections or dim
        self.householder = nn.Linear(width, self.reflections * d_model)
        self.rotation = torch.nn.utils.parametrizations.orthogonal(nn.Linear(d_model, dim, bias=False))

    def _read(self, h: torch.Tensor, mask: torch.Tensor, side: int) -> torch.Tensor:
        """Hidden states in the hypernetwork's width, marked with their side and positions."""
        pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
        from_end = (mask.sum(1, keepdim=True) - 1 - pos).clamp(min=0)
        top = self.MAX_POSITIONS - 1
        return (
            self.read_states(h)
            + self.side.weight[side]
            + self.position(pos.clamp(max=top))
            + self.from_end(from_end.clamp(max=top))
        )

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        base: torch.Tensor,
        base_mask: torch.Tensor,
        source: torch.Tensor,
        source_mask: torch.Tensor,
        temperature: float = 1.0,
        hard: bool = False,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
        base_tokens: torch.Tensor | None = None,
        source_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Selection weights (batch, base len, source len + 1; the last column is "nowhere") and the
        subspace (batch, dim, d_model) for concept ``text`` (embeddings) on these hidden states.
        ``positions``: (base, source) token per example given instead of selected (an ablation);
        ``base_tokens`` / ``source_tokens``: the prompts' token embeddings, read beside the hidden
        states when ``read_embeddings`` (the authors' hypernetwork reads every layer, these included)."""
        states = torch.cat([self._read(base, base_mask, 0), self._read(source, source_mask, 1)], 1)
        states_mask = torch.cat([base_mask, source_mask], 1).bool()
        memory, memory_mask = states + self.layer_mark.weight[0], states_mask
        if self.read_embeddings and base_tokens is not None and source_tokens is not None:
            tokens_read = torch.cat(
                [self._read(base_tokens, base_mask, 0), self._read(source_tokens, source_mask, 1)], 1
            )
            memory = torch.cat([memory, tokens_read + self.layer_mark.weight[1]], 1)
            memory_mask = torch.cat([states_mask, states_mask], 1)
        concept = self.encoder(
            self.read_text(text), memory, tgt_key_padding_mask=~text_mask.bool(), memory_key_padding_mask=~memory_mask
        )
        pooled = (concept * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp(min=1)
        tokens = self.selector(
            states, concept, tgt_key_padding_mask=~states_mask, memory_key_padding_mask=~text_mask.bool()
        )
        tb = base.shape[1]
        Q = self.rotation.weight[None].expand(pooled.shape[0], -1, -1)
        for v in self.householder(pooled).view(pooled.shape[0], self.reflections, -1).unbind(1):
            Q = Q - 2 * (Q @ v[:, :, None]) * v[:, None, :] / (v * v).sum(-1)[:, None, None]
        if positions is not None:  # given: that base token reads that source token
            wb = torch.nn.functional.one_hot(positions[0], tb).to(base.dtype)
            ws = torch.nn.functional.one_hot(positions[1], source.shape[1]).to(base.dtype)
            return torch.cat([wb[:, :, None] * ws[:, None, :], (1 - wb)[..., None]], -1), Q
        select = self._factored if self.selection == "factored" else self._pairwise
        return select(tokens[:, :tb], tokens[:, tb:], base_mask, source_mask, pooled, temperature, hard), Q

    def _factored(self, bt, st, base_mask, source_mask, pooled, temperature: float, hard: bool) -> torch.Tensor:
        """Per base token, a softmax over the source tokens and "keep" whose logits are one token
        score of the base token plus one of the source token (the same scorer for both prompts: the
        concept's token plays the same role in each), keep's logit 0. What is learnt on the base side,
        where an edit at the wrong token shows at once, carries to the source side."""
        sb = self.pick(bt).squeeze(-1).masked_fill(~base_mask.bool(), float("-inf"))
        ss = self.pick(st).squeeze(-1).masked_fill(~source_mask.bool(), float("-inf"))
        logits = torch.cat([sb[:, :, None] + ss[:, None, :], torch.zeros_like(sb)[..., None]], -1)
        if hard:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(bt.dtype)
        return torch.softmax(logits / temperature, -1)

    def _pairwise(self, bt, st, base_mask, source_mask, pooled, temperature: float, hard: bool) -> torch.Tensor:
        """Per base token, a distribution over the source tokens and "keep" (the last column): keys
        from each (base, source) pair and from the base token alone, one query from the concept.
        Soft (with ``temperature``) in training, the argmax per base token (hard) at evaluation."""
        S = st.shape[1]
        pairs = self.pair(
            torch.cat([bt[:, :, None].expand(-1, -1, S, -1), st[:, None].expand(-1, bt.shape[1], -1, -1)], -1)
        )
        keys = torch.cat([pairs, self.keep(bt)[:, :, None]], 2)  # (batch, base, source + 1, width)
        logits = (keys @ self.query(pooled)[:, None, :, None]).squeeze(-1) / math.sqrt(self.width)
        allowed = torch.cat(
            [
                source_mask.bool()[:, None].expand(-1, bt.shape[1], -1),
                torch.ones_like(logits[..., :1], dtype=torch.bool),
            ],
            -1,
        )
        allowed = allowed & (base_mask.bool()[..., None] | torch.arange(S + 1, device=bt.device).eq(S))  # padding keeps
        logits = logits.masked_fill(~allowed, float("-inf"))
        if hard:
            return torch.nn.functional.one_hot(logits.argmax(-1), S + 1).to(bt.dtype)
        return torch.softmax(logits / temperature, -1)


@dataclass
class HyperDASResult:
    """A trained hypernetwork with its layer, the concept texts it was trained on, its curve and how
    it was trained."""

    net: HyperDAS
    layer: int
    concepts: list[str]
    curve: list[dict]
    provenance: dict


def _states(lm: LoadedModel, layer: int, seqs: Sequence[list[int]], batch_size: int = 32) -> list[torch.Tensor]:
    """Hidden states at ``layer`` per sequence (its own length); the model is frozen, so once."""
    out: list[torch.Tensor] = []
    with ResidualCapture(lm, layer) as capture, torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            ids, mask = padded(chunk, pad_id(lm))
            h = capture(ids, attention_mask=mask).float()
            out += [h[b, : len(s)].cpu() for b, s in enumerate(chunk)]
    return out


def _stack(rows: Sequence[torch.Tensor], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, rows[0].shape[-1], device=device)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r.to(device)
        mask[i, : len(r)] = 1
    return x, mask


class _Batches:
    """Everything the hypernetwork reads for a set of examples, computed once: the concept texts'
    embeddings and the hidden states of base and counterfactual prompts at ``layer``."""

    def __init__(self, lm: LoadedModel, layer: int, concepts: Sequence[str], examples: Sequence[Example]):
        self.lm, self.layer, self.examples, self.concepts = lm, layer, list(examples), list(concepts)
        embed = lm.model.get_input_embeddings()
        with torch.no_grad():
            self.text = {
                c: embed(torch.tensor([lm.tokenizer(c, add_special_tokens=False)["input_ids"]], device=lm.device))[0]
                .float()
                .cpu()
                for c in sorted(set(concepts))
            }
        self.base = _states(lm, layer, [e.base_ids for e in examples])
        self.source = _states(lm, layer, [e.source_ids for e in examples])
        with torch.no_grad():  # the prompts' token embeddings (the hypernetwork may read them too)
            self.base_tokens = [embed(torch.tensor([e.base_ids], device=lm.device))[0].float().cpu() for e in examples]
            self.source_tokens = [
                embed(torch.tensor([e.source_ids], device=lm.device))[0].float().cpu() for e in examples
            ]

    def __call__(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        dev = self.lm.device
        text, text_mask = _stack([self.text[self.concepts[i]] for i in idx], dev)
        base, base_mask = _stack([self.base[i] for i in idx], dev)
        source, source_mask = _stack([self.source[i] for i in idx], dev)
        base_tokens, _ = _stack([self.base_tokens[i] for i in idx], dev)
        source_tokens, _ = _stack([self.source_tokens[i] for i in idx], dev)
        return dict(
            text=text,
            text_mask=text_mask,
            base=base,
            base_mask=base_mask,
            source=source,
            source_mask=source_mask,
            base_tokens=base_tokens,
            source_tokens=source_tokens,
        )


def _intervened_logits(
    lm: LoadedModel,
    layer: int,
    net: HyperDAS,
    inputs: dict,
    examples: Sequence[Example],
    temperature: float,
    hard: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base runs' last-position logits with the hypernetwork's interchange; its selection
    weights and subspaces."""
    given = None
    if net.given_positions:
        given = (
            torch.tensor([e.base_position for e in examples], device=lm.device),
            torch.tensor([e.source_position for e in examples], device=lm.device),
        )
    weights, Q = net(**inputs, temperature=temperature, hard=hard, positions=given)
    mixed = weights[..., :-1] @ inputs["source"] + weights[..., -1:] * inputs["base"]
    ids, mask = padded([e.base_ids for e in examples], pad_id(lm))
    with ResidualHooks(lm.model, [ResidualEdit(layer=layer, kind="interchange", basis=Q, source=mixed)]):
        return last_logits(lm, ids, mask), weights, Q


def train_hyperdas(
    lm: LoadedModel,
    layer: int,
    dim: int,
    train: Sequence[tuple[str, Example]],
    *,
    width: int = 256,
    layers: int = 2,
    heads: int = 4,
    epochs: int = 8,
    lr: float = 3e-4,
    batch_size: int = 16,
    temperature: tuple[float, float] = (1.0, 0.5),
    positions: str = "learned",
    selection: str = "factored",
    read_embeddings: bool = True,
    loss_weights: tuple[float, float] = (3.5, 0.5),
    reflections: int | None = None,
    rotation_lr: float | None = None,
    seed: int = 0,
    progress: Any = None,
) -> HyperDASResult:
    """Train the hypernetwork on (concept text, interchange example) pairs of several concepts, the
    target model frozen; the selection's temperature falls geometrically over training.
    ``positions="entity"`` gives it the examples' own positions instead (the ablation that
    separates learning where from learning what)."""
    if positions not in ("learned", "entity"):
        raise ValueError(f"HyperDAS positions {positions!r}: 'learned' or 'entity'")
    check_subspace_shape(lm, layer, dim)
    if len({c for c, _ in train}) < 2:
        raise ValueError(
            "HyperDAS trains on examples of at least two concepts at once (otherwise the concept text cannot matter)"
        )
    torch.manual_seed(seed)
    net = HyperDAS(
        lm.d_model,
        dim,
        width=width,
        layers=layers,
        heads=heads,
        given_positions=positions == "entity",
        selection=selection,
        read_embeddings=read_embeddings,
        reflections=reflections,
    ).to(lm.device)
    # the authors' two learning rates: the rotation's, and the (smaller) one of everything else
    rotation = list(net.rotation.parameters())
    others = [p for p in net.parameters() if all(p is not r for r in rotation)]
    opt = torch.optim.Adam([{"params": rotation, "lr": rotation_lr or lr}, {"params": others, "lr": lr}])
    rng = np.random.default_rng(seed)
    t0 = time.time()
    data = _Batches(lm, layer, [c for c, _ in train], [e for _, e in train])
    steps = epochs * math.ceil(len(train) / batch_size)
    curve: list[dict] = []
    with frozen(lm.model):
        for epoch, order in shuffled_batches(len(train), epochs, batch_size, rng):
            idx = order.tolist()
            tau = temperature[0] * (temperature[1] / temperature[0]) ** (len(curve) / max(steps - 1, 1))
            batch = [data.examples[j] for j in idx]
            logits, weights, _ = _intervened_logits(lm, layer, net, data(idx), batch, tau, hard=False)
            target = torch.tensor([e.answer for e in batch], device=lm.device)
            weight = torch.tensor([loss_weights[e.kind == "isolate"] for e in batch], device=lm.device)
            loss = (torch.nn.functional.cross_entropy(logits, target, reduction="none") * weight).sum() / weight.sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 4.0)  # the authors' clip
            opt.step()
            curve.append(
                {
                    "step": len(curve) + 1,
                    "epoch": epoch,
                    "loss": float(loss.detach()),
                    "accuracy": float((logits.argmax(-1) == target).float().mean()),
                    "temperature": round(tau, 4),
                    "seconds": round(time.time() - t0, 2),
                }
            )
            if progress:
                progress(curve[-1])
    net.eval()
    concepts = sorted({c for c, _ in train})
    prov = {
        "method": "HyperDAS",
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "layer": layer,
        "dim": dim,
        "width": width,
        "layers": layers,
        "heads": heads,
        "epochs": epochs,
        "lr": lr,
        "rotation_lr": rotation_lr or lr,
        "batch_size": batch_size,
        "temperature": list(temperature),
        "positions": positions,
        "selection": selection,
        "read_embeddings": read_embeddings,
        "loss_weights": list(loss_weights),
        "reflections": net.reflections,
        "seed": seed,
        "n_train": len(train),
        "concepts": concepts,
        "parameters": sum(p.numel() for p in net.parameters()),
        "seconds": round(time.time() - t0, 2),
    }
    return HyperDASResult(net, layer, concepts, curve, prov)


@torch.no_grad()
def hyperdas_predictions(
    lm: LoadedModel, hyper: HyperDASResult, concept: str, examples: Sequence[Example], batch_size: int = 32
) -> tuple[np.ndarray, dict, torch.Tensor]:
    """The base runs' greedy answers with the hypernetwork's hard selection for ``concept``; where
    it chose to edit (share of examples that edit the base's entity token, and from the source's
    entity token); and the per-example subspaces (n, dim, d_model)."""
    data = _Batches(lm, hyper.layer, [concept] * len(examples), examples)
    preds, Qs, at_entity, from_entity, from_end, entity_from_end = [], [], 0, 0, [], []
    source_offset: list[int] = []
    for i in range(0, len(examples), batch_size):
        idx = list(range(i, min(i + batch_size, len(examples))))
        batch = [examples[j] for j in idx]
        logits, weights, Q = _intervened_logits(lm, hyper.layer, hyper.net, data(idx), batch, 1.0, hard=True)
        preds.append(logits.argmax(-1).cpu().numpy())
        Qs.append(Q.cpu())
        choice = weights.argmax(-1).cpu()  # (batch, base len): a source position, or the null column
        null = weights.shape[-1] - 1
        for b, e in enumerate(batch):
            picked = choice[b, : len(e.base_ids)]
            at_entity += int(picked[e.base_position] != null)
            from_entity += int(picked[e.base_position] == e.source_position)
            if picked[e.base_position] != null:
                source_offset.append(int(picked[e.base_position]) - e.source_position)
            edited = (picked != null).nonzero().flatten()
            from_end += [len(e.base_ids) - 1 - int(p) for p in edited]
            entity_from_end.append(len(e.base_ids) - 1 - e.base_position)
    n = max(len(examples), 1)
    common = collections.Counter(source_offset).most_common(1)
    # where the edit went, as a distance from the prompt's end (0: the last token), beside the entity's
    where = {
        "edits_entity_token": at_entity / n,
        "from_source_entity_token": from_entity / n,
        "edit_from_end": float(np.median(from_end)) if from_end else float("nan"),
        "entity_from_end": float(np.median(entity_from_end)) if entity_from_end else float("nan"),
        # where the source token read into the base's entity token most often lies, relative to the
        # source's entity (0: on it; -1: the token before), and on which share of those pairs
        "source_offset": common[0][0] if common else 0,
        "source_offset_share": common[0][1] / len(source_offset) if common else float("nan"),
    }
    return (
        (np.concatenate(preds) if preds else np.zeros(0, dtype=int)),
        where,
        (torch.cat(Qs) if Qs else torch.zeros(0)),
    )


def principal_subspace(subspaces: torch.Tensor, dim: int) -> tuple[torch.Tensor, float]:
    """The ``dim`` orthonormal directions that best cover a stack of per-example subspaces
    (n, k, d): the top right-singular vectors of all their rows; and the mean share of each
    example's subspace they cover (1: HyperDAS used one subspace for this concept)."""
    rows = subspaces.reshape(-1, subspaces.shape[-1]).float()
    V = torch.linalg.svd(rows, full_matrices=False).Vh[:dim]
    coverage = float(((subspaces.float() @ V.T) ** 2).sum((1, 2)).mean() / subspaces.shape[1])
    return V.contiguous(), coverage


def hyperdas_subspace(hyper: HyperDASResult, concept: str, subspaces: torch.Tensor, **provenance: Any) -> Subspace:
    """A concept's principal subspace as a ``Subspace`` that ``das.save_subspace`` writes."""
    V, coverage = principal_subspace(subspaces, hyper.net.dim)
    return Subspace(
        V,
        hyper.layer,
        {**hyper.provenance, "concept_text": concept, "coverage": round(coverage, 4), **provenance},
        hyper.curve,
    )
