"""Sparse autoencoders: load the shipped default, any sae-lens SAE directory or a pretrained
sae-lens release; save one; build a tiny one for tests.

No SAE exists for the offline default model, so the project trains its own TopK SAE on the
residual stream with sae-lens (``lm.sae_training``, recipe in ``lm.sae_recipe``) and ships the
weights in sae-lens's own format inside the package.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors import SafetensorError

from ..config import DEFAULT_SAE
from ..core.files import atomic_replace_dir, atomic_write_json, content_hash
from ..core.paths import PACKAGE_DIR

__all__ = [
    "DEFAULT_SAE",
    "SHIPPED_DIR",
    "LoadedSAE",
    "hook_name",
    "load_sae",
    "make_topk_sae",
    "save_sae",
    "shipped_saes",
    "tiny_sae",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

SHIPPED_DIR = PACKAGE_DIR / "saes"


def hook_name(layer: int) -> str:
    """The sae-lens/TransformerLens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def layer_from_hook(name: str | None) -> int | None:
    m = re.search(r"blocks\.(\d+)\.hook_resid_(post|pre)", name or "")
    if not m:
        return None
    layer = int(m.group(1))
    return layer if m.group(2) == "post" else layer - 1


@dataclass
class LoadedSAE:
    """An sae-lens SAE, the residual layer it reads (output of decoder block ``layer``), and a
    fingerprint of its weights for artifact keys."""

    sae: Any
    layer: int
    name: str
    fingerprint: str
    card: dict = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x.to(self.sae.W_enc.dtype))

    def known_as(self, recorded: str) -> LoadedSAE | None:
        """This SAE under the fingerprint an artifact recorded for it, or None if it is another SAE.
        Artifacts written before 2026-12-07 recorded a fingerprint of float32 sums, whose rounding
        depends on the number of torch threads: such a record is recognised at 1 or 2 threads or the
        current count, and adopted, so that the artifacts built on it keep their keys."""
        if recorded == self.fingerprint:
            return self
        if recorded in legacy_fingerprints(self.sae):
            return dataclasses.replace(self, fingerprint=recorded)
        return None

    @property
    def decoder_directions(self) -> torch.Tensor:
        """(d_sae, d_in) decoder rows: each feature's direction in the residual stream."""
        return self.sae.W_dec.detach()


def weights_fingerprint(sae) -> str:
    """A digest of every weight's exact bytes: the same on any machine and thread count."""
    digest = hashlib.sha256()
    for name, p in sorted(sae.state_dict().items()):
        t = p.detach().float().cpu().contiguous()
        digest.update(f"{name}:{list(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def legacy_fingerprints(sae) -> set[str]:
    """The fingerprints the first formula (float32 sums of each weight) gives at 1 and 2 torch threads
    and the current count: the ones artifacts written before 2026-12-07 may have recorded."""
    found, threads = set(), torch.get_num_threads()
    try:
        for n in {1, 2, threads}:
            torch.set_num_threads(n)
            h = []
            for name, p in sorted(sae.state_dict().items()):
                t = p.detach().float().cpu()
                h.append((name, list(t.shape), float(t.sum()), float((t * t).sum())))
            found.add(content_hash(h))
    finally:
        torch.set_num_threads(threads)
    return found


def load_sae(
    name_or_path: str = DEFAULT_SAE, sae_id: str | None = None, *, device: str | None = None, layer: int | None = None
) -> LoadedSAE:
    """Load an SAE.

    - ``DEFAULT_SAE`` (or another folder name under ``anatomy_nb/saes``): shipped with the package.
    - a local sae-lens directory (``cfg.json`` + ``sae_weights.safetensors``).
    - a sae-lens pretrained release with ``sae_id`` (e.g. ``"gemma-scope-2b-pt-res-canonical"``,
      ``"layer_12/width_16k/canonical"``): needs access to the Hugging Face hub.

    ``layer`` overrides the layer read from the SAE's ``hook_name`` metadata.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(name_or_path)
    shipped = SHIPPED_DIR / str(name_or_path)
    card: dict = {}
    if sae_id is None and shipped.is_dir():
        path = shipped
    if sae_id is None and path.is_dir():
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(f"{path}: not a sae-lens SAE directory (no cfg.json)")
        # float16 on disk (the shipped SAE) is computed in float32: CPUs are slow at half precision
        try:
            sae = SAE.load_from_disk(
                str(path), device=device, dtype=None if str(device).startswith("cuda") else "float32"
            )
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ValueError(
                f"{path}: cannot read the SAE (cfg.json + sae_weights.safetensors): {type(exc).__name__}: {exc}"
            ) from None
        name = str(name_or_path)
        if (path / "card.json").exists():
            card = json.loads((path / "card.json").read_text())
    elif sae_id is not None:
        sae = SAE.from_pretrained(name_or_path, sae_id, device=device)
        name = f"{name_or_path}/{sae_id}"
    else:
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a shipped SAE ({', '.join(shipped_saes()) or 'none'}), a local "
            "sae-lens directory, nor a pretrained release (pass sae_id=... for a release)"
        )
    sae.eval()
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    from_hook = layer_from_hook(hook)
    if layer is not None and from_hook is not None and layer != from_hook:
        raise ValueError(f"{name} was trained on layer {from_hook} ({hook}); it cannot read layer {layer}")
    found = layer if layer is not None else from_hook
    if found is None:
        raise ValueError(f"{name}: cannot tell which layer the SAE reads (hook_name={hook!r}); pass layer=")
    return LoadedSAE(sae=sae, layer=found, name=name, fingerprint=weights_fingerprint(sae), card=card)


def shipped_saes() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "cfg.json").exists()) if SHIPPED_DIR.exists() else []


def make_topk_sae(d_in: int, d_sae: int, k: int, layer: int, model_name: str, seed: int, training: bool = True):
    meta = SAEMetadata(hook_name=hook_name(layer), model_name=model_name, prepend_bos=False)
    torch.manual_seed(seed)
    if training:
        cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta, normalize_activations="none")
        return TopKTrainingSAE(cfg)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta)
    return TopKSAE(cfg)


def tiny_sae(
    d_in: int, layer: int, d_sae: int = 128, k: int = 8, seed: int = 0, model_name: str = "tiny-llama"
) -> LoadedSAE:
    """A randomly initialised TopK SAE for tests (no training; features still fire sparsely)."""
    sae = make_topk_sae(d_in, d_sae, k, layer, model_name, seed, training=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.eval()
    return LoadedSAE(
        sae=sae, layer=layer, name=f"tiny-sae-{d_sae}-k{k}-seed{seed}", fingerprint=weights_fingerprint(sae)
    )


def save_sae(loaded: LoadedSAE, path: str | Path, card: dict | None = None, dtype: str | None = None) -> Path:
    """Save in sae-lens's inference format (safetensors + cfg.json) plus our card, atomically.

    ``dtype="float16"`` halves the file (the shipped SAE); ``load_sae`` always computes in
    float32 on CPU.
    """
    sae = loaded.sae
    if dtype is not None:
        sae = copy.deepcopy(sae).to(getattr(torch, dtype))
        sae.cfg.dtype = dtype

    def write(tmp: Path) -> None:
        if hasattr(sae, "save_inference_model"):
            sae.save_inference_model(str(tmp))
        else:
            sae.save_model(str(tmp))
        if card is not None:
            atomic_write_json(tmp / "card.json", card)

    return atomic_replace_dir(write, path)
