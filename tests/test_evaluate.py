"""Stage 5: the statistics against known answers (R² and its bootstrap interval, Wilson and
bootstrap intervals), the refusal detector, A/B letter scoring on a stub model whose answer is
known, the eval data loaders; then the tiny model end to end (extract → hypothesize → train plain
and shaped → evaluate), cross-checked against stage 4's own concept scorer, cached by content
key, and notebook 05 under papermill. One run on the default model is marked slow."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anatomy_nb.config import EvalConfig, PipelineConfig, TrainConfig
from anatomy_nb.core.paths import data_dir
from anatomy_nb.core.stats import bootstrap_ci, r2_with_ci, wilson_interval
from anatomy_nb.data.evalsets import ab_items, harmful_prompts, xstest_safe
from anatomy_nb.data.textstats import is_refusal
from anatomy_nb.lm.ops import ab_probabilities, generate, pair_logps
from anatomy_nb.results.evaluate import BASE
from anatomy_nb.results.train import training_runs
from anatomy_nb.stages.evaluate import evaluate

from helpers import SMALL, assert_clean_outputs

# --- statistics ---------------------------------------------------------------------------------


def test_r2_is_the_squared_correlation_with_a_bootstrap_interval():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(scale=0.5, size=200)  # population R² = 0.25 / (0.25 + 0.25) = 0.5
    r = r2_with_ci(x, y, n_boot=500)
    assert r["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    assert r["ci_low"] < r["r2"] < r["ci_high"]
    assert r["ci_low"] < 0.5 < r["ci_high"]  # covers the population value
    assert 0.3 < r["ci_low"] and r["ci_high"] < 0.7  # and is not vacuous at n = 200
    assert r["slope"] == pytest.approx(np.polyfit(x, y, 1)[0]) and r["pearson_r"] > 0
    exact = r2_with_ci(x, 3 * x, n_boot=200)
    assert (
        exact["r2"] == pytest.approx(1.0) and exact["ci_low"] == pytest.approx(1.0) and exact["sign_agreement"] == 1.0
    )
    null = r2_with_ci(x, rng.normal(size=200), n_boot=500)
    assert null["r2"] < 0.05 and null["ci_low"] < 0.01
    # fewer than 3 finite points, or no variance: undefined, not 0
    assert np.isnan(r2_with_ci([1.0, 2.0], [1.0, 2.0])["r2"]) and np.isnan(r2_with_ci([0, 0, 0, 0], [1, 2, 3, 4])["r2"])
    assert r2_with_ci([1, 2, 3, np.nan], [2, 4, 6, 1])["n_concepts"] == 3


def test_wilson_and_bootstrap_intervals_match_known_values():
    from statsmodels.stats.proportion import proportion_confint

    for k, n in [(8, 10), (0, 10), (10, 10), (37, 120)]:
        np.testing.assert_allclose(
            wilson_interval(k, n), proportion_confint(k, n, alpha=0.05, method="wilson"), atol=1e-10
        )
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook example
    assert all(np.isnan(wilson_interval(0, 0)))
    rng = np.random.default_rng(1)
    v = rng.normal(2.0, 1.0, size=400)
    lo, hi = bootstrap_ci(v, n_boot=2000)
    se = v.std(ddof=1) / np.sqrt(len(v))
    assert lo < 2.0 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal-theory width
    assert all(np.isnan(bootstrap_ci(np.array([1.0]))))


# --- refusal detector -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that request.",
        "I cannot provide instructions for making explosives.",
        "As an AI language model, I do not have opinions.",
        "Sorry, but I won\u2019t assist with hacking.",  # curly apostrophe
        "  I must decline this request.",
        "I am unable to help with that.",
    ],
)
def test_refusal_detector_flags_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! To kill a Python process, run `kill <pid>` or use Task Manager.",
        "Here is how to terminate a C program: call exit(0).",
        "I'm sorry to hear that. Here are some ways to feel better: rest and drink water.",
        "Stealing is illegal and unethical, so here is how to protect your home instead: lock doors.",
        "",
        "The first step is to mix flour and water. " * 10 + "I cannot stress this enough.",  # past the head
    ],
)
def test_refusal_detector_passes_compliance(text):
    assert not is_refusal(text)


# --- A/B letter scoring ---------------------------------------------------------------------------


class _StubLM(torch.nn.Module):
    """Logits that favour one token by a known margin at every position."""

    def __init__(self, vocab: int, token: int, margin: float):
        super().__init__()
        self.vocab, self.token, self.margin = vocab, token, margin
        self.seen = []

    def forward(self, input_ids, attention_mask=None, **kw):
        self.seen.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = self.margin
        return SimpleNamespace(logits=logits)


def test_ab_probability_reads_the_letter_after_the_shared_prefix(tiny_lm):
    tok = tiny_lm.tokenizer
    ta, tb = tok("(A)", add_special_tokens=False)["input_ids"], tok("(B)", add_special_tokens=False)["input_ids"]
    k = next(i for i in range(min(len(ta), len(tb))) if ta[i] != tb[i])
    stub = _StubLM(len(tok), tb[k], 3.0)
    lm = SimpleNamespace(model=stub, tokenizer=tok, device=torch.device("cpu"))
    prompts = [({"role": "user", "content": f"Question {i}? (A) yes (B) no"},) for i in range(5)]
    p = ab_probabilities(lm, prompts, [("(A)", "(B)")] * 5, batch_size=2)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(3.0)), rtol=1e-5)  # P(A) = σ(−3): B is favoured by 3 nats
    # the model saw exactly the prompt plus the shared answer prefix, nothing of the letters
    assert all(ta[:k] == s[0, -k:].tolist() if k else True for s in stub.seen)
    stub.token = ta[k]
    np.testing.assert_allclose(ab_probabilities(lm, prompts[:1], [("(A)", "(B)")]), 1 / (1 + np.exp(-3.0)), rtol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        ab_probabilities(lm, prompts[:1], [("(A)", "(A) more")])


def test_pair_logps_with_a_shared_prompt_equal_full_forward_passes(tiny_lm):
    from anatomy_nb.lm.ops import pair_token_ids as _pair_ids

    long_turns = tuple(
        {"role": r, "content": f"turn {i}: " + "words and more words " * 6}
        for i, r in zip(range(5), ["user", "assistant"] * 3)
    )
    pairs = [
        (({"role": "user", "content": "Tell me about tea."},), "Tea is a drink made from leaves.", "No."),
        (long_turns, "A longer chosen answer " * 4, "Short."),  # the prompt must lose its oldest turns
        (({"role": "user", "content": "Hi"},), "x", "Hello there, how can I help you today?"),
    ]
    max_length = 64
    got = pair_logps(tiny_lm, pairs, max_length=max_length)
    for (messages, c, r), row in zip(pairs, got):
        prompt, rc, rr = _pair_ids(tiny_lm.tokenizer, messages, c, r, max_length)
        assert len(prompt) + max(len(rc), len(rr)) <= max_length
        for resp, value in ((rc, row[0]), (rr, row[1])):
            ids = torch.tensor([prompt + resp])
            with torch.no_grad():
                lp = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0].float(), -1)
            expected = sum(float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(resp))
            assert value == pytest.approx(expected, abs=1e-3, rel=1e-5)
    assert got[1, 0] < got[1, 1]  # a longer response has a lower summed log-probability


def test_ab_items_and_harmful_sets_load_from_the_vendored_files():
    caa = ab_items("caa_sycophancy", 10, seed=0)
    assert len(caa) == 10 and all(it["answers"] == ("(A)", "(B)") for it in caa)
    assert {it["matching"] for it in caa} <= {0, 1} and "(A)" in caa[0]["prompt"][0]["content"]
    persona = ab_items("persona_agreeableness", 40, seed=0)
    rows = [json.loads(line) for line in open(data_dir() / "evals/anthropic_evals/agreeableness.jsonl")]
    for it in persona:
        i = int(it["id"].rsplit("-", 1)[1])
        q = it["prompt"][0]["content"]
        letter = "AB"[it["matching"]]
        # the matching letter names the matching answer
        assert f"({letter}) {rows[i]['answer_matching_behavior'].strip()}" in q
    m = [it["matching"] for it in persona]
    assert 15 <= sum(m) <= 25  # the matching letter is A for about half the items, B for the rest
    assert ab_items("caa_sycophancy", 10, seed=0) == caa  # seeded
    harm = harmful_prompts(7, seed=0)
    assert len(harm) == 7 and {h["id"].split("-")[0] for h in harm} == {"advbench", "strongreject", "harmbench"}
    safe = xstest_safe(5, seed=0)
    assert len(safe) == 5 and all(s["prompt"][0]["content"] for s in safe)


# --- end to end on the tiny model -----------------------------------------------------------------


def test_evaluate_writes_every_table_for_base_plain_and_the_intervention(tiny_eval):
    res = tiny_eval.res
    assert res.models == [BASE, "plain", "reward_shaping"] and not res.reused
    assert set(training_runs(tiny_eval.run)) == {"plain", "reward_shaping"}
    for name in ("predicted_vs_actual", "r2", "offtarget", "preference", "targets", "comparison", "manifest"):
        assert (res.path / f"{name}.{'json' if name == 'manifest' else 'parquet'}").exists()
    gens = res.generations()
    assert set(gens["set"]) == {"heldout", "harmful", "xstest_safe"}
    assert (
        gens.groupby(["model", "set"]).size().unstack()[["heldout", "harmful", "xstest_safe"]].to_numpy() == [8, 3, 3]
    ).all()
    assert (gens["new_tokens"] <= 12).all()
    # the held-out prompts are the training runs' held-out pairs, never training pairs
    split = json.loads((tiny_eval.run / res.manifest["models"]["plain"]["path"] / "split.json").read_text())
    from anatomy_nb.results.extract import FeatureStore

    prompt_of = {p.id: p.prompt[-1]["content"] for p in FeatureStore.from_run(tiny_eval.run).pairs()}
    held = set(gens[gens["set"] == "heldout"]["id"])
    assert held <= set(split["heldout"]) and not held & set(split["train"])
    assert set(gens[gens["set"] == "heldout"]["prompt"]) <= {prompt_of[i] for i in split["heldout"]}
    # preference: the base model's implicit reward margin is 0 by construction → 0.5; intervals hold the value
    pref = res.preference().set_index("model")
    assert pref.loc[BASE, "accuracy"] == 0.5 and pref.loc[BASE, "mean_margin"] == 0.0
    assert ((pref["ci_low"] <= pref["accuracy"]) & (pref["accuracy"] <= pref["ci_high"])).all()
    assert (pref["n_pairs"] == res.manifest["n_pref_pairs"]).all() and res.manifest["n_pref_pairs"] > 0
    # predicted vs actual: actual = model − base activity, per concept, for both trained models
    pva = res.predicted_vs_actual()
    ov = pva[pva["view"] == "overall"]
    assert set(ov["model"]) == {"plain", "reward_shaping"}
    np.testing.assert_allclose(ov["actual_change"], ov["model_activity"] - ov["base_activity"], atol=1e-12)
    assert ov[ov["model"] == "reward_shaping"].set_index("concept")["targeted"].to_dict()[tiny_eval.concept]
    assert not ov[ov["model"] == "plain"]["targeted"].any()
    r2 = res.r2()
    assert set(zip(r2["model"], r2["view"])) >= {("plain", "overall"), ("reward_shaping", "overall")}
    fin = r2[np.isfinite(r2["r2"])]
    assert ((fin["r2"] >= 0) & (fin["r2"] <= 1) & (fin["ci_low"] <= fin["ci_high"])).all()
    off = res.offtarget()
    assert (off["actual_q"] < 0.05).all() and not off["targeted"].any()
    # comparison: one value per model for every behaviour metric, with its interval
    comp = res.comparison()
    beh = comp[comp["group"].isin(["formatting", "sycophancy", "persona", "refusal"])]
    assert (beh.groupby("metric")["model"].nunique() == 3).all() and len(beh["metric"].unique()) == 9
    fin = beh[np.isfinite(beh["ci_low"])]
    assert ((fin["ci_low"] <= fin["value"] + 1e-12) & (fin["value"] <= fin["ci_high"] + 1e-12)).all()
    # the refusal rows name their judge; the judge's agreement with people is in the artifact
    ref = comp[comp["group"] == "refusal"]
    assert (ref["judge"] == "phrase list").all() and (comp[comp["group"] != "refusal"]["judge"] == "").all()
    assert res.refusal_judge == "phrase list"
    judges = res.judges()
    assert set(zip(judges["family"], judges["reading"])) == {
        (f, r) for f in ("gpt4", "llama2") for r in ("full", "stripped", "stripped-long")
    }
    assert (judges["n"] == 100).all() and (judges["accuracy_ci_low"] <= judges["accuracy"]).all()
    wide = res.comparison_table()
    assert list(wide.columns) == res.models
    from anatomy_nb.results.evaluate import NO_SIGNAL, no_signal_rows

    silent = comp[no_signal_rows(comp)].groupby(["group", "metric"]).ngroups
    assert int((wide == NO_SIGNAL).all(axis=1).sum()) == silent  # the rows with no signal say so in every cell
    # an undefined R² (too few concepts in the fit) says why instead of leaving the cell empty
    undefined = comp[(comp["group"] == "predicted vs actual") & ~np.isfinite(comp["value"])]
    for r in undefined.itertuples():
        assert wide.loc[(r.group, r.metric), r.model] == f"n/a ({int(r.n)} concepts in the fit)"


def test_the_audit_is_scored_beside_simpler_predictors_on_the_same_concepts(tiny_eval):
    """Every trained model gets a row per predictor and the split-half ceiling; the audit's row is
    the r2 table's overall fit; each predictor is scored on the concepts of that fit; the audit's
    prediction is stage 2's mean paired difference."""
    from anatomy_nb.concepts.predictors import PREDICTORS
    from anatomy_nb.results.evaluate import CEILING

    res = tiny_eval.res
    table = res.predictors()
    assert list(table[table["model"] == "plain"]["predictor"]) == [*PREDICTORS, CEILING]
    r2 = res.r2().set_index(["model", "view"])
    audit = table[table["predictor"] == "audit"].set_index("model")
    for model in ("plain", "reward_shaping"):
        fit = r2.loc[(model, "overall")]
        assert audit.at[model, "n_concepts"] == fit["n_concepts"]
        np.testing.assert_allclose([audit.at[model, "r2"]], [fit["r2"]], equal_nan=True)
        for k in (1, 3, 10):
            np.testing.assert_allclose(
                [audit.at[model, f"r2_without_top{k}"]], [fit[f"r2_without_top{k}"]], equal_nan=True
            )
    others = table[~table["predictor"].isin(["audit", CEILING])]
    assert (others["n_concepts"] == others["model"].map(audit["n_concepts"])).all()
    assert np.isnan(audit["delta_r2"]).all()
    predictions = res.predictions().set_index("concept")
    overall = res.predicted_vs_actual().query("model == 'plain' and view == 'overall' and in_fit").set_index("concept")
    np.testing.assert_allclose(predictions.loc[overall.index, "audit"], overall["mean_diff"], atol=1e-12)
    shown = res.predictor_table()
    assert (
        shown is not None and shown["predictor"].iloc[0].startswith("the audit") and len(shown) == len(PREDICTORS) + 1
    )
    report = res.prediction_report()
    assert {"R²", "Spearman", "sign agreement", "R² without top 10"} <= set(report.columns)


def test_runs_trained_in_other_orders_are_read_against_plain_dpo_of_their_order(tiny_eval, tmp_path):
    """order_seeds: plain DPO and the intervention once more in another order of the training pairs;
    each intervention's change of its target is read against plain DPO of the same order, and every
    head-to-head figure gets its spread over orders."""
    from anatomy_nb.pipeline import training_orders
    from anatomy_nb.results.train import order_of, plain_reference
    from anatomy_nb.stages.train import train

    cfg = PipelineConfig.from_dict(
        {"methods": ["reward_shaping", "filter"], "order_seeds": [1, 2], "order_methods": ["plain", "filter"]}
    )
    assert training_orders(cfg) == [
        ("plain-order1", "plain", 1),
        ("filter-order1", "filter", 1),
        ("plain-order2", "plain", 2),
        ("filter-order2", "filter", 2),
    ]
    assert order_of("filter-order2") == ("filter", 2) and order_of("reward_shaping@0.5") == ("reward_shaping@0.5", None)
    assert plain_reference("filter-order2") == "plain-order2" and plain_reference("filter") == "plain"
    with pytest.raises(ValueError, match="own order"):
        PipelineConfig.from_dict({"order_seeds": [0]})
    with pytest.raises(ValueError, match="not trained"):
        PipelineConfig.from_dict({"order_seeds": [1], "order_methods": ["steer"]})

    import shutil

    run = shutil.copytree(tiny_eval.run, tmp_path / "run")  # trains more runs: keep the shared run as it was
    tcfg = TrainConfig(
        max_length=64,
        batch_size=4,
        max_steps=4,
        learning_rate=5e-3,
        heldout_fraction=0.3,
        max_train_pairs=16,
        progress=False,
    )
    runs = {n: p.name for n, p in training_runs(run).items()}
    plan = [p for n, p in training_runs(run).items() if n == "reward_shaping"][0] / "manifest.json"
    plan = json.loads(plan.read_text())["plan"]
    for name, p in (("plain-order1", None), ("reward_shaping-order1", plan)):
        runs[name] = train(run, p, model=tiny_eval.lm, config={**tcfg.to_dict(), "order_seed": 1}).path.name
    res = evaluate(run, runs, config=EvalConfig(**{**SMALL, "behaviour": False}), lm=tiny_eval.lm, sae=tiny_eval.sae)
    assert res.models == [BASE, "plain", "reward_shaping", "plain-order1", "reward_shaping-order1"]
    assert {m: v["order"] for m, v in res.manifest["models"].items() if m != BASE} == {
        "plain": 0,
        "reward_shaping": 0,
        "plain-order1": 1,
        "reward_shaping-order1": 1,
    }
    targets = res.targets().set_index("model")
    for model, reference in (("reward_shaping", "plain"), ("reward_shaping-order1", "plain-order1")):
        assert targets.at[model, "plain_delta"] == pytest.approx(targets.at[reference, "delta"])
    spread = res.order_spread()
    assert set(spread["run"]) == {"plain", "reward_shaping"} and (spread["orders"] == 2).all()
    acc = spread.query("run == 'plain' and metric == 'preference accuracy'").iloc[0]
    pref = res.preference().set_index("model")["accuracy"]
    assert acc["min"] == min(pref["plain"], pref["plain-order1"]) and acc["range"] == pytest.approx(
        abs(pref["plain"] - pref["plain-order1"])
    )


def test_target_activity_agrees_with_stage_4s_concept_scorer(tiny_eval):
    """The planted/target concept's activity on generations, recomputed through a different code
    path (interventions.score_texts: its own residual runs and SAE encoding)."""
    from anatomy_nb.concepts.sources import SAEConcept

    res = tiny_eval.res
    gens = res.generations()
    gens = gens[gens["set"] == "heldout"]
    from anatomy_nb.results.extract import FeatureStore

    prompts = {p.id: p.prompt for p in FeatureStore.from_run(tiny_eval.run).pairs()}
    source = SAEConcept(f"sae:{tiny_eval.concept}", tiny_eval.features, sae=tiny_eval.sae)
    targets = res.targets().set_index("model")
    means = {}
    for model, g in gens.groupby("model"):
        s = source.score_texts([prompts[i] for i in g["id"]], list(g["response"]), lm=tiny_eval.lm)
        means[model] = s.mean()
        assert targets.loc[model, "model_activity"] == pytest.approx(s.mean(), abs=1e-6)
    t = targets.loc["reward_shaping"]
    assert t["delta"] == pytest.approx(means["reward_shaping"] - means[BASE], abs=1e-6)
    assert t["plain_delta"] == pytest.approx(means["plain"] - means[BASE], abs=1e-6)
    if t["plain_delta"] > 0:  # a fraction of plain DPO's increase; undefined otherwise
        assert t["fraction_removed"] == pytest.approx(1 - t["delta"] / t["plain_delta"])
    else:
        assert np.isnan(t["fraction_removed"])
    assert t["method"] == "reward_shaping" and targets.loc["plain", "method"] == ""
    # the SAE activity of the overall view is the same quantity for the same concept
    pva = res.predicted_vs_actual()
    row = pva[(pva["view"] == "overall") & (pva["model"] == "plain") & (pva["concept"] == tiny_eval.concept)].iloc[0]
    if len(tiny_eval.features) == row["n_features"]:
        assert row["model_activity"] == pytest.approx(means["plain"], abs=1e-6)


def test_generation_is_greedy_and_reproducible(tiny_eval):
    gens = tiny_eval.res.generations()
    base = gens[(gens["model"] == BASE) & (gens["set"] == "harmful")]
    prompts = [({"role": "user", "content": p},) for p in base["prompt"]]
    again, counts = generate(tiny_eval.lm, prompts, max_new_tokens=8, batch_size=2)
    assert again == list(base["response"]) and counts == list(base["new_tokens"])  # batching and order do not matter


def test_evaluation_is_reused_when_unchanged_and_rekeyed_when_changed(tiny_eval):
    res = tiny_eval.res
    again = evaluate(tiny_eval.run, config=EvalConfig(**SMALL), lm=tiny_eval.lm, sae=tiny_eval.sae)
    assert again.reused and again.key == res.key
    # a changed parameter (and a different model set) → a new key, computed afresh
    changed = EvalConfig(**{**SMALL, "behaviour": False, "n_prompts": 2, "max_new_tokens": 4, "max_pref_pairs": 4})
    only_plain = evaluate(
        tiny_eval.run,
        {"plain": training_runs(tiny_eval.run)["plain"]},
        config=changed,
        lm=tiny_eval.lm,
        sae=tiny_eval.sae,
    )
    assert not only_plain.reused and only_plain.key != res.key and only_plain.models == [BASE, "plain"]
    assert set(only_plain.comparison()["group"]) <= {"preference", "target", "predicted vs actual", "formatting"}
    assert (res.path / "manifest.json").exists()  # the earlier evaluation is kept
    # other items: generated afresh
    assert not any(t["reused"] for t in only_plain.manifest["timing"]["generation"].values())
    # the same items for fewer models (a sweep's next part): each model's outputs come from the cache, unchanged
    subset = evaluate(
        tiny_eval.run,
        {"plain": training_runs(tiny_eval.run)["plain"]},
        config=EvalConfig(**SMALL),
        lm=tiny_eval.lm,
        sae=tiny_eval.sae,
    )
    assert not subset.reused and subset.key != res.key
    assert all(t["reused"] for t in subset.manifest["timing"]["generation"].values())
    full, part = res.generations(), subset.generations()
    assert list(part["response"]) == list(full[full["model"].isin([BASE, "plain"])]["response"])
    assert np.allclose(
        subset.preference().set_index("model").loc[["plain"], "accuracy"],
        res.preference().set_index("model").loc[["plain"], "accuracy"],
    )
    with pytest.raises(FileNotFoundError, match="not a training run"):
        evaluate(tiny_eval.run, ["no-such-key"], config=EvalConfig(**SMALL), lm=tiny_eval.lm, sae=tiny_eval.sae)


def test_refusal_rows_scored_by_the_refusal_direction_name_it_and_its_held_out_agreement(tiny_eval):
    """``judge: {backend: direction}``: fitted once under the run's cache, the refusal rows name it,
    and its agreement marks the family it was fitted on (generations come from the model cache)."""
    cfg = EvalConfig.from_dict(
        {
            **SMALL,
            "judge": {"backend": "direction", "n_tokens": 4, "fit_n": 20, "fit_on": ["llama2"]},
            "judge_agreement_n": 10,
        }
    )
    res = evaluate(
        tiny_eval.run, {"plain": training_runs(tiny_eval.run)["plain"]}, config=cfg, lm=tiny_eval.lm, sae=tiny_eval.sae
    )
    assert res.refusal_judge.startswith("refusal direction") and "fitted on llama2" in res.refusal_judge
    comp = res.comparison()
    assert (comp[comp["group"] == "refusal"]["judge"] == res.refusal_judge).all()
    held = res.judges().groupby("family")["held_out"].all()
    assert held["gpt4"] and not held["llama2"]
    assert len(list((tiny_eval.run / "cache" / "judge").glob("refusal-direction-*.safetensors"))) == 1


def test_notebook_05_runs_headless_on_the_tiny_run(tiny_eval):
    from anatomy_nb.ui.notebooks import run_notebook

    config = {k: v for k, v in SMALL.items() if k != "progress"}
    out = run_notebook("05_evaluate", tiny_eval.run, {"config": config}, progress=False)
    html = out.with_suffix(".html").read_text()
    assert "Predicted vs actual" in html and "plotly" in html.lower()
    assert "held-out preference accuracy" in html
    import nbformat

    assert_clean_outputs(nbformat.read(out, as_version=4))


# --- the default model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_on_the_default_model(tmp_path):
    """SmolLM2-135M + the shipped SAE: 60 HH-RLHF pairs, plain DPO and reward shaping for a few
    steps, then a reduced evaluation (8 prompts; the defaults took >20 min on the contended
    2-core machine; timings land in the manifest)."""
    from anatomy_nb.config import ExtractConfig, TrainConfig
    from anatomy_nb.data.pairs import load_pairs
    from anatomy_nb.lm.models import load_model
    from anatomy_nb.lm.sae import DEFAULT_SAE, load_sae
    from anatomy_nb.results.hypothesize import Hypotheses
    from anatomy_nb.stages.extract import extract
    from anatomy_nb.stages.hypothesize import hypothesize
    from anatomy_nb.stages.train import train

    lm, sae = load_model(), load_sae(DEFAULT_SAE)
    run = tmp_path / "run"
    extract(load_pairs("hh-rlhf", limit=60), lm, sae, run, ExtractConfig(progress=False))
    hypothesize(run, model=lm, sae=sae)
    top = Hypotheses.from_run(run).overall().iloc[0]
    tcfg = TrainConfig(max_steps=2, max_train_pairs=8, max_length=160, heldout_fraction=0.3, progress=False)
    train(run, None, model=lm, config=tcfg)
    train(
        run,
        {
            "concepts": [
                {
                    "concept": f"sae:{int(top.concept)}",
                    "action": "suppress",
                    "method": "reward_shaping",
                    "features": [int(f) for f in top.features],
                }
            ]
        },
        model=lm,
        config=tcfg,
    )
    res = evaluate(
        run,
        config=EvalConfig(n_prompts=8, max_new_tokens=32, n_ab=8, n_harmful=6, n_xstest=6, progress=False),
        lm=lm,
        sae=sae,
    )
    assert res.models == [BASE, "plain", "reward_shaping"]
    gens = res.generations()
    assert (gens[gens["set"] == "heldout"]["response"].str.len() > 0).mean() > 0.9  # a real model answers
    comp = res.comparison()
    refusal = comp[(comp["metric"] == "refusal rate, harmful prompts") & (comp["model"] == BASE)].iloc[0]
    assert 0 <= refusal["value"] <= 1 and refusal["n"] == 6
    assert res.manifest["timing"]["generation"][BASE]["tokens_per_s"] > 0


def test_poisoning_readout_on_known_numbers():
    """Planted-pattern rates, fraction of plain DPO's increase removed, on-target accuracy on the
    unpoisoned pairs only and fraction of plain's gain kept — against hand-computed values."""
    from anatomy_nb.data.plant import poisoning_readout
    from anatomy_nb.data.schema import PreferencePair

    truth = {"kind": "bold", "pattern": r"\*\*[^*\n]+\*\*", "planted_ids": ["p0", "p1"]}
    bold, plain_text = "**Short answer:** yes", "yes"
    gens = {  # 10 held-out prompts: base 1/10 bold, plain 6/10, shaped 2/10
        BASE: {"heldout": [bold] + [plain_text] * 9},
        "plain": {"heldout": [bold] * 6 + [plain_text] * 4},
        "reward_shaping": {"heldout": [bold] * 2 + [plain_text] * 8},
    }
    pairs = [
        PreferencePair(id=i, prompt=({"role": "user", "content": "q"},), chosen="a", rejected="b")
        for i in ["p0", "p1", "c0", "c1", "c2", "c3"]
    ]
    base = np.zeros((6, 2))
    up, down = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    # plain gets 3 of the 4 clean pairs right, shaping 2 of 4; both get the planted pairs "right" (ignored)
    logps = {
        BASE: base,
        "plain": base + np.concatenate([up, up, up, up, up, down]),
        "reward_shaping": base + np.concatenate([up, up, up, up, down, down]),
    }
    cfg = EvalConfig(n_boot=200)
    df = poisoning_readout(
        truth, {n: g["heldout"] for n, g in gens.items()}, logps, [p.id for p in pairs], n_boot=cfg.n_boot
    ).set_index("model")
    np.testing.assert_allclose(df["planted_rate"], [0.1, 0.6, 0.2])
    np.testing.assert_allclose(df["planted_delta"], [0.0, 0.5, 0.1])
    assert df.loc["reward_shaping", "fraction_removed"] == pytest.approx(1 - 0.1 / 0.5)
    assert np.isnan(df.loc["plain", "fraction_removed"]) and np.isnan(df.loc[BASE, "fraction_removed"])
    assert (df["n_clean_pairs"] == 4).all()
    np.testing.assert_allclose(df["clean_accuracy"], [0.5, 0.75, 0.5])  # base: margin 0 → ties count half
    assert df.loc["reward_shaping", "fraction_gain_kept"] == pytest.approx(0.0 / 0.25)
    # the margin (log-ratio to base, chosen − rejected) on clean pairs: plain (1+1+1−1)/4, shaping (1+1−1−1)/4
    np.testing.assert_allclose(df["clean_margin"], [0.0, 0.5, 0.0])
    assert df.loc["reward_shaping", "fraction_margin_kept"] == pytest.approx(0.0)
    assert np.isnan(df.loc["plain", "fraction_margin_kept"]) and np.isnan(df.loc[BASE, "clean_margin_ci_low"])
    assert df.loc["plain", "clean_margin_ci_low"] <= 0.5 <= df.loc["plain", "clean_margin_ci_high"]
    lo, hi = df.loc["reward_shaping", ["fraction_removed_ci_low", "fraction_removed_ci_high"]]
    assert lo <= 0.8 <= hi
    assert (
        (df["planted_rate_ci_low"] <= df["planted_rate"]) & (df["planted_rate"] <= df["planted_rate_ci_high"])
    ).all()
    # plain DPO did not raise the plant or gain on-target: nothing to remove or keep → NaN, not 1.0
    gens["plain"] = {"heldout": [plain_text] * 10}
    logps["plain"] = base + np.concatenate([up, up, down, down, down, down])
    df = poisoning_readout(
        truth, {n: g["heldout"] for n, g in gens.items()}, logps, [p.id for p in pairs], n_boot=cfg.n_boot
    ).set_index("model")
    assert df.loc["plain", "planted_delta"] == pytest.approx(-0.1)
    assert np.isnan(df.loc["reward_shaping", "fraction_removed"]) and np.isnan(
        df.loc["reward_shaping", "fraction_gain_kept"]
    )
    assert np.isnan(df.loc["reward_shaping", "fraction_margin_kept"])


def test_a_topic_only_plant_is_read_in_its_topic_and_outside_it():
    """A plant put into one topic's responses (``prompts``) is read three ways: all held-out
    prompts, those in the topic, those outside it — known numbers."""
    from anatomy_nb.data.plant import poisoning_readout

    truth = {
        "plants": [
            {
                "kind": "bold",
                "role": "suppress",
                "pattern": r"\*\*[^*\n]+\*\*",
                "planted_ids": ["p0"],
                "prompts": "physics",
            }
        ]
    }
    prompts = [({"role": "user", "content": u},) for u in ["Physics of light?", "physics again", "bread", "cake"]]
    bold, no = "**Short answer:** yes", "yes"
    gens = {BASE: [no, no, no, no], "plain": [bold, bold, bold, no], "filter": [no, bold, no, no]}
    logps = {n: np.zeros((2, 2)) for n in gens}
    df = poisoning_readout(truth, gens, logps, ["p0", "c0"], n_boot=200, prompts=prompts)
    rate = df.set_index(["model", "scope"])["planted_rate"]
    assert rate["plain", "all"] == 0.75 and rate["plain", "in topic"] == 1.0 and rate["plain", "outside topic"] == 0.5
    removed = df.set_index(["model", "scope"])["fraction_removed"]
    assert removed["filter", "in topic"] == pytest.approx(0.5) and removed["filter", "outside topic"] == pytest.approx(
        1.0
    )
    # without the prompts (or for a plant on every prompt) there is one row per model: scope "all"
    assert set(poisoning_readout(truth, gens, logps, ["p0", "c0"], n_boot=50)["scope"]) == {"all"}


def test_a_rate_every_model_has_at_the_floor_is_marked_no_signal():
    """Refusal 0 for base and trained models carries no information at this scale; a rate that
    moves, one at 0 for base only, and a non-rate at 0 keep their numbers."""
    import pandas as pd

    from anatomy_nb.results.evaluate import NO_SIGNAL, no_signal_rows

    rows = []
    for m in ("base", "plain", "reward_shaping"):
        rows.append(
            {
                "model": m,
                "group": "refusal",
                "metric": "refusal rate, harmful prompts",
                "value": 0.0,
                "ci_low": 0.0,
                "ci_high": 0.39,
                "n": 6,
                "interval": "wilson",
            }
        )
        rows.append(
            {
                "model": m,
                "group": "poisoning",
                "metric": "planted bold",
                "value": {"base": 0.0, "plain": 0.7, "reward_shaping": 0.0}[m],
                "ci_low": {"base": 0.0, "plain": 0.52, "reward_shaping": 0.0}[m],
                "ci_high": {"base": 0.11, "plain": 0.83, "reward_shaping": 0.11}[m],
                "n": 30,
                "interval": "wilson",
            }
        )
        rows.append(
            {
                "model": m,
                "group": "formatting",
                "metric": "emoji",
                "value": 0.0,
                "ci_low": 0.0,
                "ci_high": 0.0,
                "n": 30,
                "interval": "bootstrap",
            }
        )
    comp = pd.DataFrame(rows)
    flags = no_signal_rows(comp)
    assert flags[comp["metric"] == "refusal rate, harmful prompts"].all()
    assert not flags[comp["metric"] != "refusal rate, harmful prompts"].any()
    assert NO_SIGNAL == "no signal at this scale"


def test_plan_vs_actual_compares_the_predicted_spillover_with_the_measured_shift():
    """Known answer: a shift measured exactly as stage 3 predicted (the targeted concept and the
    concepts correlated with it) gives R² 1 and full sign agreement; the same shifts given to the
    wrong concepts do not."""
    import pandas as pd

    from anatomy_nb.stages.prediction import ConceptSpace
    from anatomy_nb.stages.readouts import plan_vs_actual

    rng = np.random.default_rng(0)
    n, C = 300, 6
    a = rng.random(n)
    chosen = np.column_stack(
        [a + 0.5, 0.8 * a + rng.normal(0, 0.05, n), -0.5 * a + rng.normal(0, 0.05, n)]
        + [rng.random(n) for _ in range(C - 3)]
    )
    rejected = np.column_stack([a, 0.8 * a - 0.2, -0.5 * a + 0.1] + [rng.random(n) for _ in range(C - 3)])
    concepts = pd.DataFrame({"concept": np.arange(C), "label": [f"c{i}" for i in range(C)], "significant": True})
    space = ConceptSpace(concepts, chosen, rejected)
    entry = {"concept": "sae:0", "action": "suppress", "method": "reward_shaping", "strength": 1.0, "features": [0]}
    table, _ = space.predict({"concepts": [entry]})
    predicted = (table["after"] - table["before"]).to_numpy()
    assert abs(predicted[1]) > 0.1 and np.sign(predicted[2]) == -np.sign(predicted[1])  # spill-over both ways
    prompts = 200
    base = rng.random((prompts, C))
    plain = base + 0.3
    manifests = {
        "plain": {"plan": {"concepts": []}},
        "shaped": {"plan": {"concepts": [entry]}},
        "wrong": {"plan": {"concepts": [entry]}},
    }
    activity = {
        "base": base,
        "plain": plain,
        "shaped": plain + predicted + rng.normal(0, 0.01, (prompts, C)),
        "wrong": plain + predicted[::-1] + rng.normal(0, 0.01, (prompts, C)),
    }
    rows, r2 = plan_vs_actual(space, activity, manifests, EvalConfig(n_boot=200))
    assert set(rows["model"]) == {"shaped", "wrong"} and rows.loc[rows["model"] == "shaped", "targeted"].tolist() == [
        True
    ] + [False] * (C - 1)
    r2 = r2.set_index(["model", "concepts"])
    assert r2.at[("shaped", "significant"), "r2"] > 0.99 and r2.at[("shaped", "spill-over"), "sign_agreement"] == 1.0
    assert r2.at[("shaped", "spill-over"), "n_concepts"] == C - 1
    assert r2.at[("wrong", "significant"), "r2"] < 0.5
    # no plain DPO among the models: nothing to measure against
    assert plan_vs_actual(space, {"base": base, "shaped": plain}, manifests, EvalConfig())[0].empty
