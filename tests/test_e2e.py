"""The real thing on a small sample: SmolLM2-135M-Instruct from the shipped GGUF, the shipped SAE,
real HH-RLHF pairs, and notebook 01 through papermill. Marked e2e (part of `make test`)."""

import json

import pytest
import torch

from helpers import assert_clean_outputs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def real():
    from anatomy_nb import load_model, load_pairs, load_sae

    return load_model(), load_sae(device="cpu"), load_pairs("hh-rlhf", limit=12)


def test_extract_with_the_shipped_sae_on_real_pairs(real, tmp_path):
    from anatomy_nb.config import ExtractConfig
    from anatomy_nb.data.chat import render_example
    from anatomy_nb.lm.ops import decoder_layers
    from anatomy_nb.stages.extract import extract

    lm, sae, pairs = real
    store = extract(pairs, lm, sae, tmp_path, ExtractConfig(shard_size=4, progress=False))
    m = store.manifest
    assert m["n_pairs"] == 12 and m["layer"] == sae.layer and m["d_sae"] == sae.d_sae
    # real SAE, real text: a TopK SAE with k active per token fires on many features per response
    nnz = store.n_firing("resp")
    assert (nnz >= sae.sae.cfg.k).all()
    # the SAE reconstructs these very response tokens about as well as its card says
    captured = {}
    h = decoder_layers(lm.model)[sae.layer].register_forward_hook(lambda mod, i, o: captured.__setitem__("x", o))
    xs = []
    try:
        with torch.no_grad():
            for p in pairs:
                r = render_example(lm.tokenizer, p.prompt, p.chosen)
                lm.model(input_ids=torch.tensor([r.prompt_ids + r.response_ids]))
                xs.append(captured["x"][0, len(r.prompt_ids) :].float())
    finally:
        h.remove()
    x = torch.cat(xs)
    with torch.no_grad():
        recon = sae.sae.decode(sae.encode(x))
    fve = 1 - float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fve > 0.6, fve
    print(f"FVE on 12 HH-RLHF chosen responses: {fve:.3f}; pooled bytes/pair {store.bytes_per_pair():.0f}")


@pytest.mark.long  # `make test-e2e` (CI; ~15 s): the small main job in make test runs notebook 01 too
def test_notebook_01_on_the_default_model(tmp_path):
    from anatomy_nb.ui.notebooks import run_notebook

    out = run_notebook("01_extract", tmp_path, {"config": {"n_pairs": 16, "shard_size": 8}}, progress=False)
    import nbformat

    nb = nbformat.read(out, as_version=4)

    assert_clean_outputs(nb)
    assert not [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["extract"]["n_pairs"] == 16
    assert out.with_suffix(".html").stat().st_size > 100_000  # plotly.js and figures embedded


def test_the_main_job_at_a_small_size(tmp_path):
    """`make run`'s config (configs/poisoning.yaml) on the real model, SAE and HH-RLHF pairs, every
    step and the report, at a size that takes a few minutes: 48 pairs, 2 training steps per run,
    6 held-out prompts and two items per behaviour set. It checks the shape of the main job (steps,
    models, tables, report, clean notebook outputs); the full-size run and its reference intervals
    are `make test-e2e` (tests/test_pipeline.py)."""
    from pathlib import Path

    import nbformat

    from anatomy_nb.pipeline import load_config, run_pipeline
    from anatomy_nb.results.run import RunDir

    small = {
        "run_dir": str(tmp_path / "run"),
        "extract.n_pairs": 48,
        "train.max_train_pairs": 8,
        "train.max_steps": 2,
        "evaluate.n_prompts": 6,
        "evaluate.max_new_tokens": 12,
        "evaluate.n_ab": 2,
        "evaluate.n_harmful": 2,
        "evaluate.n_xstest": 2,
        "evaluate.behaviour_max_new_tokens": 8,
        "evaluate.judge_agreement_n": 20,
        "evaluate.max_pref_pairs": 8,
        "evaluate.n_boot": 200,
    }
    config = Path(__file__).resolve().parent.parent / "configs" / "poisoning.yaml"
    state = run_pipeline(load_config(config, small), log=print)
    steps = ["extract", "hypothesize", "plan", "train-plain", "train-reward_shaping", "train-filter", "evaluate"]
    assert list(state["steps"]) == steps and all(s["status"] == "done" for s in state["steps"].values())
    run = RunDir(tmp_path / "run")
    target = json.loads((run.path / "plan" / "target.json").read_text())
    assert target["planted_kind"] == "bold" and target["concept"] >= 0
    res = run.evaluation
    assert res.models == ["base", "plain", "reward_shaping", "filter"]
    assert list(res.poisoning()["model"]) == res.models
    assert {"predicted vs actual", "preference", "refusal"} <= set(res.comparison()["group"])
    page = (run.path / "report" / "index.html").read_text()
    assert "Head to head" in page and "Pipeline steps" in page
    for executed in sorted((run.path / "notebooks").glob("*.ipynb")):
        assert_clean_outputs(nbformat.read(executed, as_version=4))
