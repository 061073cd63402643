"""Reading a feature store at scale: seconds to open it, to build every response's firing sets
(``pooled("fires")``) and the prompts' means (``pooled("mean", prefix="prompt")``), peak memory,
and bytes per pair, on a synthetic store in the layout ``stages.extract`` writes.

    python benchmarks/store_open.py                          # 100,000 pairs × 4,608 features, ~670 per response
    python benchmarks/store_open.py --size 10000x4608x670
    python benchmarks/store_open.py --layout ids             # firing sets as ids only (format 1's layout)
    python benchmarks/store_open.py --reencode /path/to/format-1/store   # its bytes per pair, old vs new

The store is written (or reused, under ``--cache``) in a child process, so the peak RSS printed is
reading's alone. ``--reencode`` rewrites a format-1 store's firing sets with the writer's
``write_firing_sets`` into a temporary folder, checks that every pooled matrix a stage reads is
unchanged, and prints bytes per pair per array family before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

FAMILIES = ("resp", "prompt", "resp_opening", "resp_ending")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _store_path(size: str, cache: Path, layout: str) -> tuple[Path, float]:
    """In a child process: write (or reuse) the synthetic store; its path and seconds."""
    run_dir = cache / (size if layout == "auto" else f"{size}-{layout}")
    code = (
        f"import time, anatomy_nb.stages.extract as ex; ex.FIRING_LAYOUT = {layout!r}; from synthetic_store import "
        "write_synthetic_store; "
        f"t = time.perf_counter(); s = write_synthetic_store({str(run_dir)!r}, {', '.join(size.split('x'))}); "
        "print(s.path); print(round(time.perf_counter() - t, 1))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"writing the store failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout.split()
    return Path(out[-2]), float(out[-1])


def _families(store) -> dict[str, float]:
    """Bytes per pair per pooled array (the ones ``bytes_per_pair`` counts)."""
    return {n: round((store.path / f"{n}.npy").stat().st_size / store.n_pairs) for n in store.pooled_arrays()}


def measure(size: str, cache: Path, layout: str = "auto") -> dict:
    from anatomy_nb.results.extract import FeatureStore

    path, write_s = _store_path(size, cache, layout)
    t = {}
    t0 = time.perf_counter()
    store = FeatureStore(path)
    t["open"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fires = store.pooled("fires")
    t["pooled_fires_all_rows"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    chosen, rejected = store.pooled("fires", "chosen"), store.pooled("fires", "rejected")
    t["pooled_fires_chosen_and_rejected"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prompt = store.pooled("mean", prefix="prompt")
    t["pooled_mean_prompt"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    edges = [store.pooled("fires", side, prefix=f"resp_{e}") for e in store.edges for side in ("chosen", "rejected")]
    t["pooled_fires_edges_both_sides"] = time.perf_counter() - t0
    return {
        "size": size,
        "store_write_seconds": write_s,
        "n_pairs": store.n_pairs,
        "d_sae": store.d_sae,
        "firing_sets": store.manifest.get("firing_sets"),
        "features_per_response": round(fires.nnz / fires.shape[0], 1),
        "features_per_prompt": round(prompt.nnz / prompt.shape[0], 1),
        "features_per_edge_row": round(sum(m.nnz for m in edges) / sum(m.shape[0] for m in edges), 1),
        "chosen_plus_rejected_nnz_equal": int(chosen.nnz + rejected.nnz) == int(fires.nnz),
        "seconds": {k: round(v, 2) for k, v in t.items()},
        "peak_rss_gb": round(_peak_rss_gb(), 2),
        "bytes_per_pair": round(store.bytes_per_pair()),
        "bytes_per_pair_by_array": _families(store),
    }


def reencode(src: Path) -> dict:
    """A format-1 store's bytes per pair, and the same store with format 2's firing sets and no
    pooled values; every pooled matrix a stage reads is checked equal."""
    import numpy as np

    from anatomy_nb.results.extract import FeatureStore
    from anatomy_nb.stages.extract import write_firing_sets

    old = FeatureStore(src)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp)
        dropped = {f"{p}_{a}" for p in FAMILIES for a in ("indptr", "feat")} | {
            "resp_max",
            "resp_mean",
            "resp_count",
            "prompt_max",
            "prompt_count",
        }
        for p in src.iterdir():
            if p.is_file() and p.stem not in dropped:
                shutil.copy(p, dst / p.name)
        layouts = {
            f: write_firing_sets(dst, f, np.load(src / f"{f}_indptr.npy"), np.load(src / f"{f}_feat.npy"), old.d_sae)
            for f in FAMILIES
            if old.firing_layout(f)
        }
        new = FeatureStore(dst)
        for stat, side, prefix in (
            [("fires", s, "resp") for s in (None, "chosen", "rejected")]
            + [("mean", None, "prompt")]
            + [("fires", s, f"resp_{e}") for e in old.edges for s in ("chosen", "rejected")]
        ):
            a, b = old.pooled(stat, side, prefix=prefix), new.pooled(stat, side, prefix=prefix)
            assert all(
                np.array_equal(x, y) for x, y in ((a.indptr, b.indptr), (a.indices, b.indices), (a.data, b.data))
            ), (stat, side, prefix)
        return {
            "store": str(src),
            "n_pairs": old.n_pairs,
            "d_sae": old.d_sae,
            "features_per_row": {f: round(float(old.n_firing(f).mean()), 1) for f in FAMILIES if old.firing_layout(f)},
            "format_1_bytes_per_pair": round(old.bytes_per_pair()),
            "format_1_by_array": _families(old),
            "format_2_bytes_per_pair": round(new.bytes_per_pair()),
            "format_2_by_array": _families(new),
            "format_2_layouts": layouts,
            "pooled_matrices_equal": True,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100000x4608x670", help="PAIRSxFEATURESxPER_RESPONSE")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument(
        "--layout", choices=["auto", "bits", "ids"], default="auto", help="firing sets: the writer's choice, or forced"
    )
    ap.add_argument("--reencode", type=Path, help="a format-1 store: its bytes per pair, old vs new")
    ap.add_argument("--out", type=Path, help="also write the output here")
    args = ap.parse_args()
    if args.reencode:
        text = json.dumps(reencode(args.reencode), indent=1)
    else:
        args.cache.mkdir(parents=True, exist_ok=True)
        text = json.dumps(measure(args.size, args.cache, args.layout), indent=1)
    text = (
        f"# benchmarks/store_open.py {' '.join(sys.argv[1:])} ({os.cpu_count()} CPUs, "
        f"{datetime.date.today().isoformat()})\n{text}"
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
