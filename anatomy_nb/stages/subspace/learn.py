"""The subspace stage's run: concept subspaces from counterfactual pairs (DAS and HyperDAS on RAVEL),
scored beside the SAE's features.

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
3. **DAS** per target attribute (``das.train_das``) at the entity's last token.
3b. **HyperDAS** (``hyperdas``; ``hyperdas=True`` and two or more targets): one hypernetwork
   trained on every target's pairs at once, each told its concept in words ("the country of the
   city"), choosing the base and source positions itself (``hyperdas_selection``); scored on the
   same test pairs, with where it chose to intervene.
4. **SAE features** per attribute: the ``dim`` features whose activation at the entity's last token
   best tells the attribute's values apart on the train entities, chosen two ways (``select_latents``):
   by one-way ANOVA F ("SAE features") and, as RAVEL does for SAEs, by an L1-penalised linear probe
   ("SAE features (L1 probe)"); their decoder rows orthonormalised and interchanged the same way.
4b. **SAE latents, learned mask** (``sae_mask=True``; ``sae_mask``): the latents chosen under the
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

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from ...concepts.sources import orthonormal
from ...config import SubspaceConfig
from ...core.files import content_hash
from ...core.stage import terminal
from ...data.ravel import load_ravel
from ...lm.models import LoadedModel, load_model
from ...results.run import RunDir, RunLike
from ...results.subspace import FORMAT, SubspaceResult
from . import hyperdas
from .das import (
    Example,
    check_subspace_shape,
    interchange_predictions,
    save_subspace,
    train_das,
)
from .latents import SAE_SELECTIONS, entity_latents, select_latents
from .ravel_task import ravel_scores, ravel_splits
from .sae_mask import latent_differences, latent_swap_predictions, train_latent_mask

__all__ = ["STAGE", "learn_subspace"]

STAGE = "subspace"


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
        from ...lm.sae import load_sae

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
