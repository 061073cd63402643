"""SAE-recipe activation collection: documents per forward pass, measured as a ratio in one run.

    python benchmarks/sae_collect.py            # default model, 160 documents of the recipe's corpus
    python benchmarks/sae_collect.py --tiny     # tiny random model (plumbing check only)

Prints tokens/s of ``sae.collect_activations`` at batch sizes 1 and 16 (medians of interleaved
repeats) and their ratio, and the largest difference between the activations the two store.
Measured 2026-11-24 on two idle CPU cores: 601 vs 384 tokens/s, ratio 0.64 (batching loses on
CPU: the forward is compute-bound and padding adds work), largest difference 0.0625 (float16
rounding; typical |activation| 2.2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anatomy_nb.config import RecipeConfig  # noqa: E402
from anatomy_nb.lm.models import load_model  # noqa: E402
from anatomy_nb.lm.sae_recipe import split_corpus  # noqa: E402
from anatomy_nb.lm.sae_training import chat_documents, collect_activations  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--docs", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    lm = load_model("tiny-llama") if args.tiny else load_model()
    layer = min(15, lm.n_layers - 1)
    train, _ = split_corpus(RecipeConfig.held_out_every)
    docs = chat_documents(lm, train, RecipeConfig.max_seq_len)
    docs = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))[: args.docs]]
    tokens = sum(len(d.ids) - d.collect_from for d in docs)
    print(
        f"model {lm.name}, layer {layer}, {len(docs)} documents, {tokens} collected tokens, torch threads "
        f"{torch.get_num_threads()}, {args.repeats} interleaved repeats (medians)\n"
    )
    times: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    stored: dict[int, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for b in args.batch_sizes:
                t = time.perf_counter()
                acts = collect_activations(lm, docs, [layer], Path(tmp) / f"b{b}-r{rep}", batch_size=b)[layer]
                times[b].append(time.perf_counter() - t)
                stored[b] = np.asarray(acts, dtype=np.float32)
    med = {b: statistics.median(ts) for b, ts in times.items()}
    for b in args.batch_sizes:
        print(f"batch {b:3d}: {med[b]:7.2f} s  {tokens / med[b]:8.0f} tokens/s")
    first, last = args.batch_sizes[0], args.batch_sizes[-1]
    print(f"\nbatch {last} / batch {first} throughput ratio: {med[first] / med[last]:.2f}")
    print(
        f"largest |difference| between the stored activations: {np.abs(stored[last] - stored[first]).max():.4g} "
        f"(float16 storage; typical |activation| {np.median(np.abs(stored[first])):.3g})"
    )


if __name__ == "__main__":
    main()
