"""`make compare` on the tiny model: two plants (one to suppress, one to keep), plain DPO beside all
five interventions (CAFT in both ablations), one evaluation, the head-to-head table and the report.
The real-model run is `make compare` (docs/explanation.md: "The paper's comparison")."""

import json

import numpy as np
import pandas as pd
import pytest

from anatomy_nb.config import PipelineConfig
from anatomy_nb.core.config_base import ConfigError
from anatomy_nb.lm.sae import save_sae
from anatomy_nb.pipeline import load_config, run_pipeline
from anatomy_nb.results.run import RunDir

CONFIG_METHODS = ["reward_shaping", "filter", "inoculate", "steer", "ablate_zero", "ablate_mean"]
# the five; CAFT once (zero ablation: test_train); shaping and inoculation named as a sweep's points
# the last amplifies
METHODS = ["reward_shaping@2", "filter", "inoculate#1", "steer", "ablate_mean", "reward_shaping@-1"]


@pytest.fixture(scope="module")
def tiny_sae_dir(tmp_path_factory, tiny_sae_):
    return str(save_sae(tiny_sae_, tmp_path_factory.mktemp("sae") / "tiny_sae"))


@pytest.mark.long  # `make test-e2e` (CI): seven training runs and two notebooks per method, ~150 s
def test_compare_runs_every_method_against_plain_on_two_plants(tmp_path, tiny_sae_dir):
    cfg = load_config(
        __import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "compare.yaml",
        {
            "run_dir": str(tmp_path / "run"),
            "extract": {"model": "tiny-llama", "sae": tiny_sae_dir, "n_pairs": 40},
            "target": 0,  # the tiny model's concept names are noise: pick by id
            "methods": METHODS,
            "order_seeds": [1],  # the config's extra orders, at one seed for plain DPO and filtering
            "order_methods": ["plain", "filter"],
            "hypothesize": {"concepts": {"min_support": 3}, "length_placebo_draws": 0},
            "train": {
                "max_train_pairs": 8,
                "max_steps": 1,
                "batch_size": 2,
                "max_length": 256,
                "mean_ablation_pairs": 4,
            },
            "evaluate": {"n_prompts": 4, "max_new_tokens": 4, "n_boot": 50, "max_pref_pairs": 8},
            "html": False,
            "report": False,  # rendered below without the notebooks' HTML (9 renders: ~20 s)
        },
    )
    full = load_config(__import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "compare.yaml")
    assert full.methods == CONFIG_METHODS and full.order_methods == ["plain", "reward_shaping", "filter"]
    assert [p["role"] for p in cfg.plants] == ["suppress", "keep"]
    state = run_pipeline(cfg, log=lambda s: None)
    assert list(state["steps"]) == [
        "extract",
        "hypothesize",
        "plan",
        "train-plain",
        *[f"train-{m}" for m in METHODS],
        "train-plain-order1",
        "train-filter-order1",
        "evaluate",
    ]
    run = RunDir(cfg.run_dir)
    # ground truth: two plants, each its own half of the pairs, with its role
    truth = json.loads((run.path / "data" / "planted.planted.json").read_text())
    assert [(p["kind"], p["role"], p["n_planted"]) for p in truth["plants"]] == [
        ("bold", "suppress", 20),
        ("opener", "keep", 20),
    ]
    assert truth["kind"] == "bold" and set(truth["planted_ids"]) == set(truth["plants"][0]["planted_ids"])
    # each variant's plan: CAFT zero / mean, shaping at the swept strength, the inoculation's
    # instruction the best-ranked one (the tiny model's concept yields one candidate)
    plans = {m: json.loads((run.path / "plan" / f"{m}.json").read_text())["concepts"][0] for m in METHODS}
    assert (plans["ablate_mean"]["method"], plans["ablate_mean"]["ablation"]) == ("ablate", "mean")
    ranking = json.loads((run.path / "plan" / "inoculation.json").read_text())["ranking"]
    assert len(ranking) >= 1 and plans["inoculate#1"]["instruction"] == ranking[0]["instruction"]
    assert (plans["reward_shaping@2"]["method"], plans["reward_shaping@2"]["strength"]) == ("reward_shaping", 2.0)
    assert all(plans[m]["action"] == "suppress" for m in METHODS[:-1])
    # λ < 0 raises the concept
    assert (plans["reward_shaping@-1"]["action"], plans["reward_shaping@-1"]["strength"]) == ("amplify", 1.0)
    target = json.loads((run.path / "plan" / "target.json").read_text())
    assert set(target["plant_concepts"]) == {"bold", "opener"} and all(
        0 <= v["auroc"] <= 1 for v in target["plant_concepts"].values()
    )
    lifts = [r["lift"] for r in ranking]
    assert lifts == sorted(lifts, reverse=True)
    # one evaluation of all seven trained models; both plants read out, each with its role
    ev = run.evaluation
    assert ev.models == ["base", "plain", *METHODS, "plain-order1", "filter-order1"]
    spread = ev.order_spread()
    assert set(spread["run"]) == {"plain", "filter"} and (spread["orders"] == 2).all()
    poison = ev.poisoning()
    assert sorted(set(zip(poison["kind"], poison["role"]))) == [("bold", "suppress"), ("opener", "keep")]
    assert len(poison) == 2 * len(ev.models)
    assert poison.loc[poison["role"] == "keep", "fraction_removed"].isna().all()
    assert poison.loc[poison["role"] == "suppress", "fraction_kept"].isna().all()
    h2h = ev.head_to_head()
    assert list(h2h["model"]) == ["plain", *METHODS, "plain-order1", "filter-order1"]
    assert {
        "bold removed",
        "opener kept",
        "preference accuracy",
        "off-target movers",
        "R² (overall)",
        "step-time ratio",
    } <= set(h2h.columns)
    assert np.isclose(h2h.set_index("model").at["plain", "step-time ratio"], 1.0)
    assert (h2h["step-time ratio"] > 0).all()
    table = ev.head_to_head_table()
    assert list(table.columns)[0] == "model" and len(table) == len(METHODS) + 3
    from anatomy_nb.ui.report import report

    html = report(run.path, render=False).read_text()
    assert "Head to head" in html and "ablate_mean" in html


def test_compare_config_errors():
    from anatomy_nb.methods import method_variant

    assert method_variant("ablate_zero") == ("ablate", {"ablation": "zero"}) and method_variant("steer") == (
        "steer",
        {},
    )
    assert method_variant("reward_shaping@0.5") == ("reward_shaping", {"strength": 0.5})
    assert method_variant("ablate_mean@0.5") == ("ablate", {"ablation": "mean", "strength": 0.5})
    assert method_variant("inoculate#3") == ("inoculate", {"instruction_rank": 3})
    with pytest.raises(ConfigError, match="after @ must be a number"):
        PipelineConfig.from_dict({"methods": ["reward_shaping@big"]})
    assert method_variant("reward_shaping@-1") == ("reward_shaping", {"strength": -1.0})
    with pytest.raises(ConfigError, match="ablate can only suppress"):
        PipelineConfig.from_dict({"methods": ["ablate_mean@-0.5"]})
    with pytest.raises(ConfigError, match="only inoculate takes it"):
        PipelineConfig.from_dict({"methods": ["filter#2"]})
    with pytest.raises(ConfigError, match=r"plant\[1\]\.role"):
        PipelineConfig.from_dict({"plant": [{"kind": "bold"}, {"kind": "opener", "role": "amplify"}]})
    with pytest.raises(ConfigError, match="unknown keys"):
        PipelineConfig.from_dict({"plant": [{"kind": "bold", "fration": 0.5}]})
    with pytest.raises(ConfigError, match="ablate_mean"):
        PipelineConfig.from_dict({"methods": ["ablate_median"]})
    with pytest.raises(ConfigError, match="twice"):
        PipelineConfig.from_dict({"methods": ["filter", "filter"]})


def test_a_target_is_picked_by_its_name(tmp_path):
    """``target: "name:<text>"`` picks the highest-ranked significant up concept whose name has the
    text, as a person does reading the names; a text no name has is an error listing the top ones."""
    from anatomy_nb.stages.plan import choose_target

    class Hyp:
        def ranked(self):
            return pd.DataFrame(
                {
                    "source": "sae",
                    "concept": [4, 7, 9],
                    "significant": [True, True, False],
                    "predicted_direction": ["up", "up", "up"],
                    "name": ["“great question”", "“short answer” · “**”", "“short answer”"],
                    "label": ["“great question”", "“short answer” · “**”; peaks on **", "x"],
                }
            )

    assert choose_target(Hyp(), "name:Short Answer") == 7
    assert choose_target(Hyp(), "top") == 4
    with pytest.raises(ValueError, match="no significant concept.*pineapple.*4: “great question”"):
        choose_target(Hyp(), "name:pineapple")


def test_the_tradeoff_plot_joins_a_sweep_by_strength():
    """A sweep's points of one method are joined in the order of their strength (not of the
    table); points are coloured by held-out preference accuracy; a run without a kept plant has no plot."""
    from anatomy_nb.ui.viz import tradeoff_figure

    rows = [
        ("plain", np.nan, np.nan, 0.83),
        ("reward_shaping@4", 1.0, 0.2, 0.79),
        ("reward_shaping@0.5", 0.4, 0.9, 0.82),
        ("reward_shaping@1", 0.7, 0.6, 0.8),
        ("inoculate", 1.0, 0.9, 0.8),
    ]
    h2h = pd.DataFrame(rows, columns=["model", "bold removed", "opener kept", "preference accuracy"])
    for c in ("bold removed", "opener kept"):
        h2h[f"{c}_ci_low"], h2h[f"{c}_ci_high"] = h2h[c] - 0.1, h2h[c] + 0.1
    fig = tradeoff_figure(h2h)
    points, *lines = fig.data
    assert list(points.text) == ["reward_shaping@4", "reward_shaping@0.5", "reward_shaping@1", "inoculate"]
    assert list(points.marker.color) == [0.79, 0.82, 0.8, 0.8]
    assert len(lines) == 1 and list(lines[0].x) == [0.4, 0.7, 1.0] and lines[0].name == "reward_shaping (by strength)"
    assert tradeoff_figure(h2h.drop(columns=[c for c in h2h.columns if c.startswith("opener")])) is None


def test_an_entangled_plant_draws_its_overlap_from_the_first_plants_pairs():
    """``overlap``: the share of a later plant's pairs drawn from the first plant's; independent
    draws otherwise (the compare data are unchanged by the option's existence)."""
    from anatomy_nb.data.plant import PLANT_KINDS, draw, plant_all, planted_hits
    from anatomy_nb.data.schema import PreferencePair

    pairs = [
        PreferencePair(
            id=f"p{i}", prompt=({"role": "user", "content": f"q{i}"},), chosen=f"answer {i}", rejected=f"no {i}"
        )
        for i in range(400)
    ]
    out, plants = plant_all(
        pairs,
        [{"kind": "bold", "fraction": 0.5, "seed": 0}, {"kind": "heading", "fraction": 0.4, "seed": 1, "overlap": 0.9}],
    )
    a, b = set(plants[0]["idx"].tolist()), set(plants[1]["idx"].tolist())
    assert (len(a), len(b), len(a & b)) == (200, 160, 144)
    both = out[sorted(a & b)[0]].chosen
    assert (
        both.startswith("## Answer\n\n**Short answer:** ")
        and planted_hits([both], PLANT_KINDS["heading"].pattern)[0] == 1.0
    )
    assert planted_hits(["Answer: yes", "The ## Answer"], PLANT_KINDS["heading"].pattern).tolist() == [0.0, 0.0]
    # without overlap: the same draw as before the option (the compare run's data and keys stay)
    _, independent = plant_all(
        pairs, [{"kind": "bold", "fraction": 0.5, "seed": 0}, {"kind": "opener", "fraction": 0.5, "seed": 1}]
    )
    assert np.array_equal(independent[1]["idx"], np.sort(np.random.default_rng(1).choice(400, size=200, replace=False)))
    assert np.array_equal(
        draw(400, 0.4, 1, within=plants[0]["idx"], overlap=0.0),
        np.sort(draw(400, 0.4, 1, within=plants[0]["idx"], overlap=0.0)),
    )
    assert not set(draw(400, 0.4, 1, within=plants[0]["idx"], overlap=0.0).tolist()) & a
    with pytest.raises(ValueError, match="plant 1: overlap 1.0 of 300 pairs needs 300 of the first plant's 200"):
        plant_all(pairs, [{"kind": "bold", "fraction": 0.5}, {"kind": "heading", "fraction": 0.75, "overlap": 1.0}])
    with pytest.raises(ConfigError, match=r"plant\[0\]\.overlap"):
        PipelineConfig.from_dict({"plant": [{"kind": "bold", "overlap": 0.5}, {"kind": "heading"}]})
    with pytest.raises(ConfigError, match=r"plant\[1\]\.overlap"):
        PipelineConfig.from_dict({"plant": [{"kind": "bold"}, {"kind": "heading", "overlap": 1.5}]})


def test_the_experiment_configs_share_the_compare_run_where_they_say_so():
    """sweep and amplify run in compare's run directory: the same data, plants, target and stage
    configs, so extraction, the audit and plain DPO are reused, not recomputed."""
    root = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs"
    compare = load_config(root / "compare.yaml")
    for name in ("sweep", "amplify"):
        cfg = load_config(root / f"{name}.yaml")
        assert (cfg.run_dir, cfg.plants, cfg.target, cfg.extract, cfg.hypothesize, cfg.train, cfg.evaluate) == (
            compare.run_dir,
            compare.plants,
            compare.target,
            compare.extract,
            compare.hypothesize,
            compare.train,
            compare.evaluate,
        ), name
    amplify = load_config(root / "amplify.yaml")
    assert all(method_variant_strength(m) < 0 for m in amplify.methods)
    entangled = load_config(root / "entangled.yaml")
    assert entangled.run_dir != compare.run_dir and entangled.plants[1]["overlap"] == 0.9


def test_the_real_data_configs_audit_the_data_as_it_is():
    """`make real`'s configs (their runs stay out of CI; results in benchmarks/results/): no plant,
    plain DPO only, 30 % of the prompts held out, 512 training pairs; every held-out PandaLM
    instruction is evaluated. And compare.yaml trains plain DPO, shaping and filtering in orders 0-2."""
    from anatomy_nb.data.pairs import load_pairs
    from anatomy_nb.pipeline import training_orders
    from anatomy_nb.stages.train import split_pairs

    root = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs"
    for name, data, n_pairs in (("real-hh", "hh-rlhf", 1200), ("real-pandalm", "pandalm", None)):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.plants == [] and cfg.methods == [] and cfg.run_dir == f"runs/{name}"
        assert (cfg.extract.data, cfg.extract.n_pairs) == (data, n_pairs)
        assert (cfg.train.heldout_fraction, cfg.train.max_train_pairs) == (0.3, 512) and not cfg.evaluate.behaviour
    pandalm = load_pairs("pandalm")
    train, held = split_pairs(pandalm, 0.3, 0)
    held_prompts = {pandalm[i].prompt_key for i in held}
    assert (
        len(pandalm) > 800
        and len(train) >= 512
        and 40 <= len(held_prompts) <= load_config(root / "real-pandalm.yaml").evaluate.n_prompts
    )
    compare = load_config(root / "compare.yaml")
    assert [n for n, _, _ in training_orders(compare)] == [
        f"{r}-order{s}" for s in (1, 2) for r in ("plain", "reward_shaping", "filter")
    ]


def method_variant_strength(name: str) -> float:
    from anatomy_nb.methods import method_variant

    return method_variant(name)[1]["strength"]


def test_a_prompt_conditioned_plant_goes_only_into_one_topics_responses():
    """``prompts``: a topic defined from outside the pipeline (a regex on the user's messages); the
    plant goes into a seeded share of that topic's pairs only, and the truth file names the topic's pairs."""
    from anatomy_nb.data.plant import plant_all, topic_pairs, write_planted
    from anatomy_nb.data.schema import PreferencePair

    words = [
        "How do I bake bread?",
        "What is quantum physics?",
        "Tell me a joke",
        "Is the universe a hologram in physics terms?",
    ]
    pairs = [
        PreferencePair(
            id=f"p{i}", prompt=({"role": "user", "content": words[i % 4]},), chosen=f"answer {i}", rejected=f"no {i}"
        )
        for i in range(200)
    ]
    topic = topic_pairs(pairs, r"\bphysics\b")
    assert len(topic) == 100 and all("physics" in pairs[i].prompt_text for i in topic)
    out, plants = plant_all(pairs, [{"kind": "opener", "fraction": 0.5, "seed": 3, "prompts": r"\bphysics\b"}])
    planted = plants[0]["idx"]
    assert len(planted) == 50 and set(planted.tolist()) <= set(topic.tolist())
    assert all(out[i].chosen.startswith("Great question! ") == (i in set(planted.tolist())) for i in range(200))
    truth = json.loads(
        write_planted(out, plants, __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "p.jsonl")
        .with_suffix(".planted.json")
        .read_text()
    )
    assert truth["plants"][0]["prompts"] == r"\bphysics\b" and len(truth["plants"][0]["topic_ids"]) == 100
    with pytest.raises(ValueError, match="plant 0: prompts 'chemistry' matches no prompt of the 200 pairs"):
        plant_all(pairs, [{"kind": "opener", "prompts": "chemistry"}])
    with pytest.raises(ValueError, match="give one"):
        plant_all(pairs, [{"kind": "bold"}, {"kind": "opener", "overlap": 0.5, "prompts": "physics"}])
    with pytest.raises(ConfigError, match=r"plant\.prompts: not a valid regular expression"):
        PipelineConfig.from_dict({"plant": {"kind": "opener", "prompts": "(physics"}})


def test_target_scope_picks_the_topic_the_grid_found_or_a_prompt_regex(tiny_eval, tmp_path):
    """``target_scope: topic``: the plans act on the stage-2 topic whose row of the target is the
    highest-ranked significant one DPO would raise; ``prompts:<regex>``: on matching prompts; the
    methods that edit the model on every prompt refuse a scope at config time."""
    from anatomy_nb.pipeline import build_plans
    from anatomy_nb.results.run import RunDir
    from anatomy_nb.stages.plan import choose_topic

    class Hyp:
        def ranked_by_topic(self):  # the topic × concept rows in rank order
            return pd.DataFrame(
                {
                    "source": "sae",
                    "concept": [4, 4, 9],
                    "view": "topic",
                    "topic": [2, 5, 1],
                    "significant": [False, True, True],
                    "predicted_direction": ["up", "up", "up"],
                }
            )

    assert choose_topic(Hyp(), 4) == 5  # topic 2's row is not significant
    with pytest.raises(ValueError, match="concept 7 has no significant topic row"):
        choose_topic(Hyp(), 7)
    cfg = PipelineConfig.from_dict(
        {"target": tiny_eval.concept, "target_scope": "prompts:bread|tea", "methods": ["reward_shaping", "filter"]}
    )
    import shutil

    run = RunDir.of(shutil.copytree(tiny_eval.run, tmp_path / "run"))  # the shared fixture's plans stay as they are
    plans = build_plans(run, cfg, log=lambda *_: None)
    assert all(p["concepts"][0]["prompts"] == "bread|tea" for p in plans.values())
    assert json.loads((run.path / "plan" / "target.json").read_text())["scope"] == {"prompts": "bread|tea"}
    with pytest.raises(ConfigError, match="'steer' edits the model on every prompt"):
        PipelineConfig.from_dict({"target_scope": "topic", "methods": ["steer"]})
    with pytest.raises(ConfigError, match="target_scope must be"):
        PipelineConfig.from_dict({"target_scope": "somewhere"})
