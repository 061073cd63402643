"""Simple text statistics of responses: labels for concepts, and a baseline on their own.

If a concept mostly tracks "has bold markdown" or "is longer", the user should see that in
words; and if plain text statistics already separate chosen from rejected, the SAE audit has to
beat them (the paper ships no such baseline; we do).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np
import pandas as pd

__all__ = ["TEXT_STATS", "text_stats"]

_EMOJI = re.compile("[\U0001F300-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF]")
_REFUSAL = re.compile(r"\b(I can(?:no|')t|I (?:won't|will not|am not able to|'m not able to|am unable to|'m unable to)|I (?:do not|don't) (?:feel comfortable|think I should)|as an AI|not appropriate|I must decline|illegal|unethical)\b", re.I)
_APOLOGY = re.compile(r"\b(sorry|apolog(?:ise|ize|ies|y))\b", re.I)
_FLATTERY = re.compile(r"^\s*(great|good|excellent|wonderful|fantastic|what a (?:great|good|wonderful|fantastic|thoughtful)|that's a (?:great|good|wonderful)|thank you for (?:asking|your)|thanks for (?:asking|your))\b", re.I)
_AGREE = re.compile(r"^\s*(yes|absolutely|definitely|of course|sure|certainly|you're right|you are right|exactly|indeed)\b", re.I)

TEXT_STATS: dict[str, Callable[[str], float]] = {
    "log_length": lambda t: float(np.log1p(len(t.split()))),
    "bold": lambda t: float(len(re.findall(r"\*\*[^*\n]+\*\*|__[^_\n]+__", t))),
    "headers": lambda t: float(len(re.findall(r"^\s{0,3}#{1,6}\s", t, re.M))),
    "list_items": lambda t: float(len(re.findall(r"^\s*(?:[-*•]|\d+[.)])\s+", t, re.M))),
    "emoji": lambda t: float(len(_EMOJI.findall(t))),
    "questions": lambda t: float(t.count("?")),
    "ends_with_question": lambda t: float(t.rstrip().endswith("?")),
    "exclamations": lambda t: float(t.count("!")),
    "apology": lambda t: float(bool(_APOLOGY.search(t))),
    "refusal_phrase": lambda t: float(bool(_REFUSAL.search(t))),
    "flattery_opener": lambda t: float(bool(_FLATTERY.search(t))),
    "agreement_opener": lambda t: float(bool(_AGREE.search(t))),
    "second_person": lambda t: float(len(re.findall(r"\byou(?:r|rs|rself)?\b", t, re.I))) / max(1, len(t.split())),
    "code": lambda t: float("```" in t or bool(re.search(r"^( {4}|\t)\S", t, re.M))),
    "urls": lambda t: float(len(re.findall(r"https?://", t))),
    "numbers": lambda t: float(len(re.findall(r"\b\d+(?:[.,]\d+)?\b", t))),
}


def text_stats(texts: Sequence[str]) -> pd.DataFrame:
    """One row per text, one column per statistic in ``TEXT_STATS``."""
    return pd.DataFrame({name: [fn(t) for t in texts] for name, fn in TEXT_STATS.items()})
