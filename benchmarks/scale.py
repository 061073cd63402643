"""Stage 2 at the scale practitioners work at: seconds per step and peak memory, on synthetic
stores whose sparsity is pinned to real SAEs (benchmarks/synthetic_store.py).

    python benchmarks/scale.py                       # the four sizes below, then the loop ratio
    python benchmarks/scale.py --sizes 10000x4608x670 --no-loop
    python benchmarks/scale.py --loop-only           # vectorised tests vs a per-feature scipy loop

Each size runs ``hypothesize`` with the default settings in a fresh process (so peak RSS is that
size's alone) and prints its manifest's step seconds. Stores are cached under ``--cache`` (default
``benchmarks/.cache``, gitignored; tens of GB for all sizes); the table goes to stdout and to
``benchmarks/results/scale-<date>.txt``. No model runs: promoted-token labels are skipped (the
manifest says why), as they would be without the model at hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# pairs × features × distinct features per response
SIZES = ["10000x4608x670", "100000x16384x670", "100000x65536x1500", "50000x131072x1500"]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def make_store(size: str, cache: Path) -> dict:
    """In this process: write (or reuse) the synthetic store of ``size``."""
    from synthetic_store import write_synthetic_store

    n_pairs, d_sae, per_response = (int(v) for v in size.split("x"))
    t0 = time.perf_counter()
    write_synthetic_store(cache / size, n_pairs, d_sae, per_response)
    return {"store_seconds": round(time.perf_counter() - t0, 1), "peak_rss_store_gb": round(_peak_rss_gb(), 2)}


def run_one(size: str, cache: Path) -> dict:
    """In this process (the store already written, so the peak is stage 2's alone): time stage 2."""
    from synthetic_store import write_synthetic_store

    from anatomy_nb import hypothesize

    n_pairs, d_sae, per_response = (int(v) for v in size.split("x"))
    run_dir = cache / size
    store = write_synthetic_store(run_dir, n_pairs, d_sae, per_response)  # reused
    measured = store.n_firing("resp").mean()
    planted = set(store.manifest["synthetic"]["planted_groups"])
    t0 = time.perf_counter()
    hyp = hypothesize(run_dir, {"promoted_tokens": 0})
    seconds = time.perf_counter() - t0
    manifest = hyp.manifest
    overall = hyp.table[(hyp.table["view"] == "overall") & hyp.table["significant"]]
    found = {int(f) // 8 for feats in overall["features"] for f in feats} & planted
    return {
        "size": size,
        "n_pairs": n_pairs,
        "d_sae": d_sae,
        "features_per_response": round(float(measured), 1),
        "stage2_seconds": round(seconds, 1),
        "step_seconds": manifest["step_seconds"],
        "peak_rss_gb": round(_peak_rss_gb(), 2),
        "n_concepts": manifest["n_concepts"],
        "n_tests": manifest["n_tests"],
        "n_significant_overall": manifest["n_significant_overall"],
        "planted_groups_found": f"{len(found)}/{len(planted)}",
    }


def loop_ratio(cache: Path, repeats: int = 3) -> dict:
    """The per-feature paired tests (units = prompts) vectorised vs one scipy call per feature,
    and the per-topic concept tests vectorised vs one scipy Welch test per concept and topic."""
    import numpy as np
    import scipy.sparse as sp
    import scipy.stats as sps
    from synthetic_store import write_synthetic_store

    from anatomy_nb.concepts.activity import PairFeatures, concept_activity, feature_difference_sums
    from anatomy_nb.concepts.clustering import cluster_features
    from anatomy_nb.config import HypothesizeConfig
    from anatomy_nb.core.stats import group_means, paired_test_from_sums, welch_each_group

    store = write_synthetic_store(cache / SIZES[0], *(int(v) for v in SIZES[0].split("x")))
    pf = PairFeatures.from_store(store)
    groups = pf.groups

    def vectorised_features():  # what stage 2 runs (hypothesize.feature_tests)
        return paired_test_from_sums(*feature_difference_sums(pf, groups))

    def loop_features():
        D = group_means(
            pf.fires_chosen.astype(np.float32) - pf.fires_rejected.astype(np.float32), groups, dense=False
        ).tocsc()
        return np.array([sps.ttest_1samp(D[:, j].toarray().ravel(), 0.0).pvalue for j in range(D.shape[1])])

    cfg = HypothesizeConfig()
    labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), cfg.concepts)
    Uc, Ur = concept_activity(pf, labels)
    Du = group_means(Uc - Ur, groups)
    topic = np.random.default_rng(0).integers(0, 12, Du.shape[0])

    def vectorised_topics():
        return welch_each_group(Du, topic, range(12))

    def loop_topics():
        return [
            [sps.ttest_ind(Du[topic == k, c], Du[topic != k, c], equal_var=False).pvalue for c in range(Du.shape[1])]
            for k in range(12)
        ]

    def median_seconds(fn, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    vf, ft = median_seconds(vectorised_features, repeats)
    lf, lp = median_seconds(loop_features, 1)
    vt, wt = median_seconds(vectorised_topics, repeats)
    lt, lw = median_seconds(loop_topics, 1)
    same_f = bool(np.allclose(np.nan_to_num(ft.p, nan=1.0), np.nan_to_num(lp, nan=1.0), atol=1e-8))
    same_t = bool(
        np.allclose(
            np.nan_to_num(np.array([wt[k][0].p for k in range(12)]), nan=1.0),
            np.nan_to_num(np.array(lw), nan=1.0),
            atol=1e-8,
        )
    )
    return {
        "features": {
            "n": int(pf.d_sae),
            "vectorised_s": round(vf, 3),
            "loop_s": round(lf, 2),
            "ratio": round(lf / vf, 1),
            "same_p": same_f,
        },
        "concept_topic_tests": {
            "n": int(Du.shape[1] * 12),
            "vectorised_s": round(vt, 3),
            "loop_s": round(lt, 2),
            "ratio": round(lt / vt, 1),
            "same_p": same_t,
        },
    }


def _table(rows: list[dict]) -> str:
    steps = sorted(
        {s for r in rows for s in r["step_seconds"]}, key=lambda s: -max(r["step_seconds"].get(s, 0) for r in rows)
    )
    head = ["pairs × features (per response)", "stage 2 s", "peak RSS GB", "concepts", "tests", "planted found", *steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r['n_pairs']:,} × {r['d_sae']:,} ({r['features_per_response']:.0f})",
            f"{r['stage2_seconds']:.0f}",
            f"{r['peak_rss_gb']:.1f}",
            f"{r['n_concepts']:,}",
            f"{r['n_tests']:,}",
            r["planted_groups_found"],
        ]
        cells += [f"{r['step_seconds'].get(s, 0):.1f}" for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=SIZES, help="PAIRSxFEATURESxPER_RESPONSE")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--no-loop", action="store_true")
    ap.add_argument("--loop-only", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one size, JSON on the last line
    ap.add_argument("--store-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per size")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(make_store(args.one, args.cache) if args.store_only else run_one(args.one, args.cache)))
        return
    rows, out = [], []
    if not args.loop_only:
        for size in args.sizes:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            row = {}
            for mode in (["--store-only"], []):  # the store in its own process: stage 2's peak RSS is its own
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", size, "--cache", str(args.cache), *mode],
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                    env=env,
                )
                if proc.returncode != 0:
                    break
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            if proc.returncode != 0:
                print(f"{size}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                out.append(
                    f"{size}: failed (exit {proc.returncode}): "
                    f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
                )
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
        if rows:
            out.insert(0, _table(rows))
    if args.loop_only or not args.no_loop:
        ratio = loop_ratio(args.cache)
        out.append(
            f"tests at {SIZES[0]} (vectorised vs a scipy loop, median of 3 vectorised runs): {json.dumps(ratio)}"
        )
    text = "\n\n".join(out)
    print(text)
    stamp = datetime.date.today().isoformat()
    (HERE / "results").mkdir(exist_ok=True)
    name = (
        f"scale-{stamp}.txt"
        if sorted(args.sizes) == sorted(SIZES) and not args.no_loop and not args.loop_only
        else f"scale-{stamp}-partial.txt"
    )
    (HERE / "results" / name).write_text(
        f"# benchmarks/scale.py {' '.join(sys.argv[1:])} ({os.cpu_count()} CPUs)\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
