"""The wheel works outside the checkout: build it, install it into a fresh virtual environment that
reuses the dependencies already installed (no second torch), and run the tiny-model pipeline —
every notebook, from the wheel's own copy — in a directory that is not the repository."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = dist.glob("anatomy_nb-*.whl")
    return path


def test_the_wheel_carries_what_a_user_needs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = [
        *(
            f"anatomy_nb/notebooks/{n}.ipynb"
            for n in ("00_train_sae", "01_extract", "02_hypothesize", "03_plan", "04_train", "05_evaluate")
        ),
        "anatomy_nb/widgets/common.js",
        "anatomy_nb/widgets/viewer.js",
        "anatomy_nb/widgets/toggles.js",
        "anatomy_nb/widgets/anatomy.css",
        "anatomy_nb/prompts/explain_concept.txt",
        "anatomy_nb/saes/smollm2-135m-instruct-topk/sae_weights.safetensors",
        "anatomy_nb/datasets/DATA.md",
        "anatomy_nb/datasets/hh_rlhf/harmless-base/test.jsonl.gz",
        "anatomy_nb/datasets/hh_rlhf/LICENSE",
        "anatomy_nb/datasets/evals/xstest/xstest_prompts.csv",
    ]
    missing = [n for n in needed if n not in names]
    assert not missing, missing
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/")) or "__pycache__" in n]


@pytest.mark.long  # `make test-e2e` (CI): a fresh venv with the wheel, ~90 s
def test_the_installed_wheel_runs_the_pipeline_outside_the_checkout(wheel, tmp_path, tiny_sae_):
    from anatomy_nb.lm.sae import save_sae

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # reuse the installed dependencies (a path, not a site dir: the checkout's editable install is not loaded)
    (site / "_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the new environment's own pip (pip --prefix from this one would uninstall this one's copy)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    sae_dir = save_sae(tiny_sae_, work / "tiny_sae")
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import anatomy_nb, anatomy_nb.core.paths as p; print(anatomy_nb.__file__); print(p.notebook_dir()); "
            "print(p.data_dir())",
        ],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert all(w.startswith(str(venv)) for w in where), where  # the wheel's copy, not the checkout's
    config = {
        "run_dir": str(work / "run"),
        "extract": {"model": "tiny-llama", "sae": str(sae_dir), "n_pairs": 24, "shard_size": 12},
        "plant": {"kind": "bold", "fraction": 0.5, "seed": 0},
        "target": 0,
        "methods": ["reward_shaping"],
        "hypothesize": {"concepts": {"min_support": 3}, "promoted_tokens": 0, "length_placebo_draws": 2},
        "train": {"max_train_pairs": 8, "max_steps": 1, "batch_size": 2, "max_length": 256},
        "evaluate": {
            "n_prompts": 2,
            "max_new_tokens": 4,
            "n_ab": 2,
            "n_harmful": 1,
            "n_xstest": 1,
            "n_boot": 50,
            "max_pref_pairs": 4,
        },
        "html": False,
    }
    (work / "config.json").write_text(json.dumps(config))
    # the reused dependencies' data files (nbconvert's templates) sit under the first environment's prefix
    env = {**os.environ, "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter")}
    out = subprocess.run(
        [str(python), "-m", "anatomy_nb.cli", "run", "config.json"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    state = json.loads((work / "run" / "pipeline.json").read_text())
    assert [s["status"] for s in state["steps"].values()] == ["done"] * 6
    assert (work / "run" / "report" / "index.html").exists() and (work / "run" / "evaluate").is_dir()
