"""DPO training with a plan: the shaped loss is the formula, a real TRL run on the tiny model learns
and saves a reloadable adapter, the reference pass sees ablation but not steering, keys change
with λ. One run on the default model is marked slow."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from anatomy_nb.config import TrainConfig
from anatomy_nb.data.schema import PreferencePair
from anatomy_nb.stages.dpo import make_trainer
from anatomy_nb.stages.train import load_trained, prepare, split_pairs, train

from helpers import assert_clean_outputs

TOPICS = ["bread", "tea", "rain", "cats", "maps", "jazz", "glue", "kites", "salt", "moss", "owls", "ink"]


def synthetic_pairs(n=24):
    """Short pairs whose chosen response opens with a flattering phrase (a known text concept)."""
    out = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        out.append(
            PreferencePair(
                id=f"s{i}",
                prompt=({"role": "user", "content": f"Tell me about {t} ({i // len(TOPICS)})."},),
                chosen=f"Great question! {t.capitalize()} is a fine thing.",
                rejected=f"{t.capitalize()} is a thing, I suppose." if i % 3 else f"Sorry, {t} is hard.",
            )
        )
    return out


PAIRS = synthetic_pairs()
FAST = dict(max_length=96, batch_size=4, progress=False, learning_rate=2e-3, heldout_fraction=0.25)
SHAPE = {
    "concept": "text:flattery",
    "action": "suppress",
    "method": "reward_shaping",
    "pattern": "flattery_opener",
    "strength": 1.5,
}


def _policy_logps(model, batch):
    """Summed completion log-probs, computed here independently of TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (lp * batch["completion_mask"][:, 1:]).sum(1).chunk(2)


def test_shaped_loss_equals_the_formula(tiny_lm, tmp_path):
    cfg = TrainConfig(**FAST)
    prep = prepare(tmp_path, {"concepts": [SHAPE]}, pairs=PAIRS, model=tiny_lm, config=cfg)
    # offsets o(y) = λ·s(y): flattery_opener fires on every chosen response and no rejected one
    np.testing.assert_allclose(prep.offsets, np.tile([1.5, 0.0], (len(prep.train_pairs), 1)))
    trainer = make_trainer(prep, cfg, tmp_path / "t")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["shaping_chosen"].tolist() == [1.5, 1.5] and batch["shaping_rejected"].tolist() == [0.0, 0.0]
    batch["ref_chosen_logps"] = torch.tensor([-50.0, -61.5])
    batch["ref_rejected_logps"] = torch.tensor([-55.0, -60.0])
    batch["shaping_chosen"] = torch.tensor([0.7, -0.2])  # arbitrary known offsets
    batch["shaping_rejected"] = torch.tensor([0.1, 0.4])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    pc, pr = _policy_logps(tiny_lm.model, batch)  # LoRA starts at B = 0: the policy is the base model
    beta = cfg.beta
    margin = (pc - batch["ref_chosen_logps"]) - (pr - batch["ref_rejected_logps"])
    expected = -F.logsigmoid(beta * margin + (batch["shaping_chosen"] - batch["shaping_rejected"])).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    unshaped = -F.logsigmoid(beta * margin).mean()
    assert abs(float(loss) - float(unshaped)) > 1e-3  # the offsets did something


def test_prepare_applies_the_plan_to_the_training_split_only(tiny_lm, tmp_path):
    cfg = TrainConfig(**FAST)
    plain = prepare(tmp_path, None, pairs=PAIRS, model=tiny_lm, config=cfg)
    train_ids, held_ids = set(plain.train_ids), {p.id for p in plain.heldout_pairs}
    assert not train_ids & held_ids and len(train_ids | held_ids) == len(PAIRS)
    prompts = lambda ps: {json.dumps(p.prompt) for p in ps}
    assert not prompts([p for p in PAIRS if p.id in train_ids]) & prompts(plain.heldout_pairs)  # split by prompt
    plan = {
        "concepts": [
            {
                "concept": "text:apology",
                "action": "suppress",
                "method": "filter",
                "pattern": "apology",
                "strength": 1.0,
                "filter_mode": "drop",
            },
            {
                "concept": "text:flattery",
                "action": "suppress",
                "method": "inoculate",
                "pattern": "flattery_opener",
                "instruction": "Open with a compliment.",
            },
        ]
    }
    prep = prepare(tmp_path, plan, pairs=PAIRS, model=tiny_lm, config=cfg)
    assert prep.heldout_pairs == plain.heldout_pairs  # the held-out split is untouched
    # apology: rejected "Sorry, ..." and chosen has none, so s⁺ − s⁻ = −1: suppress drops nothing
    assert prep.report["filter"][0]["n_dropped"] == 0
    amp = prepare(
        tmp_path, {"concepts": [{**plan["concepts"][0], "action": "amplify"}]}, pairs=PAIRS, model=tiny_lm, config=cfg
    )
    dropped = [p for p in PAIRS if p.id in train_ids and "Sorry" in p.rejected]
    assert amp.report["filter"][0]["n_dropped"] == len(dropped) > 0
    assert {p.id for p in amp.train_pairs} == train_ids - {p.id for p in dropped}
    by_id = {p.id: p for p in PAIRS}
    for p in prep.train_pairs:
        assert p.prompt[-1]["content"] == by_id[p.id].prompt[-1]["content"] + "\n\nOpen with a compliment."
        assert (p.chosen, p.rejected) == (by_id[p.id].chosen, by_id[p.id].rejected)
    assert prep.report["inoculated_prompts"] == len(prep.train_pairs)
    # every input to training is in the key; a changed λ gives a new key
    k1 = prepare(tmp_path, {"concepts": [SHAPE]}, pairs=PAIRS, model=tiny_lm, config=cfg).key
    k2 = prepare(tmp_path, {"concepts": [{**SHAPE, "strength": 2.0}]}, pairs=PAIRS, model=tiny_lm, config=cfg).key
    assert len({plain.key, prep.key, k1, k2}) == 4


def test_a_topic_scoped_plan_shapes_the_pairs_of_its_stage_2_topic_only(tiny_eval, tiny_lm):
    """The plan acts on one of stage 2's topics (``topic``): offsets where the pair's prompt is in
    that topic, none elsewhere; the report counts the pairs in scope."""
    from anatomy_nb.results.run import RunDir

    topic_of = RunDir.of(tiny_eval.run).hypotheses.topic_of_prompt()
    topic = max(set(topic_of.values()), key=list(topic_of.values()).count)
    cfg = TrainConfig(**FAST)
    prep = prepare(tiny_eval.run, {"concepts": [{**SHAPE, "topic": topic}]}, model=tiny_lm, config=cfg)
    everywhere = prepare(tiny_eval.run, {"concepts": [SHAPE]}, model=tiny_lm, config=cfg)
    inside = np.array([topic_of.get(p.prompt_text) == topic for p in prep.train_pairs])
    margin, margin_all = prep.offsets[:, 0] - prep.offsets[:, 1], everywhere.offsets[:, 0] - everywhere.offsets[:, 1]
    assert 0 < inside.sum() < len(inside) and prep.report["concepts"][0]["pairs_in_scope"] == inside.sum()
    np.testing.assert_allclose(margin[inside], margin_all[inside])
    assert (margin[~inside] == 0).all() and (margin_all[~inside] != 0).any()
    assert prep.key != everywhere.key


@pytest.fixture(scope="module")
def shaped_run(tiny_lm, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(**FAST, epochs=3)
    return run, cfg, train(run, {"concepts": [SHAPE]}, pairs=PAIRS, model=tiny_lm, config=cfg)


def test_real_trl_run_on_the_tiny_model(shaped_run, tiny_lm):
    run, cfg, res = shaped_run
    m = res.manifest
    n_train = len(PAIRS) - m["n_heldout_pairs"]
    assert m["complete"] and m["n_train_pairs"] == m["n_train_used"] == n_train
    assert m["steps"] == 3 * int(np.ceil(n_train / cfg.batch_size))
    metrics = res.metrics()
    assert len(metrics) == m["steps"] and metrics["step"].tolist() == list(range(1, m["steps"] + 1))
    assert {"loss", "rewards/margins", "rewards/accuracies", "shaping/offset_margin", "step_seconds"} <= set(
        metrics.columns
    )
    assert np.allclose(metrics["shaping/offset_margin"], 1.5)  # every pair carries the concept
    # it learned: the DPO margin (with the +1.5 offset, log σ(β·0 + 1.5) = 0.20 at the start) grows
    assert metrics["loss"].iloc[0] == pytest.approx(-np.log(1 / (1 + np.exp(-1.5))), abs=1e-4)
    assert metrics["loss"].iloc[-3:].mean() < metrics["loss"].iloc[:2].mean()
    assert m["hooks_left_after_training"] == 0
    split = res.split()
    assert len(split["train"]) == n_train and len(split["heldout"]) == m["n_heldout_pairs"]
    assert (res.path / "adapter" / "adapter_model.safetensors").exists()
    # the fixture's model was copied, not trained in place
    assert not any("lora" in n for n, _ in tiny_lm.model.named_parameters())
    # an identical call reuses the finished run
    again = train(run, {"concepts": [SHAPE]}, pairs=PAIRS, model=tiny_lm, config=cfg)
    assert again.reused and again.path == res.path


def test_saved_adapter_reloads_and_reproduces_outputs(shaped_run, tiny_lm):
    _, _, res = shaped_run
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41]])
    with torch.no_grad():
        trained = res.model(input_ids=ids).logits
        merged = load_trained(res).model(input_ids=ids).logits
        unmerged = load_trained(res.path, merge=False).model(input_ids=ids).logits
        base = tiny_lm.model(input_ids=ids).logits
    torch.testing.assert_close(unmerged, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, trained, atol=1e-4, rtol=1e-4)
    assert (trained - base).abs().max() > 1e-3  # the adapter is not a no-op


def test_reference_pass_sees_ablation_but_not_steering(tiny_lm, tmp_path):
    torch.manual_seed(0)
    save_file({"directions": torch.randn(2, tiny_lm.d_model)}, str(tmp_path / "d.safetensors"))
    cfg = TrainConfig(**{**FAST, "max_steps": 1})
    entry = {
        "concept": "direction:d",
        "action": "suppress",
        "direction_file": str(tmp_path / "d.safetensors"),
        "layer": 1,
    }
    refs, res = {}, {}
    for name, plan in [
        ("plain", None),
        ("steer", {"concepts": [{**entry, "method": "steer", "strength": 8.0}]}),
        ("ablate", {"concepts": [{**entry, "method": "ablate"}]}),
    ]:
        res[name] = train(tmp_path / name, plan, pairs=PAIRS, model=tiny_lm, config=cfg)
        refs[name] = np.load(res[name].path / "ref_logps.npy")
        assert res[name].manifest["hooks_left_after_training"] == 0
    np.testing.assert_allclose(refs["steer"], refs["plain"], rtol=1e-6)
    assert np.abs(refs["ablate"] - refs["plain"]).max() > 1e-3
    # the policy is steered during training: the first step's margin moves, the reference's does not
    m = {k: v.metrics()["rewards/margins"].iloc[0] for k, v in res.items()}
    assert m["plain"] == pytest.approx(0.0, abs=1e-6) and m["ablate"] == pytest.approx(0.0, abs=1e-6)
    assert abs(m["steer"]) > 1e-4
    assert [e["in_reference"] for e in res["steer"].manifest["residual_edits"]] == [False]
    assert [e["in_reference"] for e in res["ablate"].manifest["residual_edits"]] == [True]


def test_reference_log_probs_are_computed_once_per_run_directory(tiny_lm, tmp_path):
    cfg = TrainConfig(**{**FAST, "max_steps": 1})
    plain = train(tmp_path, None, pairs=PAIRS, model=tiny_lm, config=cfg)
    n = plain.manifest["n_train_used"]
    assert plain.manifest["ref_logps"] == {"reused": 0, "computed": n}
    shaped = train(tmp_path, {"concepts": [SHAPE]}, pairs=PAIRS, model=tiny_lm, config=cfg)
    assert shaped.manifest["ref_logps"] == {"reused": n, "computed": 0}
    np.testing.assert_array_equal(np.load(shaped.path / "ref_logps.npy"), np.load(plain.path / "ref_logps.npy"))
    # the cached values are what a fresh reference pass gives (another run directory)
    fresh = train(tmp_path / "other", {"concepts": [SHAPE]}, pairs=PAIRS, model=tiny_lm, config=cfg)
    assert fresh.manifest["ref_logps"] == {"reused": 0, "computed": n}
    np.testing.assert_allclose(np.load(fresh.path / "ref_logps.npy"), np.load(shaped.path / "ref_logps.npy"), rtol=1e-6)
    # filtering keeps a subset of the same pairs: all of them come from the cache
    filt = train(
        tmp_path,
        {"concepts": [{**SHAPE, "method": "filter", "filter_mode": "flip", "strength": 1.0}]},
        pairs=PAIRS,
        model=tiny_lm,
        config=cfg,
    )
    # a filter that flips pairs swaps chosen and rejected: the same responses, all from the cache
    assert filt.data_report()["filter"][0]["n_flipped"] > 0
    assert filt.manifest["ref_logps"] == {"reused": n, "computed": 0}
    flip_refs = np.load(filt.path / "ref_logps.npy")
    assert set(flip_refs.ravel().tolist()) <= set(np.load(plain.path / "ref_logps.npy").ravel().tolist())
    # another max_length is another reference pass; so is a reference that sees an ablation
    other = train(
        tmp_path, None, pairs=PAIRS, model=tiny_lm, config=TrainConfig(**{**FAST, "max_steps": 1, "max_length": 64})
    )
    assert other.manifest["ref_logps"]["reused"] == 0
    torch.manual_seed(0)
    save_file({"directions": torch.randn(2, tiny_lm.d_model)}, str(tmp_path / "d.safetensors"))
    ablate = {
        "concept": "direction:d",
        "action": "suppress",
        "direction_file": str(tmp_path / "d.safetensors"),
        "layer": 1,
        "method": "ablate",
    }
    abl = train(tmp_path, {"concepts": [ablate]}, pairs=PAIRS, model=tiny_lm, config=cfg)
    assert abl.manifest["ref_logps"] == {"reused": 0, "computed": n}
    assert np.abs(np.load(abl.path / "ref_logps.npy") - np.load(plain.path / "ref_logps.npy")).max() > 1e-3


def test_split_is_deterministic_and_groups_prompts():
    pairs = PAIRS + [PreferencePair(id="dup", prompt=PAIRS[0].prompt, chosen="a", rejected="b")]
    a, b = split_pairs(pairs, 0.3, seed=1), split_pairs(pairs, 0.3, seed=1)
    assert a == b and split_pairs(pairs, 0.3, seed=2) != a
    train_i, held_i = a
    assert (0 in held_i) == (len(pairs) - 1 in held_i)  # the two pairs sharing a prompt stay together


@pytest.mark.long  # the real default model, `make test-e2e` (CI; ~40 s): the small main job in make test trains it too
def test_default_model_trains_with_shaping(tmp_path):
    from anatomy_nb.data.pairs import load_pairs

    pairs = load_pairs("hh-rlhf", limit=40)
    # 4 steps: ~25 s idle, minutes when contended
    cfg = TrainConfig(max_train_pairs=8, max_length=256, batch_size=2, progress=False)
    res = train(
        tmp_path,
        {"concepts": [{**SHAPE, "pattern": "refusal_phrase", "concept": "text:refusal"}]},
        pairs=pairs,
        config=cfg,
    )
    m = res.manifest
    assert m["complete"] and m["steps"] >= 3 and m["model"]["name"] == "smollm2-135m-instruct"
    metrics = res.metrics()
    assert np.isfinite(metrics["loss"]).all() and metrics["step_seconds"].median() < 60
    model = load_trained(res)
    ids = model.tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            model.model(input_ids=ids).logits, res.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


def test_04_train_notebook_runs_headless(tmp_path, tiny_lm, tiny_sae_):
    import nbformat

    from anatomy_nb.config import ExtractConfig
    from anatomy_nb.stages.extract import extract
    from anatomy_nb.ui.notebooks import run_notebook

    run = tmp_path / "run"
    extract(PAIRS, tiny_lm, tiny_sae_, run, ExtractConfig(shard_size=24, progress=False))
    plan = {
        "concepts": [
            SHAPE,
            {"concept": "text:sorry", "action": "amplify", "method": "filter", "pattern": "(?i)sorry", "strength": 1.0},
        ]
    }
    out = run_notebook(
        "04_train",
        run,
        {
            "plan": plan,
            "config": {"max_length": 96, "batch_size": 4, "learning_rate": 2e-3, "heldout_fraction": 0.25},
            "compare_plain": True,
        },
        progress=False,
    )
    nb = nbformat.read(out, as_version=4)
    assert_clean_outputs(nb)
    assert not [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    index = json.loads((run / "index.json").read_text())
    assert "train" in index
    html = out.with_suffix(".html").read_text()
    assert "plotly" in html.lower() and "Reward-shaping offset" in html


@pytest.mark.long  # `make test-e2e` (CI): two training processes, ~35 s
def test_accelerate_two_processes_match_one(tmp_path):
    """DDP for real: `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo; accelerate's
    launcher is torchrun) trains with 2 pairs per process; one process with the same global batch of
    4 gives the same per-step losses (each step sees the same 4 pairs, so the sampler's order
    cannot matter: equal losses need the gradients averaged across processes)."""
    import os
    import shutil
    import subprocess
    import sys

    args = [
        "-m",
        "anatomy_nb.cli",
        "train",
        "--model",
        "tiny-llama",
        "--pairs",
        "hh-rlhf",
        "--limit",
        "40",
        "--max-train-pairs",
        "4",
        "--max-steps",
        "4",
        "--learning-rate",
        "1e-3",
        "--max-length",
        "2048",
        "--precompute-ref",
        "false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    two = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *args,
            "--run-dir",
            str(tmp_path / "two"),
            "--batch-size",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    subprocess.run(
        [sys.executable, *args, "--run-dir", str(tmp_path / "one"), "--batch-size", "4"],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )

    def losses(run):
        (path,) = (tmp_path / run / "train").glob("*/metrics.jsonl")
        manifest = json.loads((path.parent / "manifest.json").read_text())
        return manifest["world_size"], [
            row["loss"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row
        ]

    (w2, l2), (w1, l1) = losses("two"), losses("one")
    assert (w2, w1) == (2, 1) and len(l1) == 4
    np.testing.assert_allclose(l2, l1, atol=1e-4)
    assert l1[-1] < l1[0] - 0.1  # it trained
