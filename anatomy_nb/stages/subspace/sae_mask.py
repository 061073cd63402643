"""Which SAE latents carry an attribute, learned by interchange: RAVEL's differential binary masking
(Huang et al. 2024) applied to an SAE's features instead of neurons.

The ANOVA and probe selections (``stages.subspace.select_latents``) rank latents by how well their
activation separates an attribute's values: a correlational choice. This one is chosen under the same
supervision as DAS, so the SAE and DAS are compared on equal terms. At the entity token, the base's
latents z_b and the source's z_s (``LoadedSAE.encode``) give the swap

    h ← h_b + ((m ⊙ (z_s − z_b)) · W_dec)

for a mask m over the latents: the masked latents take the source's values and everything the SAE
does not reconstruct (its error) stays the base's. During training m = sigmoid(logits / T), T
annealed from 1 to ``final_temperature``, with an L1 penalty on m; the latents whose logit ends
positive are the selection. Cross-entropy is on the expected answer of cause pairs (the source's
value) and isolate pairs (the base's own), as for DAS.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...lm.models import LoadedModel
from .das import Example, frozen, interchanged_logits, residuals_at, shuffled_batches

__all__ = ["LatentMask", "latent_differences", "latent_swap_predictions", "train_latent_mask"]


@dataclass
class LatentMask:
    """The latents a mask selected (logit > 0), its final logits, and how it was learned."""

    features: list[int]
    logits: torch.Tensor
    layer: int
    provenance: dict
    curve: list[dict]


@torch.no_grad()
def latent_differences(
    lm: LoadedModel, sae: Any, layer: int, examples: Sequence[Example], batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the base residual at the entity token (n, d_model) and z_s − z_b, the source's
    latents minus the base's there (n, d_sae)."""
    if sae.layer != layer:
        raise ValueError(
            f"the SAE reads layer {sae.layer}, the swap is at layer {layer}: a latent swap needs the SAE's own layer"
        )
    hb, dz = [], []
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        b, s = residuals_at(lm, layer, batch, "base"), residuals_at(lm, layer, batch, "source")
        dev = sae.sae.W_enc.device
        dz.append((sae.encode(s.to(dev)) - sae.encode(b.to(dev))).float().cpu())
        hb.append(b.cpu())
    return torch.cat(hb), torch.cat(dz)


def train_latent_mask(
    lm: LoadedModel,
    sae: Any,
    layer: int,
    train: Sequence[Example],
    *,
    epochs: int = 4,
    lr: float = 0.05,
    batch_size: int = 16,
    sparsity: float = 1e-3,
    final_temperature: float = 0.05,
    seed: int = 0,
) -> LatentMask:
    """Learn the mask on ``train`` (module docstring); the model and the SAE stay frozen."""
    if not train:
        raise ValueError("no training examples")
    if sparsity < 0 or not 0 < final_temperature <= 1:
        raise ValueError(f"sparsity must be >= 0 and final_temperature in (0, 1], got {sparsity}, {final_temperature}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    hb, dz = latent_differences(lm, sae, layer, train)
    W_dec = sae.decoder_directions.float().to(lm.device)
    whole = torch.eye(lm.d_model, device=lm.device)  # an interchange on the whole space: the residual is replaced
    logits = torch.zeros(W_dec.shape[0], device=lm.device, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    steps = epochs * -(-len(train) // batch_size)
    curve: list[dict] = []
    t0, step = time.time(), 0
    with frozen(lm.model):
        for epoch, order in shuffled_batches(len(train), epochs, batch_size, rng):
            idx = torch.as_tensor(order)
            batch = [train[int(j)] for j in idx]
            temperature = final_temperature ** (step / max(steps - 1, 1))  # 1 → final, geometric
            m = torch.sigmoid(logits / temperature)
            edited = hb[idx].to(lm.device) + (m * dz[idx].to(lm.device)) @ W_dec
            out = interchanged_logits(lm, layer, whole, batch, edited)
            target = torch.tensor([e.answer for e in batch], device=lm.device)
            ce = torch.nn.functional.cross_entropy(out, target)
            loss = ce + sparsity * m.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            curve.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": float(ce.detach()),
                    "accuracy": float((out.argmax(-1) == target).float().mean()),
                    "selected": int((logits.detach() > 0).sum()),
                    "temperature": round(temperature, 4),
                    "seconds": round(time.time() - t0, 2),
                }
            )
    final = logits.detach().float().cpu()
    features = torch.nonzero(final > 0).flatten().tolist()
    prov = {
        "method": "SAE latent mask",
        "model": lm.name,
        "sae": sae.name,
        "layer": layer,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "sparsity": sparsity,
        "final_temperature": final_temperature,
        "seed": seed,
        "n_train": len(train),
        "n_selected": len(features),
        "seconds": round(time.time() - t0, 2),
    }
    return LatentMask(features, final, layer, prov, curve)


@torch.no_grad()
def latent_swap_predictions(
    lm: LoadedModel,
    sae: Any,
    layer: int,
    features: Sequence[int],
    examples: Sequence[Example],
    batch_size: int = 32,
    differences: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> np.ndarray:
    """The base run's greedy answer after swapping the latents ``features`` in from the source;
    ``differences``: ``latent_differences`` of ``examples`` when already computed (several swaps of
    the same examples then share their forward passes)."""
    hb, dz = differences if differences is not None else latent_differences(lm, sae, layer, examples, batch_size)
    keep = torch.zeros(dz.shape[1])
    keep[torch.as_tensor(list(features), dtype=torch.long)] = 1.0
    W_dec = sae.decoder_directions.float().to(lm.device)
    whole = torch.eye(lm.d_model, device=lm.device)
    out = []
    for i in range(0, len(examples), batch_size):
        edited = hb[i : i + batch_size].to(lm.device) + (keep * dz[i : i + batch_size]).to(lm.device) @ W_dec
        out.append(interchanged_logits(lm, layer, whole, examples[i : i + batch_size], edited).argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=int)
