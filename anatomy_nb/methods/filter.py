"""Filtering: drop (or, ``filter_mode: flip``, relabel) the training pairs whose preference the
concept carries — suppress: s(y⁺) − s(y⁻) ≥ strength; amplify: s(y⁻) − s(y⁺) ≥ strength. Its
prediction is exact: the signal is recomputed without those pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .base import Method, register


@register
class Filter(Method):
    name = "filter"
    default_strength = 0.5
    strength_range = (0.0, 1.0, False)
    scored = True
    variants = {"filter_drop": {"filter_mode": "drop"}, "filter_flip": {"filter_mode": "flip"}}

    def check(self, choice: Any) -> tuple[str, str] | None:
        if choice.filter_mode not in ("drop", "flip"):
            return "filter_mode", f"{choice.filter_mode!r} is not 'drop' or 'flip'"
        return None

    def select_pairs(
        self, pairs: list, entries: Sequence[Any], scores: Mapping[str, np.ndarray]
    ) -> tuple[list, np.ndarray, list[dict]]:
        """Entries apply in plan order; a pair dropped by one is not counted by the next."""
        keep = np.ones(len(pairs), dtype=bool)
        flipped = np.zeros(len(pairs), dtype=bool)
        rows = []
        for r in entries:
            c = r.choice
            s = np.asarray(scores[r.ref])
            diff = (s[:, 0] - s[:, 1]) * c.sign
            # a flipped pair's chosen is its old rejected: its preference now points the other way
            diff = np.where(flipped, -diff, diff)
            hit = keep & (diff >= c.strength - 1e-12)
            if c.filter_mode == "flip":
                flipped ^= hit
            else:
                keep &= ~hit
            n_hit = int(hit.sum())
            rows.append(
                {
                    "concept": r.ref,
                    "label": c.label,
                    "action": c.action,
                    "mode": c.filter_mode,
                    "threshold": c.strength,
                    "n_pairs": len(pairs),
                    "n_matched": n_hit,
                    "n_dropped": n_hit if c.filter_mode == "drop" else 0,
                    "n_flipped": n_hit if c.filter_mode == "flip" else 0,
                }
            )
        out, index = [], []
        for i, p in enumerate(pairs):
            if not keep[i]:
                continue
            if flipped[i]:
                p = replace(p, chosen=p.rejected, rejected=p.chosen, metadata={**dict(p.metadata), "flipped": True})
            out.append(p)
            index.append(i)
        return out, np.asarray(index, dtype=np.int64), rows

    def carried(self, choice: Any, difference: np.ndarray) -> np.ndarray:
        return choice.sign * difference >= choice.strength

    def flips(self, choice: Any) -> bool:
        return choice.filter_mode == "flip"
