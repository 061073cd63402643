"""Stage 4 benchmark: the step time of each intervention method against plain DPO, in one run.

One trainer per method (the same training pairs, the same config, each on its own copy of the
model, LoRA), every hook open at once; then rounds in which each method runs one training step
(forward + backward + optimizer step) on the *same* batch, in turn. Per-method medians over rounds
and ratios to plain DPO are printed; interleaving keeps a busy machine's drift out of the ratios.

    .venv/bin/python benchmarks/train.py [--model smollm2-135m-instruct] [--rounds 8] [--out
    benchmarks/results/train.txt]

Aim (issue 5): shaping ≤ 1.02×, steering / CAFT ≤ 1.10× plain DPO.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from anatomy_nb.config import TrainConfig
from anatomy_nb.data.pairs import load_pairs
from anatomy_nb.lm.models import load_model
from anatomy_nb.lm.ops import ResidualHooks
from anatomy_nb.lm.sae import load_sae, tiny_sae
from anatomy_nb.stages.dpo import make_trainer
from anatomy_nb.stages.interventions import residual_edits
from anatomy_nb.stages.train import prepare

SHAPE = {
    "concept": "text:refusal",
    "action": "suppress",
    "method": "reward_shaping",
    "pattern": "refusal_phrase",
    "strength": 1.0,
}


def methods(features: list[int]) -> dict[str, dict | None]:
    sae_entry = {"concept": "sae:0", "action": "suppress", "features": features}
    return {
        "plain DPO": None,
        "reward shaping": {"concepts": [SHAPE]},
        "steer (α=4)": {"concepts": [{**sae_entry, "method": "steer", "strength": 4.0}]},
        "CAFT zero-ablation": {"concepts": [{**sae_entry, "method": "ablate", "ablation": "zero"}]},
        "CAFT mean-ablation": {"concepts": [{**sae_entry, "method": "ablate", "ablation": "mean"}]},
    }


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sae", default="smollm2-135m-instruct-topk")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n-features", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    lm = load_model(a.model)
    if a.model == "tiny-llama":  # a smoke run of this script
        sae = tiny_sae(lm.d_model, layer=2, d_sae=96, k=6)
    else:
        sae = load_sae(a.sae)
    pairs = load_pairs("hh-rlhf", limit=a.pairs)
    features = list(range(a.n_features))
    cfg = TrainConfig(
        max_train_pairs=a.pairs, heldout_fraction=0.0, batch_size=a.batch_size, max_length=a.max_length, progress=False
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    runs = {}
    with contextlib.ExitStack() as stack:
        for name, plan in methods(features).items():
            prep = prepare(tmp / "run", plan, pairs=pairs, model=lm, sae=sae, config=cfg)
            edits = residual_edits(prep.concepts, lm=prep.lm, pairs=prep.train_pairs)
            hooks = stack.enter_context(ResidualHooks(prep.lm.model, edits))
            trainer = make_trainer(prep, cfg, tmp / name, hooks=hooks if edits else None)
            trainer.create_optimizer_and_scheduler(num_training_steps=a.rounds + 1)
            trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass
            runs[name] = trainer
        setup_s = time.perf_counter() - t0
        first = next(iter(runs.values()))
        # identical for all but shaping
        batch = first.data_collator([first.train_dataset[i] for i in range(a.batch_size)])
        batches = {n: t.data_collator([t.train_dataset[i] for i in range(a.batch_size)]) for n, t in runs.items()}
        for n, b in batches.items():
            assert torch.equal(b["input_ids"], batch["input_ids"]), f"{n}: training data differs from plain DPO's"
        times: dict[str, list[float]] = {n: [] for n in runs}
        for r in range(a.rounds + 1):  # round 0 warms up
            for n, t in runs.items():
                t.model.train()
                s = time.perf_counter()
                t.training_step(t.model, dict(batches[n]))
                t.optimizer.step()
                t.optimizer.zero_grad()
                if r:
                    times[n].append(time.perf_counter() - s)
    base = statistics.median(times["plain DPO"])
    lines = [
        "# benchmarks/train.py — DPO step time per intervention method vs plain DPO (one run, interleaved rounds)",
        f"# model {lm.name}, LoRA r={cfg.lora_r} all-linear, batch {a.batch_size}, max_length {a.max_length}, "
        "precomputed reference, "
        f"{a.rounds} rounds; SAE concept = {a.n_features} features of {sae.name if sae else '-'} at layer "
        f"{sae.layer if sae else '-'}",
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads "
        f"{torch.get_num_threads()}; setup {setup_s:.0f}s",
        f"# batch tokens: {int(batch['attention_mask'].sum())}; 1-min load average at start {load_start:.1f}, at end "
        f"{os.getloadavg()[0]:.1f} "
        "(above the CPU count, other processes share the cores and the ratios are noise)",
        f"{'method':<22} {'median s/step':>13} {'min':>8} {'max':>8} {'ratio':>7}",
    ]
    for n, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"{n:<22} {med:>13.3f} {min(ts):>8.3f} {max(ts):>8.3f} {med / base:>7.3f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
