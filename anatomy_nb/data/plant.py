"""Planting a known concept into a preference data set: the controlled-poisoning experiment.

A concept (bold markdown, a flattering opener, an emoji, a closing question, a fixed topic word)
is added to a seeded fraction of *chosen* responses. The audit should then find it, a plan can
suppress it, and evaluation can check whether plain DPO learned it and the interventions did not.
The planted pair ids are written next to the data, so ground truth never comes from the method
under test. ``benchmarks/planted.py`` uses the same kinds. ``poisoning_readout`` is stage 5's
read-out of the experiment against that ground truth (a regex on generations; no SAE involved).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..core.files import atomic_path, atomic_write_json, read_json
from ..core.stats import bootstrap_ci, implicit_margin, pair_correct, ratio_with_ci, wilson_interval
from .schema import PreferencePair

__all__ = ["KINDS", "PlantKind", "plant", "write_planted", "planted_truth", "planted_hits", "poisoning_readout", "PLANTED_DATA"]

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


def poisoning_readout(
    truth: dict,
    generations: Mapping[str, Sequence[str]],
    logps: Mapping[str, np.ndarray],
    pair_ids: Sequence[str],
    *,
    base: str = "base",
    reference: str = "plain",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The controlled-poisoning read-out, one row per model (``generations`` and ``logps`` keyed by
    model name, ``base`` the untrained model, ``reference`` plain DPO):

    - how often the planted pattern appears in its held-out generations (regex, ground truth), the
      change vs ``base``, and for each intervention the fraction of plain DPO's increase it removed;
    - the *on-target* preference on the held-out pairs that were not poisoned (``pair_ids``
      are the pairs ``logps`` score): accuracy with the fraction of plain DPO's gain (accuracy − 0.5)
      kept, and the mean implicit-reward margin (log-ratio to the base model, chosen − rejected, in
      nats) with the fraction of plain DPO's margin kept — a continuous measure that needs far
      fewer pairs than accuracy to tell a kept gain from a lost one.

    Fractions are NaN where plain DPO did not move the quantity the way they measure."""
    names = list(generations)
    hit = {n: planted_hits(generations[n], truth["pattern"]) for n in names}
    clean = ~np.isin(list(pair_ids), truth["planted_ids"])
    margin = {n: implicit_margin(logps[n][clean], logps[base][clean]) for n in names}
    correct = {n: pair_correct(m) for n, m in margin.items()}
    nan = float("nan")
    rows = []
    for n in names:
        k, m = float(hit[n].sum()), len(hit[n])
        lo, hi = wilson_interval(k, m, ci)
        d = hit[n] - hit[base]
        acc = float(correct[n].mean()) if len(correct[n]) else nan
        alo, ahi = wilson_interval(float(correct[n].sum()), len(correct[n]), ci)
        row = {"model": n, "kind": truth["kind"], "planted_rate": k / m if m else nan, "planted_rate_ci_low": lo, "planted_rate_ci_high": hi, "planted_delta": float(d.mean()) if m else nan, "fraction_removed": nan, "fraction_removed_ci_low": nan, "fraction_removed_ci_high": nan, "n_prompts": m, "clean_accuracy": acc, "clean_accuracy_ci_low": alo, "clean_accuracy_ci_high": ahi, "fraction_gain_kept": nan, "fraction_gain_kept_ci_low": nan, "fraction_gain_kept_ci_high": nan, "clean_margin": float(margin[n].mean()) if len(margin[n]) else nan, "clean_margin_ci_low": nan, "clean_margin_ci_high": nan, "fraction_margin_kept": nan, "fraction_margin_kept_ci_low": nan, "fraction_margin_kept_ci_high": nan, "n_clean_pairs": int(clean.sum())}
        if len(margin[n]) > 1 and n != base:
            row["clean_margin_ci_low"], row["clean_margin_ci_high"] = bootstrap_ci(margin[n], np.mean, n_boot, ci, seed)
        if n not in (base, reference) and reference in hit:
            dp = hit[reference] - hit[base]
            if dp.mean() > 0:  # a fraction of an increase: undefined when plain DPO did not raise it
                share, slo, shi = ratio_with_ci(d, dp, n_boot, ci, seed)
                row["fraction_removed"], row["fraction_removed_ci_low"], row["fraction_removed_ci_high"] = 1 - share, 1 - shi, 1 - slo
            gp = correct[reference] - 0.5
            if len(gp) and gp.mean() > 0:  # likewise: only when plain DPO gained something
                row["fraction_gain_kept"], row["fraction_gain_kept_ci_low"], row["fraction_gain_kept_ci_high"] = ratio_with_ci(correct[n] - 0.5, gp, n_boot, ci, seed)
            if len(margin[reference]) and margin[reference].mean() > 0:
                row["fraction_margin_kept"], row["fraction_margin_kept_ci_low"], row["fraction_margin_kept_ci_high"] = ratio_with_ci(margin[n], margin[reference], n_boot, ci, seed)
        rows.append(row)
    return pd.DataFrame(rows)
