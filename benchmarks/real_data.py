"""The tables of a real-data run (`make real`: configs/real-hh.yaml, configs/real-pandalm.yaml),
written into ``benchmarks/results/``: for every evaluation in the run directory (one per learning
rate tried), the predicted-vs-actual fit (R², interval, Spearman, sign agreement, leave-top-k-out),
the audit against the simpler predictors (ΔR² with its paired interval) and the ceiling, and the
training's health: train loss, held-out preference accuracy and the generations' length, bigram
diversity and repetition (a learning rate too high for several hundred steps shows there first).

Reads only (no torch): run it after the job, e.g.::

    anatomy-nb run configs/real-hh.yaml
    python benchmarks/real_data.py runs/real-hh --name real-hh
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from anatomy_nb.core.files import read_json
from anatomy_nb.results.evaluate import EvalResult
from anatomy_nb.results.run import RunDir

RESULTS = Path(__file__).resolve().parent / "results"


def generation_health(texts: list[str]) -> dict:
    """Mean words, distinct bigrams over all bigrams, and the share of generations that repeat a
    word trigram three or more times (a degenerate loop) or say almost nothing (< 3 words)."""
    words = [re.findall(r"\S+", t.lower()) for t in texts]
    bigrams = [tuple(w[i : i + 2]) for w in words for i in range(len(w) - 1)]
    loops = [max(Counter(tuple(w[i : i + 3]) for i in range(len(w) - 2)).values(), default=0) >= 3 for w in words]
    return {
        "mean_words": float(np.mean([len(w) for w in words])),
        "distinct_2": len(set(bigrams)) / max(len(bigrams), 1),
        "repeating": float(np.mean(loops)),
        "near_empty": float(np.mean([len(w) < 3 for w in words])),
    }


def evaluation_rows(run: RunDir, ev: EvalResult) -> dict:
    gens = ev.generations()
    held = gens[gens["set"] == "heldout"]
    pref = ev.preference().set_index("model")
    models = {}
    for name in ev.models:
        row = {"generations": generation_health(list(held[held["model"] == name]["response"]))}
        if name in pref.index:
            row["preference_accuracy"] = [round(float(pref.at[name, c]), 4) for c in ("accuracy", "ci_low", "ci_high")]
        if name != "base":
            train = read_json(run.path / ev.manifest["models"][name]["path"] / "manifest.json")
            metrics = pd.read_json(run.path / ev.manifest["models"][name]["path"] / "metrics.jsonl", lines=True)
            loss = metrics["loss"].dropna() if "loss" in metrics else pd.Series(dtype=float)
            acc = metrics["rewards/accuracies"].dropna() if "rewards/accuracies" in metrics else pd.Series(dtype=float)
            row["training"] = {
                "learning_rate": train["config"]["learning_rate"],
                "steps": train["steps"],
                "pairs": train["n_train_used"],
                "seconds": train["seconds"],
                "loss_first_10": round(float(loss.head(10).mean()), 4) if len(loss) else None,
                "loss_last_10": round(float(loss.tail(10).mean()), 4) if len(loss) else None,
                "reward_accuracy_last_10": round(float(acc.tail(10).mean()), 4) if len(acc) else None,
            }
        models[name] = row
    predictors = ev.predictors()
    return {
        "evaluation": ev.path.name,
        "n_prompts": ev.manifest["n_prompts"],
        "n_pref_pairs": ev.manifest["n_pref_pairs"],
        "seconds": ev.manifest["seconds"],
        "r2": ev.r2().round(4).to_dict(orient="records"),
        "predictors": None if predictors is None else predictors.round(4).to_dict(orient="records"),
        "linear_predictor": ev.manifest.get("linear_predictor"),
        "models": models,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--name", required=True, help="file prefix, e.g. real-hh")
    ap.add_argument("--note", default="")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    evaluations = [
        EvalResult(p.parent, read_json(p))
        for p in sorted((run.path / "evaluate").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
        if read_json(p).get("complete")
    ]
    state = json.loads((run.path / "pipeline.json").read_text())
    store = run.store.manifest
    hyp = run.hypotheses.manifest
    result = {
        "run_dir": args.run_dir,
        "pairs": store["n_pairs"],
        "steps_last_run": {k: v.get("seconds") for k, v in state["steps"].items()},
        "hypotheses": {k: hyp.get(k) for k in ("n_concepts", "n_topics", "n_significant", "n_significant_overall")},
        "evaluations": [evaluation_rows(run, ev) for ev in evaluations],
        "note": args.note,
    }
    path = RESULTS / f"{args.name}-run-{args.date}.json"
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    latest = run.evaluation
    table = latest.predictor_table()
    if table is not None:
        table.to_csv(RESULTS / f"{args.name}-predictors-{args.date}.csv", index=False)
        print(table.to_string(index=False))
    print(latest.prediction_report().to_string(index=False))
    for e in result["evaluations"]:
        print(e["evaluation"][:8], json.dumps(e["models"], default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
