"""The behaviour eval sets stage 5 uses, read from the vendored ``data/evals`` files: A/B items
(CAA sycophancy, an Anthropic persona trait), harmful requests (AdvBench / StrongREJECT /
HarmBench) and XSTest's safe prompts (over-refusal). Each item is a dict with an ``id`` and a
``prompt`` (chat messages); samples are seeded."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from ..core.paths import data_dir

__all__ = ["AB_SETS", "EVAL_FILES", "ab_items", "eval_file_digests", "eval_path", "harmful_prompts", "xstest_safe"]

EVAL_FILES = {
    "caa_sycophancy": "evals/caa/sycophancy_test_dataset_ab.json",
    "persona_agreeableness": "evals/anthropic_evals/agreeableness.jsonl",
    "xstest": "evals/xstest/xstest_prompts.csv",
    "advbench": "evals/refusal_direction/advbench.csv",
    "strongreject": "evals/refusal_direction/strongreject.csv",
    "harmbench": "evals/refusal_direction/harmbench_val.csv",
    # human-labelled completions the refusal judge is measured on (data.judges)
    "xstest_completions_gpt4": "evals/xstest_completions/xstest_v2_completions_gpt4.csv",
    "xstest_completions_llama2": "evals/xstest_completions/xstest_v2_completions_llama2orig.csv",
    # refusing / complying answers by construction (a third family for the judges)
    "caa_refusal": "evals/caa/refusal_generate_dataset.json",
}


def eval_path(name: str) -> Path:
    path = data_dir() / EVAL_FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"{path}: vendored eval file missing (see data/DATA.md)")
    return path


AB_SETS = ("caa_sycophancy", "persona_agreeableness")


def eval_file_digests() -> dict[str, str]:
    """A digest of every eval file, for stage 5's content key."""
    return {k: hashlib.sha256(eval_path(k).read_bytes()).hexdigest()[:16] for k in EVAL_FILES}


def _sample(n_total: int, n: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).permutation(n_total)[: min(n, n_total)].tolist())


def ab_items(name: str, n: int, seed: int) -> list[dict]:
    """A/B items as {id, prompt (messages), answers ("(A)", "(B)"), matching (0/1)}.

    CAA items carry their own "(A) … (B) …" choices. Anthropic persona items are Yes/No
    statements; they get the choices "(A) Yes / (B) No" for a random half of the items and "(A) No /
    (B) Yes" for the other, so a model's bias towards one letter cancels out instead of reading as
    a trait."""
    path = eval_path(name)
    if name == "caa_sycophancy":
        rows = json.loads(path.read_text())
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    picked = _sample(len(rows), n, seed)
    # persona items: "Yes" first for a random half, independent of the item (the upstream files
    # alternate matching Yes/No line by line, so alternating by index would align them)
    yes_first_of = np.random.default_rng(seed + 1).permutation(np.arange(len(picked)) % 2 == 0)
    for j, i in enumerate(picked):
        r = rows[i]
        for f in ("question", "answer_matching_behavior", "answer_not_matching_behavior"):
            if f not in r:
                raise ValueError(f"{path}: record {i} has no field {f!r}")
        q = r["question"]
        match = str(r["answer_matching_behavior"]).strip()
        if name != "caa_sycophancy":
            yes_first = bool(yes_first_of[j])
            q = (
                f"{q}\n\nChoices:\n (A) {'Yes' if yes_first else 'No'}\n (B) "
                f"{'No' if yes_first else 'Yes'}\n\nAnswer with (A) or (B)."
            )
            match = "(A)" if (match.lower() == "yes") == yes_first else "(B)"
        if match not in ("(A)", "(B)"):
            raise ValueError(
                f"{path}: record {i}, field 'answer_matching_behavior': expected (A) or (B), got {match!r}"
            )
        out.append(
            {
                "id": f"{name}-{i}",
                "prompt": ({"role": "user", "content": q},),
                "answers": ("(A)", "(B)"),
                "matching": 0 if match == "(A)" else 1,
            }
        )
    return out


def harmful_prompts(n: int, seed: int) -> list[dict]:
    """A sample of harmful requests, drawn evenly from AdvBench, StrongREJECT and HarmBench (val,
    standard behaviours)."""
    sources = []
    with open(eval_path("advbench"), newline="") as fh:
        sources.append(("advbench", [r["goal"] for r in csv.DictReader(fh)]))
    with open(eval_path("strongreject"), newline="") as fh:
        sources.append(("strongreject", [r["forbidden_prompt"] for r in csv.DictReader(fh)]))
    with open(eval_path("harmbench"), newline="") as fh:
        sources.append(
            ("harmbench", [r["Behavior"] for r in csv.DictReader(fh) if r.get("FunctionalCategory") == "standard"])
        )
    per = [n // 3 + (j < n % 3) for j in range(3)]
    out = []
    for j, ((name, texts), k) in enumerate(zip(sources, per)):
        for i in _sample(len(texts), k, seed + j):
            out.append({"id": f"{name}-{i}", "prompt": ({"role": "user", "content": texts[i]},)})
    return out


def xstest_safe(n: int, seed: int) -> list[dict]:
    with open(eval_path("xstest"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("label") == "safe"]
    return [
        {"id": f"xstest-{rows[i]['id']}", "prompt": ({"role": "user", "content": rows[i]["prompt"]},)}
        for i in _sample(len(rows), n, seed)
    ]
