"""The config of concept subspaces learned from counterfactual pairs (DAS, HyperDAS on RAVEL; notebook 06,
``stages.subspace``). Re-exported by ``anatomy_nb.config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..core.config_base import DEFAULT_MODEL, DEFAULT_SAE, NOT_KEYED, Config
from ..core.config_base import described as _help


@dataclass
class SubspaceConfig(Config):
    """Concept subspaces learned from counterfactual pairs: DAS and HyperDAS on RAVEL, scored beside
    the SAE's features (``stages.subspace.learn_subspace``)."""

    model: str = field(default=DEFAULT_MODEL, metadata=_help("model alias, hub id or local directory", key=False))
    sae: str | None = field(
        default=DEFAULT_SAE,
        metadata=_help(
            "the SAE whose features are scored beside DAS (and whose layer DAS uses); None: DAS only", key=False
        ),
    )
    sae_id: str | None = field(
        default=None, metadata=_help("for a sae-lens pretrained release, e.g. layer_12/width_16k/canonical", key=False)
    )
    layer: int | None = field(
        default=None,
        metadata=_help("residual-stream layer; None: the SAE's (at another layer the SAE's rows are left out)"),
    )
    entity_type: str = field(
        default="city",
        metadata=_help("RAVEL entity type (vendored: city, nobel_prize_winner, occupation, physical_object, verb)"),
    )
    attributes: list[str] = field(
        default_factory=lambda: ["Country", "Continent", "Language"],
        metadata=_help("attributes asked (the isolate pairs ask the others)"),
    )
    targets: list[str] | None = field(
        default=None, metadata=_help("attributes to learn a subspace for; None: every attribute the model knows")
    )
    entities: int = field(default=100, metadata=_help("entities drawn per split (train, test)"))
    templates: int = field(default=6, metadata=_help("prompt templates per attribute, drawn at random"))
    dim: int = field(default=16, metadata=_help("subspace dimension (≤ the hidden size)"))
    n_train: int = 512
    n_test: int = 200
    epochs: int = 2
    lr: float = 5e-3
    batch_size: int = 16
    das: bool = field(
        default=True, metadata=_help("train DAS per target (False: HyperDAS and the SAE's features only)")
    )
    hyperdas: bool = field(
        default=True,
        metadata=_help(
            "also train HyperDAS: one hypernetwork for every target at once, told the concept in words, choosing the "
            "positions itself (needs two or more targets)"
        ),
    )
    hyperdas_width: int = field(default=256, metadata=_help("HyperDAS hypernetwork width"))
    hyperdas_layers: int = field(default=2, metadata=_help("HyperDAS concept-encoder blocks"))
    hyperdas_positions: Literal["learned", "entity"] = field(
        default="learned",
        metadata=_help(
            "learned: HyperDAS chooses the base and source tokens; entity: it is given the entity's last token (an "
            "ablation)"
        ),
    )
    hyperdas_selection: Literal["factored", "pairwise"] = field(
        default="factored",
        metadata=_help(
            "how HyperDAS chooses its tokens: factored (one token scorer for both prompts) or pairwise (the authors': "
            "a score per base-source pair)"
        ),
    )
    hyperdas_epochs: int = field(default=8, metadata=_help("HyperDAS passes over the pairs of all targets"))
    hyperdas_lr: float = field(
        default=3e-4, metadata=_help("HyperDAS learning rate (Adam; at 3e-3 it collapsed to editing nothing)")
    )
    sae_mask: bool = field(
        default=True,
        metadata=_help(
            "also learn which SAE latents carry each target by interchange (RAVEL's differential binary masking "
            "over the "
            "SAE's latents, stages.subspace.sae_mask); needs sae"
        ),
    )
    sae_mask_sparsity: float = field(
        default=1e-3, metadata=_help("the L1 weight on the latent mask (per latent, added to the cross-entropy)")
    )
    sae_mask_lr: float = field(
        default=0.05, metadata=_help("learning rate of the latent mask's logits (Adam); it trains for 'epochs' passes")
    )
    min_accuracy: float = field(
        default=0.1, metadata=_help("an attribute the model answers right less often than this is not learned")
    )
    require_known: bool = field(
        default=True,
        metadata=_help(
            "keep only examples the model answers right, and sources whose value of the target it knows (as RAVEL "
            "does); "
            "False: every example (tests on untrained models)"
        ),
    )
    source_known_fraction: float = field(
        default=0.5,
        metadata=_help(
            "with require_known: a source entity must be answered right on at least this fraction of its target's "
            "templates asked (0: on at least one, which lets few-shot guesses in)"
        ),
    )
    seed: int = 0
    progress: bool = field(default=True, metadata=NOT_KEYED)

    def __post_init__(self):
        if (
            self.dim < 1
            or self.entities < 2
            or self.templates < 1
            or self.n_train < 1
            or self.n_test < 1
            or self.epochs < 1
            or self.hyperdas_epochs < 1
            or self.hyperdas_layers < 1
        ):
            raise ValueError(
                "dim, templates, n_train, n_test, epochs, hyperdas_epochs and hyperdas_layers must be >= 1 and "
                "entities >= 2"
            )
        if not 0 <= self.source_known_fraction <= 1:
            raise ValueError(f"source_known_fraction must be in [0, 1], got {self.source_known_fraction}")
        if self.sae_mask_sparsity < 0 or self.sae_mask_lr <= 0:
            raise ValueError(
                f"sae_mask_sparsity must be >= 0 and sae_mask_lr > 0, got {self.sae_mask_sparsity}, {self.sae_mask_lr}"
            )
        if not self.das and not self.hyperdas and not self.sae_mask:
            raise ValueError("das, hyperdas and sae_mask are all off: nothing would be learned")
        if self.hyperdas_selection not in ("factored", "pairwise"):
            raise ValueError(f"hyperdas_selection must be 'factored' or 'pairwise', got {self.hyperdas_selection!r}")
        if self.hyperdas_positions not in ("learned", "entity"):
            raise ValueError(f"hyperdas_positions must be 'learned' or 'entity', got {self.hyperdas_positions!r}")
        if self.hyperdas_width < 4 or self.hyperdas_width % 4:
            raise ValueError(
                f"hyperdas_width must be a positive multiple of 4 (its attention heads), got {self.hyperdas_width}"
            )
        if len(self.attributes) < 2:
            raise ValueError(f"attributes: at least two (the isolate pairs ask the others), got {self.attributes}")
