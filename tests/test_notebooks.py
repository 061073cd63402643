"""The notebooks run headless with papermill (tiny model here; the real default in test_e2e.py),
render to standalone HTML, and never let dataset text execute."""

import json

import nbformat
import pytest

from anatomy_nb.lm.sae import save_sae
from anatomy_nb.ui.notebooks import notebook_dir, run_notebook

from helpers import assert_clean_outputs

XSS = [
    {
        "id": f"xss-{i}",
        "prompt": f"<script>window.__pwned=1</script> question {i}",
        "chosen": f'<img src=x onerror="window.__pwned=2"> fine {i}',
        "rejected": f"[click](javascript:alert(3)) **bold** <b>raw</b> {i}",
    }
    for i in range(8)
]


def test_notebooks_are_committed_clean_with_a_parameters_cell():
    for path in sorted(notebook_dir().glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), path
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path} has outputs"


def test_01_extract_runs_headless_and_escapes_dataset_text(tmp_path, tiny_lm, tiny_sae_):
    data = tmp_path / "xss.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in XSS))
    sae_dir = save_sae(tiny_sae_, tmp_path / "tiny_sae")
    run_dir = tmp_path / "run"
    out = run_notebook(
        "01_extract",
        run_dir,
        {"config": {"model": "tiny-llama", "sae": str(sae_dir), "data": str(data), "n_pairs": None, "shard_size": 4}},
        progress=False,
    )
    nb = nbformat.read(out, as_version=4)
    assert_clean_outputs(nb)
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors
    assert (run_dir / "index.json").exists() and json.loads((run_dir / "index.json").read_text())["extract"][
        "n_pairs"
    ] == 8
    html = out.with_suffix(".html").read_text()
    assert "plotly" in html.lower()  # figures embedded
    # the untrusted text is present, escaped; none of it is live markup
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=" in html
    assert "<script>window.__pwned" not in html and "<img src=x onerror" not in html and "<b>raw</b>" not in html


def test_00_train_sae_runs_headless_on_the_tiny_model(tmp_path):
    run_dir = tmp_path / "run"
    config = {
        "model": "tiny-llama",
        "sweep_layers": [1, 2],
        "train_tokens": 6000,
        "sweep_tokens": 3000,
        "final": {"epochs": 2.0, "k": 4, "expansion": 2},
        "eval_tokens": 600,
        "eval_loss_docs": 3,
    }
    out = run_notebook("00_train_sae", run_dir, {"config": config}, progress=False)
    assert (run_dir / "sae" / "sae_weights.safetensors").exists()
    card = json.loads((run_dir / "sae" / "card.json").read_text())
    assert card["layer"] in (1, 2) and set(card["sweep"]) == {"1", "2"}
    assert out.with_suffix(".html").exists()


def test_02_hypothesize_runs_headless_after_01(tmp_path, tiny_lm, tiny_sae_, hh_pairs):
    from anatomy_nb.config import ExtractConfig
    from anatomy_nb.stages.extract import extract

    sae_dir = save_sae(tiny_sae_, tmp_path / "tiny_sae")
    from anatomy_nb.lm.sae import load_sae

    extract(hh_pairs, tiny_lm, load_sae(str(sae_dir)), tmp_path / "run", ExtractConfig(shard_size=10, progress=False))
    out = run_notebook("02_hypothesize", tmp_path / "run", {"config": {"concepts": {"min_support": 3}}}, progress=False)
    nb = nbformat.read(out, as_version=4)
    assert_clean_outputs(nb)
    assert not [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert json.loads((tmp_path / "run" / "index.json").read_text())["hypothesize"]["key"]
    assert out.with_suffix(".html").exists()


def test_unknown_parameter_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="has no parameter"):
        run_notebook("01_extract", tmp_path, {"n_pairz": 3}, html=False)
    # a stage parameter the stage's config does not have: named, with the valid ones, before a kernel starts
    for name, bad in [
        ("01_extract", {"n_pairz": 3}),
        ("02_hypothesize", {"concepts": {"min_suport": 3}}),
        ("03_plan", {"spill": 3}),
        ("04_train", {"lora_rank": 4}),
        ("05_evaluate", {"n_promts": 3}),
        ("00_train_sae", {"layers": [1]}),
    ]:
        with pytest.raises(ValueError, match=r"unknown key.*valid keys") as err:
            run_notebook(name, tmp_path, {"config": bad}, html=False)
        assert list(bad)[0] in str(err.value) or "min_suport" in str(err.value)
