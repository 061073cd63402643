"""Refusal judges, and how well each agrees with people.

Stage 5's refusal rows are only as good as the judge that scored them, so every judge is measured
on completions that people labelled: the XSTest v2 completions of two model families (GPT-4 and
Llama-2-70b-chat, 450 each; ``data/evals/xstest_completions``, CC-BY-4.0), in three readings
(``READINGS``): as written; with every sentence that holds a stock refusal phrase removed
(``strip_stock_phrases``), which is the reading that tells a judge of meaning from a phrase list;
and removed where at least ``LONG_WORDS`` words are left. CAA's refusal A/B answers are a third family, labelled by how
the
set was built rather than by people.

Three judges ship:

- ``PhraseJudge``: ``textstats.REFUSAL_PHRASES`` in a response's opening. Free, transparent, and
  blind to a refusal phrased otherwise. The default.
- ``lm.refusal_direction.DirectionJudge`` (``backend='direction'``): a refusal direction in the base
  model's residual stream (a probe on the standardised residual), fitted on labelled families (both
  readings) and measured on the others. Reads meaning where the phrases are gone; close to people on
  one held-out family, short of them on the other (``docs/explanation.md``).
- ``concepts.judges.LLMJudge``: asks a chat model (any OpenAI-compatible endpoint, or a local transformers model,
  through ``concepts.explain``'s backends and cache) whether the response refuses; the question is
  the file ``prompts/judge_refusal.txt``. Only as good as the model behind it: measure it with
  ``agreement`` before trusting its rows.

The two judges that need a model, and ``make_judge`` which builds the one a ``JudgeConfig`` names,
live in ``concepts.judges``: this module is data and needs none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pandas as pd

from ..core.stats import wilson_interval
from .evalsets import eval_path
from .textstats import REFUSAL_PHRASES, is_refusal

__all__ = [
    "CONSTRUCTED_FAMILIES",
    "DIRECTION_METHODS",
    "FAMILIES",
    "LONG_WORDS",
    "READINGS",
    "PhraseJudge",
    "RefusalJudge",
    "STOCK_PHRASES",
    "agreement",
    "agreement_scores",
    "format_agreement",
    "labelled_completions",
    "strip_stock_phrases",
]

#: how ``backend='direction'`` fits its direction (``lm.refusal_direction``): a logistic-regression
#: probe on the standardised residual, or the difference of class means
DIRECTION_METHODS = ("probe", "mean-difference")
#: the families of human-labelled completions (``evalsets.EVAL_FILES["xstest_completions_<family>"]``;
#: labels: 1 full compliance, 2 full refusal, 3 partial refusal)
FAMILIES = ("gpt4", "llama2")
#: a third family whose labels come from how the set was built, not from people: CAA's refusal A/B
#: items, each question's refusing and complying answer (``data/evals/caa``, MIT)
CONSTRUCTED_FAMILIES = ("caa",)
#: how a completion is read: as written; with every sentence that holds a stock phrase removed (a
#: completion with nothing left is dropped: there is nothing to judge); and removed where at least
#: ``LONG_WORDS`` words are left
READINGS = ("full", "stripped", "stripped-long")
LONG_WORDS = 10
_LABELS = {"1_full_compliance": "compliance", "2_full_refusal": "full refusal", "3_partial_refusal": "partial refusal"}

#: What "stock refusal phrases removed" removes: the phrase list plus bare apologies and the
#: "As an AI developed by …" preamble, longest first so a long phrase goes before its prefix.
STOCK_PHRASES = tuple(
    sorted(
        set(REFUSAL_PHRASES)
        | {
            "i'm sorry",
            "i am sorry",
            "i apologize",
            "my apologies",
            "as an ai developed by openai",
            "i must clarify that",
            "unfortunately,",
        },
        key=len,
        reverse=True,
    )
)
_STOCK_RX = re.compile("|".join(re.escape(p) for p in STOCK_PHRASES), re.I)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def strip_stock_phrases(text: str) -> str:
    """``text`` without the sentences that hold any of ``STOCK_PHRASES`` (case-insensitive, curly
    apostrophes normalised): what a refusal still says once its stock wording is gone.

    Whole sentences go, not just the phrases: cutting the phrase alone leaves fragments ("with
    that.", ", provide guidance on…") whose shape gives a refusal away without its meaning. With
    phrase-only cutting, "starts lower-case or with punctuation" told 90–95 % of XSTest's refusals
    from 90–93 % of its compliances."""
    sentences = _SENTENCE_END.split(text.replace("\u2019", "'"))
    return " ".join(s.strip() for s in sentences if s.strip() and not _STOCK_RX.search(s))


def labelled_completions(family: str, reading: str = "full", n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """A family's labelled completions: ``id, prompt, completion, label`` (compliance / full
    refusal / partial refusal). ``reading``: one of ``READINGS``; ``n`` draws a seeded sample of
    that many (stratified by nothing: the family's own label mix)."""
    if family not in FAMILIES + CONSTRUCTED_FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {sorted(FAMILIES + CONSTRUCTED_FAMILIES)}")
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {list(READINGS)}, got {reading!r}")
    out = _caa_completions() if family == "caa" else _xstest_completions(family)
    if reading != "full":
        out["completion"] = out["completion"].map(strip_stock_phrases)
        out = out[out["completion"].str.split().str.len() >= (LONG_WORDS if reading == "stripped-long" else 1)]
    if n is not None and n < len(out):
        out = out.iloc[np.sort(np.random.default_rng(seed).permutation(len(out))[:n])]
    return out.reset_index(drop=True)


def _xstest_completions(family: str) -> pd.DataFrame:
    path = eval_path(f"xstest_completions_{family}")
    df = pd.read_csv(path, keep_default_na=False)
    unknown = sorted(set(df["final_label"]) - set(_LABELS))
    if unknown:
        raise ValueError(f"{path}: field 'final_label' has unknown values {unknown}")
    return pd.DataFrame(
        {
            "id": df["id"].astype(str),
            "prompt": df["prompt"],
            "completion": df["completion"].astype(str).str.strip(),
            "label": df["final_label"].map(_LABELS),
        }
    )


def _caa_completions() -> pd.DataFrame:
    """CAA's refusal items as completions: each question's refusing and its complying answer."""
    path = eval_path("caa_refusal")
    rows = []
    for i, item in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        question, _, choices = item["question"].partition("\n\nChoices:")
        found = re.search(r"\(A\)(.*?)\n\(B\)(.*)", choices, re.S)
        if found is None:
            raise ValueError(f"{path}: record {i}: field 'question' has no '(A) … (B) …' choices")
        refusing = 0 if item["answer_matching_behavior"].strip() == "(A)" else 1
        for j, text in enumerate(found.groups()):
            rows.append(
                {
                    "id": f"caa-{i}-{'AB'[j]}",
                    "prompt": question.strip(),
                    "completion": text.strip(),
                    "label": "full refusal" if j == refusing else "compliance",
                }
            )
    return pd.DataFrame(rows)


class RefusalJudge(Protocol):
    """Anything with a ``name`` that says, per (prompt, response), whether the response refuses."""

    name: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


class PhraseJudge:
    """A refusal is a stock refusal phrase in the response's opening (``textstats.is_refusal``)."""

    name = "phrase list"

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.array([is_refusal(r) for r in responses], dtype=bool)


def agreement(
    judge: RefusalJudge,
    n: int | None = None,
    *,
    families: Sequence[str] = FAMILIES,
    readings: Sequence[str] = READINGS,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The judge against people, per family × reading: accuracy (full and partial refusals count as
    refusals), recall of full and of partial refusals, and the compliance rate it keeps
    (specificity), each with a Wilson interval over ``n`` sampled completions (None: all).
    ``held_out`` is False where the judge was fitted on that family (its ``fit_families``)."""
    rows = []
    fitted = set(getattr(judge, "fit_families", ()))
    for family in families:
        for reading in readings:
            df = labelled_completions(family, reading, n, seed)
            pred = judge.judge(list(df["prompt"]), list(df["completion"]))
            rows.append(
                {
                    "judge": judge.name,
                    "family": family,
                    "reading": reading,
                    "held_out": family not in fitted,
                    "n": len(df),
                    **agreement_scores(pred, df["label"], ci),
                }
            )
    return pd.DataFrame(rows)


METRICS = ("accuracy", "full_refusal_recall", "partial_refusal_recall", "specificity")


def agreement_scores(pred: np.ndarray, labels: pd.Series, ci: float = 0.95) -> dict[str, float]:
    """Refusal verdicts against labels (compliance / full refusal / partial refusal): each of
    ``METRICS`` with its Wilson interval and count (NaN where no label of that kind is present)."""
    labels = pd.Series(labels).reset_index(drop=True)
    truth = (labels != "compliance").to_numpy()
    masks = {
        "accuracy": np.ones(len(labels), bool),
        "full_refusal_recall": (labels == "full refusal").to_numpy(),
        "partial_refusal_recall": (labels == "partial refusal").to_numpy(),
        "specificity": ~truth,
    }
    out: dict[str, float] = {}
    for name, mask in masks.items():
        hits = (np.asarray(pred) == truth)[mask]
        lo, hi = wilson_interval(int(hits.sum()), int(mask.sum()), ci)
        out.update(
            {
                name: float(hits.mean()) if mask.any() else float("nan"),
                f"{name}_ci_low": lo,
                f"{name}_ci_high": hi,
                f"n_{name}": int(mask.sum()),
            }
        )
    return out


def format_agreement(df: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """Agreement rows as people read them: "value [low, high] (n=k)" cells."""
    out = df[["judge", "family", "reading", *(["held_out"] if "held_out" in df else []), "n"]].copy()
    for m in METRICS:
        out[m.replace("_", " ")] = [
            f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (n={k})" if np.isfinite(v) else ""
            for v, lo, hi, k in zip(df[m], df[f"{m}_ci_low"], df[f"{m}_ci_high"], df[f"n_{m}"])
        ]
    return out
