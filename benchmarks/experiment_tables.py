"""The tables of a finished experiment run (`make compare`, `make sweep`, `make amplify`,
`make entangled`), written into ``benchmarks/results/``: the head-to-head table, the long comparison
table, and a JSON with the pipeline's step times, the target, the evaluation's timing and — for each
plant — its own concept's predicted change (stage 3, spill-over included) beside its measured change
per model, with the whole-response R² and sign agreement.

Reads only (no torch): run it after the experiment, e.g.::

    anatomy-nb run configs/entangled.yaml
    python benchmarks/experiment_tables.py runs/entangled --name entangled --command "anatomy-nb run
    configs/entangled.yaml"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from anatomy_nb.results.run import RunDir

RESULTS = Path(__file__).resolve().parent / "results"


def plant_concept_rows(ev, target: dict) -> dict:
    """Each plant's own concept (``plan/target.json``'s ``plant_concepts``): per model, its change
    against the base model (stage 2 predicted what plain DPO would learn), and per intervention the
    shift its plan predicted relative to plain DPO (stage 3, spill-over included) beside the shift measured."""
    pva = ev.predicted_vs_actual()
    pva = pva[pva["view"] == "overall"]
    plan = ev.plan_vs_actual()
    out = {}
    for kind, c in (target.get("plant_concepts") or {}).items():
        rows = pva[pva["concept"] == c["concept"]]
        out[kind] = {
            **c,
            "label": str(rows["label"].iloc[0]) if len(rows) else None,
            "vs_base": [
                {
                    "model": r.model,
                    "stage2_predicted": round(float(r.predicted), 4),
                    "actual_change": round(float(r.actual_change), 4),
                    "actual_q": round(float(r.actual_q), 6),
                }
                for r in rows.itertuples()
            ],
        }
        if plan is not None:
            p = plan[plan["concept"] == c["concept"]]
            out[kind]["vs_plain"] = [
                {
                    "model": r.model,
                    "plan_predicted_shift": round(float(r.predicted_shift), 4),
                    "measured_shift": round(float(r.actual_shift), 4),
                    "measured_q": round(float(r.actual_q), 6),
                    "targeted": bool(r.targeted),
                    "basis": r.basis,
                }
                for r in p.itertuples()
            ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--name", required=True, help="file prefix, e.g. entangled")
    ap.add_argument("--command", default="", help="the command that produced the run, recorded in the JSON")
    ap.add_argument("--note", default="")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    ev = run.evaluation
    stem = RESULTS / f"{args.name}"
    ev.head_to_head_table().to_csv(f"{stem}-head-to-head-{args.date}.csv", index=False)
    ev.comparison_table().to_csv(f"{stem}-comparison-{args.date}.csv")
    state = json.loads((run.path / "pipeline.json").read_text())
    target = json.loads((run.path / "plan" / "target.json").read_text())
    r2 = ev.r2()
    result = {
        "command": args.command,
        "steps": {k: v.get("seconds") for k, v in state["steps"].items()},
        "seconds_this_run": state.get("seconds_this_run"),
        "target": target,
        "plant_concepts": plant_concept_rows(ev, target),
        "r2_overall": r2[r2["view"] == "overall"][["model", "n_concepts", "r2", "ci_low", "ci_high", "sign_agreement"]]
        .round(4)
        .to_dict(orient="records"),
        "plan_r2": None if ev.plan_r2() is None else ev.plan_r2().round(4).to_dict(orient="records"),
        "eval_timing": ev.manifest.get("timing"),
        "note": args.note,
    }
    path = Path(f"{stem}-run-{args.date}.json")
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(ev.head_to_head_table().to_string(index=False))
    print(json.dumps({k: result[k] for k in ("plant_concepts", "plan_r2")}, indent=1, default=float))
    print(f"wrote {stem}-*-{args.date}.*")


if __name__ == "__main__":
    main()
