"""Model loading and the chat-template handling every stage relies on."""

import pytest
import torch

from anatomy_nb.data.chat import CHATML_TEMPLATE, render_example, render_prompt
from anatomy_nb.lm.models import tiny_llama
from anatomy_nb.lm.ops import decoder_layers, truncated_to_layer

MSGS = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "Mix flour and water."},
    {"role": "user", "content": "Then what?"},
]


def test_tiny_llama_is_deterministic_and_self_contained():
    a, b = tiny_llama(seed=3), tiny_llama(seed=3)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert a.fingerprint == b.fingerprint != tiny_llama(seed=4).fingerprint
    assert a.tokenizer.chat_template == CHATML_TEMPLATE


def test_response_tokens_are_exactly_the_transcript_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    r = render_example(tok, MSGS, "Let it rise, then bake it.")
    full = tok.apply_chat_template(
        MSGS + [{"role": "assistant", "content": "Let it rise, then bake it."}], tokenize=False
    )
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(r.prompt_ids) + len(r.response_ids)] == r.prompt_ids + r.response_ids
    assert tok.decode(r.response_ids) == "Let it rise, then bake it."


def test_prompt_content_mask_covers_message_text_only(tiny_lm):
    tok = tiny_lm.tokenizer
    ids, mask = render_prompt(tok, MSGS)
    content = tok.decode([i for i, m in zip(ids, mask) if m])
    assert content == "How do I bake bread?Mix flour and water.Then what?"
    assert "<|im_start|>" not in content and "assistant" not in content


def test_truncated_to_layer_stops_early_and_restores(tiny_lm):
    layers = decoder_layers(tiny_lm.model)
    n = len(layers)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: seen.append(k)) for k, blk in enumerate(layers)]
    try:
        with torch.no_grad(), truncated_to_layer(tiny_lm.model, 1) as base:
            base(input_ids=torch.tensor([[1, 5, 6]]))
    finally:
        for h in hooks:
            h.remove()
    assert seen == [0, 1]
    assert decoder_layers(tiny_lm.model) is layers and len(layers) == n
    with pytest.raises(ValueError, match="out of range"):
        with truncated_to_layer(tiny_lm.model, n):
            pass


@pytest.mark.e2e
def test_default_model_loads_from_the_shipped_gguf_via_cache():
    from anatomy_nb.lm.models import DEFAULT_MODEL, load_model

    lm = load_model(DEFAULT_MODEL)
    assert lm.n_layers == 30 and lm.d_model == 576 and lm.model.dtype == torch.float32
    assert getattr(lm.model, "hf_quantizer", None) is None and not hasattr(lm.model.config, "quantization_config")
    assert lm.model.config._name_or_path and "smollm2" in lm.model.config._name_or_path
    r = render_example(lm.tokenizer, [{"role": "user", "content": "Hi"}], "Hello!")
    # SmolLM2's template inserts its default system prompt when none is given
    assert "You are a helpful AI assistant named SmolLM" in lm.tokenizer.decode(r.prompt_ids)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([r.prompt_ids])).logits
    top = lm.tokenizer.decode([int(logits[0, -1].argmax())])
    assert top.strip() != ""  # a real model predicts a real token
