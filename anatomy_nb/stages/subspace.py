"""Concept subspaces from counterfactual pairs: DAS and HyperDAS on RAVEL, scored beside the SAE's features.

``learn_subspace(run, config)`` is notebook 06's work, written into ``run_dir/subspace/<key>/``
with the stage protocol (content key → reuse → write → manifest last):

1. **What the model knows.** Every (entity, template) of the configured attributes on the
   upstream entity split: greedy next token against the first token of the entity's value.
   RAVEL keeps only examples the model gets right; so does this (``require_known``). An attribute
   below ``min_accuracy`` is reported and not learned; if none is left, that is an error.
2. **Counterfactual pairs** (``data.ravel.counterfactual_pairs``) from known examples, each
   source an entity whose target value the model knows (on some template asked): half
   *cause* (the base asks the target attribute; its answer should become the source's value),
   half *isolate* (the base asks another attribute; its answer should stay).
3. **DAS** per target attribute (``lm.das.train_das``) at the entity's last token.
3b. **HyperDAS** (``lm.hyperdas``; ``hyperdas=True`` and two or more targets): one hypernetwork
   trained on every target's pairs at once, each told its concept in words ("the country of the
   city"), choosing the base and source positions itself (``hyperdas_selection``); scored on the
   same test pairs, with where it chose to intervene.
4. **SAE features** per attribute: the ``dim`` features whose activation at the entity's last token
   best tells the attribute's values apart on the train entities, chosen two ways (``select_latents``):
   by one-way ANOVA F ("SAE features") and, as RAVEL does for SAEs, by an L1-penalised linear probe
   ("SAE features (L1 probe)"); their decoder rows orthonormalised and interchanged the same way.
4b. **SAE latents, learned mask** (``sae_mask=True``; ``lm.sae_mask``): the latents chosen under the
   same supervision as DAS, by a binary mask trained by interchange on the train pairs (RAVEL's
   differential binary masking, over the SAE's latents), swapped as latents (the SAE's error term
   stays the base's); how many it chose is in the row's ``features``.
5. **RAVEL's scores** on the test pairs for DAS, HyperDAS, the SAE features and no intervention: Cause
   (share of cause pairs answered with the source's value), Isolate (share of isolate pairs whose
   answer stays), their mean (disentangle). Two reference rows bound what any method can do at this
   layer and token: "whole residual" (the source's whole residual swapped in: the most Cause there is,
   with every other attribute carried along) and "all SAE latents" (every latent swapped, the SAE's
   error kept: what the latents can carry at all, the rest being in the error term).
   ``whole_residual_by_layer`` scores the first of them at every layer asked, without training: the
   layer to learn at is one where that ceiling is high. At a layer other than the SAE's
   (``SubspaceConfig.layer``) the SAE's rows are left out.

Each DAS subspace is saved as a concept (``<attribute>.safetensors`` + ``.json``; HyperDAS's principal
subspace as ``<attribute>-hyperdas``): stage 2 scores it and a plan steers or ablates with it.
The reader is ``results.subspace.SubspaceResult`` (no torch).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import f_oneway

from ..concepts.sources import orthonormal
from ..config import SubspaceConfig
from ..core.files import content_hash
from ..core.stage import terminal
from ..data.ravel import RavelData, counterfactual_pairs, load_ravel
from ..lm import hyperdas
from ..lm.das import (
    Example,
    answer_token,
    check_subspace_shape,
    entity_prompt,
    interchange_predictions,
    next_token_predictions,
    save_subspace,
    train_das,
)
from ..lm.models import LoadedModel, load_model
from ..lm.ops import ResidualCapture
from ..lm.sae_mask import latent_differences, latent_swap_predictions, train_latent_mask
from ..results.run import RunDir, RunLike
from ..results.subspace import SubspaceResult

__all__ = [
    "STAGE",
    "SubspaceConfig",
    "RavelSplits",
    "known_examples",
    "ravel_splits",
    "whole_residual_by_layer",
    "learn_subspace",
    "ravel_scores",
    "entity_latents",
    "select_latents",
    "SAE_SELECTIONS",
]

STAGE = "subspace"
# 2: the reference rows 'whole residual' and 'all SAE latents'; 3: sources only entities whose value the model knows
FORMAT = 3

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


def _hyperdas(
    lm: LoadedModel,
    layer: int,
    cfg: SubspaceConfig,
    splits: dict[str, tuple[list[Example], list[Example]]],
    usable: list[str],
    out: Any,
    accuracy: dict[str, float],
) -> tuple[Any, list[dict], dict[str, str]]:
    """One hypernetwork trained on every target's pairs at once (each told its concept in words),
    scored on the same test pairs as DAS; each target's principal subspace saved as a concept."""
    hd = hyperdas
    train = [(hd.concept_text(a, cfg.entity_type), e) for a, (tr, _) in splits.items() for e in tr]
    net = hd.train_hyperdas(
        lm,
        layer,
        cfg.dim,
        train,
        width=cfg.hyperdas_width,
        layers=cfg.hyperdas_layers,
        epochs=cfg.hyperdas_epochs,
        lr=cfg.hyperdas_lr,
        batch_size=cfg.batch_size,
        positions=cfg.hyperdas_positions,
        selection=cfg.hyperdas_selection,
        seed=cfg.seed,
    )
    rows, concepts = [], {}
    for a, (_train, test) in splits.items():
        text = hd.concept_text(a, cfg.entity_type)
        preds, where, per_example = hd.hyperdas_predictions(lm, net, text, test)
        sub = hd.hyperdas_subspace(
            net,
            text,
            per_example[[e.kind == "cause" for e in test]] if any(e.kind == "cause" for e in test) else per_example,
            attribute=a,
            entity_type=cfg.entity_type,
            queried=usable,
        )
        concepts[a] = save_subspace(sub, out / f"{a}-hyperdas").name
        rows.append(
            {
                "attribute": a,
                "method": "HyperDAS",
                **ravel_scores(preds, test),
                "model_accuracy": accuracy[a],
                "n_train": len(train),
                "n_test": len(test),
                "features": [],
                **where,
                "subspace_coverage": sub.provenance["coverage"],
            }
        )
    return net, rows, concepts


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
    at each depth (``learn_subspace``'s "whole residual" row, at every layer asked). RunDir it to choose
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


def learn_subspace(
    run: RunLike,
    config: SubspaceConfig | dict | None = None,
    *,
    lm: LoadedModel | None = None,
    sae: Any = None,
    force: bool = False,
) -> SubspaceResult:
    """DAS (and HyperDAS) subspaces for RAVEL attributes, scored beside the SAE's features (module docstring);
    reused when the same model, SAE and config were run before."""
    cfg = SubspaceConfig.from_dict(config)
    run = RunDir.of(run)
    say: Callable[[str], None] = (lambda s: terminal(f"[subspace] {s}")) if cfg.progress else (lambda s: None)
    lm = lm or load_model(cfg.model)
    if sae is None and cfg.sae:
        from ..lm.sae import load_sae

        sae = load_sae(cfg.sae, cfg.sae_id, device=str(lm.device))
    layer = cfg.layer if cfg.layer is not None else (sae.layer if sae is not None else None)
    if layer is None:
        raise ValueError("SubspaceConfig.layer is needed when no SAE gives one (sae=None)")
    check_subspace_shape(lm, layer, cfg.dim)  # before the knowledge filter, not after it
    key = content_hash(FORMAT, lm.fingerprint, getattr(sae, "fingerprint", None), layer, cfg.key_params())
    stage = run.stage(STAGE, key, FORMAT)
    if stage.reuse(force):
        return SubspaceResult(stage.path, stage.manifest(), reused=True)
    t0 = time.time()
    data = load_ravel(cfg.entity_type)
    splits = ravel_splits(lm, cfg, data, say)
    accuracy, usable, targets, known = splits.accuracy, splits.usable, splits.targets, splits.known
    sae_here = sae is not None and sae.layer == layer  # the SAE's rows only at its own layer
    if sae is not None and not sae_here:
        say(f"layer {layer} is not the SAE's ({sae.layer}): no SAE rows")
    if not cfg.das and not (cfg.sae_mask and sae_here) and len(targets) < 2:
        raise ValueError(
            "das=False leaves HyperDAS alone, and it needs two or more target attributes the model knows; targets: "
            f"{targets}"
        )
    out = stage.begin()
    rows, curves, cards, concepts = [], [], [], {}
    for a in targets:
        ta, first_row = time.time(), len(rows)
        train, test = splits.pairs[a]
        scored = {}
        if cfg.das:
            sub = train_das(
                lm, layer, cfg.dim, train, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed
            )
            concepts[a] = save_subspace(
                sub, out / a, attribute=a, entity_type=cfg.entity_type, queried=usable, n_train=len(train)
            ).name
            curves += [{"method": "DAS", "attribute": a, **c} for c in sub.curve]
            scored["DAS"] = sub.directions
        chosen: dict[str, list[int]] = {}
        if sae_here:
            latents = entity_latents(lm, sae, data, a, known["train"])
            for method, how in SAE_SELECTIONS.items():
                if top := select_latents(*latents, cfg.dim, how):
                    scored[method], chosen[method] = (
                        orthonormal(sae.decoder_directions[torch.as_tensor(top)].float()),
                        top,
                    )
        scored["no intervention"] = torch.zeros(1, lm.d_model)
        scored["whole residual"] = torch.eye(lm.d_model)  # the ceiling of this layer and token: every attribute moves

        def row(method: str, predictions: np.ndarray, features: list[int], a=a, train=train, test=test) -> dict:
            return {
                "attribute": a,
                "method": method,
                **ravel_scores(predictions, test),
                "model_accuracy": accuracy[a],
                "n_train": len(train),
                "n_test": len(test),
                "features": features,
            }

        rows += [
            row(method, interchange_predictions(lm, layer, b, test), chosen.get(method, []))
            for method, b in scored.items()
        ]
        if sae_here:  # swaps as latents: the test pairs' latent differences are read once for both rows
            test_differences = latent_differences(lm, sae, layer, test)
            # every latent swapped, the SAE's error kept: what the latents can carry at all
            rows.append(
                row(
                    "all SAE latents",
                    latent_swap_predictions(
                        lm, sae, layer, range(sae.decoder_directions.shape[0]), test, differences=test_differences
                    ),
                    [],
                )
            )
            if cfg.sae_mask:  # the latents chosen by interchange
                mask = train_latent_mask(
                    lm,
                    sae,
                    layer,
                    train,
                    epochs=cfg.epochs,
                    lr=cfg.sae_mask_lr,
                    batch_size=cfg.batch_size,
                    sparsity=cfg.sae_mask_sparsity,
                    seed=cfg.seed,
                )
                curves += [{"method": "SAE latent mask", "attribute": a, **c} for c in mask.curve]
                rows.append(
                    row(
                        "SAE latents (learned mask)",
                        latent_swap_predictions(lm, sae, layer, mask.features, test, differences=test_differences),
                        mask.features,
                    )
                )
        cards += [
            {
                "attribute": a,
                "split": s,
                **{
                    k: e.meta[k]
                    for k in (
                        "kind",
                        "queried",
                        "base_entity",
                        "base_template",
                        "source_entity",
                        "source_template",
                        "expected",
                        "base_answer",
                    )
                },
            }
            for s, ex in (("train", train), ("test", test))
            for e in ex[:6]
        ]
        say(
            f"{a}: "
            + "; ".join(f"{r['method']} cause {r['cause']:.2f} isolate {r['isolate']:.2f}" for r in rows[first_row:])
            + f" ({time.time() - ta:.0f} s)"
        )
    hyper, hyper_concepts = None, {}
    if cfg.hyperdas and len(targets) >= 2:
        th = time.time()
        hyper, hyper_rows, hyper_concepts = _hyperdas(lm, layer, cfg, splits.pairs, usable, out, accuracy)
        rows += hyper_rows
        curves += [{"method": "HyperDAS", "attribute": "+".join(targets), **c} for c in hyper.curve]
        say(
            "HyperDAS: "
            + "; ".join(f"{r['attribute']} cause {r['cause']:.2f} isolate {r['isolate']:.2f}" for r in hyper_rows)
            + f" ({time.time() - th:.0f} s)"
        )
    stage.write_parquet("ravel", pd.DataFrame(rows))
    stage.write_parquet("curves", pd.DataFrame(curves))
    stage.write_parquet("data_card", pd.DataFrame(cards))
    manifest = stage.finish(
        {
            "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "sae": None if sae is None else {"name": sae.name, "fingerprint": sae.fingerprint},
            "layer": layer,
            "config": cfg.to_dict(),
            "knowledge": {
                a: {
                    "right": splits.counts["train"][a][0],
                    "asked": splits.counts["train"][a][1],
                    "accuracy": accuracy[a],
                }
                for a in cfg.attributes
            },
            "attributes_used": usable,
            "source_entities": {a: {s: len(v) for s, v in by.items()} for a, by in splits.sources.items()},
            "targets": targets,
            "templates": splits.templates,
            "concepts": concepts,
            "hyperdas_concepts": hyper_concepts,
            "hyperdas": None
            if hyper is None
            else {k: v for k, v in hyper.provenance.items() if k not in ("model", "model_fingerprint")},
            "seconds": round(time.time() - t0, 2),
        }
    )
    say(f"done in {manifest['seconds']:.0f} s → {out}")
    return SubspaceResult(out, manifest)
