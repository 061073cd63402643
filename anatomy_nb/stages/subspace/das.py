"""Distributed alignment search (DAS; Geiger, Wu, Potts, Icard, Goodman 2024): a concept's subspace
in the residual stream, learned from counterfactual pairs by interchange intervention.

An example is a *base* prompt, a *source* prompt, a token position in each (here: the entity's last
token) and the answer the base should give once the concept's value is taken from the source. A
k-dimensional subspace with orthonormal rows Q (``torch.nn.utils.parametrizations.orthogonal``) is
trained, the model frozen, so that the base run with h ← h + ((h_source − h)·Qᵀ)·Q at the base
position (``ops.ResidualEdit(kind="interchange")``) predicts that answer. The learned rows save as a
``direction:`` concept (``save_subspace``): stage 2 scores it by projection and stage 4 steers or
ablates it (CAFT) like any other direction concept.

Prompts here are plain text (RAVEL's templates), not chat turns: the entity's position must be
known exactly, and a chat template would only add tokens in front.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ...core.files import atomic_path, atomic_write_text
from ...lm.models import LoadedModel
from ...lm.ops import ResidualCapture, ResidualEdit, ResidualHooks

__all__ = [
    "Example",
    "Subspace",
    "answer_token",
    "check_subspace_shape",
    "entity_prompt",
    "frozen",
    "last_logits",
    "pad_id",
    "padded",
    "interchange_predictions",
    "interchanged_logits",
    "residuals_at",
    "next_token_predictions",
    "save_subspace",
    "shuffled_batches",
    "train_das",
]


def entity_prompt(tokenizer: Any, template: str, entity: str) -> tuple[list[int], int]:
    """Token ids of ``template % entity`` and the position of the entity's last token. Raises when
    the prompt's tokenisation does not begin with that of its text up to the entity (the entity
    merges with what follows it), since no position would then hold the entity alone."""
    if template.count("%s") != 1:
        raise ValueError(f"template {template!r}: needs exactly one %s for the entity")
    ids = tokenizer(template % entity, add_special_tokens=False)["input_ids"]
    prefix = tokenizer(template.split("%s")[0] + entity, add_special_tokens=False)["input_ids"]
    if ids[: len(prefix)] != prefix:
        raise ValueError(
            f"template {template!r} with entity {entity!r}: the tokenisations do not line up (the entity's last "
            "token merges with the text after it), so the entity has no token position"
        )
    return ids, len(prefix) - 1


def answer_token(tokenizer: Any, prompt: str, value: str) -> int:
    """The first token of ``value`` as the model would continue ``prompt`` (a space in between
    unless the prompt ends in a space or a quote)."""
    sep = "" if not prompt or prompt[-1] in " \"'([/" else " "
    ids = tokenizer(prompt + sep + value, add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= len(head) or ids[: len(head)] != head:
        raise ValueError(
            f"prompt {prompt!r}, value {value!r}: the value's first token is not a clean continuation of the prompt"
        )
    return int(ids[len(head)])


@dataclass
class Example:
    """One interchange example (token level)."""

    base_ids: list[int]
    base_position: int
    source_ids: list[int]
    source_position: int
    answer: int
    kind: str = "cause"  # "cause" | "isolate"
    meta: dict = field(default_factory=dict)


def padded(seqs: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)


def last_logits(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits
    return out[torch.arange(len(ids)), mask.sum(1).to(lm.device) - 1].float()


@torch.no_grad()
def next_token_predictions(lm: LoadedModel, prompts: Sequence[list[int]], batch_size: int = 32) -> np.ndarray:
    """The model's greedy next token after each prompt (to keep only what the model knows)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = padded(prompts[i : i + batch_size], pad_id(lm))
        out.append(last_logits(lm, ids, mask).argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


@torch.no_grad()
def residuals_at(lm: LoadedModel, layer: int, batch: Sequence[Example], side: str = "source") -> torch.Tensor:
    """The layer-``layer`` residual at each example's entity position, of its ``side`` ("base" or
    "source") prompt: (batch, d_model). The model is frozen while a subspace or mask trains, so these
    are computed once and reused every epoch."""
    ids, mask = padded([getattr(e, f"{side}_ids") for e in batch], pad_id(lm))
    with ResidualCapture(lm, layer) as capture:
        h = capture(ids, attention_mask=mask)
    return h[torch.arange(len(batch)), torch.tensor([getattr(e, f"{side}_position") for e in batch])].float()


def interchanged_logits(
    lm: LoadedModel, layer: int, basis: torch.Tensor, batch: Sequence[Example], source: torch.Tensor | None = None
) -> torch.Tensor:
    """The base runs' last-position logits with the interchange on ``basis`` at each base's entity
    position; ``source``: the residuals whose component in span(basis) goes in (default: the
    sources' own; the model is frozen, so callers compute them once). With ``basis`` the identity,
    the residual there is replaced by ``source`` outright."""
    source = residuals_at(lm, layer, batch, "source") if source is None else source
    ids, mask = padded([e.base_ids for e in batch], pad_id(lm))
    edit = ResidualEdit(
        layer=layer,
        kind="interchange",
        basis=basis,
        source=source.to(lm.device),
        positions=torch.tensor([e.base_position for e in batch], device=lm.device),
    )
    with ResidualHooks(lm.model, [edit]):
        return last_logits(lm, ids, mask)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode, its weights taking no gradient, while a subspace (or mask, or
    hypernetwork) trains on it; both restored after, also on error."""
    before, was_training = [p.requires_grad for p in model.parameters()], model.training
    model.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), before):
            p.requires_grad_(r)
        model.train(was_training)


def shuffled_batches(
    n: int, epochs: int, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, indices) of every training batch: each epoch a fresh permutation of ``range(n)``."""
    for epoch in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            yield epoch, order[i : i + batch_size]


@torch.no_grad()
def interchange_predictions(
    lm: LoadedModel, layer: int, basis: torch.Tensor, examples: Sequence[Example], batch_size: int = 32
) -> np.ndarray:
    """The base run's greedy answer token after the interchange on ``basis`` ((k, d) orthonormal)."""
    basis = torch.as_tensor(basis).float().to(lm.device)
    out = [
        interchanged_logits(lm, layer, basis, examples[i : i + batch_size]).argmax(-1).cpu().numpy()
        for i in range(0, len(examples), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


@dataclass
class Subspace:
    """A learned subspace: orthonormal rows (k, d_model) at ``layer``, with how it was learned."""

    directions: torch.Tensor
    layer: int
    provenance: dict
    curve: list[dict]

    @property
    def dim(self) -> int:
        return int(self.directions.shape[0])


def check_subspace_shape(lm: LoadedModel, layer: int, dim: int) -> None:
    """A layer the model has and a dimension between 1 and its hidden size, or an error that says which."""
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer {layer} out of range: {lm.name} has {lm.n_layers} layers")
    if not 1 <= dim <= lm.d_model:
        raise ValueError(f"subspace dim {dim} must be between 1 and the hidden size {lm.d_model}")


def train_das(
    lm: LoadedModel,
    layer: int,
    dim: int,
    train: Sequence[Example],
    *,
    epochs: int = 4,
    lr: float = 5e-3,
    batch_size: int = 16,
    seed: int = 0,
    progress: Any = None,
) -> Subspace:
    """Learn a ``dim``-dimensional subspace at ``layer`` from interchange examples (cross-entropy of
    the expected answer token at the base's last position; the model frozen)."""
    check_subspace_shape(lm, layer, dim)
    if not train:
        raise ValueError("no training examples")
    torch.manual_seed(seed)
    rotation = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(lm.d_model, dim, bias=False)).to(lm.device)
    opt = torch.optim.Adam(rotation.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    curve: list[dict] = []
    t0, step = time.time(), 0
    with frozen(lm.model):
        # the sources' residuals once: every epoch would otherwise re-run the same frozen forward passes
        sources = torch.cat(
            [residuals_at(lm, layer, train[i : i + batch_size], "source") for i in range(0, len(train), batch_size)]
        )
        for epoch, idx in shuffled_batches(len(train), epochs, batch_size, rng):
            batch = [train[j] for j in idx]
            logits = interchanged_logits(lm, layer, rotation.weight, batch, sources[torch.as_tensor(idx)])
            target = torch.tensor([e.answer for e in batch], device=lm.device)
            loss = torch.nn.functional.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            curve.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": float(loss.detach()),
                    "accuracy": float((logits.argmax(-1) == target).float().mean()),
                    "seconds": round(time.time() - t0, 2),
                }
            )
            if progress:
                progress(curve[-1])
    directions = rotation.weight.detach().float().cpu()
    return Subspace(
        directions,
        layer,
        {
            "method": "DAS",
            "model": lm.name,
            "model_fingerprint": lm.fingerprint,
            "layer": layer,
            "dim": dim,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "n_train": len(train),
            "seconds": round(time.time() - t0, 2),
        },
        curve,
    )


def save_subspace(subspace: Subspace, path: str | Path, **provenance: Any) -> Path:
    """Write ``<path>.safetensors`` (tensor ``directions``, readable by
    ``concepts.sources.DirectionConcept.from_file``) and ``<path>.json`` (layer, provenance, the
    training curve); a plan uses it as ``{concept: "direction:<name>", direction_file: …, layer: …}``."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    with atomic_path(weights) as tmp:
        save_file({"directions": subspace.directions.contiguous()}, str(tmp))
    atomic_write_text(
        path.with_suffix(".json"),
        json.dumps(
            {
                "layer": subspace.layer,
                "dim": subspace.dim,
                "provenance": {**subspace.provenance, **provenance},
                "curve": subspace.curve,
            },
            indent=1,
            sort_keys=True,
        ),
    )
    return weights
