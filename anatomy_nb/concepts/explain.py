"""Optional LLM explanations of concepts, scored for fidelity on held-out text.

A label is only worth what it predicts. ``explain_concept`` asks a language model to describe a
concept from its top-activating and non-activating contexts; ``fidelity`` then asks the model,
text by text on *held-out* responses, whether each matches the description, and scores those
yes/no answers against whether the concept actually fired (AUROC and accuracy). Backends are
pluggable: a local transformers model, or any OpenAI-compatible chat endpoint. Prompt templates
are files under ``anatomy_nb/prompts/`` so they can be read and changed without touching code.

Calls go out in batches (``complete_all``: concurrent requests to an endpoint, batched generation
on a local model), each answer is cached on disk (``CachedBackend``: a re-run asks only what is
new), and the calls, tokens and seconds are counted (``Usage``) for the manifest and the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sklearn.metrics import roc_auc_score

from ..core.files import atomic_write_json

__all__ = [
    "CachedBackend",
    "ExplainerBackend",
    "OpenAICompatibleBackend",
    "TransformersBackend",
    "Usage",
    "complete_all",
    "explain_concept",
    "explanation_prompt",
    "fidelity",
    "fidelity_prompts",
    "fidelity_scores",
    "load_prompt",
    "make_explainer",
    "parse_explanation",
    "usage_of",
]


def load_prompt(name: str) -> str:
    return resources.files("anatomy_nb").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")


class ExplainerBackend(Protocol):
    def complete(self, prompt: str, max_new_tokens: int = 32) -> str: ...


@dataclass
class Usage:
    """What the explanations cost: calls made and answered from the cache, tokens, seconds."""

    calls: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.calls += 1
        self.prompt_tokens += int(prompt_tokens)
        self.completion_tokens += int(completion_tokens)

    def summary(self) -> str:
        return (
            f"{self.calls} calls ({self.cached} from the cache), {self.prompt_tokens:,} prompt + "
            f"{self.completion_tokens:,} completion tokens, {self.seconds:.1f} s"
        )


@dataclass
class TransformersBackend:
    """A local chat model (a LoadedModel from ``load_model``); greedy decoding, deterministic."""

    lm: object
    batch_size: int = 8
    usage: Usage = field(default_factory=Usage)

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        return self.complete_many([prompt], max_new_tokens)[0]

    def complete_many(self, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        from ..lm.ops import generate  # a local model needs torch; the HTTP backend below does not

        texts, _ = generate(
            self.lm,
            [({"role": "user", "content": p},) for p in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=self.batch_size,
            max_prompt_tokens=None,
        )
        tok = getattr(self.lm, "tokenizer", None)
        for p, t in zip(prompts, texts):
            self.usage.add(len(tok(p)["input_ids"]) if tok else 0, len(tok(t)["input_ids"]) if tok else 0)
        return [t.strip() for t in texts]


@dataclass
class OpenAICompatibleBackend:
    """Any server speaking the OpenAI chat-completions API (vLLM, llama.cpp server, hosted APIs).

    The key is read from the environment variable named by ``api_key_env``, never stored.
    ``complete_many`` keeps ``max_workers`` requests in flight."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_workers: int = 8
    usage: Usage = field(default_factory=Usage, repr=False)

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_new_tokens,
                "temperature": 0,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode())
        except OSError as exc:  # URLError, HTTPError, timeouts: say which endpoint
            raise ConnectionError(
                f"the LLM endpoint {self.base_url} (model {self.model!r}) did not answer: {exc}"
            ) from exc
        used = data.get("usage") or {}
        self.usage.add(used.get("prompt_tokens", 0), used.get("completion_tokens", 0))
        return data["choices"][0]["message"]["content"].strip()

    def complete_many(self, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda p: self.complete(p, max_new_tokens), prompts))


class CachedBackend:
    """Answers kept on disk, one JSON file per (backend, prompt, max_new_tokens): greedy answers do
    not change, so a re-run (another FDR, another ``explain_top``) asks only what is new."""

    def __init__(self, backend: Any, cache_dir: str | Path, identity: Any):
        self.backend, self.dir, self.identity = (
            backend,
            Path(cache_dir),
            json.dumps(identity, sort_keys=True, default=str),
        )
        self.usage = getattr(backend, "usage", None) or Usage()

    def _path(self, prompt: str, max_new_tokens: int) -> Path:
        h = hashlib.sha256(json.dumps([self.identity, prompt, max_new_tokens]).encode()).hexdigest()
        return self.dir / h[:2] / f"{h}.json"

    def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
        return self.complete_many([prompt], max_new_tokens)[0]

    def complete_many(self, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        out: list[str | None] = [None] * len(prompts)
        todo = []
        for i, p in enumerate(prompts):
            path = self._path(p, max_new_tokens)
            if path.exists():
                out[i] = json.loads(path.read_text(encoding="utf-8"))["answer"]
                self.usage.cached += 1
            else:
                todo.append(i)
        unique = list(dict.fromkeys(prompts[i] for i in todo))  # a question asked twice goes out once
        answers = dict(zip(unique, complete_all(self.backend, unique, max_new_tokens)))
        for p, a in answers.items():
            atomic_write_json(self._path(p, max_new_tokens), {"answer": a})
        for i in todo:
            out[i] = answers[prompts[i]]
        return [str(a) for a in out]


def complete_all(backend: Any, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Every prompt's answer, in one batch when the backend takes batches, else one by one."""
    if not prompts:
        return []
    many = getattr(backend, "complete_many", None)
    return list(many(prompts, max_new_tokens)) if many else [backend.complete(p, max_new_tokens) for p in prompts]


def make_explainer(cfg: Any, cache_dir: str | Path | None = None, lm: Any = None) -> Any:
    """The backend an ``ExplainConfig`` names (None for ``backend='none'``), cached under
    ``cache_dir`` when ``cfg.cache``."""
    if cfg.backend == "none":
        return None
    if cfg.backend == "openai":
        backend: Any = OpenAICompatibleBackend(cfg.base_url, cfg.model, cfg.api_key_env, cfg.timeout, cfg.max_workers)
    else:
        from ..lm.models import load_model  # a local model needs torch

        backend = TransformersBackend(
            lm if lm is not None and getattr(lm, "name", None) == cfg.model else load_model(cfg.model)
        )
    if cfg.cache and cache_dir is not None:
        return CachedBackend(
            backend,
            cache_dir,
            {
                "backend": cfg.backend,
                "model": cfg.model,
                "fingerprint": getattr(getattr(backend, "lm", None), "fingerprint", None),
            },
        )
    return backend


def _format_context(tokens: Sequence[str], peak: int | None) -> str:
    return "".join(f"[[{t}]]" if i == peak else t for i, t in enumerate(tokens)).replace("\n", " ")


def explanation_prompt(active: Sequence[dict], inactive: Sequence[str] = (), template: str | None = None) -> str:
    """The prompt that asks for a one-phrase description, from top contexts (dicts with ``tokens``
    and ``peak``, as ``FeatureStore.top_contexts`` gives) and optional non-activating texts."""
    lines = [f"ACTIVE: {_format_context(c['tokens'], c['peak'])}" for c in active]
    lines += [f"INACTIVE: {t[:300]}" for t in inactive]
    return (template or load_prompt("explain_concept")).format(examples="\n".join(lines))


def parse_explanation(answer: str) -> str:
    lines = answer.strip().splitlines()
    return lines[0].strip().strip('"') if lines else ""


def explain_concept(
    backend: ExplainerBackend, active: Sequence[dict], inactive: Sequence[str] = (), template: str | None = None
) -> str:
    """One-phrase description of a concept (``explanation_prompt``, one call)."""
    return parse_explanation(backend.complete(explanation_prompt(active, inactive, template), max_new_tokens=32))


def fidelity_prompts(explanation: str, texts: Sequence[str], template: str | None = None) -> list[str]:
    tpl = template or load_prompt("score_fidelity")
    return [tpl.format(explanation=explanation, text=t[:600]) for t in texts]


def fidelity_scores(explanation: str, answers: Sequence[str], fired: Sequence[bool]) -> dict:
    """AUROC and accuracy of the yes/no ``answers`` against whether the concept fired."""
    said = np.array([a.strip().lower().startswith("yes") for a in answers], dtype=bool)
    fired = np.asarray(fired, dtype=bool)
    auroc = float(roc_auc_score(fired, said)) if 0 < fired.sum() < len(fired) else float("nan")
    return {
        "explanation": explanation,
        "n": len(answers),
        "auroc": auroc,
        "accuracy": float((said == fired).mean()) if len(fired) else float("nan"),
        "said_yes": float(said.mean()) if len(said) else float("nan"),
        "base_rate": float(fired.mean()) if len(fired) else float("nan"),
    }


def fidelity(
    backend: ExplainerBackend,
    explanation: str,
    texts: Sequence[str],
    fired: Sequence[bool],
    template: str | None = None,
) -> dict:
    """How well the explanation alone predicts whether the concept fires on held-out texts."""
    return fidelity_scores(explanation, complete_all(backend, fidelity_prompts(explanation, texts, template), 3), fired)


def usage_of(backend: Any, seconds: float) -> dict:
    """The backend's ``Usage`` (with the wall time of the step) as a manifest entry."""
    usage = getattr(backend, "usage", None) or Usage()
    usage.seconds = round(seconds, 2)
    return asdict(usage)
