"""A known-answer task for concept-subspace learners (DAS, HyperDAS): RAVEL in miniature, with the
truth planted.

A tiny Llama is trained, in seconds, on prompts ``filler… MARKER ENTITY filler… QUERY`` whose answer
is one of two attributes of the entity (``QUERY`` asks which): the entity sits 1–5 tokens before the
end, marked only by the token before it, and two other entities stand among the filler, so the model
(and a learner) must use the marker: the model reads the marked entity after its first layer, where
the interchange happens (``layer`` 0). Each entity's embedding is *planted* and frozen: attribute A's
value is written in one 2-dimensional subspace of the residual stream and attribute B's in another,
orthogonal one (k / d = 2 / 64 ≈ 0.03, RAVEL's 16 of 576), so the model has to read its answers from
there. The counterfactual pairs are RAVEL's, with answers by construction (not by the model):

- *cause* (concept A): the base asks A of entity e₁; the source holds another entity e₂; the answer is
  A(e₂), kept where A(e₂) ≠ A(e₁);
- *isolate* (concept A): the base asks B of e₁, the source holds e₂; the answer stays B(e₁), kept where
  B(e₂) ≠ B(e₁) (an edit that carries B along shows).

A learner told only the concept's name ("attribute A") must find the entity token (nothing but content
marks it) and the subspace; DAS given the entity's position is the reference. Only examples the trained
model answers right without an intervention are kept, as RAVEL keeps what the model knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...lm.models import LoadedModel, tiny_llama
from .das import Example, last_logits, pad_id, padded

__all__ = ["CONCEPTS", "PlantedTask", "planted_task", "train_planted_model"]

#: the two concepts, by the words a learner is told
CONCEPTS = ("attribute A", "attribute B")
MARKER, QUERY = 4, {"attribute A": 5, "attribute B": 6}
VALUES = {"attribute A": list(range(7, 11)), "attribute B": list(range(11, 15))}  # four answer tokens each
ENTITIES = list(range(20, 52))
FILLER = (60, 470)


@dataclass
class PlantedTask:
    """The trained model, its examples per concept and split, the planted subspaces and the layer."""

    lm: LoadedModel
    train: dict[str, list[Example]]
    test: dict[str, list[Example]]
    planted: dict[str, torch.Tensor]  # concept → (2, d) orthonormal rows
    layer: int
    attributes: dict[str, np.ndarray]  # concept → value index per entity
    model_accuracy: float

    def mixed_train(self) -> list[tuple[str, Example]]:
        """Every concept's training examples as (concept name, example): HyperDAS's input."""
        return [(c, e) for c, examples in self.train.items() for e in examples]


def _prompt(rng: np.random.Generator, entity: int, concept: str, offsets: tuple[int, ...]) -> tuple[list[int], int]:
    """``filler… MARKER entity filler… QUERY`` with two other entities among the filler (so the
    marker, not the kind of token, says which one is asked about): (ids, the entity's position), the
    entity ``offset`` tokens before the end."""
    before = rng.integers(*FILLER, int(rng.integers(2, 7))).tolist()
    after = rng.integers(*FILLER, int(rng.choice(offsets)) - 1).tolist()
    others = [e for e in rng.choice(ENTITIES, 3, replace=False).tolist() if e != entity][:2]
    slots = [*(("b", i) for i in range(len(before))), *(("a", i) for i in range(len(after)))]
    for e, k in zip(others, rng.permutation(len(slots))[:2]):
        where, i = slots[k]
        (before if where == "b" else after)[i] = e
    ids = [*before, MARKER, entity, *after, QUERY[concept]]
    return ids, len(before) + 1


def train_planted_model(
    seed: int = 0, d_model: int = 64, n_layers: int = 4, steps: int = 600, offsets: tuple[int, ...] = (1, 2, 3, 4, 5)
) -> tuple[LoadedModel, dict[str, torch.Tensor], dict[str, np.ndarray], float]:
    """A tiny Llama trained to answer either attribute of the marked entity, entity embeddings planted
    (each attribute's four values at the corners of a square in its own 2-dim subspace) and frozen.
    Returns (model, planted subspaces, attribute values per entity, accuracy on fresh prompts)."""
    lm = tiny_llama(seed=seed, n_layers=n_layers, d_model=d_model)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_model, 4, generator=gen))[0].T
    planted = {"attribute A": basis[:2], "attribute B": basis[2:]}
    attributes = {c: rng.permutation(np.arange(len(ENTITIES)) % 4) for c in CONCEPTS}
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    emb = lm.model.get_input_embeddings().weight
    with torch.no_grad():
        scale = 2.0 * float(emb.norm(dim=1).mean())
        for i, e in enumerate(ENTITIES):
            emb[e] = scale * sum(corners[attributes[c][i]] @ planted[c] for c in CONCEPTS) / np.sqrt(2) / 2
    frozen_rows = torch.tensor(ENTITIES)
    model = lm.model
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs, answers = [], []
        for _ in range(n):
            c = CONCEPTS[int(rng.integers(2))]
            i = int(rng.integers(len(ENTITIES)))
            ids, _ = _prompt(rng, ENTITIES[i], c, offsets)
            seqs.append(ids)
            answers.append(VALUES[c][attributes[c][i]])
        ids, mask = padded(seqs, pad_id(lm))
        return ids, mask, torch.tensor(answers)

    for _ in range(steps):
        ids, mask, answers = batch(64)
        loss = torch.nn.functional.cross_entropy(last_logits(lm, ids, mask), answers)
        opt.zero_grad()
        loss.backward()
        emb.grad[frozen_rows] = 0  # the planted codes stay where they were planted
        opt.step()
    model.eval()
    with torch.no_grad():
        ids, mask, answers = batch(512)
        accuracy = float((last_logits(lm, ids, mask).argmax(-1) == answers).float().mean())
    return lm, planted, attributes, accuracy


def planted_task(
    seed: int = 0, layer: int = 0, n_train: int = 400, n_test: int = 200, offsets: tuple[int, ...] = (1, 2, 3, 4, 5)
) -> PlantedTask:
    """The trained model and, per concept, ``n_train`` / ``n_test`` examples (half cause, half
    isolate) that the model answers right without an intervention."""
    lm, planted, attributes, accuracy = train_planted_model(seed, offsets=offsets)
    rng = np.random.default_rng(seed + 1)

    def examples(concept: str, n: int) -> list[Example]:
        other = next(c for c in CONCEPTS if c != concept)
        out: list[Example] = []
        while len(out) < n:
            i, j = (int(x) for x in rng.choice(len(ENTITIES), 2, replace=False))
            kind = "cause" if len(out) % 2 == 0 else "isolate"
            asked = concept if kind == "cause" else other
            if attributes[asked][i] == attributes[asked][j]:
                continue  # the answer would not tell an edit from no edit
            base, eb = _prompt(rng, ENTITIES[i], asked, offsets)
            source, es = _prompt(rng, ENTITIES[j], CONCEPTS[int(rng.integers(2))], offsets)
            answer = VALUES[asked][attributes[asked][j] if kind == "cause" else attributes[asked][i]]
            out.append(
                Example(base, eb, source, es, answer, kind, {"asks": asked, "own": VALUES[asked][attributes[asked][i]]})
            )
        return out

    def known(ex: list[Example]) -> list[Example]:
        with torch.no_grad():
            ids, mask = padded([e.base_ids for e in ex], pad_id(lm))
            own = last_logits(lm, ids, mask).argmax(-1).numpy()
        return [e for e, o in zip(ex, own) if o == e.meta["own"]]

    train = {c: known(examples(c, n_train)) for c in CONCEPTS}
    test = {c: known(examples(c, n_test)) for c in CONCEPTS}
    return PlantedTask(lm, train, test, planted, layer, attributes, accuracy)
