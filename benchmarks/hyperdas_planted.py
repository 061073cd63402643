"""HyperDAS on the planted task (``stages.subspace.planted_task``): RAVEL in miniature with the truth known.

Builds the task once (a tiny Llama trained ~30 s; two attributes planted in 2-dim subspaces of 64),
trains DAS at the entity's token per attribute (the reference), then HyperDAS once per seed, told
only the attribute's name, and prints per seed and attribute: Cause / Isolate, the share of test pairs
on which its hard selection edits the base's entity token and reads the source's entity token, the
source token it reads most often (offset from the source's entity: -1 is the marker before it) and
the loss per sixth of training. ``--variant`` passes keyword arguments to ``train_hyperdas`` as JSON,
e.g. ``'{"selection": "pairwise"}'`` or ``'{"positions": "entity"}'``. Results are appended to
``benchmarks/results/hyperdas-planted-<date>.jsonl``. Run with one thread per job on two cores::

    OMP_NUM_THREADS=1 python benchmarks/hyperdas_planted.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np

from anatomy_nb.stages.subspace import ravel_scores
from anatomy_nb.stages.subspace.das import interchange_predictions, train_das
from anatomy_nb.stages.subspace.hyperdas import hyperdas_predictions, train_hyperdas
from anatomy_nb.stages.subspace.planted_task import planted_task

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--variant", default="{}", help="train_hyperdas keyword arguments as JSON")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=200)
    args = ap.parse_args()
    variant = json.loads(args.variant)
    task = planted_task(n_train=args.n_train, n_test=args.n_test)
    lm, layer = task.lm, task.layer
    das = {}
    for c in task.planted:
        sub = train_das(lm, layer, 2, task.train[c], epochs=4, lr=1e-2, batch_size=16, seed=0)
        das[c] = ravel_scores(interchange_predictions(lm, layer, sub.directions, task.test[c]), task.test[c])
        print(f"DAS at the entity's token, {c}: cause {das[c]['cause']:.2f} isolate {das[c]['isolate']:.2f}")
    out = RESULTS / f"hyperdas-planted-{dt.date.today().isoformat()}.jsonl"
    for seed in args.seeds:
        t0 = time.time()
        hyper = train_hyperdas(lm, layer, 2, task.mixed_train(), **{"epochs": args.epochs, "seed": seed, **variant})
        losses = np.array([c["loss"] for c in hyper.curve])
        row = {
            "variant": variant,
            "seed": seed,
            "epochs": args.epochs,
            "seconds": round(time.time() - t0, 1),
            "loss_by_sixth": [round(float(q.mean()), 2) for q in np.array_split(losses, 6)],
            "das": {c: {k: round(v, 3) for k, v in s.items()} for c, s in das.items()},
        }
        for c in task.planted:
            preds, where, _ = hyperdas_predictions(lm, hyper, c, task.test[c])
            scores = ravel_scores(preds, task.test[c])
            row[c] = {
                "cause": round(scores["cause"], 3),
                "isolate": round(scores["isolate"], 3),
                "base_entity_token": round(where["edits_entity_token"], 3),
                "source_entity_token": round(where["from_source_entity_token"], 3),
                "source_offset": where["source_offset"],
                "source_offset_share": round(where["source_offset_share"], 3),
            }
            r = row[c]
            print(
                f"seed {seed} {c}: cause {r['cause']:.2f} isolate {r['isolate']:.2f} | base entity token "
                f"{r['base_entity_token']:.0%}, source entity token {r['source_entity_token']:.0%} (most often "
                f"offset {r['source_offset']}) | loss {row['loss_by_sixth']} | {row['seconds']:.0f} s",
                flush=True,
            )
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    print("→", out)


if __name__ == "__main__":
    main()
