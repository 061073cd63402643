"""TRL's DPO with what the interventions need, as module-level subclasses (TRL's own pattern).

- ``ShapedDPOTrainer`` — per-pair reward offsets and training-time residual hooks. TRL 1.x
  computes the loss in one method from the reference log-probs, so an offset o(y) = Σ λ·s_c(y)
  enters as ref_logp(y) − o(y)/β, which turns β·margin into β·margin + o(y⁺) − o(y⁻) exactly.
  Residual hooks (steering, CAFT) stay open for the trainer's lifetime; the reference pass runs
  under ``hooks.reference()`` (steering off, ablation on: ``stages.interventions``).
- ``ShapingCollator`` — TRL's preference collator that carries the offsets as columns.
- ``RefLogpCache`` — reference log-probs per (prompt, response) shared by the training runs of a
  run directory: TRL caches that pass by dataset fingerprint, which never hits for datasets built
  in memory with offset columns, so plain DPO, shaping and filtering would each redo it (~50 s on
  CPU per run).
- ``MetricsLog`` — every log event (one per step) appended to ``metrics.jsonl`` with the step time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ..config import TrainConfig
from ..core.files import atomic_write_json, content_hash, read_json
from ..core.stage import show_progress
from ..data.schema import PreferencePair
from ..lm.models import LoadedModel
from ..lm.ops import ResidualHooks
from ..results.run import RunDir

if TYPE_CHECKING:  # pragma: no cover
    from .train import Prepared

__all__ = [
    "MetricsLog",
    "RefLogpCache",
    "ShapedDPOTrainer",
    "ShapingCollator",
    "dpo_config",
    "make_trainer",
    "preference_dataset",
    "quiet_datasets",
    "ref_cache_for",
    "use_bf16",
]

SHAPING = ("shaping_chosen", "shaping_rejected")


def preference_dataset(pairs: Sequence[PreferencePair], offsets: np.ndarray):
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in p.prompt],
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
                "shaping_chosen": float(o[0]),
                "shaping_rejected": float(o[1]),
            }
            for p, o in zip(pairs, offsets)
        ]
    )


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


def ref_cache_for(run: RunDir, lm: LoadedModel, cfg: TrainConfig, edits: Sequence = ()) -> RefLogpCache | None:
    """The run directory's cache for this model and config; None when it must not be used: no
    precomputed reference pass, or a reference pass that sees a residual edit (CAFT)."""
    if not cfg.precompute_ref or any(e.in_reference for e in edits):
        return None
    cuda = torch.cuda.is_available()
    return RefLogpCache(
        run.cache_dir / "ref_logps",
        ["ref_logps", 1, lm.fingerprint, cfg.max_length, use_bf16(cfg, cuda), cuda, cfg.lora, trl.__version__],
    )


def use_bf16(cfg: TrainConfig, cuda: bool) -> bool:
    """bf16 unless the config says otherwise: on CUDA only by default."""
    return bool(cuda if cfg.bf16 is None else cfg.bf16)


class ShapingCollator(DataCollatorForPreference):
    """TRL's preference collator that also carries the per-response reward offsets."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        for k in SHAPING:
            out[k] = torch.tensor([float(e.get(k, 0.0)) for e in examples], dtype=torch.float32)
        return out


class ShapedDPOTrainer(DPOTrainer):
    """DPOTrainer with per-pair reward offsets and training-time residual hooks.

    Loss: −log σ(β·margin + o(y⁺) − o(y⁻)), implemented as a shift of the reference log-probs
    by −o/β before TRL's own loss (which is otherwise unchanged). ``hooks``: a ResidualHooks
    that is open for the trainer's lifetime; the reference pass runs under
    ``hooks.reference()``.
    """

    def __init__(self, *args, hooks: ResidualHooks | None = None, ref_cache: RefLogpCache | None = None, **kwargs):
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
        keys = [
            (RefLogpCache.key(r["prompt_ids"], r["chosen_ids"]), RefLogpCache.key(r["prompt_ids"], r["rejected_ids"]))
            for r in rows
        ]
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
        for k in SHAPING:
            if k not in self._signature_columns:
                self._signature_columns.append(k)

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k not in SHAPING}
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
        row = {
            "step": state.global_step,
            "epoch": state.epoch,
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
        }
        if self.step_seconds:
            row["step_seconds"] = self.step_seconds[-1]
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def dpo_config(cfg: TrainConfig, output_dir: str | Path, cuda: bool) -> DPOConfig:
    """TRL's DPOConfig from ours: CPU-friendly defaults, no checkpoints, one log line per step."""
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
        bf16=use_bf16(cfg, cuda),
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not show_progress(cfg.progress),
        seed=cfg.seed if cfg.order_seed is None else cfg.order_seed,
        dataloader_num_workers=0,
    )


def make_trainer(
    prep: Prepared,
    cfg: TrainConfig,
    output_dir: str | Path,
    *,
    hooks: ResidualHooks | None = None,
    callbacks: Sequence = (),
    ref_cache: RefLogpCache | None = None,
):
    """TRL's DPO trainer (our subclass) for prepared data. Open ``hooks`` before calling: the
    reference log-probs are precomputed here (taking what ``ref_cache`` already holds)."""
    lm = prep.lm
    cuda = torch.cuda.is_available()
    with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing; TRL still sets it
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        args = dpo_config(cfg, output_dir, cuda)
    peft_config = (
        LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target,
            task_type="CAUSAL_LM",
        )
        if cfg.lora
        else None
    )
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
            train_dataset=preference_dataset(prep.train_pairs, prep.offsets),
            processing_class=lm.tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks),
            hooks=hooks,
            ref_cache=ref_cache,
        )
    if not show_progress(cfg.progress):  # without a progress bar, transformers prints every log dict instead
        trainer.remove_callback(PrinterCallback)
    return trainer


@contextlib.contextmanager
def quiet_datasets(quiet: bool):
    was = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and was:
            datasets.enable_progress_bars()
