"""Extraction speed and size, measured as ratios within one run (medians of interleaved repeats).

    python benchmarks/extract.py                 # default model + shipped SAE, 48 HH-RLHF pairs
    python benchmarks/extract.py --tiny          # tiny random model + tiny SAE (seconds)

Prints:
- bare early-exit forward to the SAE layer (prompt once, both responses on its KV cache), tokens/s;
- extraction (the same forward + SAE encode + pooling + contexts + histograms), tokens/s, and the
  ratio extraction / bare forward (aim >= 0.9);
- extraction with the shared prompt run once vs naively twice: time ratio;
- batched extraction (4 and 16 pairs per forward, length-sorted and padded) against one pair per
  forward: throughput ratio (on a GPU, ``batch_size=None`` sizes batches from free memory);
- the whole ``extract()`` call (sharding, files, merge) against the in-memory extraction;
- bytes stored per pair: pooled statistics only, and everything (tokens, contexts, histograms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anatomy_nb.config import ExtractConfig  # noqa: E402
from anatomy_nb.data.chat import render_example, truncate_prompt  # noqa: E402
from anatomy_nb.data.pairs import load_pairs  # noqa: E402
from anatomy_nb.lm.models import load_model  # noqa: E402
from anatomy_nb.lm.ops import ResidualCapture  # noqa: E402
from anatomy_nb.lm.sae import load_sae, tiny_sae  # noqa: E402
from anatomy_nb.results.extract import FeatureStore  # noqa: E402
from anatomy_nb.stages.extract import compute_shard, extract  # noqa: E402


def n_tokens(lm, pairs, cfg: ExtractConfig) -> int:
    total = 0
    for p in pairs:
        r = render_example(lm.tokenizer, p.prompt, p.chosen)
        rej = lm.tokenizer(p.rejected, add_special_tokens=False)["input_ids"]
        total += (
            min(len(r.prompt_ids), cfg.max_prompt_tokens)
            + min(len(r.response_ids), cfg.max_response_tokens)
            + min(len(rej), cfg.max_response_tokens)
        )
    return total


@torch.no_grad()
def bare_forward(lm, sae, pairs, cfg: ExtractConfig) -> None:
    """Extraction's own shared-prefix forward to the SAE layer (same truncation), with no SAE,
    pooling, contexts or histograms."""
    tok = lm.tokenizer
    with ResidualCapture(lm, sae.layer) as capture:
        for p in pairs:
            r = render_example(tok, p.prompt, p.chosen)
            rej = tok(p.rejected, add_special_tokens=False)["input_ids"]
            prompt, _, _ = truncate_prompt(r.prompt_ids, r.prompt_content, cfg.max_prompt_tokens)
            capture.shared_prefix(
                prompt, [r.response_ids[: cfg.max_response_tokens], list(rej)[: cfg.max_response_tokens]]
            )


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        lm = load_model("tiny-llama")
        sae = tiny_sae(lm.d_model, layer=2, d_sae=512, k=16)
    else:
        lm = load_model()
        sae = load_sae(device="cpu")
    pairs = list(load_pairs("hh-rlhf", limit=args.pairs))
    cfg = ExtractConfig(progress=False)
    naive_cfg = ExtractConfig(progress=False, shared_prefix=False)
    tokens = n_tokens(lm, pairs, cfg)
    print(
        f"model {lm.name}, SAE {sae.name} (layer {sae.layer}, {sae.d_sae} features), {len(pairs)} HH-RLHF pairs, "
        f"{tokens} tokens (prompt once + both responses)"
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats} (interleaved), "
        "medians reported\n"
    )

    batch_sizes = (4, 16)
    times: dict[str, list[float]] = {
        "bare": [],
        "extract": [],
        "naive": [],
        "store": [],
        **{f"batch{b}": [] for b in batch_sizes},
    }
    bare_forward(lm, sae, pairs[:4], cfg)  # warm-up
    with ResidualCapture(lm, sae.layer) as capture:
        compute_shard(capture, sae, pairs[:4], cfg)
    for rep in range(args.repeats):
        times["bare"].append(timed(lambda: bare_forward(lm, sae, pairs, cfg)))
        with ResidualCapture(lm, sae.layer) as capture:
            times["extract"].append(timed(lambda: compute_shard(capture, sae, pairs, cfg)))
            times["naive"].append(timed(lambda: compute_shard(capture, sae, pairs, naive_cfg)))
            for b in batch_sizes:
                times[f"batch{b}"].append(
                    timed(lambda b=b: compute_shard(capture, sae, pairs, cfg, (b, cfg.batch_tokens)))
                )
        with tempfile.TemporaryDirectory() as d:
            times["store"].append(
                timed(lambda: extract(pairs, lm, sae, d, ExtractConfig(progress=False, shard_size=16)))
            )
            if rep == 0:
                st = FeatureStore.from_run(d)
                pooled_bpp, all_bpp = st.bytes_per_pair(), st.bytes_per_pair(pooled_only=False)
                nnz = st.n_firing("resp").mean()
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        ("bare early-exit forward", med["bare"], tokens / med["bare"]),
        ("extraction (in memory)", med["extract"], tokens / med["extract"]),
        ("extraction, naive (prompt run twice)", med["naive"], tokens / med["naive"]),
        *[(f"extraction, {b} pairs per forward", med[f"batch{b}"], tokens / med[f"batch{b}"]) for b in batch_sizes],
        ("extract() with shards, files, merge", med["store"], tokens / med["store"]),
    ]
    print(f"{'':40s} {'seconds':>9s} {'tokens/s':>10s}")
    for name, s, tps in rows:
        print(f"{name:40s} {s:9.2f} {tps:10.0f}")
    print()
    print(f"extraction / bare forward throughput ratio : {med['bare'] / med['extract']:.3f}   (aim >= 0.9)")
    print(f"shared-prefix / naive extraction time ratio: {med['extract'] / med['naive']:.3f}   (lower is better)")
    for b in batch_sizes:
        print(f"batched ({b:2d} pairs) / one-pair throughput  : {med['extract'] / med[f'batch{b}']:.3f}")
    print(f"extract() / in-memory extraction time ratio: {med['store'] / med['extract']:.3f}")
    print(f"bytes per pair, pooled arrays              : {pooled_bpp:.0f}   (aim <= 6144)")
    print(f"bytes per pair, everything stored          : {all_bpp:.0f}")
    print(f"mean features firing per response          : {nnz:.0f}")


if __name__ == "__main__":
    main()
