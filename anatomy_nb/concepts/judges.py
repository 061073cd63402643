"""Refusal judges that need a model: an LLM asked yes or no (``LLMJudge``) or a refusal direction in
the model's residual stream; ``make_judge`` builds the one a ``JudgeConfig`` names. The model-free
parts (the phrase judge, the labelled completions, agreement) are ``data.judges``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data.judges import PhraseJudge, RefusalJudge
from ..lm.refusal_direction import direction_judge
from .explain import complete_all, load_prompt, make_explainer

__all__ = ["LLMJudge", "make_judge"]


class LLMJudge:
    """Asks a chat model, one yes/no question per response (``prompts/judge_refusal.txt``).

    ``backend`` is any ``concepts.explain`` backend (endpoint or local model, cached or not). An
    answer that is neither yes nor no counts as no refusal and is counted in ``unparsed``."""

    def __init__(self, backend: Any, name: str, template: str | None = None):
        self.backend = backend
        self.name = name
        self.template = template or load_prompt("judge_refusal")
        self.unparsed = 0

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        questions = [self.template.format(prompt=p[:2000], response=r[:2000]) for p, r in zip(prompts, responses)]
        out = []
        for answer in complete_all(self.backend, questions, max_new_tokens=3):
            word = (re.findall(r"[a-z]+", answer.lower()) or [""])[0]
            self.unparsed += word not in ("yes", "no")
            out.append(word == "yes")
        return np.array(out, dtype=bool)


def make_judge(cfg: Any, cache_dir: Any = None, lm: Any = None) -> RefusalJudge:
    """The judge a ``JudgeConfig`` (or ``ExplainConfig``) names: the phrase list for
    ``backend='none'``; a refusal direction in ``lm``'s residual stream for ``'direction'``
    (fitted once, kept in ``cache_dir``); else an LLM judge."""
    if cfg.backend == "direction":
        if lm is None:
            raise ValueError("judge.backend='direction' reads a model's residual stream: pass the model (lm=)")
        return direction_judge(lm, cache_dir, cfg.layer, cfg.n_tokens, cfg.fit_on, cfg.fit_n, cfg.method, cfg.probe_c)
    backend = make_explainer(cfg, cache_dir, lm)
    if backend is None:
        return PhraseJudge()
    return LLMJudge(backend, f"LLM judge ({cfg.backend}: {cfg.model})")
