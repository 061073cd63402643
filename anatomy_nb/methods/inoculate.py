"""Inoculation prompting: an instruction that asks for the concept is added to the training prompts
(never to held-out or evaluation prompts), so the preference for it is explained by the prompt and
not learned as a default. It can only suppress; its size cannot be predicted before training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .base import Method, register

__all__ = ["Inoculate", "with_instruction"]


def with_instruction(prompt: Sequence[dict], instruction: str) -> tuple[dict, ...]:
    """The prompt with ``instruction`` appended to its last user turn (a new user turn if none).
    The system prompt is left alone: replacing it would change more than the instruction."""
    msgs = [dict(m) for m in prompt]
    for m in reversed(msgs):
        if m["role"] == "user":
            m["content"] = f"{m['content'].rstrip()}\n\n{instruction.strip()}"
            return tuple(msgs)
    return tuple(msgs) + ({"role": "user", "content": instruction.strip()},)


@register
class Inoculate(Method):
    name = "inoculate"
    default_strength = 1.0
    strength_range = (0.0, float("inf"), True)
    suppress_only = True
    takes_rank = True

    #: the instruction a new entry gets when none is given (the pipeline writes and ranks better ones)
    default_instruction = "In this answer, deliberately show the following trait: {label}"

    def fill_defaults(self, choice: Any) -> None:
        if not (choice.instruction or "").strip():
            choice.instruction = self.default_instruction.format(label=choice.label or choice.concept)

    def check(self, choice: Any) -> tuple[str, str] | None:
        if not (isinstance(choice.instruction, str) and choice.instruction.strip()):
            return "instruction", "inoculation needs the instruction text added to training prompts"
        return None

    def edit_prompts(self, pairs: list, entries: Sequence[Any], scopes: Mapping[str, np.ndarray]) -> list:
        """Every entry's instruction added to the prompt (plan order); a scoped entry to its pairs only."""
        out = []
        for i, p in enumerate(pairs):
            text = "\n".join(r.choice.instruction.strip() for r in entries if r.ref not in scopes or scopes[r.ref][i])
            out.append(replace(p, prompt=with_instruction(p.prompt, text)) if text else p)
        return out
