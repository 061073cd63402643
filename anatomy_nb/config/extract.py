"""Stage 1's parameters: which pairs, model and SAE, and how the feature store is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config_base import DEFAULT_MODEL, DEFAULT_SAE, NOT_KEYED, Config
from ..core.config_base import described as _help


@dataclass
class ExtractConfig(Config):
    """Stage 1. The inputs (data, model, SAE) are used when ``extract`` is not given them as
    objects; they are keyed by content (pairs, weights), so they are not part of the store key."""

    data: str = field(
        default="hh-rlhf",
        metadata=_help("vendored alias, local JSON/JSONL/CSV/Parquet file, or a datasets name", key=False),
    )
    n_pairs: int | None = field(default=300, metadata=_help("pairs to read (None: all)", key=False))
    strict: bool | None = field(
        default=None, metadata=_help("None: strict for your files, lenient (skip + count) for vendored data", key=False)
    )
    model: str = field(default=DEFAULT_MODEL, metadata=_help("model alias, hub id or local directory", key=False))
    sae: str = field(
        default=DEFAULT_SAE,
        metadata=_help("shipped SAE, local sae-lens directory, or a sae-lens release (with sae_id)", key=False),
    )
    sae_id: str | None = field(
        default=None, metadata=_help("for a sae-lens pretrained release, e.g. layer_12/width_16k/canonical", key=False)
    )
    layer: int | None = field(
        default=None, metadata=_help("only for SAEs whose files do not say which layer they read", key=False)
    )
    max_prompt_tokens: int = field(
        default=1024, metadata=_help("longer prompts keep their first token and their last tokens")
    )
    max_response_tokens: int = field(default=512, metadata=_help("at most 65,535 (counts are stored as uint16)"))
    shard_size: int = field(
        default=128, metadata=_help("pairs per shard: the unit of resuming and of work split between ranks")
    )
    top_contexts: int = field(default=32, metadata=_help("per feature: the responses where it peaks highest"))
    batch_size: int | None = field(
        default=None,
        metadata=_help(
            "pairs per forward, length-sorted and padded; None: 1 on CPU, from free memory on a GPU", key=False
        ),
    )
    batch_tokens: int = field(
        default=8192,
        metadata=_help(
            "at most this many padded tokens per forward (a GPU with batch_size=None sizes it from free memory)",
            key=False,
        ),
    )
    shared_prefix: bool = field(default=True, metadata=_help("False runs prompt+response twice (the naive baseline)"))
    store_prompts: bool = field(
        default=True, metadata=_help("also pool each prompt's message contents (topics use them)")
    )
    # an opener or a sign-off is specific to the first / last tokens and diluted in the whole response
    edge_tokens: int = field(
        default=8,
        metadata=_help("per response, also the features firing in its first / last this many tokens; 0 = not stored"),
    )
    pooled_values: bool = field(
        default=False,
        metadata=_help(
            "also store per firing feature the max / mean / firing count over each response's tokens (6 bytes) and the "
            "prompt's max / count (4 bytes): ~12.5 KB more per pair on the default SAE; no stage reads them"
        ),
    )
    progress: bool = field(default=True, metadata=NOT_KEYED)

    def __post_init__(self):
        if not 1 <= self.max_response_tokens <= 65_535:
            raise ValueError(f"max_response_tokens must be in 1..65535, got {self.max_response_tokens}")
        if self.max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2, got {self.max_prompt_tokens}")
        if self.edge_tokens < 0:
            raise ValueError(f"edge_tokens must be >= 0, got {self.edge_tokens}")
        if (self.batch_size is not None and self.batch_size < 1) or self.batch_tokens < 1:
            raise ValueError(
                f"batch_size must be None or >= 1 and batch_tokens >= 1, got {self.batch_size}, {self.batch_tokens}"
            )
        if self.shard_size < 1 or self.top_contexts < 1:
            raise ValueError("shard_size and top_contexts must be >= 1")
