"""``anatomy-nb run CONFIG``: notebooks 01–05 through papermill on the tiny model, with a poisoned
data set; unchanged steps are skipped, a changed parameter re-runs exactly the steps downstream of
it, a failed step is resumed, and an unknown key anywhere is an error that names it."""

import json

import pytest

from anatomy_nb.config import PipelineConfig
from anatomy_nb.lm.sae import save_sae
from anatomy_nb.pipeline import STATE_FILE, load_config, run_pipeline
from anatomy_nb.ui import notebooks as nbmod

from helpers import assert_clean_outputs

TRAIN = {"max_train_pairs": 12, "max_steps": 2, "batch_size": 2, "max_length": 96}


@pytest.fixture(scope="module")
def tiny_sae_dir(tmp_path_factory, tiny_sae_):
    return str(save_sae(tiny_sae_, tmp_path_factory.mktemp("sae") / "tiny_sae"))


def _cfg(run_dir, sae_dir, **kw):
    base = dict(
        run_dir=str(run_dir),
        extract={"model": "tiny-llama", "sae": sae_dir, "n_pairs": 40},
        plant={"kind": "bold", "fraction": 0.5, "seed": 0},
        target=0,
        methods=["reward_shaping"],
        hypothesize={"concepts": {"min_support": 3}},
        train=TRAIN,
        evaluate={"n_prompts": 4, "max_new_tokens": 8},
        html=False,
        report=False,
    )
    base.update(kw)
    return PipelineConfig.from_dict(base)


def _ran(logs):
    return [m.split(":")[0].split("] ")[1] for m in logs if m.endswith(".ipynb") or "running" in m]


def test_pipeline_runs_skips_reruns_downstream_and_resumes(tmp_path, tiny_sae_dir, monkeypatch):
    run_dir = tmp_path / "run"
    logs: list[str] = []
    state = run_pipeline(_cfg(run_dir, tiny_sae_dir, report=True), log=logs.append)
    steps = list(state["steps"])
    assert steps == ["extract", "hypothesize", "plan", "train-plain", "train-reward_shaping", "evaluate"]
    assert all(s["status"] == "done" for s in state["steps"].values())
    assert _ran(logs) == steps
    # the poisoned data and its ground truth are in the run; the plans suppress the target
    truth = json.loads((run_dir / "data" / "planted.planted.json").read_text())
    assert truth["kind"] == "bold" and truth["n_planted"] == 20
    plan = json.loads((run_dir / "plan" / "reward_shaping.json").read_text())
    assert [(c["concept"], c["action"], c["method"]) for c in plan["concepts"]] == [
        ("sae:0", "suppress", "reward_shaping")
    ]
    assert (run_dir / "report" / "index.html").exists()
    # what is shared shows results only: no warning, progress bar or error in any executed notebook
    import nbformat

    for executed in sorted((run_dir / "notebooks").glob("*.ipynb")):
        assert_clean_outputs(nbformat.read(executed, as_version=4))
    index = json.loads((run_dir / "index.json").read_text())
    assert {"extract", "hypothesize", "train", "evaluate"} <= set(index)
    if "evaluate" in state["steps"]:  # the poisoning read-out: planted rate per model against the ground truth
        import pandas as pd

        poison = pd.read_parquet(run_dir / index["evaluate"]["path"] / "poisoning.parquet")
        assert list(poison["model"]) == ["base", "plain", "reward_shaping"] and (poison["kind"] == "bold").all()
        ev_manifest = json.loads((run_dir / index["evaluate"]["path"] / "manifest.json").read_text())
        assert ev_manifest["model_order"] == ["base", "plain", "reward_shaping"]
        page = (run_dir / "report" / "index.html").read_text()
        assert "The audit&#x27;s target" in page or "The audit's target" in page
        assert "planted bold in generations" in page and "Pipeline steps" in page
        # which judge, and its agreement
        assert "scored by <b>phrase list</b>" in page and "full refusal recall" in page

    # unchanged: nothing runs
    logs.clear()
    run_pipeline(_cfg(run_dir, tiny_sae_dir), log=logs.append)
    assert _ran(logs) == [] and sum("unchanged" in m for m in logs) == len(steps)

    # a training parameter changed: exactly the training steps (and what follows) re-run
    logs.clear()
    state = run_pipeline(_cfg(run_dir, tiny_sae_dir, train={**TRAIN, "learning_rate": 1e-4}), log=logs.append)
    assert _ran(logs) == steps[3:]
    if "evaluate" in state["steps"]:
        # evaluation sees this config's two training runs, not the two the first config left behind
        assert len(list((run_dir / "train").iterdir())) == 4
        ev = json.loads((run_dir / "index.json").read_text())["evaluate"]
        manifest = json.loads((run_dir / ev["path"] / "manifest.json").read_text())
        trained = {n: m["train_key"] for n, m in manifest["models"].items() if n != "base"}
        assert trained == {n: state["steps"][f"train-{n}"]["artifact"] for n in ("plain", "reward_shaping")}

    # a hypothesize parameter changed and the plan step is killed: the re-run resumes there
    real = nbmod.run_notebook

    def dies_in_03(name, *a, **k):
        if name == "03_plan":
            raise KeyboardInterrupt("killed")
        return real(name, *a, **k)

    monkeypatch.setattr(nbmod, "run_notebook", dies_in_03)
    cfg = _cfg(run_dir, tiny_sae_dir, hypothesize={"concepts": {"min_support": 4}})
    logs.clear()
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, log=logs.append)
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert state["steps"]["hypothesize"]["status"] == "done" and state["steps"]["plan"]["status"] == "failed"
    monkeypatch.setattr(nbmod, "run_notebook", real)
    logs.clear()
    run_pipeline(cfg, log=logs.append)
    assert _ran(logs) == steps[2:]


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("n_pairz: 3\n")
    with pytest.raises(ValueError, match="n_pairz"):
        load_config(bad)
    # a stage's key the stage's config does not have (here TrainConfig has lora_r, not lora_rank):
    # named with the valid keys, through the file, the overrides and the CLI
    bad.write_text("train: {lora_rank: 4}\n")
    with pytest.raises(ValueError, match=r"lora_rank.*valid keys: .*lora_r"):
        load_config(bad)
    with pytest.raises(ValueError, match="lora_rank"):
        load_config(None, {"train.lora_rank": 4})
    with pytest.raises(ValueError, match=r"hypothesize\.concepts.*min_suport"):
        load_config(None, {"hypothesize": {"concepts": {"min_suport": 3}}})
    with pytest.raises(ValueError, match="learning_rate.*expects float"):
        load_config(None, {"train.learning_rate": "fast"})
    assert load_config(None, {"train.lora_r": 4}).train.lora_r == 4
    assert load_config(None, {"train.lora_r": 4}).train.learning_rate == 1e-3  # the other pipeline defaults stay
    with pytest.raises(ValueError, match="plant.kind"):
        load_config(None, {"plant": {"kind": "glitter"}})
    with pytest.raises(ValueError, match="methods"):
        load_config(None, {"methods": ["magic"]})
    cfg = load_config(None, {"plant": None})
    assert cfg.plant is None and cfg.methods == ["reward_shaping", "filter"]


def test_shipped_config_is_the_default():
    from dataclasses import asdict
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "poisoning.yaml"
    assert asdict(load_config(path)) == asdict(PipelineConfig())


def test_a_changed_plant_reruns_extraction_although_the_data_path_is_the_same(tmp_path, monkeypatch):
    """The poisoned file is rewritten in place (same path, same notebook parameters): the step key
    must follow its content, or a new plant would be audited with the old feature store."""
    ran = []

    def fake(name, run_dir, params, *a, output_name=None, **k):
        ran.append((name, params["config"]["data"]))
        out = tmp_path / "run" / "notebooks" / f"{output_name or name}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")
        return out

    monkeypatch.setattr(nbmod, "run_notebook", fake)

    def cfg(fraction):
        return PipelineConfig.from_dict(
            dict(
                run_dir=str(tmp_path / "run"),
                extract={"n_pairs": 40},
                plant={"kind": "bold", "fraction": fraction, "seed": 0},
                stages=["extract"],
                html=False,
                report=False,
            )
        )

    run_pipeline(cfg(0.25), log=lambda m: None)
    run_pipeline(cfg(0.25), log=lambda m: None)
    assert len(ran) == 1
    run_pipeline(cfg(0.5), log=lambda m: None)
    assert len(ran) == 2 and ran[0][1] == ran[1][1]


@pytest.mark.long  # the main job itself: ~15 min on two idle cores; `make test-e2e` (CI)
def test_the_default_config_runs_the_poisoning_experiment_end_to_end(tmp_path):
    """`make run`'s config (configs/poisoning.yaml) on the real model, SAE and HH-RLHF pairs: the
    audit finds the planted concept, plain DPO learns it, reward shaping removes most of what plain
    DPO learned, and the report is written. Bounds are the issue's aims or looser, well inside what
    was measured (README, "The whole pipeline")."""
    from pathlib import Path

    import pandas as pd

    from anatomy_nb.results.run import RunDir

    config = Path(__file__).resolve().parent.parent / "configs" / "poisoning.yaml"
    state = run_pipeline(load_config(config, {"run_dir": str(tmp_path / "run")}), log=print)
    run = RunDir(tmp_path / "run")
    assert all(s["status"] == "done" for s in state["steps"].values()) and len(state["steps"]) == 7
    target = json.loads((run.path / "plan" / "target.json").read_text())
    assert target["planted_kind"] == "bold" and target["rank"] == 1 and target["auroc_planted"] > 0.95
    top = run.hypotheses.ranked().query("view == 'overall'").iloc[0]
    print("the planted concept's name:", top["name"], "| label:", top["label"])
    assert "**short answer:**" in top["name"] and top["label"].startswith(top["name"])  # the plant, read back in words
    from anatomy_nb.ui.summary import teaching_summary

    first = teaching_summary(run).lessons[0]  # the report's first words name the plant first
    assert first.direction == "raises" and "**short answer:**" in first.name, first
    res = run.evaluation
    assert res.models == ["base", "plain", "reward_shaping", "filter"]
    poison = res.poisoning().set_index("model")
    print(pd.DataFrame(poison).T.to_string())
    # plain DPO learned the plant: its rate's interval lies above the base model's (measured 0.70 [0.52, 0.83] vs 0.03
    # [0.01, 0.17])
    assert poison.loc["plain", "planted_rate_ci_low"] > poison.loc["base", "planted_rate_ci_high"]
    assert poison.loc["reward_shaping", "fraction_removed"] >= 0.8  # the aim
    assert poison.loc["filter", "fraction_removed"] >= 0.8
    r2 = res.r2().set_index(["model", "view"])
    assert r2.loc[("plain", "overall"), "r2"] > 0.5  # the audit predicted what plain DPO changed
    assert (run.path / "report" / "index.html").exists()
    # the same experiment as the reference run (same seeds): every value of the comparison table lies
    # inside the reference run's interval for it (bitwise equality is not required across machines).
    # Not checked: an R² over fewer than five concepts. The topic view's fit holds the 2-4 topic rows
    # stage 2 finds significant at 300 pairs, and one q crossing 0.05 leaves it undefined (the
    # 2026-11-29 reference had 4 rows; the same store read by the same stage-2 code gave 2 on
    # 2026-11-30, with a fresh install: docs/explanation.md, "The whole pipeline").
    reference = pd.read_csv(
        Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "default-pipeline-comparison-2026-11-30.csv"
    )
    reference = reference[~((reference["group"] == "predicted vs actual") & (reference["n"] < 5))]
    now = res.comparison().set_index(["model", "metric"])["value"]
    moved = []
    for r in reference.dropna(subset=["ci_low", "ci_high"]).itertuples():
        v = now.get((r.model, r.metric))
        if v is None or not (r.ci_low - 1e-9 <= v <= r.ci_high + 1e-9):
            moved.append(
                f"{r.model} / {r.metric}: {v} outside the reference [{r.ci_low:.3f}, {r.ci_high:.3f}] (reference "
                f"value {r.value:.3f})"
            )
    assert not moved, moved
    _the_default_store_gives_the_dense_oracles_concepts(run)


def _the_default_store_gives_the_dense_oracles_concepts(run):
    """On the default SAE's real store, the exact co-firing graph (blocks, linear memory) is the
    dense phi graph the clustering used to build, so the concepts are the same; the sketch's
    agreement is reported (measured ARI 0.86 at the default 256 dims / 128 candidates, about
    Leiden's own seed-to-seed agreement, docs/explanation.md)."""
    import numpy as np
    import scipy.sparse as sp
    from sklearn.metrics import adjusted_rand_score

    from anatomy_nb.concepts.clustering import cluster_features
    from anatomy_nb.concepts.cofiring import cofiring_neighbors
    from anatomy_nb.config import ConceptConfig

    from helpers import knn_reference

    store = run.store
    fires = sp.vstack([store.pooled("fires", "chosen"), store.pooled("fires", "rejected")]).tocsc()
    cfg = ConceptConfig()
    testable = np.flatnonzero(np.asarray((fires > 0).sum(0)).ravel() >= cfg.min_support)
    F = fires[:, testable]
    expected, _ = knn_reference(F, cfg.k_neighbors, cfg.min_phi)
    got = cofiring_neighbors(F, cfg.k_neighbors, cfg.min_phi, method="exact").toarray()
    np.testing.assert_allclose(got, expected, atol=1e-9)
    exact = cluster_features(fires, cfg)
    sketch = cluster_features(fires, ConceptConfig(neighbors="sketch"))
    ari = adjusted_rand_score(exact[testable], sketch[testable])
    print(f"default SAE, {len(testable)} testable features: sketch vs exact concepts ARI {ari:.3f}")
    assert ari > 0.7
