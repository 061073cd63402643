"""Optional LLM explanations of concepts, scored for fidelity on held-out text.

A label is only worth what it predicts. ``explain_concept`` asks a language model to describe a
concept from its top-activating and non-activating contexts; ``fidelity`` then asks the model,
text by text on *held-out* responses, whether each matches the description, and scores those
yes/no answers against whether the concept actually fired (AUROC and accuracy). Backends are
pluggable: a local transformers model, or any OpenAI-compatible chat endpoint. Prompt templates
are files under ``anatomy_nb/prompts/`` so they can be read and changed without touching code.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from importlib import resources
from typing import Protocol, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["ExplainerBackend", "OpenAICompatibleBackend", "TransformersBackend", "explain_concept", "fidelity", "load_prompt"]


def load_prompt(name: str) -> str:
    return resources.files("anatomy_nb").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")


class ExplainerBackend(Protocol):
    def complete(self, prompt: str, max_new_tokens: int = 32) -> str: ...


@dataclass
class TransformersBackend:
    """A local chat model (a LoadedModel from ``load_model``); greedy decoding, deterministic."""

    lm: object

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        from ..lm.ops import generate  # a local model needs torch; the HTTP backend below does not

        texts, _ = generate(self.lm, [({"role": "user", "content": prompt},)], max_new_tokens=max_new_tokens, batch_size=1, max_prompt_tokens=None)
        return texts[0].strip()


@dataclass
class OpenAICompatibleBackend:
    """Any server speaking the OpenAI chat-completions API (vLLM, llama.cpp server, hosted APIs).

    The key is read from the environment variable named by ``api_key_env``, never stored."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new_tokens, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            data = json.loads(resp.read().decode())
        return data["choices"][0]["message"]["content"].strip()


def _format_context(tokens: Sequence[str], peak: int | None) -> str:
    return "".join(f"[[{t}]]" if i == peak else t for i, t in enumerate(tokens)).replace("\n", " ")


def explain_concept(backend: ExplainerBackend, active: Sequence[dict], inactive: Sequence[str] = (), template: str | None = None) -> str:
    """One-phrase description from top contexts (dicts with ``tokens`` and ``peak``, as
    ``FeatureStore.top_contexts`` gives) and optional non-activating texts."""
    lines = [f"ACTIVE: {_format_context(c['tokens'], c['peak'])}" for c in active]
    lines += [f"INACTIVE: {t[:300]}" for t in inactive]
    prompt = (template or load_prompt("explain_concept")).format(examples="\n".join(lines))
    return backend.complete(prompt, max_new_tokens=32).splitlines()[0].strip().strip('"')


def fidelity(backend: ExplainerBackend, explanation: str, texts: Sequence[str], fired: Sequence[bool], template: str | None = None) -> dict:
    """How well the explanation alone predicts whether the concept fires on held-out texts."""
    tpl = template or load_prompt("score_fidelity")
    said = np.array([backend.complete(tpl.format(explanation=explanation, text=t[:600]), max_new_tokens=3).strip().lower().startswith("yes") for t in texts])
    fired = np.asarray(fired, dtype=bool)
    auroc = float(roc_auc_score(fired, said)) if 0 < fired.sum() < len(fired) else float("nan")
    return {"explanation": explanation, "n": len(texts), "auroc": auroc, "accuracy": float((said == fired).mean()), "said_yes": float(said.mean()), "base_rate": float(fired.mean())}
