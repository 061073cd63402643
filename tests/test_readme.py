"""The README is a contract: its Python example runs (on the tiny test model: the default one takes
minutes per stage), and every command it shows is accepted by the parser and builds a valid config
(the long ones — `make run`, the pipeline — also run for real elsewhere: the e2e test)."""

import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def replaced(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced by ``new``; an error when ``old`` is not there, so a change of
    the README's wording fails this test instead of silently running the unedited example."""
    assert old in text, f"the README example no longer contains {old!r}: update tests/test_readme.py"
    return text.replace(old, new)


def test_the_readme_has_the_two_commands_and_ci_runs_the_second():
    (quick,) = [b for b in blocks("bash") if "make run" in b]
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test " in ci and "make test-e2e" in ci and "make lint" in ci
    for target in ("run", "test", "test-e2e", "lint", "lab", "setup", "compare"):
        dry = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
    assert "anatomy-nb run" in subprocess.run(["make", "-n", "run"], cwd=REPO, capture_output=True, text=True).stdout


def test_every_command_in_the_readme_is_accepted_with_a_valid_config(monkeypatch):
    from anatomy_nb import cli
    from anatomy_nb.config import EvalConfig, ExtractConfig, HypothesizeConfig, PipelineConfig, PlanConfig, TrainConfig
    from anatomy_nb.core.config_base import yaml_value
    from anatomy_nb.pipeline import load_config

    monkeypatch.chdir(REPO)
    configs = {
        "extract": ExtractConfig,
        "hypothesize": HypothesizeConfig,
        "plan": PlanConfig,
        "train": TrainConfig,
        "evaluate": EvalConfig,
    }
    seen = set()
    for block in blocks("bash"):
        for line in block.splitlines():
            command = line.split("  #")[0].split(" # ")[0].strip()
            if not command.startswith("anatomy-nb "):
                continue
            args = cli.parser().parse_args(shlex.split(command)[1:])  # an unknown flag exits here
            seen.add(args.command)
            if args.command == "run":
                overrides = {k: yaml_value(v) for k, v in (item.split("=", 1) for item in args.set or [])}
                cfg = PipelineConfig.from_args(args, base=load_config(args.config, overrides))
                assert cfg.run_dir == getattr(args, "run_dir", cfg.run_dir)
            elif args.command in configs:
                configs[args.command].from_args(args)
    assert {"run", "extract", "hypothesize", "train", "report"} <= seen


def test_the_python_example_runs_on_the_tiny_model(tmp_path, monkeypatch, tiny_lm):
    """Run as written, with the default model and SAE swapped for the tiny ones built in code (the
    SAE saved to disk, so the later stages reload it by the name the store records)."""
    import anatomy_nb as anb
    from anatomy_nb.lm.sae import load_sae, save_sae, tiny_sae

    (code,) = blocks("python")
    # the example reads feature 123
    sae_dir = save_sae(tiny_sae(tiny_lm.d_model, layer=2, d_sae=256, k=8), tmp_path / "tiny_sae")
    monkeypatch.setattr(anb, "load_model", lambda *a, **k: anb.tiny_llama())
    monkeypatch.setattr(anb, "load_sae", lambda *a, **k: load_sae(str(sae_dir)))
    monkeypatch.chdir(tmp_path)
    # the tiny model needs no more
    code = replaced(code, 'anb.load_pairs("hh-rlhf", limit=300)', 'anb.load_pairs("hh-rlhf", limit=40)')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    run = namespace["run"]
    assert set(run.trainings) == {"reward_shaping"} and run.evaluation.models == ["base", "reward_shaping"]
    assert (tmp_path / "runs" / "default" / "report" / "index.html").exists()
    assert namespace["plan"].active[0].concept == f"sae:{namespace['top']}"
