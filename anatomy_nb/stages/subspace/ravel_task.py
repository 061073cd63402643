"""RAVEL as a known-answer task for subspaces: which examples the model knows, the counterfactual
splits (train / test pairs, sources only entities whose value the model knows), RAVEL's scores and the
whole-residual ceiling per layer."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from ...config import SubspaceConfig
from ...data.ravel import RavelData, counterfactual_pairs, load_ravel
from ...lm.models import LoadedModel
from .das import (
    Example,
    answer_token,
    check_subspace_shape,
    entity_prompt,
    interchange_predictions,
    next_token_predictions,
)

__all__ = ["Known", "RavelSplits", "known_examples", "ravel_scores", "ravel_splits", "whole_residual_by_layer"]

Known = tuple[str, str, str, list, int, int]  # attribute, template, entity, token ids, entity position, answer token


def known_examples(
    lm: LoadedModel,
    data: RavelData,
    attributes: list[str],
    entities: list[str],
    templates: dict[str, list[str]],
    require_known: bool = True,
) -> tuple[list[Known], dict[str, tuple[int, int]]]:
    """The (attribute, template, entity, ids, position, answer) the model gets right (all of them
    when not ``require_known``), and per attribute (answered right, asked)."""
    rows, prompts = [], []
    for a in attributes:
        for t in templates[a]:
            for e in entities:
                v = data.entities[e].get(a)
                if not v:
                    continue
                try:
                    ids, pos = entity_prompt(lm.tokenizer, t, e)
                    ans = answer_token(lm.tokenizer, t % e, v)
                except ValueError:
                    continue  # the entity merges with the template's next character: no clean position
                rows.append((a, t, e, ids, pos, ans))
                prompts.append(ids)
    right = (
        next_token_predictions(lm, prompts) == np.asarray([r[5] for r in rows], dtype=np.int64)
        if rows
        else np.zeros(0, bool)
    )
    counts = {
        a: (int(sum(ok for r, ok in zip(rows, right) if r[0] == a)), sum(r[0] == a for r in rows)) for a in attributes
    }
    kept = [r for r, ok in zip(rows, right) if ok or not require_known]
    return kept, counts


def _to_examples(lm: LoadedModel, pairs: list[dict], known: set[tuple[str, str, str]]) -> list[Example]:
    out = []
    for p in pairs:
        if (p["queried"], p["base_template"], p["base_entity"]) not in known:
            continue
        try:
            b_ids, b_pos = entity_prompt(lm.tokenizer, p["base_template"], p["base_entity"])
            s_ids, s_pos = entity_prompt(lm.tokenizer, p["source_template"], p["source_entity"])
            base_prompt = p["base_template"] % p["base_entity"]
            ans = answer_token(lm.tokenizer, base_prompt, p["expected"])
            base_ans = answer_token(lm.tokenizer, base_prompt, p["base_answer"])
        except ValueError:
            continue
        out.append(Example(b_ids, b_pos, s_ids, s_pos, ans, p["kind"], {**p, "base_answer_token": base_ans}))
    return out


def ravel_scores(predictions: np.ndarray, examples: list[Example]) -> dict[str, float]:
    """RAVEL's Cause, Isolate and their mean (disentangle) from the interchanged answers."""
    cause = [p == e.answer for p, e in zip(predictions, examples) if e.kind == "cause"]
    iso = [p == e.answer for p, e in zip(predictions, examples) if e.kind == "isolate"]
    c = float(np.mean(cause)) if cause else float("nan")
    i = float(np.mean(iso)) if iso else float("nan")
    return {"cause": c, "isolate": i, "disentangle": (c + i) / 2, "n_cause": len(cause), "n_isolate": len(iso)}


@dataclass
class RavelSplits:
    """The RAVEL examples one config draws: what the model knows on each entity split and the
    counterfactual (train, test) pairs per target. One builder, so that every table scored from a
    config (``learn_subspace``, ``whole_residual_by_layer``) scores the same pairs."""

    templates: dict[str, list[str]]
    known: dict[str, list[Known]]
    counts: dict[str, dict[str, tuple[int, int]]]
    accuracy: dict[str, float]
    usable: list[str]
    targets: list[str]
    pairs: dict[str, tuple[list[Example], list[Example]]]
    # per target and split: the entities whose value the model knows, the only sources
    sources: dict[str, dict[str, list[str]]]


def ravel_splits(
    lm: LoadedModel, cfg: SubspaceConfig, data: RavelData, say: Callable[[str], None] = lambda s: None
) -> RavelSplits:
    """Entities and templates drawn by ``cfg.seed``, the examples ``lm`` answers right, and the
    counterfactual pairs of each target built from them; an error when too little is known."""
    unknown = [a for a in cfg.attributes if a not in data.templates]
    if unknown:
        raise ValueError(
            f"SubspaceConfig.attributes: RAVEL {cfg.entity_type} has no attribute(s) {unknown}; attributes: "
            f"{data.attributes}"
        )
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    ents = {
        s: sorted(rng.choice(data.entities_in(s), min(cfg.entities, len(data.entities_in(s))), replace=False).tolist())
        for s in ("train", "test")
    }
    templates = {
        a: sorted(rng.choice(data.templates[a], min(cfg.templates, len(data.templates[a])), replace=False).tolist())
        for a in cfg.attributes
    }
    known, counts = {}, {}
    for s in ("train", "test"):
        known[s], counts[s] = known_examples(lm, data, list(cfg.attributes), ents[s], templates, cfg.require_known)
    accuracy = {a: counts["train"][a][0] / max(counts["train"][a][1], 1) for a in cfg.attributes}
    say(
        "what the model knows (train entities): "
        + ", ".join(f"{a} {v:.2f}" for a, v in accuracy.items())
        + f" ({time.time() - t0:.0f} s)"
    )
    usable = [a for a in cfg.attributes if accuracy[a] >= cfg.min_accuracy or not cfg.require_known]
    targets = [a for a in (cfg.targets or cfg.attributes) if a in usable]
    if not targets or len(usable) < 2:
        raise ValueError(
            f"{lm.name} gets too few RAVEL {cfg.entity_type} attributes right to learn from (accuracy on the train "
            "entities: "
            + ", ".join(f"{a} {v:.2f}" for a, v in accuracy.items())
            + (
                f"; needed: ≥ {cfg.min_accuracy} for the target and one more attribute). Choose attributes it "
                "knows, or a larger model."
            )
        )
    known_set = {s: {(a, t, e) for a, t, e, *_ in known[s]} for s in known}
    asked = replace(data, templates={a: templates[a] for a in usable})  # pairs use the templates asked
    # a source is an entity whose target value the model knows (on at least one template asked, or
    # on source_known_fraction of them): one it does not know has no value to give, and Cause would
    # measure the model's accuracy, not the method
    needed = {a: max(1, math.ceil(cfg.source_known_fraction * len(templates[a]) - 1e-9)) for a in targets}
    sources = {
        a: {
            s: sorted(e for e, k in Counter(e for b, _, e, *_ in known[s] if b == a).items() if k >= needed[a])
            for s in known
        }
        for a in targets
    }
    pairs = {}
    for a in targets:
        if not sources[a]["train"] or not sources[a]["test"]:
            raise ValueError(
                f"RAVEL {cfg.entity_type} / {a}: no entity whose {a} {lm.name} knows to take a source from (train "
                f"{len(sources[a]['train'])}, test {len(sources[a]['test'])}; right on at least {needed[a]} of "
                f"{len(templates[a])} templates); raise entities or templates, or lower source_known_fraction"
            )
        train = _to_examples(
            lm,
            counterfactual_pairs(
                asked, a, usable, ents["train"], 10 * cfg.n_train, seed=cfg.seed + 1, sources=sources[a]["train"]
            ),
            known_set["train"],
        )[: cfg.n_train]
        test = _to_examples(
            lm,
            counterfactual_pairs(
                asked, a, usable, ents["test"], 10 * cfg.n_test, seed=cfg.seed + 2, sources=sources[a]["test"]
            ),
            known_set["test"],
        )[: cfg.n_test]
        if not train or not test:
            raise ValueError(
                f"RAVEL {cfg.entity_type} / {a}: no counterfactual pairs among the examples {lm.name} answers right "
                f"(train {len(train)}, test {len(test)}); raise entities or templates"
            )
        pairs[a] = (train, test)
    return RavelSplits(templates, known, counts, accuracy, usable, targets, pairs, sources)


def whole_residual_by_layer(
    lm: LoadedModel,
    config: SubspaceConfig | dict | None,
    layers: list[int],
    say: Callable[[str], None] = lambda s: None,
) -> pd.DataFrame:
    """RAVEL's Cause and Isolate of swapping the source's whole residual at the entity token, layer by
    layer, on ``config``'s test pairs: the most any method editing that token can move an attribute
    at each depth (``learn_subspace``'s "whole residual" row, at every layer asked). Run it to choose
    the layer before training DAS there: where even this ceiling is low, no subspace can do better."""
    cfg = SubspaceConfig.from_dict(config)
    for layer in layers:  # before the knowledge filter, not after it
        check_subspace_shape(lm, layer, 1)
    splits = ravel_splits(lm, cfg, load_ravel(cfg.entity_type), say)
    eye, rows = torch.eye(lm.d_model), []
    for layer in layers:
        for a, (_, test) in splits.pairs.items():
            rows.append(
                {
                    "layer": layer,
                    "attribute": a,
                    **ravel_scores(interchange_predictions(lm, layer, eye, test), test),
                    "model_accuracy": splits.accuracy[a],
                    "n_test": len(test),
                }
            )
        say(
            f"layer {layer}: "
            + "; ".join(
                f"{r['attribute']} cause {r['cause']:.2f} isolate {r['isolate']:.2f}"
                for r in rows[-len(splits.pairs) :]
            )
        )
    return pd.DataFrame(rows)
