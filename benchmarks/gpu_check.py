"""The GPU check (issue 15): batched extraction, stage 2 and a few DPO steps on one GPU, in bf16,
with no network and no downloaded weights.

    python benchmarks/gpu_check.py --dry-run        # CPU, tiny shapes: proves the script runs (~1 min)
    scripts/gpu_check.sh                            # on a GPU machine (≤ 5 minutes on one H200)

Models are randomly initialised Llamas of SmolLM2-135M's shape and of a ~1.7B shape (SmolLM2-1.7B's),
built in code; SAEs are random TopK SAEs of 16,384 and 65,536 features (k = 64) at two thirds of the
depth. Random weights make the *speed and memory* real and the concepts meaningless: this checks that
the GPU path runs and how fast, not what it finds. Prints one JSON document (and writes it to
``--out``): per model × SAE, extraction tokens/s and peak GPU memory per batch size (1, 8, 32 and
``batch_size=None``, sized from free memory), stage 2's seconds on the extracted store, and DPO
seconds per step (once per model: DPO does not read the SAE).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anatomy_nb.config import ConceptConfig, ExtractConfig, HypothesizeConfig, TrainConfig  # noqa: E402
from anatomy_nb.data.pairs import load_pairs  # noqa: E402
from anatomy_nb.lm.models import tiny_llama  # noqa: E402
from anatomy_nb.lm.ops import ResidualCapture  # noqa: E402
from anatomy_nb.lm.sae import tiny_sae  # noqa: E402
from anatomy_nb.stages.extract import batch_limits, compute_shard, extract  # noqa: E402
from anatomy_nb.stages.hypothesize import hypothesize  # noqa: E402
from anatomy_nb.stages.train import train  # noqa: E402

# name: (layers, d_model, d_ff, heads, kv heads), vocabulary 49,152 as SmolLM2's
GPU_MODELS = {"smollm2-135m-shape": (30, 576, 1536, 9, 3), "smollm2-1.7b-shape": (24, 2048, 8192, 32, 32)}
DRY_MODELS = {"tiny": (4, 64, 128, 4, 2)}
GPU_SAES, DRY_SAES = (16_384, 65_536), (512, 2048)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_one(
    name: str, shape: tuple, d_sae: int, pairs: list, device: str, dry: bool, workdir: Path, dpo: bool
) -> dict:
    layers, d_model, d_ff, heads, kv = shape
    lm = tiny_llama(0, layers, d_model, d_ff=d_ff, n_heads=heads, n_kv_heads=kv, vocab_size=49_152)
    lm.model.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    sae = tiny_sae(d_model, layer=(2 * layers) // 3, d_sae=d_sae, k=64 if not dry else 16)
    sae.sae.to(device)
    dev = lm.device
    cfg = ExtractConfig(progress=False, batch_size=None)
    auto = batch_limits(cfg, lm, sae)
    out: dict = {
        "model": name,
        "d_sae": d_sae,
        "layer": sae.layer,
        "dtype": str(lm.model.dtype),
        "auto_batch_limits": list(auto),
        "extract": [],
    }
    timed_pairs = pairs[: 16 if dry else 256]
    with ResidualCapture(lm, sae.layer) as capture:
        compute_shard(capture, sae, timed_pairs[:4], cfg, (4, cfg.batch_tokens))  # warm-up
        for label, limits in (("1", (1, cfg.batch_tokens)), ("8", (8, 16_384)), ("32", (32, 65_536)), ("auto", auto)):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            synchronize(dev)
            t = time.perf_counter()
            arrays = compute_shard(capture, sae, timed_pairs, cfg, limits)
            synchronize(dev)
            seconds = time.perf_counter() - t
            tokens = int(arrays["resp_ntok"].sum() + arrays.get("prompt_ntok", arrays["resp_ntok"][:0]).sum())
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
            out["extract"].append(
                {
                    "batch": label,
                    "limits": list(limits),
                    "seconds": round(seconds, 2),
                    "tokens_per_s": round(tokens / seconds),
                    "peak_gpu_gb": peak and round(peak, 2),
                }
            )
    run = workdir / f"{name}-{d_sae}"
    t = time.perf_counter()
    extract(pairs, lm, sae, run, ExtractConfig(progress=False, shard_size=256))
    out["extract_all_seconds"] = round(time.perf_counter() - t, 1)
    out["n_pairs"] = len(pairs)
    t = time.perf_counter()
    hyp = hypothesize(
        run,
        HypothesizeConfig(concepts=ConceptConfig(min_support=3), promoted_tokens=0, linear_baseline=False),
        model=lm,
        sae=sae,
    )
    out["hypothesize_seconds"] = round(time.perf_counter() - t, 1)
    out["concepts"] = int(len(hyp.ranked()))
    steps = 2 if dry else 4
    t = time.perf_counter()
    if dpo:  # DPO does not depend on the SAE: once per model
        train(
            run,
            None,
            model=lm,
            config=TrainConfig(
                max_steps=steps,
                batch_size=4 if dry else 8,
                max_length=1024,
                max_train_pairs=64,
                heldout_fraction=0.1,
                progress=False,
            ),
        )
        out["dpo_seconds_per_step"] = round((time.perf_counter() - t) / steps, 2)
    del lm, sae
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--pairs", type=int, default=None, help="HH-RLHF pairs (default: 512 on a GPU, 24 dry)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on CPU")
    device = "cpu" if dry else "cuda"
    pairs = list(load_pairs("hh-rlhf", limit=args.pairs or (24 if dry else 512)))
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dry_run": dry,
        "note": "random weights: speed and memory are real, concepts are not",
        "runs": [],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in (DRY_MODELS if dry else GPU_MODELS).items():
            for j, d_sae in enumerate(DRY_SAES if dry else GPU_SAES):
                report["runs"].append(check_one(name, shape, d_sae, pairs, device, dry, Path(tmp), dpo=j == 0))
                print(json.dumps(report["runs"][-1]), flush=True)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
