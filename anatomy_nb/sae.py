"""Sparse autoencoders: load the shipped default or any sae-lens SAE, train one, measure it.

No SAE exists for the offline default model, so the project trains its own TopK SAE on the
residual stream with sae-lens (``train_sae``) and ships the weights in sae-lens's own format
inside the package. ``evaluate_sae`` reports what limits everything downstream: variance
explained, L0, dead features and next-token loss recovered when the reconstruction is spliced
back into the forward pass.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import atomic_write_json, content_hash
from .models import LoadedModel, decoder_layers, render_example, truncated_to_layer

__all__ = [
    "DEFAULT_SAE",
    "LoadedSAE",
    "SAETrainingConfig",
    "collect_activations",
    "evaluate_sae",
    "hook_name",
    "load_sae",
    "save_sae",
    "tiny_sae",
    "train_sae",
]

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "saes"
DEFAULT_SAE = "smollm2-135m-instruct-topk"


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

    @property
    def decoder_directions(self) -> torch.Tensor:
        """(d_sae, d_in) decoder rows: each feature's direction in the residual stream."""
        return self.sae.W_dec.detach()


def _weights_fingerprint(sae) -> str:
    h = []
    for name, p in sorted(sae.state_dict().items()):
        t = p.detach().float().cpu()
        h.append((name, list(t.shape), float(t.sum()), float((t * t).sum())))
    return content_hash(h)


def load_sae(
    name_or_path: str = DEFAULT_SAE,
    sae_id: str | None = None,
    *,
    device: str | None = None,
    layer: int | None = None,
) -> LoadedSAE:
    """Load an SAE.

    - ``DEFAULT_SAE`` (or another folder name under ``anatomy_nb/saes``): shipped with the package.
    - a local sae-lens directory (``cfg.json`` + ``sae_weights.safetensors``).
    - a sae-lens pretrained release with ``sae_id`` (e.g. ``"gemma-scope-2b-pt-res-canonical"``,
      ``"layer_12/width_16k/canonical"``): needs access to the Hugging Face hub.

    ``layer`` overrides the layer read from the SAE's ``hook_name`` metadata.
    """
    from sae_lens import SAE

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
        sae = SAE.load_from_disk(str(path), device=device, dtype=None if str(device).startswith("cuda") else "float32")
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
    return LoadedSAE(sae=sae, layer=found, name=name, fingerprint=_weights_fingerprint(sae), card=card)


def shipped_saes() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "cfg.json").exists()) if SHIPPED_DIR.exists() else []


def _make_topk(d_in: int, d_sae: int, k: int, layer: int, model_name: str, seed: int, training: bool = True):
    from sae_lens import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook_name(layer), model_name=model_name, prepend_bos=False)
    torch.manual_seed(seed)
    if training:
        cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta, normalize_activations="none")
        return TopKTrainingSAE(cfg)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta)
    return TopKSAE(cfg)


def tiny_sae(d_in: int, layer: int, d_sae: int = 128, k: int = 8, seed: int = 0, model_name: str = "tiny-llama") -> LoadedSAE:
    """A randomly initialised TopK SAE for tests (no training; features still fire sparsely)."""
    sae = _make_topk(d_in, d_sae, k, layer, model_name, seed, training=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.eval()
    return LoadedSAE(sae=sae, layer=layer, name=f"tiny-sae-{d_sae}-k{k}-seed{seed}", fingerprint=_weights_fingerprint(sae))


def save_sae(loaded: LoadedSAE, path: str | Path, card: dict | None = None, dtype: str | None = None) -> Path:
    """Save in sae-lens's inference format (safetensors + cfg.json) plus our card, atomically.

    ``dtype="float16"`` halves the file (the shipped SAE); ``load_sae`` always computes in
    float32 on CPU.
    """
    import copy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        sae = loaded.sae
        if dtype is not None:
            sae = copy.deepcopy(sae).to(getattr(torch, dtype))
            sae.cfg.dtype = dtype
        if hasattr(sae, "save_inference_model"):
            sae.save_inference_model(str(tmp))
        else:
            sae.save_model(str(tmp))
        if card is not None:
            atomic_write_json(tmp / "card.json", card)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- collecting residual activations ----------------------------------------------------------------


@dataclass
class Document:
    """Token ids of one chat transcript and the first position worth collecting."""

    ids: list[int]
    collect_from: int
    origin: str = ""


def chat_documents(lm: LoadedModel, corpus: Iterable[tuple[list[dict], str, str]], max_seq_len: int = 384) -> list[Document]:
    """Render (prompt, response, origin) triples with the chat template.

    Positions before the first message content are skipped when collecting: the attention sink
    (position 0) and the template's default system prompt, which is the same in every document
    and would otherwise be thousands of identical activations. When the same prompt comes twice
    in a row (the two sides of a preference pair), the second copy collects only its response.
    """
    docs = []
    last_prompt: list[int] | None = None
    for messages, response, origin in corpus:
        r = render_example(lm.tokenizer, messages, response)
        ids = (r.prompt_ids + r.response_ids)[:max_seq_len]
        first_content = next((i for i, m in enumerate(r.prompt_content) if m), len(r.prompt_ids))
        start = max(1, first_content)
        if r.prompt_ids == last_prompt:
            start = len(r.prompt_ids)
        last_prompt = r.prompt_ids
        if start < len(ids):
            docs.append(Document(ids=ids, collect_from=start, origin=origin))
    return docs


@torch.no_grad()
def collect_activations(
    lm: LoadedModel,
    docs: Sequence[Document],
    layers: Sequence[int],
    out_dir: str | Path,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> dict[int, np.memmap]:
    """Run the documents to the deepest requested layer (early exit) and store the residual
    stream of every collected position at each layer as float16 memmaps ``layer{L}.npy``.

    ``batch_size`` documents go through each forward pass, right-padded with an attention mask
    (padding after a causal sequence changes nothing before it); the stored tokens keep the
    documents' order. 1 is fastest on CPU, where the forward is already compute-bound and padding
    only adds work (``benchmarks/sae_collect.py``: batches of 16 ran at 0.64x on two cores); a GPU
    wants larger batches. Returns {layer: (n_tokens, d_model) memmap}. Resumable only as a whole
    (it is a cache).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(d.ids) - d.collect_from for d in docs)
    if max_tokens is not None:
        total = min(total, max_tokens)
    done_flag = out_dir / "done.json"
    paths = {L: out_dir / f"layer{L}.npy" for L in layers}
    if done_flag.exists() and all(p.exists() for p in paths.values()):
        return {L: np.load(p, mmap_mode="r") for L, p in paths.items()}
    arrays = {L: np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(total, lm.d_model)) for L, p in paths.items()}
    blocks = decoder_layers(lm.model)
    captured: dict[int, torch.Tensor] = {}
    handles = [blocks[L].register_forward_hook(lambda mod, inp, out, L=L: captured.__setitem__(L, out[0] if isinstance(out, tuple) else out)) for L in layers]
    cursor = 0
    try:
        with truncated_to_layer(lm.model, max(layers)) as base, tqdm(total=total, desc="collect activations", unit="tok") as bar:
            step = max(1, batch_size)
            for start in range(0, len(docs), step):
                if cursor >= total:
                    break
                batch = docs[start : start + step]
                width = max(len(d.ids) for d in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, d in enumerate(batch):
                    ids[row, : len(d.ids)] = torch.tensor(d.ids)
                    mask[row, : len(d.ids)] = 1
                base(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
                for row, d in enumerate(batch):
                    n = min(len(d.ids) - d.collect_from, total - cursor)
                    if n <= 0:
                        break
                    for L in layers:
                        arrays[L][cursor : cursor + n] = captured[L][row, d.collect_from : d.collect_from + n].float().cpu().numpy()
                    cursor += n
                    bar.update(n)
    finally:
        for h in handles:
            h.remove()
    for a in arrays.values():
        a.flush()
    atomic_write_json(done_flag, {"n_tokens": cursor, "layers": list(layers), "n_docs": len(docs)})
    return {L: np.load(p, mmap_mode="r") for L, p in paths.items()}


# --- training --------------------------------------------------------------------------------------


@dataclass
class SAETrainingConfig:
    """How the default SAE is trained (see ``anatomy_nb/saes/*/card.json`` for what shipped)."""

    layer: int = 15
    expansion: int = 8
    k: int = 32
    epochs: float = 2.0
    batch_size: int = 4096
    lr: float = 4e-4
    lr_warm_up_steps: int = 50
    dead_feature_window: int = 40  # in steps: short runs need a short window or AuxK never starts
    aux_loss_coefficient: float = 1.0
    seed: int = 0


def _batches(acts: np.ndarray, batch_size: int, seed: int, mean: np.ndarray | None = None) -> Iterator[torch.Tensor]:
    """Endless shuffled batches from an (n, d) array; each epoch is a fresh permutation."""
    rng = np.random.default_rng(seed)
    n = acts.shape[0]
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = np.sort(order[i : i + batch_size])
            yield torch.from_numpy(np.asarray(acts[idx], dtype=np.float32))


def train_sae(acts: np.ndarray, cfg: SAETrainingConfig, model_name: str = "") -> LoadedSAE:
    """Train a TopK SAE with sae-lens on a (n_tokens, d_model) activation array."""
    from sae_lens import TopKSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = acts.shape[1]
    training_sae = _make_topk(d_in, d_in * cfg.expansion, cfg.k, cfg.layer, model_name, cfg.seed, training=True)
    training_sae.cfg.aux_loss_coefficient = cfg.aux_loss_coefficient
    # Initialise the decoder bias at the geometric-median proxy (mean): faster, fewer dead.
    sample = np.asarray(acts[np.random.default_rng(cfg.seed).choice(acts.shape[0], min(50_000, acts.shape[0]), replace=False)], dtype=np.float32)
    with torch.no_grad():
        training_sae.b_dec.copy_(torch.from_numpy(sample.mean(0)))
    total = int(acts.shape[0] * cfg.epochs)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=0,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(cfg.dead_feature_window, 100),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=training_sae, data_provider=_batches(acts, cfg.batch_size, cfg.seed))
    trained = trainer.fit()
    # Convert to the inference class (same weights) so it saves and loads like any sae-lens SAE.
    inference = _make_topk(d_in, d_in * cfg.expansion, cfg.k, cfg.layer, model_name, cfg.seed, training=False)
    state = {k: v for k, v in trained.state_dict().items() if k in inference.state_dict()}
    inference.load_state_dict(state)
    inference.eval()
    assert isinstance(inference, TopKSAE)
    return LoadedSAE(sae=inference, layer=cfg.layer, name=f"topk-{d_in * cfg.expansion}-k{cfg.k}-L{cfg.layer}", fingerprint=_weights_fingerprint(inference))


# --- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_sae(
    lm: LoadedModel,
    sae: LoadedSAE,
    docs: Sequence[Document],
    max_tokens: int = 50_000,
    loss_docs: int = 200,
) -> dict[str, float]:
    """Quality on held-out documents.

    - ``fve``: fraction of variance explained, 1 - sum||x - x̂||² / sum||x - mean||².
    - ``l0``: mean active features per token.
    - ``dead_fraction``: features that never fire on the held-out tokens.
    - ``loss_recovered``: (CE_zero - CE_sae) / (CE_zero - CE_clean), next-token cross-entropy
      with the layer's output replaced by the reconstruction (CE_sae) or by zeros (CE_zero),
      positions 0 (the attention sink, never seen by the SAE) left as they were.
    """
    device = lm.device
    blocks = decoder_layers(lm.model)
    block = blocks[sae.layer]
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    sq_err = 0.0
    n_tok = 0
    l0_sum = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_x2 = 0.0
    captured = {}
    handle = block.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    try:
        with truncated_to_layer(lm.model, sae.layer) as base:
            for doc in docs:
                if n_tok >= max_tokens:
                    break
                base(input_ids=torch.tensor([doc.ids], device=device), use_cache=False)
                x = captured["x"][0, doc.collect_from :].float()
                acts = sae.encode(x)
                recon = sae.sae.decode(acts).float()
                fired |= (acts > 0).any(0).cpu()
                l0_sum += float((acts > 0).sum())
                sq_err += float(((x - recon) ** 2).sum())
                sum_x += x.double().sum(0).cpu()
                sum_x2 += float((x.double() ** 2).sum())
                n_tok += x.shape[0]
    finally:
        handle.remove()
    if n_tok == 0:
        raise ValueError("evaluate_sae: the documents have no tokens to evaluate on")
    total_var = sum_x2 - float((sum_x**2).sum()) / n_tok
    metrics = {
        "n_tokens": n_tok,
        "fve": 1.0 - sq_err / total_var,
        "l0": l0_sum / n_tok,
        "dead_fraction": float((~fired).float().mean()),
    }

    def ce_with(mode: str) -> float:
        def hook(m, i, o):
            x = o[0] if isinstance(o, tuple) else o
            if mode == "clean":
                return o
            new = x.clone()
            if mode == "sae":
                new[:, 1:] = sae.sae.decode(sae.encode(x[:, 1:].float())).to(x.dtype)
            else:
                new[:, 1:] = 0
            return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new

        h = block.register_forward_hook(hook)
        losses, counts = 0.0, 0
        try:
            for doc in docs[:loss_docs]:
                ids = torch.tensor([doc.ids], device=device)
                logits = lm.model(input_ids=ids, use_cache=False).logits[0, doc.collect_from - 1 : -1].float()
                target = ids[0, doc.collect_from :]
                losses += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                counts += int(target.numel())
        finally:
            h.remove()
        return losses / counts

    ce_clean, ce_sae, ce_zero = ce_with("clean"), ce_with("sae"), ce_with("zero")
    metrics.update(ce_clean=ce_clean, ce_sae=ce_sae, ce_zero=ce_zero, loss_recovered=(ce_zero - ce_sae) / (ce_zero - ce_clean))
    return metrics
