"""Chat templates and token spans, shared by every stage (tokenizers only, no torch).

The prompt is rendered with the model's chat template up to and including the assistant header,
so it is the same for the chosen and the rejected response of a pair and can be computed once;
the response is tokenised on its own, which gives exactly the tokens of the full transcript.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CHATML_TEMPLATE",
    "Rendered",
    "ensure_chat_template",
    "prompt_ids",
    "render_example",
    "render_prompt",
    "truncate_prompt",
]

# Used only when a tokenizer has no chat template of its own (base models, the tiny test model).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Rendered:
    """One (prompt, response) rendered with the chat template and split into token spans.

    ``prompt_ids`` end with the assistant header, so they are identical for the chosen and the
    rejected response of a pair and can be computed once. ``prompt_content`` marks prompt tokens
    that belong to message contents (not the template's markup or its default system prompt):
    topic clustering pools only those.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    prompt_content: list[bool]


def _content_mask(text: str, offsets: Sequence[tuple[int, int]], contents: Sequence[str]) -> list[bool]:
    spans = []
    cursor = 0
    for content in contents:
        if not content:
            continue
        start = text.find(content, cursor)
        if start < 0:
            continue
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    mask = []
    for a, b in offsets:
        mask.append(any(a >= s and b <= e and b > a for s, e in spans))
    return mask


def render_prompt(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = _content_mask(text, enc["offset_mapping"], [m["content"] for m in messages])
    return list(enc["input_ids"]), mask


def render_example(tokenizer, messages: Sequence[dict], response: str) -> Rendered:
    """Tokenise a prompt (chat messages) and a response so the response tokens are exact.

    The prompt ends with the template's assistant header (a special token and a newline), so
    tokenising prompt and response separately gives the same tokens as the full transcript. The
    template's end-of-turn markup after the response is not included: under causal attention it
    cannot change the response positions, and it is not the response.
    """
    prompt_ids, mask = render_prompt(tokenizer, messages)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return Rendered(prompt_ids=prompt_ids, response_ids=list(response_ids), prompt_content=mask)


def prompt_ids(tokenizer, messages: Sequence[dict], max_tokens: int) -> list[int]:
    """The rendered prompt's token ids, keeping its last ``max_tokens`` (generation and A/B scoring)."""
    ids, _ = render_prompt(tokenizer, messages)
    return ids[-max_tokens:]


def truncate_prompt(ids: list[int], mask: list[bool], limit: int) -> tuple[list[int], list[bool], bool]:
    """At most ``limit`` prompt tokens: position 0 (the attention sink the model expects) and the
    most recent turns. Returns (ids, content mask, whether anything was cut)."""
    if len(ids) <= limit:
        return ids, mask, False
    keep = limit - 1
    return ids[:1] + ids[-keep:], mask[:1] + mask[-keep:], True


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template ChatML, and a pad token (its EOS) if it has none."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
