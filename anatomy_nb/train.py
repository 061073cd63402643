"""Stage 4b: DPO training (TRL) with an intervention plan applied.

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

Methods (see ``interventions`` for scores and directions): reward shaping subclasses TRL's
``DPOTrainer`` — TRL 1.x computes the loss in one method from the reference log-probs, so the
offset o(y) = Σ λ·s_c(y) enters as ref_logp(y) − o(y)/β, which turns β·margin into
β·margin + o(y⁺) − o(y⁻) exactly. Offsets are computed before training, stored as dataset columns
and carried through the collator. Filtering and inoculation change the training pairs; steering and
CAFT are forward hooks held for the whole run (reference pass included, with steering switched
off there) and removed afterwards. Plain DPO is the empty plan.

The reference log-probs are precomputed once by default (one pass over the data; each step then
runs the policy only). TRL caches that pass by dataset fingerprint and model weights, which never
hits for us: our datasets are built in memory and carry the offset columns, so every run has a new
fingerprint. ``RefLogpCache`` caches them per response instead — keyed by the prompt's and the
response's token ids, the model, ``max_length`` and precision — under ``run_dir/cache/ref_logps/``, so plain DPO, reward
shaping and filtering on the same pairs run the reference pass once between them (about 50 s per
run on CPU). Runs whose reference pass sees a residual edit (CAFT) do not use it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .artifacts import RunDir, atomic_write_json, content_hash, read_json
from .data import PairSet, PreferencePair
from .interventions import (
    ResidualHooks,
    as_pairs,
    filter_pairs,
    inoculate,
    pair_scores,
    residual_edits,
    resolve_plan,
    shaping_offsets,
)
from .models import DEFAULT_MODEL, LoadedModel, load_model
from .plan import InterventionPlan, load_plan

__all__ = ["TrainConfig", "TrainResult", "Prepared", "RefLogpCache", "prepare", "make_trainer", "train", "load_trained", "split_pairs", "STAGE"]

log = logging.getLogger(__name__)
STAGE = "train"
FORMAT = 1


@dataclass
class TrainConfig:
    """DPO hyper-parameters. Defaults are CPU-sized (SmolLM2-135M, 64 training pairs, a few
    minutes on two cores); on GPUs raise ``max_train_pairs`` (None = all) and set ``bf16``."""

    model: str | None = None  # None: the feature store's model, else the default model
    lora: bool = True  # False: full fine-tune
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target: str | list[str] = "all-linear"
    beta: float = 0.1
    learning_rate: float = 5e-5
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 256
    max_train_pairs: int | None = 64
    heldout_fraction: float = 0.1
    warmup_ratio: float = 0.0
    precompute_ref: bool = True
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: on CUDA only
    mean_ablation_pairs: int = 32  # pairs whose mean residual mean-ablation uses
    seed: int = 0
    progress: bool = True  # not part of the key

    def __post_init__(self):
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")


@dataclass
class TrainResult:
    path: Path
    manifest: dict
    reused: bool = False
    model: Any = None  # the trained model in memory (this session only; None when reused)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def metrics(self) -> pd.DataFrame:
        """Per-step training metrics (one row per logged step)."""
        with open(self.path / "metrics.jsonl") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        return pd.DataFrame([r for r in rows if "train_runtime" not in r])

    def data_report(self) -> dict:
        return read_json(self.path / "data_report.json")

    def split(self) -> dict:
        return read_json(self.path / "split.json")

    def __repr__(self) -> str:
        m = self.manifest
        return f"TrainResult({m['n_train_pairs']} training pairs, {m['steps']} steps, {m['seconds']:.0f}s, path={str(self.path)!r})"


# --- data ------------------------------------------------------------------------------------


def split_pairs(pairs: Sequence[PreferencePair], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices; whole prompts go to one side, chosen at random with ``seed``."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(content_hash([dict(m) for m in p.prompt]), []).append(i)
    keys = list(groups)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    n_held = int(math.ceil(fraction * len(keys))) if fraction > 0 and len(keys) > 1 else 0
    held = sorted(i for k in order[:n_held] for i in groups[keys[k]])
    train = [i for k in order[n_held:] for i in groups[keys[k]]]  # random prompt order
    return train, held


def _dataset(pairs: Sequence[PreferencePair], offsets: np.ndarray):
    from datasets import Dataset

    return Dataset.from_list([
        {
            "prompt": [{"role": m["role"], "content": m["content"]} for m in p.prompt],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
            "shaping_chosen": float(o[0]),
            "shaping_rejected": float(o[1]),
        }
        for p, o in zip(pairs, offsets)
    ])


class RefLogpCache:
    """Reference log-probs per (prompt, response), shared by the training runs of one run directory.

    One JSON file per context (model fingerprint, ``max_length``, precision, TRL version): the
    reference model and how TRL tokenises and truncates are the same for every pair in it, so a
    response's token ids and its prompt's identify its log-prob — also after a filter swapped
    chosen and rejected. Written atomically; a file that cannot be read is recomputed."""

    def __init__(self, directory: str | Path, context: Any):
        self.path = Path(directory) / f"{content_hash(context)}.json"

    @staticmethod
    def key(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
        return content_hash(list(prompt_ids), list(response_ids))

    def _read(self) -> dict[str, float]:
        try:
            data = read_json(self.path)
        except (FileNotFoundError, ValueError):
            return {}
        return data.get("logps", {}) if isinstance(data, dict) else {}

    def get(self, keys: Sequence[str]) -> dict[str, float]:
        stored = self._read()
        return {k: float(stored[k]) for k in keys if k in stored}

    def put(self, values: Mapping[str, float]) -> None:
        stored = self._read()
        stored.update({k: float(v) for k, v in values.items()})
        atomic_write_json(self.path, {"logps": stored})


def ref_cache_for(run: RunDir, lm: LoadedModel, cfg: "TrainConfig", edits: Sequence = ()) -> RefLogpCache | None:
    """The run directory's cache for this model and config; None when it must not be used: no
    precomputed reference pass, or a reference pass that sees a residual edit (CAFT)."""
    if not cfg.precompute_ref or any(e.in_reference for e in edits):
        return None
    import trl

    cuda = torch.cuda.is_available()
    return RefLogpCache(run.path / "cache" / "ref_logps", ["ref_logps", 1, lm.fingerprint, cfg.max_length, _bf16(cfg, cuda), cuda, cfg.lora, trl.__version__])


def _bf16(cfg: "TrainConfig", cuda: bool) -> bool:
    """bf16 unless the config says otherwise: on CUDA only by default."""
    return bool(cuda if cfg.bf16 is None else cfg.bf16)


# --- the trainer -----------------------------------------------------------------------------

_SHAPING = ("shaping_chosen", "shaping_rejected")


def _trainer_classes():
    """Built lazily so importing anatomy_nb does not import TRL."""
    from transformers import TrainerCallback
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class ShapingCollator(DataCollatorForPreference):
        """TRL's preference collator that also carries the per-response reward offsets."""

        def torch_call(self, examples):
            out = super().torch_call(examples)
            for k in _SHAPING:
                out[k] = torch.tensor([float(e.get(k, 0.0)) for e in examples], dtype=torch.float32)
            return out

    class ShapedDPOTrainer(DPOTrainer):
        """DPOTrainer with per-pair reward offsets and training-time residual hooks.

        Loss: −log σ(β·margin + o(y⁺) − o(y⁻)), implemented as a shift of the reference log-probs
        by −o/β before TRL's own loss (which is otherwise unchanged). ``hooks``: a ResidualHooks
        that is open for the trainer's lifetime; the reference pass runs under
        ``hooks.reference()``.
        """

        def __init__(self, *args, hooks: ResidualHooks | None = None, ref_cache: "RefLogpCache | None" = None, **kwargs):
            self._hooks = hooks
            self._ref_cache = ref_cache
            self.ref_cache_stats = {"reused": 0, "computed": 0}
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            """TRL's pass, run only on the pairs ``ref_cache`` does not hold yet."""
            cache = self._ref_cache
            if cache is None:
                out = super()._precompute_ref_logps(dataset, name, batch_size)
                self.ref_cache_stats["computed"] += len(dataset)
                return out
            rows = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
            keys = [(RefLogpCache.key(r["prompt_ids"], r["chosen_ids"]), RefLogpCache.key(r["prompt_ids"], r["rejected_ids"])) for r in rows]
            known = cache.get([k for pair in keys for k in pair])
            missing = [i for i, (kc, kr) in enumerate(keys) if kc not in known or kr not in known]
            if missing:
                sub = super()._precompute_ref_logps(dataset.select(missing), name, batch_size)
                new = {}
                for i, c, r in zip(missing, sub["ref_chosen_logps"], sub["ref_rejected_logps"]):
                    new[keys[i][0]], new[keys[i][1]] = float(c), float(r)
                if self.accelerator.is_main_process:
                    cache.put(new)
                known.update(new)
            self.ref_cache_stats["reused"] += len(keys) - len(missing)
            self.ref_cache_stats["computed"] += len(missing)
            dataset = dataset.add_column("ref_chosen_logps", [known[kc] for kc, _ in keys])
            return dataset.add_column("ref_rejected_logps", [known[kr] for _, kr in keys])

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            for k in _SHAPING:
                if k not in self._signature_columns:
                    self._signature_columns.append(k)

        def compute_ref_log_probs(self, model, inputs):
            inputs = {k: v for k, v in inputs.items() if k not in _SHAPING}
            if self._hooks is None:
                return super().compute_ref_log_probs(model, inputs)
            with self._hooks.reference():
                return super().compute_ref_log_probs(model, inputs)

        def _compute_loss(self, model, inputs, return_outputs):
            inputs = dict(inputs)
            off_c, off_r = inputs.pop("shaping_chosen", None), inputs.pop("shaping_rejected", None)
            if self.precompute_ref_logps:
                ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:  # our own reference pass, so that hooks.reference() applies to it
                ref_c, ref_r = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
            if off_c is not None:
                mode = "train" if self.model.training else "eval"
                ref_c = ref_c - off_c.to(ref_c) / self.beta
                ref_r = ref_r - off_r.to(ref_r) / self.beta
                self._metrics[mode]["shaping/offset_margin"].append(float((off_c - off_r).mean()))
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_c, ref_r
            precompute, self.precompute_ref_logps = self.precompute_ref_logps, True
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                self.precompute_ref_logps = precompute

    class MetricsLog(TrainerCallback):
        """Appends every log event (one per step) to a JSONL file, with the step's wall time."""

        def __init__(self, path: Path, enabled: bool):
            self.path, self.enabled = path, enabled
            self.step_seconds: list[float] = []
            self._t0 = None

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self._t0 is not None:
                self.step_seconds.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if not self.enabled or not logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            if self.step_seconds:
                row["step_seconds"] = self.step_seconds[-1]
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    return ShapingCollator, ShapedDPOTrainer, MetricsLog


# --- train -----------------------------------------------------------------------------------


def _feature_store(run: RunDir):
    from .extract import FeatureStore

    try:
        return FeatureStore.from_run(run)
    except FileNotFoundError:
        return None


def _hypotheses(run: RunDir):
    try:
        from .hypothesize import Hypotheses

        return Hypotheses.from_run(run)
    except (FileNotFoundError, ImportError):
        return None


def _save_dir_atomic(save, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


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
    concepts: list  # ResolvedConcept
    plan: InterventionPlan
    lm: LoadedModel
    sae: Any = None


def prepare(
    run_dir: str | Path | RunDir,
    plan: InterventionPlan | Mapping[str, Any] | str | Path | None = None,
    *,
    pairs: PairSet | Sequence[PreferencePair] | None = None,
    model: LoadedModel | str | None = None,
    sae: Any = None,
    config: TrainConfig | None = None,
) -> Prepared:
    """Split the pairs, apply the plan's data edits and compute the reward offsets (no training).

    ``pairs`` default to the stage-1 feature store's pairs; ``model`` to the store's model (a
    LoadedModel is copied, never trained in place); ``sae`` (needed to steer/ablate SAE concepts)
    to the store's SAE by name. A plan given as a path may be a run directory (its ``plan.json``).
    """
    cfg = config or TrainConfig()
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    store = _feature_store(run)
    hyps = _hypotheses(run) if plan is not None else None
    known = hyps.table["concept"].unique().tolist() if hyps is not None else None
    plan_source = plan
    plan = load_plan(plan, known_concepts=known)
    base_dir = Path(plan_source).parent if isinstance(plan_source, (str, Path)) and Path(str(plan_source)).is_file() else run.path

    if pairs is None:
        if store is None:
            raise FileNotFoundError(f"{run.path}: no feature store to take the pairs from; run stage 1 or pass pairs=")
        all_pairs = as_pairs(store.pairs())
    else:
        all_pairs = as_pairs(list(pairs))
    if not all_pairs:
        raise ValueError("no pairs to train on")
    model_name = cfg.model or (store.manifest["model"]["name"] if store is not None else DEFAULT_MODEL)
    if isinstance(model, LoadedModel):
        lm = LoadedModel(model=copy.deepcopy(model.model), tokenizer=model.tokenizer, name=model.name, fingerprint=model.fingerprint, source=model.source)
    else:
        lm = load_model(model or model_name)
    if store is not None and pairs is None and lm.fingerprint != store.manifest["model"]["fingerprint"]:
        log.warning("training model %s differs from the feature store's model %s", lm.name, store.manifest["model"]["name"])

    needs_sae = any(c.kind == "sae" and c.method in ("steer", "ablate") for c in plan.active)
    if needs_sae and sae is None:
        from .sae import load_sae

        if store is None:
            raise ValueError("steering/ablating an SAE concept needs the SAE: pass sae=")
        sae = load_sae(store.manifest["sae"]["name"])
    if sae is not None and store is not None and sae.fingerprint != store.manifest["sae"]["fingerprint"]:
        raise ValueError(f"SAE {sae.name} is not the one the feature store was built with ({store.manifest['sae']['name']})")
    concepts = resolve_plan(plan, hypotheses=hyps, sae=sae, d_model=lm.d_model, base_dir=base_dir)

    # split, then apply the plan to the training side only
    train_idx, held_idx = split_pairs(all_pairs, cfg.heldout_fraction, cfg.seed)
    if cfg.max_train_pairs is not None:
        train_idx = train_idx[: cfg.max_train_pairs]
    train_pairs = [all_pairs[i] for i in train_idx]
    scored = [r for r in concepts if r.choice.method in ("reward_shaping", "filter")]
    scores = {r.concept: pair_scores(r, train_pairs, store=store, lm=lm, sae=sae) for r in scored}
    report: dict[str, Any] = {"n_pairs": len(all_pairs), "n_heldout": len(held_idx), "n_train_before": len(train_pairs), "concepts": []}
    for r in scored:
        s = scores[r.concept]
        report["concepts"].append({"concept": r.concept, "label": r.choice.label, "method": r.choice.method, "action": r.choice.action, "mean_chosen": float(s[:, 0].mean()), "mean_rejected": float(s[:, 1].mean()), "mean_diff": float((s[:, 0] - s[:, 1]).mean())})
    kept, kept_idx, counts = filter_pairs(train_pairs, concepts, scores)
    report["filter"] = counts.to_dict(orient="records")
    flipped = np.asarray([bool(p.metadata.get("flipped")) for p in kept], dtype=bool)
    scores = {k: np.where(flipped[:, None], v[kept_idx][:, ::-1], v[kept_idx]) for k, v in scores.items()}
    final = inoculate(kept, concepts)
    report["inoculated_prompts"] = sum(a.prompt != b.prompt for a, b in zip(kept, final))
    report["instructions"] = [r.choice.instruction for r in concepts if r.choice.method == "inoculate"]
    offsets = shaping_offsets(concepts, scores, len(final))
    n = len(final)
    report["offsets"] = {"mean_chosen": float(offsets[:, 0].mean()) if n else 0.0, "mean_rejected": float(offsets[:, 1].mean()) if n else 0.0, "mean_margin": float((offsets[:, 0] - offsets[:, 1]).mean()) if n else 0.0, "nonzero_pairs": int((np.abs(offsets[:, 0] - offsets[:, 1]) > 0).sum())}
    report["n_train"] = n

    resolved_info = [{"concept": r.concept, "features": r.features, "layer": r.layer, "scale": r.scale, "directions": None if r.directions is None else content_hash(r.directions.numpy().round(6).tobytes())} for r in concepts]
    params = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    key = content_hash(FORMAT, [p.to_dict() for p in final], np.round(offsets, 8).tolist(), lm.fingerprint, plan.to_dict(), resolved_info, sae.fingerprint if sae is not None else None, params)
    return Prepared(key=key, train_pairs=final, heldout_pairs=[all_pairs[i] for i in held_idx], train_ids=[all_pairs[i].id for i in train_idx], offsets=offsets, scores=scores, report=report, concepts=concepts, plan=plan, lm=lm, sae=sae)


def _dpo_config(DPOConfig, cfg: TrainConfig, output_dir: str | Path, cuda: bool):
    return DPOConfig(
        output_dir=str(output_dir),
        beta=cfg.beta,
        loss_type=["sigmoid"],
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value < 1 is a fraction of the total steps
        precompute_ref_log_probs=cfg.precompute_ref,
        precompute_ref_batch_size=max(cfg.batch_size, 4),
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=_bf16(cfg, cuda),
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not cfg.progress,
        seed=cfg.seed,
        dataloader_num_workers=0,
    )


def make_trainer(prep: Prepared, cfg: TrainConfig, output_dir: str | Path, *, hooks: ResidualHooks | None = None, callbacks: Sequence = (), ref_cache: RefLogpCache | None = None):
    """TRL's DPO trainer (our subclass) for prepared data. Open ``hooks`` before calling: the
    reference log-probs are precomputed here (taking what ``ref_cache`` already holds)."""
    from peft import LoraConfig
    from trl import DPOConfig

    ShapingCollator, ShapedDPOTrainer, _ = _trainer_classes()
    lm = prep.lm
    cuda = torch.cuda.is_available()
    with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing; TRL still sets it
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        args = _dpo_config(DPOConfig, cfg, output_dir, cuda)
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target, task_type="CAUSAL_LM") if cfg.lora else None
    ref_model = None
    if not cfg.lora and not cfg.precompute_ref:
        ref_model = copy.deepcopy(lm.model).eval()  # TRL would otherwise reload it from config._name_or_path
    lm.model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        trainer = ShapedDPOTrainer(
            model=lm.model,
            ref_model=ref_model,
            args=args,
            data_collator=ShapingCollator(pad_token_id=lm.tokenizer.pad_token_id, max_length=cfg.max_length),
            train_dataset=_dataset(prep.train_pairs, prep.offsets),
            processing_class=lm.tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks),
            hooks=hooks,
            ref_cache=ref_cache,
        )
    if not cfg.progress:  # without a progress bar, transformers prints every log dict instead
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def train(
    run_dir: str | Path | RunDir,
    plan: InterventionPlan | Mapping[str, Any] | str | Path | None = None,
    *,
    pairs: PairSet | Sequence[PreferencePair] | None = None,
    model: LoadedModel | str | None = None,
    sae: Any = None,
    config: TrainConfig | None = None,
    force: bool = False,
) -> TrainResult:
    """Train DPO with ``plan`` (None: plain DPO) on the run's pairs; reuse a finished identical
    run unless ``force``. Arguments as in ``prepare``."""
    cfg = config or TrainConfig()
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    prep = prepare(run, plan, pairs=pairs, model=model, sae=sae, config=cfg)
    if prep.report["n_train"] < cfg.batch_size:
        raise ValueError(f"only {prep.report['n_train']} training pairs left after the plan (batch_size={cfg.batch_size}); filter counts: {prep.report['filter']}")
    out = run.artifact_dir(STAGE, prep.key)
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not force and read_json(manifest_path).get("complete"):
        run.record(STAGE, prep.key, plan=prep.plan.to_dict())
        return TrainResult(out, read_json(manifest_path), reused=True)

    _, _, MetricsLog = _trainer_classes()
    lm = prep.lm
    from accelerate import PartialState

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:  # one writer under accelerate launch
        metrics_path.unlink(missing_ok=True)
    edits = residual_edits(prep.concepts, lm=lm, pairs=prep.train_pairs, n_mean=cfg.mean_ablation_pairs)
    metrics_cb = MetricsLog(metrics_path, enabled=True)
    t0 = time.time()
    with _quiet_datasets(not cfg.progress), ResidualHooks(lm.model, edits) as hooks:
        trainer = make_trainer(prep, cfg, out / "trainer", hooks=hooks if edits else None, callbacks=[metrics_cb], ref_cache=ref_cache_for(run, lm, cfg, edits))
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

        _save_dir_atomic(save, out / "adapter")
        ds = trainer.train_dataset
        if cfg.precompute_ref and "ref_chosen_logps" in ds.column_names:
            from .artifacts import atomic_save_npy

            atomic_save_npy(out / "ref_logps.npy", np.stack([np.asarray(ds["ref_chosen_logps"]), np.asarray(ds["ref_rejected_logps"])], 1))
        prep.report["n_train_used"] = len(ds)  # TRL drops pairs whose prompt alone fills max_length
        atomic_write_json(out / "split.json", {"train": prep.train_ids, "heldout": [p.id for p in prep.heldout_pairs], "seed": cfg.seed, "heldout_fraction": cfg.heldout_fraction})
        atomic_write_json(out / "data_report.json", prep.report)
        shutil.rmtree(out / "trainer", ignore_errors=True)
        step_s = metrics_cb.step_seconds
        manifest = {
            "complete": True,
            "format": FORMAT,
            "key": prep.key,
            "model": {"name": lm.name, "fingerprint": lm.fingerprint, "source": lm.source},
            "sae": None if prep.sae is None else {"name": prep.sae.name, "fingerprint": prep.sae.fingerprint},
            "lora": cfg.lora,
            "plan": prep.plan.to_dict(),
            "config": asdict(cfg),
            "n_train_pairs": prep.report["n_train"],
            "n_train_used": len(ds),
            "n_heldout_pairs": len(prep.heldout_pairs),
            "steps": int(result.global_step),
            "train_loss": float(result.training_loss),
            "seconds": round(seconds, 2),
            "seconds_total": round(time.time() - t0, 2),
            "step_seconds": [round(s, 4) for s in step_s],
            "step_seconds_median": float(np.median(step_s)) if step_s else None,
            "residual_edits": [{"concept": e.concept, "kind": e.kind, "layer": e.layer, "in_reference": e.in_reference} for e in edits],
            "hooks_left_after_training": hooks_left,
            "world_size": trainer.accelerator.num_processes,
            "ref_logps": trainer.ref_cache_stats,  # pairs whose reference log-probs came from the run's cache / were computed
        }
        atomic_write_json(manifest_path, manifest)
        run.record(STAGE, prep.key, plan=prep.plan.to_dict())
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, read_json(manifest_path), model=trained)


@contextlib.contextmanager
def _quiet_datasets(quiet: bool):
    import datasets

    was = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and was:
            datasets.enable_progress_bars()


def load_trained(path: str | Path | RunDir | TrainResult, *, merge: bool = True, device: str | None = None) -> LoadedModel:
    """The trained model: the base model with the saved adapter (merged into the weights unless
    ``merge=False``), or the full fine-tuned model. ``path``: a train artifact or a run directory
    (its latest training run)."""
    if isinstance(path, TrainResult):
        path = path.path
    elif isinstance(path, RunDir) or (Path(path) / "index.json").exists():
        run = path if isinstance(path, RunDir) else RunDir(path)
        path = run.latest(STAGE)
    path = Path(path)
    manifest = read_json(path / "manifest.json")
    name = manifest["model"]["name"]
    if not manifest["lora"]:
        lm = load_model(str(path / "adapter"), device=device)
        lm.name, lm.fingerprint = f"{name}+{manifest['key']}", content_hash(manifest["model"]["fingerprint"], manifest["key"])
        return lm
    from peft import PeftModel

    base = load_model(name, device=device)
    if base.fingerprint != manifest["model"]["fingerprint"]:
        raise ValueError(f"{path}: the base model {name} now has fingerprint {base.fingerprint}, trained on {manifest['model']['fingerprint']}")
    model = PeftModel.from_pretrained(base.model, str(path / "adapter"))
    model = model.merge_and_unload() if merge else model
    model.eval()
    return LoadedModel(model=model, tokenizer=base.tokenizer, name=f"{name}+{manifest['key']}", fingerprint=content_hash(base.fingerprint, manifest["key"]), source=str(path))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m anatomy_nb.train`` — the same ``train`` call, for ``accelerate launch -m``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m anatomy_nb.train", description="DPO with an intervention plan (stage 4)")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--plan", default=None, help="plan file, run dir (its plan.json) or JSON string; omit for plain DPO")
    ap.add_argument("--data", default=None, help="pairs source for load_pairs (default: the run's feature store)")
    ap.add_argument("--limit", type=int, default=None, help="with --data: read at most this many pairs")
    ap.add_argument("--force", action="store_true")
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("progress", "lora_target"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", "bool | None"):
            ap.add_argument(flag, type=lambda s: None if s.lower() == "none" else s.lower() in ("1", "true", "yes"), default=f.default)
        elif f.type in ("int", "int | None"):
            ap.add_argument(flag, type=lambda s: None if s.lower() == "none" else int(s), default=f.default)
        elif f.type == "float":
            ap.add_argument(flag, type=float, default=f.default)
        else:
            ap.add_argument(flag, default=f.default)
    a = vars(ap.parse_args(argv))
    run_dir, plan, data, limit, force = (a.pop(k) for k in ("run_dir", "plan", "data", "limit", "force"))
    pairs = None
    if data:
        from .data import load_pairs

        pairs = load_pairs(data, limit=limit)
    res = train(run_dir, plan, pairs=pairs, config=TrainConfig(**a), force=force)
    print(res)


if __name__ == "__main__":
    main()
