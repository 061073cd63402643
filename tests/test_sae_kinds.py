"""Any sae-lens SAE: standard (ReLU), JumpReLU, TopK, and BatchTopK / Matryoshka in the form sae-lens
saves for inference (a JumpReLU with the batch threshold), each saved to disk and loaded by path.

Extraction must equal sae-lens's own ``encode`` applied to the residual stream at the hook the
SAE's metadata names (``hook_resid_post`` of block L, or ``hook_resid_pre`` = the input of block L),
with the SAE's run-time input normalisation (layer norm, constant-norm rescale) and decoder-bias handling — computed
here independently, from
the model's ``output_hidden_states`` on the whole transcript."""

import copy

import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from anatomy_nb import extract
from anatomy_nb.data.chat import render_example
from anatomy_nb.lm.sae import load_sae

D_SAE = 64


def _randomise(sae, seed: int) -> None:
    """Random weights with a non-zero decoder bias (so ``apply_b_dec_to_input`` matters) and
    encoder biases that leave a fraction of features active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(0.05 + 0.1 * torch.rand(p.shape, generator=g))
            elif name == "b_enc":
                p.copy_(-0.1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[0]))


def make_sae(kind: str, d_in: int, hook: str, tmp_path):
    meta = SAEMetadata(hook_name=hook, model_name="tiny-llama", prepend_bos=False)
    common = dict(d_in=d_in, d_sae=D_SAE, metadata=meta)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(**common, apply_b_dec_to_input=True, normalize_activations="layer_norm"))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common, apply_b_dec_to_input=False))
    elif kind == "topk":
        sae = TopKSAE(
            TopKSAEConfig(**common, k=5, apply_b_dec_to_input=True, normalize_activations="constant_norm_rescale")
        )
    elif kind == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=5))
    elif kind == "matryoshka":
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(**common, k=5, matryoshka_widths=[16, 32, D_SAE])
        )
    else:
        raise ValueError(kind)
    _randomise(sae, seed=len(kind))
    if kind in ("batchtopk", "matryoshka"):
        sae.topk_threshold.fill_(0.2)  # what training would have learned; saved as the JumpReLU threshold
    path = tmp_path / f"sae-{kind}"
    getattr(sae, "save_inference_model", sae.save_model)(str(path))  # training SAEs save their inference form
    return path


def reference_max(lm, sae_path, layer_input: int, pairs, side: str) -> np.ndarray:
    """Per pair, the max over response tokens of sae-lens's ``encode`` on the hidden state
    ``layer_input`` (hidden_states[i] is the input of block i) of the full transcript."""
    sae = SAE.load_from_disk(str(sae_path), device="cpu", dtype="float32")
    sae.eval()
    model = copy.deepcopy(lm.model)  # output_hidden_states leaves transformers' recording hooks on the model it ran
    out = np.zeros((len(pairs), D_SAE), dtype=np.float32)
    for i, p in enumerate(pairs):
        r = render_example(lm.tokenizer, p.prompt, p.chosen if side == "chosen" else p.rejected)
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[layer_input][0]
            acts = sae.encode(hidden[len(r.prompt_ids) :].float())
        out[i] = acts.max(0).values.clamp(min=0).numpy()
    return out


@pytest.mark.parametrize(
    "kind,hook,layer_input",
    [
        ("standard", "blocks.1.hook_resid_post", 2),
        ("jumprelu", "blocks.2.hook_resid_pre", 2),
        ("topk", "blocks.2.hook_resid_post", 3),
        ("batchtopk", "blocks.1.hook_resid_post", 2),
        ("matryoshka", "blocks.0.hook_resid_post", 1),
    ],
)
def test_extraction_equals_sae_lens_encode_at_the_named_hook(kind, hook, layer_input, tiny_lm, hh_pairs, tmp_path):
    path = make_sae(kind, tiny_lm.d_model, hook, tmp_path)
    loaded = load_sae(str(path), device="cpu")
    assert loaded.layer == layer_input - 1
    pairs = hh_pairs[:4]
    store = extract(
        pairs,
        tiny_lm,
        loaded,
        tmp_path / "run",
        {"max_prompt_tokens": 4096, "max_response_tokens": 4096, "pooled_values": True},
    )
    for side in ("chosen", "rejected"):
        expected = reference_max(tiny_lm, path, layer_input, pairs, side)
        got = store.pooled("max", side).toarray()
        assert (expected > 0).any(), "the random SAE must fire"
        clear = np.abs(expected) > 1e-3  # away from the firing boundary
        np.testing.assert_array_equal(got[clear] > 0, expected[clear] > 0)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)  # the store keeps float16
