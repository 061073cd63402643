"""Stage 0's config: how the default SAE is trained (``lm.sae_recipe``, notebook 00). Re-exported by
``anatomy_nb.config``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config_base import DEFAULT_MODEL, Config
from ..core.config_base import described as _help


@dataclass
class SAETrainingConfig(Config):
    """How the default SAE is trained (see ``anatomy_nb/saes/*/card.json`` for what shipped)."""

    layer: int = 15
    expansion: int = 8
    k: int = 32
    epochs: float = 2.0
    batch_size: int = 4096
    lr: float = 4e-4
    lr_warm_up_steps: int = 50
    dead_feature_window: int = field(
        default=40, metadata=_help("in steps: short runs need a short window or AuxK never starts")
    )
    aux_loss_coefficient: float = 1.0
    seed: int = 0


@dataclass
class RecipeConfig(Config):
    """The recipe that produced the shipped SAE (``anatomy_nb.lm.sae_recipe``, notebook 00)."""

    model: str = DEFAULT_MODEL
    sweep_layers: tuple[int, ...] = (6, 10, 15, 20)
    train_tokens: int = 800_000
    held_out_every: int = field(default=25, metadata=_help("1 prompt in this many is held out"))
    max_seq_len: int = 384
    collect_batch_size: int = field(
        default=1, metadata=_help("documents per forward pass while collecting (raise it on a GPU)")
    )
    sweep_tokens: int = 250_000
    sweep_epochs: float = 1.0
    sweep_batch_size: int = 1024
    final: SAETrainingConfig = field(default_factory=lambda: SAETrainingConfig(epochs=3.0))
    eval_tokens: int = 60_000
    eval_loss_docs: int = 100
    ship_dtype: str = field(default="float16", metadata=_help("weights on disk; computed in float32"))
