"""RAVEL on the default model: which city attributes SmolLM2-135M knows, and how well DAS and the
shipped SAE's features isolate one attribute from the others (Cause, Isolate, their mean).

Steps (all on the upstream entity split: train entities to fit, test entities to score):

1. **What the model knows.** Every (entity, template) of the chosen attributes, greedy next token
   against the first token of the entity's value. RAVEL keeps only examples the model gets right;
   so do we. An attribute below ``--min-accuracy`` is reported and dropped.
2. **Counterfactual pairs** (``data.ravel.counterfactual_pairs``) built from known examples only:
   half *cause* (the base asks the target attribute; the answer should become the source's
   value), half *isolate* (the base asks another attribute; its answer should stay).
3. **DAS** per target attribute: a ``--dim``-dimensional subspace at the SAE's layer, at the
   entity's last token (``lm.das.train_das``).
4. **SAE features** per target attribute, as RAVEL does for SAEs: the ``--dim`` features whose
   activation at the entity's last token best tells the attribute's values apart on the train
   entities (one-way ANOVA F), their decoder rows orthonormalised into a subspace and interchanged
   the same way.
5. **Scores** on the test pairs: Cause = share of cause pairs whose greedy answer is the source's
   value's first token; Isolate = share of isolate pairs whose answer stays the base's; disentangle
   = their mean.

Usage::

    python benchmarks/ravel_das.py --out benchmarks/results/ravel-das-2026-11-29.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import f_oneway

from anatomy_nb.concepts.sources import orthonormal
from anatomy_nb.data.ravel import counterfactual_pairs, load_ravel
from anatomy_nb.lm.das import Example, answer_token, entity_prompt, interchange_predictions, next_token_predictions, train_das
from anatomy_nb.lm.models import load_model
from anatomy_nb.lm.ops import ResidualCapture
from anatomy_nb.lm.sae import DEFAULT_SAE, load_sae


def known_examples(lm, data, attributes, entities, templates):
    """The (attribute, template, entity, ids, position, answer) the model gets right: its greedy next
    token is the value's first token. Also returns how many were asked."""
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
    pred = next_token_predictions(lm, prompts)
    return [(a, t, e, ids, pos, ans) for (a, t, e, ids, pos, ans), p in zip(rows, pred) if p == ans], len(rows)


def to_examples(lm, pairs, known_set):
    out = []
    for p in pairs:
        if (p["queried"], p["base_template"], p["base_entity"]) not in known_set:
            continue
        try:
            b_ids, b_pos = entity_prompt(lm.tokenizer, p["base_template"], p["base_entity"])
            s_ids, s_pos = entity_prompt(lm.tokenizer, p["source_template"], p["source_entity"])
            ans = answer_token(lm.tokenizer, p["base_template"] % p["base_entity"], p["expected"])
        except ValueError:
            continue
        out.append(Example(b_ids, b_pos, s_ids, s_pos, ans, p["kind"], {"base_answer": answer_token(lm.tokenizer, p["base_template"] % p["base_entity"], p["base_answer"])}))
    return out


def scores(pred, examples):
    cause = [p == e.answer for p, e in zip(pred, examples) if e.kind == "cause"]
    iso = [p == e.answer for p, e in zip(pred, examples) if e.kind == "isolate"]
    c, i = float(np.mean(cause)) if cause else float("nan"), float(np.mean(iso)) if iso else float("nan")
    return {"cause": round(c, 3), "isolate": round(i, 3), "disentangle": round((c + i) / 2, 3), "n_cause": len(cause), "n_isolate": len(iso)}


@torch.no_grad()
def sae_subspace(lm, sae, data, attribute, known, dim):
    """The ``dim`` SAE features whose activation at the entity token best separates the attribute's values."""
    items = [(e, ids, pos) for a, t, e, ids, pos, _ in known if a == attribute]
    acts, values = [], []
    with ResidualCapture(lm, sae.layer) as cap:
        for e, ids, pos in items[:600]:
            h = cap(torch.tensor([ids]))[0, pos]
            acts.append(sae.encode(h[None].to(lm.device)).float()[0].cpu().numpy())
            values.append(data.entities[e][attribute])
    A, values = np.array(acts), np.array(values)
    common = [v for v, n in zip(*np.unique(values, return_counts=True)) if n >= 2]
    groups = [A[values == v] for v in common]
    if len(groups) < 2:
        return None, []  # too few known entities share a value to rank features
    live = A.std(0) > 0
    F = np.zeros(A.shape[1])
    F[live] = np.nan_to_num(f_oneway(*[g[:, live] for g in groups]).statistic)
    top = np.argsort(-F)[:dim]
    return orthonormal(sae.decoder_directions[torch.as_tensor(top)].float()), top.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attributes", default="Country,Continent,Language")
    ap.add_argument("--entities", type=int, default=150, help="entities per split")
    ap.add_argument("--templates", type=int, default=8, help="templates per attribute (drawn at random)")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--min-accuracy", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    lm, sae = load_model(), load_sae(DEFAULT_SAE)
    data = load_ravel("city")
    attrs = args.attributes.split(",")
    rng = np.random.default_rng(0)
    ents = {s: sorted(rng.choice(data.entities_in(s), args.entities, replace=False).tolist()) for s in ("train", "test")}
    result = {"model": lm.name, "sae": sae.name, "layer": sae.layer, "dim": args.dim, "entities_per_split": args.entities, "attributes": {}}
    templates = {a: sorted(rng.choice(data.templates[a], min(args.templates, len(data.templates[a])), replace=False).tolist()) for a in attrs}
    known, n_all = {}, {}
    for s in ("train", "test"):
        known[s], n_all[s] = known_examples(lm, data, attrs, ents[s], templates)
    for a in attrs:
        k = sum(x[0] == a for x in known["train"])
        n = sum(1 for t in templates[a] for e in ents["train"] if data.entities[e].get(a))
        result["attributes"][a] = {"model_accuracy": round(k / max(n, 1), 3), "known_train_examples": k, "templates": templates[a]}
    print("model accuracy:", {a: v["model_accuracy"] for a, v in result["attributes"].items()}, f"({time.time() - t0:.0f} s)", flush=True)
    kept = [a for a in attrs if result["attributes"][a]["model_accuracy"] >= args.min_accuracy]
    if len(kept) < 2:
        raise SystemExit(f"fewer than two attributes the model knows at ≥ {args.min_accuracy}: {result['attributes']}")
    known_set = {s: {(a, t, e) for a, t, e, *_ in known[s]} for s in known}
    asked = replace(data, templates={a: templates[a] for a in kept})  # pairs use the templates asked
    for a in kept:
        ta = time.time()
        train = to_examples(lm, counterfactual_pairs(asked, a, kept, ents["train"], 10 * args.n_train, seed=1), known_set["train"])[: args.n_train]
        test = to_examples(lm, counterfactual_pairs(asked, a, kept, ents["test"], 10 * args.n_test, seed=2), known_set["test"])[: args.n_test]
        sub = train_das(lm, sae.layer, args.dim, train, epochs=args.epochs, lr=5e-3, batch_size=16)
        das = scores(interchange_predictions(lm, sae.layer, sub.directions, test), test)
        basis, feats = sae_subspace(lm, sae, data, a, known["train"], args.dim)
        sae_scores = scores(interchange_predictions(lm, sae.layer, basis, test), test) if basis is not None else {}
        none = scores(interchange_predictions(lm, sae.layer, torch.zeros(1, lm.d_model), test), test)
        result["attributes"][a].update({"n_train": len(train), "n_test": len(test), "das": das, "sae_features": {**sae_scores, "features": feats}, "no_intervention": none, "das_curve_last": sub.curve[-1], "seconds": round(time.time() - ta, 1)})
        print(a, {"das": das, "sae": sae_scores, "none": none}, f"{time.time() - ta:.0f} s", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
