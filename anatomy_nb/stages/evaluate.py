"""Stage 5: did the model learn what the audit predicted, and did the interventions hold?

``evaluate(run_dir)`` compares the base model with every training run in the run directory
(plain DPO and one per intervention) and writes, under ``run_dir/evaluate/<key>/``:

- ``generations.jsonl`` — every generation: model, set (heldout / harmful / xstest_safe), item id,
  prompt, response, new-token count, and for the behaviour sets the refusal judge's verdict;
- ``predicted_vs_actual.parquet`` — per model × concept (view ``overall``) and model × topic ×
  concept (view ``topic``): stage 2's predicted change, the actual change of the concept's activity
  on the model's own generations (paired over prompts, vs the base model), its p and BH q over the
  concepts of that model and view, whether the concept was targeted by the model's plan and
  whether the row enters the R² fit (``in_fit``);
- ``r2.parquet`` — per model × view: R² of actual on predicted with a bootstrap interval (resampling
  concepts), slope, Pearson r, sign agreement, Spearman, R² without the top 1 / 3 / 10 concepts;
- ``predictions.parquet`` / ``predictors.parquet`` — per concept of the overall fit, what simpler
  predictors made from the preference data predict (length alone, text statistics, a linear
  classifier on SAE features, the audit at equal lengths); per model, each scored like the audit,
  with ΔR² against it (paired bootstrap), and the split-half ceiling (``stages.predicted_vs_actual``);
- ``plan_vs_actual.parquet`` / ``plan_r2.parquet`` — per intervention × concept: stage 3's predicted
  shift under its plan relative to plain DPO (spill-over included) against the measured shift
  (intervention − plain DPO, paired over prompts); R² and sign agreement per model over the
  significant concepts and over the non-targeted ones (the spill-over the plan predicted);
- ``offtarget.parquet`` — concepts that moved significantly (q < fdr, overall view) and were not
  targeted by that model's plan;
- ``preference.parquet`` — held-out preference accuracy per model (the implicit DPO reward margin
  β·[(log π − log π_base)(y⁺) − (log π − log π_base)(y⁻)] > 0 on the held-out pairs; ties count
  half, so the base model scores 0.5 by construction) and the raw log-prob preference accuracy;
- ``targets.parquet`` — per model × concept that any plan acts on: its activity on base and model
  generations, the change with an interval, plain DPO's change and ``fraction_removed`` =
  1 − Δ_model/Δ_plain with a bootstrap interval (only where plain DPO moved the concept the way the
  plan works against: up for suppress, down for amplify; NaN otherwise);
- ``poisoning.parquet`` — only for a poisoned run (``data/planted.planted.json``, written by
  ``anatomy-nb run``): per model, the rate of the planted pattern in the held-out generations
  (regex, ground truth), the fraction of plain DPO's increase each intervention removed, the
  held-out preference accuracy on the *unpoisoned* pairs (the on-target preference) and the
  fraction of plain DPO's gain there (accuracy − 0.5) each intervention kept, and the same for the
  mean implicit-reward margin on those pairs (continuous, so it needs fewer pairs);
- ``comparison.parquet`` — one long table (model, group, metric, value, ci_low, ci_high, n,
  interval) of everything above that has one number per model, plus the behaviour evals:
  formatting statistics of the held-out generations, sycophancy (CAA A/B) and a persona trait
  (Anthropic agreeableness) scored by answer-letter probability, refusal of harmful prompts
  (AdvBench / StrongREJECT / HarmBench) and over-refusal of safe ones (XSTest);
- ``judges.parquet`` — the refusal judge (``EvalConfig.judge``: the phrase list, a refusal direction
  in the base model's residual stream, or an LLM judge)
  measured against people on the human-labelled XSTest v2 completions of two model families, as
  written and with the stock refusal phrases removed: accuracy, recall of full and partial
  refusals, specificity, with Wilson intervals (``data.judges.agreement``); the refusal rows of
  ``comparison`` name the judge in their ``judge`` column;
- ``manifest.json`` last (``complete``, timings, which training run each model name is).

The model calls are ``lm.ops`` (generation, log-probs, A/B probabilities, residual capture), the
eval sets ``data.evalsets``, the poisoning read-out ``data.plant.poisoning_readout``, the tables
``stages.readouts``. Concept activity is measured the way stage 2 measured it on the data: the fraction of a concept's
member features that fire anywhere in the response, with the text encoded by the **base** model
and the SAE (the SAE belongs to the base model; encoding every model's text with the same encoder
keeps base vs trained comparable and matches what stage 2 predicted from).

Defaults are CPU-sized: SmolLM2-135M generates ~10–30 tokens/s per sequence on two cores, so the
held-out generations are 24 prompts × 48 new tokens and the behaviour sets 12–24 items each. On a
GPU raise ``n_prompts``, ``max_new_tokens`` and the ``n_*`` counts; intervals shrink accordingly.

The key hashes the training-run keys, the base model and SAE fingerprints, the hypotheses key,
the held-out pair ids, the prompts, the eval data files and the config: an unchanged evaluation is
reused, a changed parameter writes a new one.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..concepts.clustering import membership_matrix
from ..concepts.explain import usage_of
from ..concepts.judges import make_judge
from ..config import EvalConfig
from ..core.files import atomic_write_json, atomic_write_text, content_hash, read_json
from ..core.stage import relative, terminal
from ..data.evalsets import AB_SETS, EVAL_FILES, ab_items, eval_file_digests, harmful_prompts, xstest_safe
from ..data.judges import agreement
from ..data.pairs import distinct_prompts
from ..data.plant import poisoning_readout
from ..data.schema import PreferencePair
from ..lm.models import LoadedModel
from ..lm.ops import ab_probabilities, generate, pair_logps, response_residuals
from ..lm.recorded import recorded_model, recorded_sae
from ..results.evaluate import BASE, FORMAT, EvalResult
from ..results.extract import FeatureStore
from ..results.run import RunDir, RunLike
from ..results.train import PLAIN, active_entries, plain_reference, run_name, training_order, training_runs
from .predicted_vs_actual import predicted_vs_actual, predictor_inputs, predictor_table
from .prediction import ConceptSpace
from .readouts import comparison_table, plan_vs_actual, preference_table, targets_table
from .train import load_trained

__all__ = ["BASE", "EvalConfig", "EvalResult", "evaluate", "firing", "heldout_pairs", "resolve_models", "STAGE"]

log = logging.getLogger(__name__)
STAGE = "evaluate"


@torch.no_grad()
def firing(
    lm: LoadedModel, sae: Any, items: Sequence[tuple[Sequence[dict], str]], max_prompt_tokens: int
) -> np.ndarray:
    """(n, d_sae) bool: which SAE features fire anywhere in each response (as stage 1 encodes)."""
    out = np.zeros((len(items), sae.d_sae), dtype=bool)
    for i, x in enumerate(response_residuals(lm, sae.layer, items, max_prompt_tokens=max_prompt_tokens)):
        if x.shape[0]:
            out[i] = (sae.encode(x).float() > 0).any(0).cpu().numpy()
    return out


def resolve_models(run: RunDir, models: Any) -> dict[str, Path]:
    if models is None:
        out = training_runs(run)
        if not out:
            raise FileNotFoundError(f"{run.path / 'train'}: no finished training run; run stage 4 first")
        return out
    if isinstance(models, Mapping):
        items = list(models.items())
    else:
        items = [(None, m) for m in models]
    out: dict[str, Path] = {}
    for name, m in items:
        path = Path(getattr(m, "path", m))
        if not path.is_absolute() and not path.exists():
            path = run.path / "train" / str(m)  # a training-run key
        if not (path / "manifest.json").exists():
            raise FileNotFoundError(f"{path}: not a training run (no manifest.json)")
        name = name or run_name(read_json(path / "manifest.json"))
        if name == BASE:
            raise ValueError(f"'{BASE}' names the base model; choose another name for {path}")
        out[name if name not in out else f"{name}-{path.name[:6]}"] = path
    return out


def heldout_pairs(store: FeatureStore, paths: Mapping[str, Path]) -> list[PreferencePair]:
    """The held-out pairs every training run left out (the intersection, in the first run's order)."""
    ids: list[str] | None = None
    for name, p in paths.items():
        split_path = p / "split.json"
        if not split_path.exists():
            raise FileNotFoundError(f"{split_path}: training run {name!r} has no split.json")
        held = read_json(split_path).get("heldout")
        if held is None:
            raise ValueError(f"{split_path}: no field 'heldout'")
        if ids is None:
            ids = list(held)
        else:
            if set(held) != set(ids):
                log.warning(
                    "training run %s held out different pairs; evaluating on the pairs every run held out", name
                )
            ids = [i for i in ids if i in set(held)]
    by_id = {p.id: p for p in store.pairs()}
    missing = [i for i in ids or [] if i not in by_id]
    if missing:
        raise ValueError(
            f"{next(iter(paths.values())) / 'split.json'}: held-out pair ids {missing[:3]} are not in the feature "
            f"store {store.path}"
        )
    return [by_id[i] for i in ids or []]


#: where each model's generations, pair log-probs and A/B probabilities are kept (``model_outputs``)
MODEL_CACHE = Path("cache") / "evaluate"


def model_outputs(
    run: RunDir,
    identity: str,
    load: Callable[[], LoadedModel],
    gen_sets: Mapping[str, Sequence[dict]],
    pref_pairs: Sequence[PreferencePair],
    ab_sets: Mapping[str, Sequence[dict]],
    cfg: EvalConfig,
) -> dict:
    """One model's held-out and behaviour generations, its pair log-probs and A/B probabilities.

    Kept per model in ``run_dir/cache/evaluate/<key>.json`` (the key: the model's identity, the
    items, and every parameter that changes the outputs), so that evaluating other training runs
    beside the same ones — a sweep's next part, an amplify run — does not regenerate the base
    model and plain DPO. ``load`` is called only on a miss."""
    key = content_hash(
        "model-outputs",
        1,
        identity,
        {s: [[it["id"], list(map(dict, it["prompt"]))] for it in items] for s, items in gen_sets.items()},
        [[p.id, list(map(dict, p.prompt)), p.chosen, p.rejected] for p in pref_pairs],
        {s: [[list(map(dict, it["prompt"])), list(it["answers"])] for it in items] for s, items in ab_sets.items()},
        [
            cfg.max_new_tokens,
            cfg.behaviour_max_new_tokens,
            cfg.batch_size,
            cfg.do_sample,
            cfg.temperature,
            cfg.seed,
            cfg.max_prompt_tokens,
            cfg.pref_max_length,
        ],
    )
    path = run.path / MODEL_CACHE / f"{key}.json"
    if path.exists():
        return {**read_json(path), "reused": True}
    t0 = time.time()
    model = load()
    t_load = time.time() - t0
    t0 = time.time()
    texts, counts = {}, {}
    for set_name, items in gen_sets.items():
        mnt = cfg.max_new_tokens if set_name == "heldout" else cfg.behaviour_max_new_tokens
        texts[set_name], counts[set_name] = generate(
            model,
            [it["prompt"] for it in items],
            max_new_tokens=mnt,
            batch_size=cfg.batch_size,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            seed=cfg.seed,
            max_prompt_tokens=cfg.max_prompt_tokens,
        )
    gen_s = time.time() - t0
    n_tok = sum(sum(c) for c in counts.values())
    t1 = time.time()
    logps = pair_logps(model, [(p.prompt, p.chosen, p.rejected) for p in pref_pairs], max_length=cfg.pref_max_length)
    t2 = time.time()
    ab = {
        s: ab_probabilities(
            model,
            [it["prompt"] for it in items],
            [it["answers"] for it in items],
            max_prompt_tokens=cfg.max_prompt_tokens,
            batch_size=cfg.batch_size,
        )
        for s, items in ab_sets.items()
    }
    timing = {
        "seconds": round(gen_s, 2),
        "new_tokens": n_tok,
        "tokens_per_s": round(n_tok / max(gen_s, 1e-9), 1),
        "logp_seconds": round(t2 - t1, 2),
        "ab_seconds": round(time.time() - t2, 2),
        "load_seconds": round(t_load, 2),
    }
    result = {
        "texts": texts,
        "counts": counts,
        "logps": np.asarray(logps).tolist(),
        "ab": {s: np.asarray(v).tolist() for s, v in ab.items()},
        "timing": timing,
    }
    atomic_write_json(path, result)
    del model
    gc.collect()
    return {**result, "reused": False}


def evaluate(
    run: RunLike,
    models: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    *,
    config: EvalConfig | dict | None = None,
    lm: LoadedModel | None = None,
    sae: Any = None,
    force: bool = False,
) -> EvalResult:
    """Evaluate the base model and training runs; write (or reuse) ``run_dir/evaluate/<key>/``.

    ``models``: None = every finished training run (``training_runs``); or a list of training-run
    paths / keys / TrainResults; or a mapping name → one of those, to choose the names. ``lm`` and
    ``sae`` default to the feature store's model and SAE (loaded by name); trained models are
    reloaded from their adapters one at a time."""
    cfg = EvalConfig.from_dict(config)
    run = RunDir.of(run)
    store = run.store
    hyps = run.hypotheses
    paths = resolve_models(run, models)
    manifests = {n: read_json(p / "manifest.json") for n, p in paths.items()}
    # plain first, then the interventions in the order found
    order = sorted(paths, key=lambda n: (n != PLAIN, list(paths).index(n)))
    paths = {n: paths[n] for n in order}
    for n, m in manifests.items():
        if m["model"]["fingerprint"] != store.manifest["model"]["fingerprint"]:
            log.warning(
                "training run %s was trained from %s, not the feature store's model %s",
                n,
                m["model"]["name"],
                store.manifest["model"]["name"],
            )
    heldout = heldout_pairs(store, paths)
    if not heldout:
        raise ValueError(
            "the training runs held out no pairs (heldout_fraction=0?): nothing to evaluate on; see "
            f"{next(iter(paths.values())) / 'split.json'}"
        )
    prompts = distinct_prompts(heldout, cfg.n_prompts)
    pref_pairs = heldout[: cfg.max_pref_pairs]
    eval_files = eval_file_digests() if cfg.behaviour else {}
    truth = run.planted
    lm = lm or recorded_model(run)
    if lm.fingerprint != store.manifest["model"]["fingerprint"]:
        raise ValueError(
            f"the base model {lm.name} is not the feature store's model {store.manifest['model']['name']} "
            "(fingerprints differ)"
        )
    sae = (sae or recorded_sae(run)).known_as(store.manifest["sae"]["fingerprint"])
    if sae is None:
        raise ValueError(f"the SAE is not the feature store's SAE {store.manifest['sae']['name']}")
    key = content_hash(
        FORMAT,
        {n: p.name for n, p in paths.items()},
        lm.fingerprint,
        sae.fingerprint,
        hyps.manifest["key"],
        [p.id for p in heldout],
        [list(map(dict, pr)) for _, pr in prompts],
        eval_files,
        cfg.key_params(),
        truth,
    )
    stage = run.stage(STAGE, key, FORMAT)
    if stage.reuse(force):
        return EvalResult(stage.path, stage.manifest(), reused=True)
    out = stage.begin()
    say = (lambda s: terminal(f"[evaluate] {s}")) if cfg.progress else (lambda s: None)
    t_all = time.time()

    # behaviour items, identical for every model
    ab_sets = {name: ab_items(name, cfg.n_ab, cfg.seed) for name in AB_SETS} if cfg.behaviour else {}
    gen_sets = {"heldout": [{"id": i, "prompt": pr} for i, pr in prompts]}
    if cfg.behaviour:
        gen_sets["harmful"] = harmful_prompts(cfg.n_harmful, cfg.seed)
        gen_sets["xstest_safe"] = xstest_safe(cfg.n_xstest, cfg.seed)

    names = [BASE] + list(paths)
    gens: dict[str, dict[str, list[str]]] = {}
    gen_rows: list[dict] = []
    logps: dict[str, np.ndarray] = {}
    ab: dict[str, dict[str, np.ndarray]] = {}
    timing: dict[str, Any] = {"generation": {}}
    for name in names:
        # a training run: its key and its manifest (times included), so a forced re-training is not mistaken for the
        # old one
        identity = lm.fingerprint if name == BASE else content_hash(paths[name].name, manifests[name])
        out_m = model_outputs(
            run,
            identity,
            lambda name=name: lm if name == BASE else load_trained(paths[name], merge=True),
            gen_sets,
            pref_pairs,
            ab_sets,
            cfg,
        )
        gens[name] = out_m["texts"]
        logps[name] = np.asarray(out_m["logps"], dtype=np.float64).reshape(-1, 2)
        ab[name] = {s: np.asarray(v, dtype=np.float64) for s, v in out_m["ab"].items()}
        for set_name, items in gen_sets.items():
            for it, t, c in zip(items, out_m["texts"][set_name], out_m["counts"][set_name]):
                gen_rows.append(
                    {
                        "model": name,
                        "set": set_name,
                        "id": it["id"],
                        "prompt": it["prompt"][-1]["content"],
                        "response": t,
                        "new_tokens": c,
                    }
                )
        t = timing["generation"][name] = {**out_m["timing"], "reused": out_m["reused"]}
        say(
            f"{name}: reused from {MODEL_CACHE}"
            if out_m["reused"]
            else (
                f"{name}: {t['new_tokens']} new tokens in {t['seconds']:.0f} s ({t['tokens_per_s']:.1f} tok/s); "
                f"log-probs {t['logp_seconds']:.0f} s, A/B {t['ab_seconds']:.0f} s"
            )
        )

    # concept activity of the held-out generations, every model's text through the base encoder
    t0 = time.time()
    M = membership_matrix(hyps.feature_labels(sae.d_sae))
    fires = {
        n: firing(lm, sae, [(pr, g) for (_, pr), g in zip(prompts, gens[n]["heldout"])], cfg.max_prompt_tokens)
        for n in names
    }
    activity = {n: np.asarray(f.astype(np.float64) @ M) for n, f in fires.items()}  # prompts × concepts
    timing["encode_seconds"] = round(time.time() - t0, 2)

    pva, r2_rows = predicted_vs_actual(hyps, store, heldout, prompts, activity, manifests, cfg)
    stage.write_parquet("predicted_vs_actual", pva)
    stage.write_parquet("r2", r2_rows)
    # the same fit for simpler predictors made from the preference data alone, and its ceiling
    in_fit = pva[(pva["view"] == "overall") & pva["in_fit"].astype(bool)]
    predictions, reliability, linear_info = predictor_inputs(hyps, store, np.unique(in_fit["concept"].astype(int)), cfg)
    stage.write_parquet("predictions", predictions)
    stage.write_parquet("predictors", predictor_table(pva, predictions, reliability, activity, cfg))
    plan_pva, plan_r2 = plan_vs_actual(ConceptSpace.from_run(run, hyps, store), activity, manifests, cfg)
    stage.write_parquet("plan_vs_actual", plan_pva)
    stage.write_parquet("plan_r2", plan_r2)
    off = (
        pva[
            (pva["view"] == "overall")
            & (pva["model"] != BASE)
            & (pva["actual_q"] < cfg.fdr)
            & ~pva["targeted"].astype(bool)
        ]
        .sort_values(["model", "actual_q"])
        .reset_index(drop=True)
    )
    stage.write_parquet("offtarget", off)
    pref = preference_table(logps, manifests, cfg)
    stage.write_parquet("preference", pref)
    targets = targets_table(names, manifests, fires, gens, cfg)
    stage.write_parquet("targets", targets)
    poison = None
    if truth:
        heldout_gens = {n: gens[n]["heldout"] for n in names}
        poison = poisoning_readout(
            truth,
            heldout_gens,
            logps,
            [p.id for p in pref_pairs],
            base=BASE,
            reference={n: plain_reference(n) for n in names},
            n_boot=cfg.n_boot,
            ci=cfg.ci,
            seed=cfg.seed,
            prompts=[pr for _, pr in prompts],
        )
        stage.write_parquet("poisoning", poison)
    # the refusal rows: one judge for every model, measured against people on labelled completions
    judge = make_judge(cfg.judge, run.path / "cache" / ("judge" if cfg.judge.backend == "direction" else "llm"), lm)
    t0 = time.time()
    judged = {
        s: [it["prompt"][-1]["content"] for it in gen_sets[s]] for s in ("harmful", "xstest_safe") if s in gen_sets
    }
    refusals = {n: {s: judge.judge(prompts_of_set, gens[n][s]) for s, prompts_of_set in judged.items()} for n in names}
    if cfg.behaviour and cfg.judge_agreement_n:
        stage.write_parquet("judges", agreement(judge, cfg.judge_agreement_n, ci=cfg.ci, seed=cfg.seed))
    judge_s = time.time() - t0
    timing["judge"] = {
        "name": judge.name,
        "seconds": round(judge_s, 2),
        **({"llm": usage_of(judge.backend, judge_s)} if hasattr(judge, "backend") else {}),
    }
    stage.write_parquet(
        "comparison",
        comparison_table(names, pref, targets, r2_rows, gens, ab, ab_sets, cfg, poison, refusals, judge.name),
    )
    flags = {
        (n, s, it["id"]): bool(f) for n in names for s, fl in refusals[n].items() for it, f in zip(gen_sets[s], fl)
    }
    for r in gen_rows:
        r["refusal"] = flags.get((r["model"], r["set"], r["id"]))
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gen_rows))

    manifest = stage.finish(
        {
            "models": {
                BASE: {"model": lm.name, "fingerprint": lm.fingerprint},
                **{
                    n: {
                        "train_key": p.name,
                        "path": relative(p, run.path),
                        "plan_active": active_entries(manifests[n]),
                        "order": training_order(manifests[n]),
                    }
                    for n, p in paths.items()
                },
            },
            "model_order": names,
            "sae": {"name": sae.name, "fingerprint": sae.fingerprint},
            "hypotheses_key": hyps.manifest["key"],
            "n_heldout_pairs": len(heldout),
            "n_prompts": len(prompts),
            "n_pref_pairs": len(pref_pairs),
            "eval_files": {k: EVAL_FILES[k] for k in eval_files},
            "config": cfg.to_dict(),
            "timing": timing,
            # the head-to-head's step-time ratio
            "train_step_seconds": {n: m.get("step_seconds_median") for n, m in manifests.items()},
            "refusal_judge": judge.name,
            "linear_predictor": linear_info,
            "seconds": round(time.time() - t_all, 2),
        },
        models=names,
    )
    say(f"done in {manifest['seconds']:.0f} s → {out}")
    return EvalResult(out, manifest)
