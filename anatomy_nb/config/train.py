"""Stage 4's parameters: DPO and LoRA, the held-out split and the training order."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config_base import KEYED_WHEN_SET, NOT_KEYED, Config
from ..core.config_base import described as _help


@dataclass
class TrainConfig(Config):
    """DPO hyper-parameters. Defaults are CPU-sized (SmolLM2-135M, 64 training pairs, a few
    minutes on two cores); on GPUs raise ``max_train_pairs`` (None = all) and set ``bf16``."""

    model: str | None = field(default=None, metadata=_help("None: the feature store's model"))
    lora: bool = field(default=True, metadata=_help("False: full fine-tune"))
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target: str | list[str] = field(default="all-linear", metadata=_help("peft target_modules"))
    beta: float = field(default=0.1, metadata=_help("DPO β"))
    # 1e-3: at 5e-5 (and 5e-4) the CPU-sized 64 pairs teach LoRA nothing measurable; on several hundred
    # real pairs 1e-3 can be too high (docs/explanation.md, "Real data")
    learning_rate: float = field(
        default=1e-3, metadata=_help("the LoRA learning rate (full fine-tuning wants far less)")
    )
    epochs: float = 1.0
    max_steps: int = field(default=-1, metadata=_help("> 0 overrides epochs"))
    batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 256
    max_train_pairs: int | None = field(default=64, metadata=_help("CPU-sized; None trains on every training pair"))
    heldout_fraction: float = field(
        default=0.2,
        metadata=_help("prompts held out for stage 5 (whole prompts); 0.2 holds out ~60 of the default run's pairs"),
    )
    warmup_ratio: float = 0.0
    precompute_ref: bool = field(
        default=True,
        metadata=_help(
            "compute the reference log-probs once before training (shared by the run directory's training runs)"
        ),
    )
    gradient_checkpointing: bool = False
    bf16: bool | None = field(default=None, metadata=_help("None: on CUDA only"))
    mean_ablation_pairs: int = field(default=32, metadata=_help("pairs whose mean residual mean-ablation uses"))
    seed: int = field(
        default=0, metadata=_help("the held-out split's seed, and the trainer's unless order_seed is set")
    )
    order_seed: int | None = field(
        default=None,
        metadata=_help(
            "the trainer's seed (the order of the training pairs, the LoRA initialisation) apart from the split's: a "
            "seed control trains the same pairs in another order; None: seed",
            **KEYED_WHEN_SET,
        ),
    )
    progress: bool = field(default=True, metadata=NOT_KEYED)

    def __post_init__(self):
        if not self.learning_rate > 0 or not self.epochs > 0:
            raise ValueError(f"learning_rate and epochs must be > 0, got {self.learning_rate} and {self.epochs}")
        if self.lora_r < 1 or (self.max_train_pairs is not None and self.max_train_pairs < 1):
            raise ValueError(f"lora_r and max_train_pairs must be >= 1, got {self.lora_r} and {self.max_train_pairs}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
