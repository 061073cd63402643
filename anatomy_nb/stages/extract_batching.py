"""How many pairs and padded tokens stage 1 sends through the model at once: on a CPU a fixed small
batch, on a GPU limits from free memory and the SAE's width; pairs grouped by length so padding stays
small (``extract``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import ExtractConfig
from ..lm.models import LoadedModel
from ..lm.sae import LoadedSAE

__all__ = ["CPU_BATCH_PAIRS", "batch_limits", "gpu_batch_limits", "length_batches"]

CPU_BATCH_PAIRS = 1  # benchmarks/extract.py: batching gains little on two CPU cores


def length_batches(sizes: Sequence[int], max_pairs: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar size (sorted, so padding is small), each at most
    ``max_pairs`` long and, padded to its longest member, at most ``max_tokens`` (a single item
    larger than that is a batch of its own)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if b is not None and len(b) < max_pairs and (len(b) + 1) * sizes[i] <= max_tokens:
            b.append(i)
        else:
            batches.append([i])
    return batches


def batch_limits(cfg: ExtractConfig, lm: LoadedModel, sae: LoadedSAE) -> tuple[int, int]:
    """(pairs, padded tokens) per forward. On a GPU with ``batch_size=None`` both come from free
    memory: each token costs about 12 bytes per SAE feature (pre-activations, activations, masks
    in fp32) plus the model's activations; 40 % of the free memory is used."""
    if cfg.batch_size is not None:
        return cfg.batch_size, cfg.batch_tokens
    if lm.device.type != "cuda":
        return CPU_BATCH_PAIRS, cfg.batch_tokens
    free, _ = torch.cuda.mem_get_info(lm.device)
    return gpu_batch_limits(
        free, sae.d_sae, lm.d_model, int(getattr(lm.model.config, "intermediate_size", 4 * lm.d_model))
    )


def gpu_batch_limits(free_bytes: int, d_sae: int, d_model: int, d_ff: int) -> tuple[int, int]:
    per_token = 12 * d_sae + 4 * (3 * d_ff + 8 * d_model)
    tokens = max(512, int(0.4 * free_bytes / per_token))
    return 256, tokens
