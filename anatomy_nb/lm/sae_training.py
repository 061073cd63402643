"""Training and measuring an SAE: collect residual activations, train a TopK SAE with sae-lens,
and report what limits everything downstream — variance explained, L0, dead features and
next-token loss recovered when the reconstruction is spliced back into the forward pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sae_lens import TopKSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from ..config import SAETrainingConfig
from ..core.files import atomic_write_json
from ..data.chat import render_example
from .models import LoadedModel
from .ops import ResidualCapture, decoder_layers
from .sae import LoadedSAE, make_topk_sae, weights_fingerprint

__all__ = ["Document", "SAETrainingConfig", "chat_documents", "collect_activations", "evaluate_sae", "train_sae"]


@dataclass
class Document:
    """Token ids of one chat transcript and the first position worth collecting."""

    ids: list[int]
    collect_from: int
    origin: str = ""


def chat_documents(
    lm: LoadedModel, corpus: Iterable[tuple[list[dict], str, str]], max_seq_len: int = 384
) -> list[Document]:
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
    arrays = {
        L: np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(total, lm.d_model))
        for L, p in paths.items()
    }
    cursor = 0
    with ResidualCapture(lm, layers) as capture, tqdm(total=total, desc="collect activations", unit="tok") as bar:
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
            capture(ids, attention_mask=mask)
            for row, d in enumerate(batch):
                n = min(len(d.ids) - d.collect_from, total - cursor)
                if n <= 0:
                    break
                for L in layers:
                    arrays[L][cursor : cursor + n] = (
                        capture.at[L][row, d.collect_from : d.collect_from + n].float().cpu().numpy()
                    )
                cursor += n
                bar.update(n)
    for a in arrays.values():
        a.flush()
    atomic_write_json(done_flag, {"n_tokens": cursor, "layers": list(layers), "n_docs": len(docs)})
    return {L: np.load(p, mmap_mode="r") for L, p in paths.items()}


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
    d_in = acts.shape[1]
    training_sae = make_topk_sae(d_in, d_in * cfg.expansion, cfg.k, cfg.layer, model_name, cfg.seed, training=True)
    training_sae.cfg.aux_loss_coefficient = cfg.aux_loss_coefficient
    # Initialise the decoder bias at the geometric-median proxy (mean): faster, fewer dead.
    sample = np.asarray(
        acts[np.random.default_rng(cfg.seed).choice(acts.shape[0], min(50_000, acts.shape[0]), replace=False)],
        dtype=np.float32,
    )
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
    inference = make_topk_sae(d_in, d_in * cfg.expansion, cfg.k, cfg.layer, model_name, cfg.seed, training=False)
    state = {k: v for k, v in trained.state_dict().items() if k in inference.state_dict()}
    inference.load_state_dict(state)
    inference.eval()
    assert isinstance(inference, TopKSAE)
    return LoadedSAE(
        sae=inference,
        layer=cfg.layer,
        name=f"topk-{d_in * cfg.expansion}-k{cfg.k}-L{cfg.layer}",
        fingerprint=weights_fingerprint(inference),
    )


# --- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_sae(
    lm: LoadedModel, sae: LoadedSAE, docs: Sequence[Document], max_tokens: int = 50_000, loss_docs: int = 200
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
    block = decoder_layers(lm.model)[sae.layer]
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    sq_err = 0.0
    n_tok = 0
    l0_sum = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_x2 = 0.0
    with ResidualCapture(lm, sae.layer) as capture:
        for doc in docs:
            if n_tok >= max_tokens:
                break
            x = capture(torch.tensor([doc.ids]))[0, doc.collect_from :].float()
            acts = sae.encode(x)
            recon = sae.sae.decode(acts).float()
            fired |= (acts > 0).any(0).cpu()
            l0_sum += float((acts > 0).sum())
            sq_err += float(((x - recon) ** 2).sum())
            sum_x += x.double().sum(0).cpu()
            sum_x2 += float((x.double() ** 2).sum())
            n_tok += x.shape[0]
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
    metrics.update(
        ce_clean=ce_clean, ce_sae=ce_sae, ce_zero=ce_zero, loss_recovered=(ce_zero - ce_sae) / (ce_zero - ce_clean)
    )
    return metrics
