"""RAVEL on the default model: which city attributes SmolLM2-135M knows, and how well DAS, HyperDAS
and the shipped SAE's features isolate one attribute from the others (Cause, Isolate, their mean).

Steps (all on the upstream entity split: train entities to fit, test entities to score):

1. **What the model knows.** Every (entity, template) of the chosen attributes, greedy next token
   against the first token of the entity's value. RAVEL keeps only examples the model gets right;
   so do we. An attribute below ``--min-accuracy`` is reported and dropped.
2. **Counterfactual pairs** (``data.ravel.counterfactual_pairs``) built from known examples only:
   half *cause* (the base asks the target attribute; the answer should become the source's
   value), half *isolate* (the base asks another attribute; its answer should stay).
3. **DAS** per target attribute: a ``--dim``-dimensional subspace at the SAE's layer, at the
   entity's last token (``stages.subspace.das.train_das``).
3b. **HyperDAS**: one hypernetwork for all target attributes at once, told each concept in words,
   choosing the positions itself (``stages.subspace.hyperdas``), on the same pairs.
4. **SAE features** per target attribute, as RAVEL does for SAEs: the ``--dim`` features whose
   activation at the entity's last token best tells the attribute's values apart on the train
   entities (one-way ANOVA F), their decoder rows orthonormalised into a subspace and interchanged
   the same way.
   Also RAVEL's own selection for SAEs: an L1-penalised linear probe on the latents
   ("SAE features (L1 probe)", ``stages.subspace.select_latents``).
4b. **SAE latents, learned mask**: the latents a binary mask selects when trained by interchange on
   the same pairs as DAS (``stages.subspace.sae_mask``; L1 weight ``--sae-mask-sparsity``), swapped as latents.
4c. **References**: the source's whole residual swapped in ("whole residual": the most Cause this
   layer and token allow) and every SAE latent swapped with the base's SAE error kept ("all SAE
   latents": what the latents can carry at all).
5. **Scores** on the test pairs: Cause = share of cause pairs whose greedy answer is the source's
   value's first token; Isolate = share of isolate pairs whose answer stays the base's; disentangle
   = their mean.

The work is ``anatomy_nb.stages.subspace.learn_subspace`` (notebook 06); this script runs it with
the options below into a scratch run directory and writes its table as JSON.

Usage::

    python benchmarks/ravel_das.py --out benchmarks/results/ravel-das-hyperdas-2026-11-30.json
    python benchmarks/ravel_das.py --scan-layers 0,3,6,9,12,15,18,21,24,27 --out ravel-layers.json  # the ceiling per
    layer
    python benchmarks/ravel_das.py --layer 9 --hyperdas-epochs 0 --no-sae-mask   # DAS at another layer (no SAE rows)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import anatomy_nb as anb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = anb.SubspaceConfig()  # the defaults are the config's (its one source)
    ap.add_argument("--attributes", default=",".join(d.attributes))
    ap.add_argument("--entities", type=int, default=d.entities, help="entities per split")
    ap.add_argument("--templates", type=int, default=d.templates, help="templates per attribute (drawn at random)")
    ap.add_argument("--dim", type=int, default=d.dim)
    ap.add_argument("--n-train", type=int, default=d.n_train)
    ap.add_argument("--n-test", type=int, default=d.n_test)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--min-accuracy", type=float, default=d.min_accuracy)
    ap.add_argument(
        "--source-known-fraction",
        type=float,
        default=d.source_known_fraction,
        help="a source must be answered right on at least this fraction of its target's templates (0: on one)",
    )
    ap.add_argument("--hyperdas-epochs", type=int, default=d.hyperdas_epochs, help="0: no HyperDAS")
    ap.add_argument("--hyperdas-width", type=int, default=d.hyperdas_width)
    ap.add_argument(
        "--hyperdas-positions",
        default=d.hyperdas_positions,
        choices=["learned", "entity"],
        help="entity: HyperDAS is given the entity's token (ablation)",
    )
    ap.add_argument("--no-das", action="store_true", help="skip DAS (HyperDAS and the SAE's features only)")
    ap.add_argument("--targets", default=None, help="comma-separated attributes to learn (default: every known one)")
    ap.add_argument("--no-sae-mask", action="store_true", help="skip the SAE latent mask learned by interchange")
    ap.add_argument("--sae-mask-sparsity", type=float, default=d.sae_mask_sparsity)
    ap.add_argument("--sae-mask-lr", type=float, default=d.sae_mask_lr)
    ap.add_argument(
        "--layer",
        type=int,
        default=None,
        help="residual layer (default: the SAE's); at another layer the SAE's rows are left out",
    )
    ap.add_argument(
        "--scan-layers",
        default=None,
        help="comma-separated layers: score only the whole-residual swap at each (no training), to choose --layer",
    )
    ap.add_argument("--run-dir", type=Path, default=None, help="keep the artifact here (default: a scratch directory)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = anb.SubspaceConfig(
        attributes=args.attributes.split(","),
        targets=args.targets.split(",") if args.targets else None,
        entities=args.entities,
        templates=args.templates,
        dim=args.dim,
        n_train=args.n_train,
        n_test=args.n_test,
        epochs=args.epochs,
        min_accuracy=args.min_accuracy,
        source_known_fraction=args.source_known_fraction,
        hyperdas=args.hyperdas_epochs > 0,
        hyperdas_epochs=max(args.hyperdas_epochs, 1),
        hyperdas_width=args.hyperdas_width,
        hyperdas_positions=args.hyperdas_positions,
        das=not args.no_das,
        sae_mask=not args.no_sae_mask,
        sae_mask_sparsity=args.sae_mask_sparsity,
        sae_mask_lr=args.sae_mask_lr,
        layer=args.layer,
    )
    t0 = time.time()
    if args.scan_layers:
        return scan_layers(cfg, [int(x) for x in args.scan_layers.split(",")], args.out, t0)
    with tempfile.TemporaryDirectory() as scratch:
        res = anb.learn_subspace(args.run_dir or scratch, cfg)
        table = res.table()
        m = res.manifest
        result = {
            "model": m["model"]["name"],
            "sae": (m["sae"] or {}).get("name"),
            "layer": m["layer"],
            "dim": cfg.dim,
            "entities_per_split": cfg.entities,
            "knowledge": m["knowledge"],
            "source_entities": m.get("source_entities"),
            "templates": m["templates"],
            "hyperdas": m.get("hyperdas"),
            "attributes": {},
        }
        for a, t in table.groupby("attribute", sort=False):
            by = t.set_index("method")
            result["attributes"][a] = {
                "model_accuracy": round(float(by["model_accuracy"].iloc[0]), 3),
                "n_train": int(by["n_train"].iloc[0]),
                "n_test": int(by["n_test"].iloc[0]),
                **{
                    name: {
                        k: (
                            round(float(by.at[method, k]), 3)
                            if k in ("cause", "isolate", "disentangle")
                            else int(by.at[method, k])
                        )
                        for k in ("cause", "isolate", "disentangle", "n_cause", "n_isolate")
                    }
                    for name, method in (
                        ("das", "DAS"),
                        ("hyperdas", "HyperDAS"),
                        ("sae_features", "SAE features"),
                        ("sae_probe", "SAE features (L1 probe)"),
                        ("sae_mask", "SAE latents (learned mask)"),
                        ("no_intervention", "no intervention"),
                        ("whole_residual", "whole residual"),
                        ("all_sae_latents", "all SAE latents"),
                    )
                    if method in by.index
                },
                "das_curve_last": res.curves().query("method == 'DAS' and attribute == @a").iloc[-1].to_dict()
                if "DAS" in by.index
                else None,
            }
            if "SAE features (L1 probe)" in by.index:
                result["attributes"][a]["sae_probe"]["n_latents"] = len(by.at["SAE features (L1 probe)", "features"])
            if "SAE latents (learned mask)" in by.index:
                result["attributes"][a]["sae_mask"]["n_latents"] = len(by.at["SAE latents (learned mask)", "features"])
            if "HyperDAS" in by.index:
                result["attributes"][a]["hyperdas"].update(
                    {
                        k: round(float(by.at["HyperDAS", k]), 3)
                        for k in (
                            "edits_entity_token",
                            "from_source_entity_token",
                            "edit_from_end",
                            "entity_from_end",
                            "subspace_coverage",
                        )
                    }
                )
        curves = res.curves()
        for a, c in curves[curves["method"] == "SAE latent mask"].groupby("attribute"):
            result["attributes"][a]["sae_mask"]["curve"] = {
                "first_8_loss": round(float(c["loss"].head(8).mean()), 3),
                "last_8_loss": round(float(c["loss"].tail(8).mean()), 3),
                "last_8_accuracy": round(float(c["accuracy"].tail(8).mean()), 3),
                "selected_at_step": {int(r.step): int(r.selected) for r in c.iloc[:: max(len(c) // 8, 1)].itertuples()},
                "steps": int(len(c)),
                "seconds": float(c["seconds"].iloc[-1]),
            }
        if (curves["method"] == "HyperDAS").any():
            h = curves[curves["method"] == "HyperDAS"]
            result["hyperdas_curve"] = {
                "first_20_loss": round(float(h["loss"].head(20).mean()), 3),
                "last_20_loss": round(float(h["loss"].tail(20).mean()), 3),
                "last_20_accuracy": round(float(h["accuracy"].tail(20).mean()), 3),
                "steps": int(len(h)),
                "seconds": float(h["seconds"].iloc[-1]),
            }
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1, default=float))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")


def scan_layers(cfg: anb.SubspaceConfig, layers: list[int], out: Path | None, t0: float) -> None:
    """The whole-residual ceiling per layer on the same test pairs (``whole_residual_by_layer``)."""
    from anatomy_nb.lm.models import load_model
    from anatomy_nb.stages.subspace import whole_residual_by_layer

    lm = load_model(cfg.model)
    table = whole_residual_by_layer(lm, cfg, layers, say=print)
    result = {
        "model": lm.name,
        "what": "whole residual swapped at the entity token, per layer",
        "n_layers": lm.n_layers,
        "entities_per_split": cfg.entities,
        "layers": {
            int(layer): {
                r.attribute: {k: round(float(getattr(r, k)), 3) for k in ("cause", "isolate", "disentangle")}
                | {"n_cause": int(r.n_cause), "n_isolate": int(r.n_isolate)}
                for r in t.itertuples()
            }
            for layer, t in table.groupby("layer")
        },
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
