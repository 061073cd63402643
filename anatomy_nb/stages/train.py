"""Stage 4 (train): DPO training (TRL) with an intervention plan applied.

``train(run_dir, plan)`` reads the stage-1 pairs (or ``pairs=``), splits off a held-out set for
stage 5 (by prompt, so no prompt is in both), applies the plan to the training split and trains
TRL's DPO — LoRA by default — writing under ``run_dir/train/<key>/``:

- ``metrics.jsonl`` — one line per logged step (loss, rewards, margins, accuracy, step time);
- ``adapter/`` — the LoRA adapter (or the full model) as safetensors; ``load_trained`` reloads it,
  merged or not;
- ``split.json`` — training and held-out pair ids; ``data_report.json`` — what the plan did to
  the data (pairs dropped/flipped, prompts inoculated, reward offsets); ``manifest.json`` last.

The key hashes the final training pairs, the per-pair reward offsets, the plan, the model and SAE
fingerprints and the config, so a changed λ (or anything else) never reuses a finished run.

Methods (``stages.interventions`` for scores and directions, ``stages.dpo`` for the trainer):
reward shaping shifts TRL's reference log-probs by the per-pair offsets (exactly the shaped loss);
filtering and inoculation change the training pairs; steering and CAFT are forward hooks held for
the whole run (reference pass included, with steering switched off there) and removed afterwards.
Plain DPO is the empty plan. The reference log-probs are computed once per run directory and
response (``dpo.RefLogpCache``), so plain DPO, shaping and filtering on the same pairs share them;
runs whose reference pass sees a residual edit (CAFT) do not use the cache.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel

from ..config import DEFAULT_MODEL, TrainConfig
from ..core.files import atomic_replace_dir, content_hash, read_json
from ..core.stage import show_progress
from ..data.schema import PairSet, PreferencePair
from ..lm.models import LoadedModel, load_model
from ..lm.ops import ResidualHooks
from ..lm.sae import load_sae
from ..methods import METHODS
from ..results.plan import InterventionPlan, load_plan
from ..results.run import RunDir, RunLike
from ..results.train import FORMAT, TrainResult
from .dpo import MetricsLog, make_trainer, quiet_datasets, ref_cache_for
from .extract import process_state
from .interventions import (
    PlannedConcept,
    edit_prompts,
    planned_concepts,
    residual_edits,
    reward_offsets,
    scope_masks,
    select_pairs,
)

__all__ = ["TrainConfig", "TrainResult", "Prepared", "prepare", "train", "load_trained", "split_pairs", "STAGE"]

log = logging.getLogger(__name__)
STAGE = "train"


def split_pairs(pairs: Sequence[PreferencePair], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices; whole prompts go to one side, chosen at random with ``seed``."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.prompt_key, []).append(i)
    keys = list(groups)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    n_held = int(math.ceil(fraction * len(keys))) if fraction > 0 and len(keys) > 1 else 0
    held = sorted(i for k in order[:n_held] for i in groups[keys[k]])
    train = [i for k in order[n_held:] for i in groups[keys[k]]]  # random prompt order
    return train, held


@dataclass
class Prepared:
    """The training data after the plan, before any training: what ``train`` will fit."""

    key: str
    train_pairs: list[PreferencePair]  # after filtering/relabelling and inoculation
    heldout_pairs: list[PreferencePair]  # untouched: stage 5 evaluates on these
    train_ids: list[str]  # the training split before the plan (ids)
    offsets: np.ndarray  # (n_train, 2) reward offsets o(y⁺), o(y⁻)
    scores: dict[str, np.ndarray]  # per scored concept, (n_train, 2) after filtering
    report: dict[str, Any]
    concepts: list[PlannedConcept]
    plan: InterventionPlan
    lm: LoadedModel
    sae: Any = None


def prepare(
    run: RunLike,
    plan: InterventionPlan | Mapping[str, Any] | str | Path | None = None,
    *,
    pairs: PairSet | Sequence[PreferencePair] | None = None,
    model: LoadedModel | str | None = None,
    sae: Any = None,
    config: TrainConfig | dict | None = None,
) -> Prepared:
    """Split the pairs, apply the plan's data edits and compute the reward offsets (no training).

    ``pairs`` default to the stage-1 feature store's pairs; ``model`` to the store's model (a
    LoadedModel is copied, never trained in place); ``sae`` (needed to steer/ablate SAE concepts)
    to the store's SAE by name. A plan given as a path may be a run directory (its plan file).
    """
    cfg = TrainConfig.from_dict(config)
    run = RunDir.of(run)
    store = run.store if run.has("extract") else None
    hyps = run.hypotheses if plan is not None and run.has("hypothesize") else None
    known = hyps.table["concept"].unique().tolist() if hyps is not None else None
    plan_source = plan
    plan = load_plan(plan, known_concepts=known)
    base_dir = (
        Path(plan_source).parent
        if isinstance(plan_source, (str, Path)) and Path(str(plan_source)).is_file()
        else run.path
    )

    if pairs is None:
        if store is None:
            raise FileNotFoundError(f"{run.path}: no feature store to take the pairs from; run stage 1 or pass pairs=")
        all_pairs = store.pairs()
    else:
        all_pairs = list(pairs)
    if not all_pairs:
        raise ValueError("no pairs to train on")
    model_name = cfg.model or (store.manifest["model"]["name"] if store is not None else DEFAULT_MODEL)
    if isinstance(model, LoadedModel):
        lm = LoadedModel(
            model=copy.deepcopy(model.model),
            tokenizer=model.tokenizer,
            name=model.name,
            fingerprint=model.fingerprint,
            source=model.source,
        )
    else:
        lm = load_model(model or model_name)
    if store is not None and pairs is None and lm.fingerprint != store.manifest["model"]["fingerprint"]:
        log.warning(
            "training model %s differs from the feature store's model %s", lm.name, store.manifest["model"]["name"]
        )

    needs_sae = any(c.kind == "sae" and METHODS[c.method].needs_direction for c in plan.active)
    if needs_sae and sae is None:
        if store is None:
            raise ValueError("steering/ablating an SAE concept needs the SAE: pass sae=")
        sae = load_sae(store.manifest["sae"]["name"])
    if sae is not None and store is not None:
        known = sae.known_as(store.manifest["sae"]["fingerprint"])
        if known is None:
            raise ValueError(
                f"SAE {sae.name} is not the one the feature store was built with ({store.manifest['sae']['name']})"
            )
        sae = known
    concepts = planned_concepts(plan, hypotheses=hyps, sae=sae, d_model=lm.d_model, base_dir=base_dir)

    # split, then apply the plan to the training side only
    train_idx, held_idx = split_pairs(all_pairs, cfg.heldout_fraction, cfg.seed)
    if cfg.max_train_pairs is not None:
        train_idx = train_idx[: cfg.max_train_pairs]
    train_pairs = [all_pairs[i] for i in train_idx]
    scored = [r for r in concepts if METHODS[r.choice.method].scored]
    scopes = scope_masks(concepts, train_pairs, hyps.topic_of_prompt() if hyps is not None else None)
    # a scoped entry scores zero outside its scope: no offset, no filter hit there
    scores = {
        r.ref: r.source.pair_scores(train_pairs, store=store, lm=lm)
        * (scopes[r.ref][:, None] if r.ref in scopes else 1.0)
        for r in scored
    }
    report: dict[str, Any] = {
        "n_pairs": len(all_pairs),
        "n_heldout": len(held_idx),
        "n_train_before": len(train_pairs),
        "concepts": [],
    }
    for r in scored:
        s = scores[r.ref]
        report["concepts"].append(
            {
                "concept": r.ref,
                "label": r.choice.label,
                "method": r.choice.method,
                "action": r.choice.action,
                "mean_chosen": float(s[:, 0].mean()),
                "mean_rejected": float(s[:, 1].mean()),
                "mean_diff": float((s[:, 0] - s[:, 1]).mean()),
                **({"pairs_in_scope": int(scopes[r.ref].sum())} if r.ref in scopes else {}),
            }
        )
    kept, kept_idx, counts = select_pairs(train_pairs, concepts, scores)
    report["filter"] = counts.to_dict(orient="records")
    flipped = np.asarray([bool(p.metadata.get("flipped")) for p in kept], dtype=bool)
    scores = {k: np.where(flipped[:, None], v[kept_idx][:, ::-1], v[kept_idx]) for k, v in scores.items()}
    final = edit_prompts(kept, concepts, {ref: m[kept_idx] for ref, m in scopes.items()})
    report["inoculated_prompts"] = sum(a.prompt != b.prompt for a, b in zip(kept, final))
    report["instructions"] = [r.choice.instruction for r in concepts if r.choice.instruction]
    offsets = reward_offsets(concepts, scores, len(final))
    n = len(final)
    report["offsets"] = {
        "mean_chosen": float(offsets[:, 0].mean()) if n else 0.0,
        "mean_rejected": float(offsets[:, 1].mean()) if n else 0.0,
        "mean_margin": float((offsets[:, 0] - offsets[:, 1]).mean()) if n else 0.0,
        "nonzero_pairs": int((np.abs(offsets[:, 0] - offsets[:, 1]) > 0).sum()),
    }
    report["n_train"] = n

    sources = [{**r.source.describe(), "scale": getattr(r.source, "scale", None)} for r in concepts]
    key = content_hash(
        FORMAT,
        [p.to_dict() for p in final],
        np.round(offsets, 8).tolist(),
        lm.fingerprint,
        plan.to_dict(),
        sources,
        sae.fingerprint if sae is not None else None,
        cfg.key_params(),
    )
    return Prepared(
        key=key,
        train_pairs=final,
        heldout_pairs=[all_pairs[i] for i in held_idx],
        train_ids=[all_pairs[i].id for i in train_idx],
        offsets=offsets,
        scores=scores,
        report=report,
        concepts=concepts,
        plan=plan,
        lm=lm,
        sae=sae,
    )


def train(
    run: RunLike,
    plan: InterventionPlan | Mapping[str, Any] | str | Path | None = None,
    *,
    pairs: PairSet | Sequence[PreferencePair] | None = None,
    model: LoadedModel | str | None = None,
    sae: Any = None,
    config: TrainConfig | dict | None = None,
    force: bool = False,
) -> TrainResult:
    """Train DPO with ``plan`` (None: plain DPO) on the run's pairs; reuse a finished identical
    run unless ``force``. Arguments as in ``prepare``."""
    cfg = TrainConfig.from_dict(config)
    run = RunDir.of(run)
    prep = prepare(run, plan, pairs=pairs, model=model, sae=sae, config=cfg)
    if prep.report["n_train"] < cfg.batch_size:
        raise ValueError(
            f"only {prep.report['n_train']} training pairs left after the plan (batch_size={cfg.batch_size}); filter "
            f"counts: {prep.report['filter']}"
        )
    stage = run.stage(STAGE, prep.key, FORMAT)
    if stage.reuse(force, plan=prep.plan.to_dict()):
        return TrainResult(stage.path, stage.manifest(), reused=True)

    lm = prep.lm
    out = stage.begin()
    metrics_path = out / "metrics.jsonl"
    if process_state().is_main_process:  # one writer under accelerate launch
        metrics_path.unlink(missing_ok=True)
    edits = residual_edits(prep.concepts, lm=lm, pairs=prep.train_pairs, n_mean=cfg.mean_ablation_pairs)
    metrics_cb = MetricsLog(metrics_path, enabled=True)
    t0 = time.time()
    with quiet_datasets(not show_progress(cfg.progress)), ResidualHooks(lm.model, edits) as hooks:
        trainer = make_trainer(
            prep,
            cfg,
            out / "trainer",
            hooks=hooks if edits else None,
            callbacks=[metrics_cb],
            ref_cache=ref_cache_for(run, lm, cfg, edits),
        )
        if len(trainer.train_dataset) < cfg.batch_size:  # TRL drops the pairs whose prompt alone fills max_length
            raise ValueError(
                f"{len(trainer.train_dataset)} of {len(prep.train_pairs)} training pairs fit "
                f"max_length={cfg.max_length} tokens (TRL drops the pairs whose prompt fills it); raise "
                "TrainConfig.max_length"
            )
        main = trainer.accelerator.is_main_process
        metrics_cb.enabled = main
        t_train = time.time()
        result = trainer.train()
        seconds = time.time() - t_train
    hooks_left = sum(len(m._forward_hooks) for m in lm.model.modules())
    trained = trainer.accelerator.unwrap_model(trainer.model)
    trained.eval()
    if main:

        def save(path: Path) -> None:
            trained.save_pretrained(str(path), safe_serialization=True)
            if not cfg.lora:
                lm.tokenizer.save_pretrained(str(path))

        atomic_replace_dir(save, out / "adapter")
        ds = trainer.train_dataset
        if cfg.precompute_ref and "ref_chosen_logps" in ds.column_names:
            stage.save_npy(
                "ref_logps", np.stack([np.asarray(ds["ref_chosen_logps"]), np.asarray(ds["ref_rejected_logps"])], 1)
            )
        prep.report["n_train_used"] = len(ds)  # TRL drops pairs whose prompt alone fills max_length
        stage.write_json(
            "split.json",
            {
                "train": prep.train_ids,
                "heldout": [p.id for p in prep.heldout_pairs],
                "seed": cfg.seed,
                "heldout_fraction": cfg.heldout_fraction,
            },
        )
        stage.write_json("data_report.json", prep.report)
        shutil.rmtree(out / "trainer", ignore_errors=True)
        step_s = metrics_cb.step_seconds
        stage.finish(
            {
                "model": {"name": lm.name, "fingerprint": lm.fingerprint, "source": lm.source},
                "sae": None if prep.sae is None else {"name": prep.sae.name, "fingerprint": prep.sae.fingerprint},
                "lora": cfg.lora,
                "plan": prep.plan.to_dict(),
                "config": cfg.to_dict(),
                "n_train_pairs": prep.report["n_train"],
                "n_train_used": len(ds),
                "n_heldout_pairs": len(prep.heldout_pairs),
                "steps": int(result.global_step),
                "train_loss": float(result.training_loss),
                "seconds": round(seconds, 2),
                "seconds_total": round(time.time() - t0, 2),
                "step_seconds": [round(s, 4) for s in step_s],
                "step_seconds_median": float(np.median(step_s)) if step_s else None,
                "residual_edits": [
                    {"concept": e.concept, "kind": e.kind, "layer": e.layer, "in_reference": e.in_reference}
                    for e in edits
                ],
                "hooks_left_after_training": hooks_left,
                "world_size": trainer.accelerator.num_processes,
                # pairs whose reference log-probs came from the run's cache / were computed
                "ref_logps": trainer.ref_cache_stats,
            },
            plan=prep.plan.to_dict(),
        )
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, model=trained)


def load_trained(
    path: str | Path | RunDir | TrainResult, *, merge: bool = True, device: str | None = None
) -> LoadedModel:
    """The trained model: the base model with the saved adapter (merged into the weights unless
    ``merge=False``), or the full fine-tuned model. ``path``: a train artifact or a run directory
    (its latest training run)."""
    if isinstance(path, TrainResult):
        path = path.path
    elif isinstance(path, RunDir) or (Path(path) / "index.json").exists():
        path = RunDir.of(path).latest(STAGE)
    path = Path(path)
    manifest = read_json(path / "manifest.json")
    name = manifest["model"]["name"]
    if not manifest["lora"]:
        lm = load_model(str(path / "adapter"), device=device)
        lm.name, lm.fingerprint = (
            f"{name}+{manifest['key']}",
            content_hash(manifest["model"]["fingerprint"], manifest["key"]),
        )
        return lm
    base = load_model(name, device=device)
    if base.fingerprint != manifest["model"]["fingerprint"]:
        raise ValueError(
            f"{path}: the base model {name} now has fingerprint {base.fingerprint}, trained on "
            f"{manifest['model']['fingerprint']}"
        )
    model = PeftModel.from_pretrained(base.model, str(path / "adapter"))
    model = model.merge_and_unload() if merge else model
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=base.tokenizer,
        name=f"{name}+{manifest['key']}",
        fingerprint=content_hash(base.fingerprint, manifest["key"]),
        source=str(path),
    )
