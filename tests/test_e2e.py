"""The real thing on a small sample: SmolLM2-135M-Instruct from the shipped GGUF, the shipped SAE,
real HH-RLHF pairs, and notebook 01 through papermill. Marked e2e (part of `make test`)."""

import json

import pytest
import torch
from conftest import assert_clean_outputs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def real():
    from anatomy_nb import load_model, load_pairs, load_sae

    return load_model(), load_sae(device="cpu"), load_pairs("hh-rlhf", limit=12)


def test_extract_with_the_shipped_sae_on_real_pairs(real, tmp_path):
    from anatomy_nb.config import ExtractConfig
    from anatomy_nb.lm.chat import render_example
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
