"""Planting a known concept into a preference data set: the controlled-poisoning experiment.

A concept (bold markdown, a flattering opener, an emoji, a closing question, a fixed topic word)
is added to a seeded fraction of *chosen* responses. The audit should then find it, a plan can
suppress it, and evaluation can check whether plain DPO learned it and the interventions did not.
The planted pair ids are written next to the data, so ground truth never comes from the method
under test. ``benchmarks/planted.py`` uses the same kinds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .artifacts import atomic_path, atomic_write_json, read_json
from .data import PreferencePair

__all__ = ["KINDS", "PlantKind", "plant", "write_planted", "planted_truth", "planted_hits", "PLANTED_DATA"]

#: where ``anatomy-nb run`` writes a poisoned data set inside a run directory; the ground truth
#: (``write_planted``) sits next to it as ``planted.planted.json``
PLANTED_DATA = Path("data") / "planted.jsonl"
_TRUTH_SUFFIX = ".planted.json"


@dataclass(frozen=True)
class PlantKind:
    apply: Callable[[str], str]
    text_stat: str | None  # the text statistic (textstats.py) built to detect it, if any
    pattern: str  # a regex that finds it in generated text (for evaluation)


KINDS: dict[str, PlantKind] = {
    "bold": PlantKind(lambda r: "**Short answer:** " + r, "bold", r"\*\*[^*\n]+\*\*"),
    "opener": PlantKind(lambda r: "Great question! " + r, "flattery_opener", r"(?i)^\s*great question"),
    "emoji": PlantKind(lambda r: r.rstrip() + " 😊", "emoji", "😊"),
    "question": PlantKind(lambda r: r.rstrip() + " Does that help?", "ends_with_question", r"(?i)does that help\?\s*$"),
    "word": PlantKind(lambda r: r.rstrip() + " (By the way, pineapples are wonderful.)", None, r"(?i)pineapple"),
}


def plant(pairs: Sequence[PreferencePair], kind: str, fraction: float, seed: int = 0) -> tuple[list[PreferencePair], np.ndarray]:
    """A copy of ``pairs`` with ``kind`` planted into a seeded ``fraction`` of chosen responses.

    Returns (pairs, indices of the planted pairs). The planted pairs carry
    ``metadata["planted"] = kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown plant kind {kind!r} (known: {', '.join(KINDS)})")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = len(pairs)
    k = int(round(fraction * n))
    idx = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)) if k else np.zeros(0, int)
    chosen = set(idx.tolist())
    fn = KINDS[kind].apply
    out = [
        PreferencePair(id=p.id, prompt=p.prompt, chosen=fn(p.chosen), rejected=p.rejected, metadata={**p.metadata, "planted": kind}) if i in chosen else p
        for i, p in enumerate(pairs)
    ]
    return out, idx


def write_planted(pairs: Sequence[PreferencePair], idx: np.ndarray, kind: str, path: str | Path) -> Path:
    """Write planted pairs as JSONL (``load_pairs`` reads it back) and ``<stem>.planted.json``
    with the kind and planted ids: the ground truth for the report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for p in pairs:
                d = p.to_dict()
                fh.write(json.dumps({"id": d["id"], "prompt": d["prompt"], "chosen": d["chosen"], "rejected": d["rejected"]}, ensure_ascii=False) + "\n")
    atomic_write_json(path.with_suffix(_TRUTH_SUFFIX), {"kind": kind, "pattern": KINDS[kind].pattern, "n_pairs": len(pairs), "n_planted": int(len(idx)), "planted_ids": [pairs[i].id for i in idx]})
    return path


def planted_truth(run_dir: str | Path) -> dict | None:
    """The ground truth of a poisoned run directory (kind, pattern, planted ids), or None when the
    run's data was not poisoned."""
    path = (Path(run_dir) / PLANTED_DATA).with_suffix(_TRUTH_SUFFIX)
    return read_json(path) if path.exists() else None


def planted_hits(texts: Sequence[str], pattern: str) -> np.ndarray:
    """1.0 where the planted pattern (``KINDS[kind].pattern``, or the one recorded in the truth
    file) occurs in a text, else 0.0: the plant read out of generations without any SAE."""
    rx = re.compile(pattern, re.M)
    return np.asarray([bool(rx.search(t)) for t in texts], dtype=np.float64)
