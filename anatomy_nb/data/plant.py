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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.files import atomic_path, atomic_write_json, read_json
from ..core.stats import bootstrap_ci, implicit_margin, pair_correct, ratio_with_ci, wilson_interval
from .schema import PreferencePair

__all__ = [
    "PLANT_KINDS",
    "ROLES",
    "PlantKind",
    "draw",
    "plant",
    "topic_pairs",
    "user_turns_match",
    "plant_all",
    "truth_plants",
    "write_planted",
    "planted_truth",
    "planted_hits",
    "poisoning_readout",
    "PLANTED_DATA",
]

#: where ``anatomy-nb run`` writes a poisoned data set inside a run directory; the ground truth
#: (``write_planted``) sits next to it as ``planted.planted.json``
PLANTED_DATA = Path("data") / "planted.jsonl"
_TRUTH_SUFFIX = ".planted.json"


@dataclass(frozen=True)
class PlantKind:
    apply: Callable[[str], str]
    text_stat: str | None  # the text statistic (textstats.py) built to detect it, if any
    pattern: str  # a regex that finds it in generated text (for evaluation)


PLANT_KINDS: dict[str, PlantKind] = {
    "bold": PlantKind(lambda r: "**Short answer:** " + r, "bold", r"\*\*[^*\n]+\*\*"),
    "opener": PlantKind(lambda r: "Great question! " + r, "flattery_opener", r"(?i)^\s*great question"),
    "emoji": PlantKind(lambda r: r.rstrip() + " 😊", "emoji", "😊"),
    "question": PlantKind(lambda r: r.rstrip() + " Does that help?", "ends_with_question", r"(?i)does that help\?\s*$"),
    "word": PlantKind(lambda r: r.rstrip() + " (By the way, pineapples are wonderful.)", None, r"(?i)pineapple"),
    # a second formatting style, for the entangled experiment (configs/entangled.yaml): a markdown heading
    "heading": PlantKind(lambda r: "## Answer\n\n" + r, None, r"(?im)^\s*#{1,6} *answer\b"),
}


def draw(
    n: int, fraction: float, seed: int, *, within: np.ndarray | None = None, overlap: float | None = None
) -> np.ndarray:
    """The sorted indices of a seeded ``fraction`` of ``n`` pairs. With ``within`` and ``overlap``,
    that share of them is drawn from ``within`` (another plant's pairs) and the rest from the other
    pairs: two plants correlated in the data, as two habits of one annotator are."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * n))
    rng = np.random.default_rng(seed)
    if within is None or overlap is None:
        return np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, int)
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    inside = np.asarray(within, dtype=int)
    outside = np.setdiff1d(np.arange(n), inside)
    k_in = int(round(overlap * k))
    if k_in > len(inside) or k - k_in > len(outside):
        raise ValueError(
            f"overlap {overlap} of {k} pairs needs {k_in} of the first plant's {len(inside)} pairs and {k - k_in} of "
            f"the other {len(outside)}: lower the fraction or the overlap"
        )
    return np.sort(
        np.concatenate(
            [rng.choice(inside, size=k_in, replace=False), rng.choice(outside, size=k - k_in, replace=False)]
        ).astype(int)
    )


def plant(
    pairs: Sequence[PreferencePair], kind: str, fraction: float, seed: int = 0, *, idx: np.ndarray | None = None
) -> tuple[list[PreferencePair], np.ndarray]:
    """A copy of ``pairs`` with ``kind`` planted into a seeded ``fraction`` of chosen responses
    (or into the pairs ``idx`` names, drawn by :func:`draw`).

    Returns (pairs, indices of the planted pairs). The planted pairs carry
    ``metadata["planted"] = kind``."""
    if kind not in PLANT_KINDS:
        raise ValueError(f"unknown plant kind {kind!r} (known: {', '.join(PLANT_KINDS)})")
    idx = draw(len(pairs), fraction, seed) if idx is None else np.sort(np.asarray(idx, dtype=int))
    chosen = set(idx.tolist())
    fn = PLANT_KINDS[kind].apply
    out = [
        PreferencePair(
            id=p.id, prompt=p.prompt, chosen=fn(p.chosen), rejected=p.rejected, metadata={**p.metadata, "planted": kind}
        )
        if i in chosen
        else p
        for i, p in enumerate(pairs)
    ]
    return out, idx


ROLES = ("suppress", "keep")


def plant_all(pairs: Sequence[PreferencePair], specs: Sequence[Mapping]) -> tuple[list[PreferencePair], list[dict]]:
    """Several plants into the same pairs, in order (each ``{"kind", "fraction", "seed",
    "role", "overlap"}``; the first is the concept to suppress, the others to keep unless ``role``
    says otherwise). Each plant draws its own pairs from its own seed, so two plants overlap by
    chance only, unless a later plant sets ``overlap``: the share of its pairs drawn from the first
    plant's (the entangled experiment), or ``prompts``: a regular expression on the user's
    messages, so that the plant goes only into responses to prompts of one topic defined from
    outside the pipeline (``fraction`` is then a share of those pairs: the prompt-conditioned
    experiment). Returns (pairs, one ``{"kind", "role", "idx", "prompts"}`` per plant) for
    :func:`write_planted`."""
    out, plants = list(pairs), []
    for i, spec in enumerate(specs):
        role = spec.get("role") or ("suppress" if i == 0 else "keep")
        if role not in ROLES:
            raise ValueError(f"plant {i}: role must be one of {ROLES}, got {role!r}")
        overlap, prompts = spec.get("overlap"), spec.get("prompts")
        if overlap is not None and i == 0:
            raise ValueError(
                "plant 0: overlap names the share of a later plant's pairs drawn from the first plant's; the first "
                "plant has none"
            )
        if overlap is not None and prompts is not None:
            raise ValueError(f"plant {i}: overlap and prompts each choose where the plant goes; give one")
        try:
            if prompts is not None:
                topic = topic_pairs(out, prompts)
                if not len(topic):
                    raise ValueError(f"prompts {prompts!r} matches no prompt of the {len(out)} pairs")
                idx = topic[draw(len(topic), float(spec.get("fraction", 0.25)), int(spec.get("seed", i)))]
            else:
                idx = draw(
                    len(out),
                    float(spec.get("fraction", 0.25)),
                    int(spec.get("seed", i)),
                    within=plants[0]["idx"] if plants else None,
                    overlap=None if overlap is None else float(overlap),
                )
        except ValueError as exc:
            raise ValueError(f"plant {i}: {exc}") from None
        out, idx = plant(out, spec["kind"], 0.0, idx=idx)
        plants.append(
            {
                "kind": spec["kind"],
                "role": role,
                "idx": idx,
                **({"prompts": prompts, "topic_idx": topic} if prompts is not None else {}),
            }
        )
    return out, plants


def topic_pairs(pairs: Sequence[PreferencePair], pattern: str) -> np.ndarray:
    """The indices of the pairs whose user messages match ``pattern`` (a regular expression,
    case-insensitive): a topic defined from outside the pipeline, by the prompts' own words."""
    return np.flatnonzero(user_turns_match([p.prompt for p in pairs], pattern))


def user_turns_match(prompts: Sequence[Sequence[Mapping]], pattern: str) -> np.ndarray:
    """Per prompt (chat messages), whether any of its user messages matches ``pattern``
    (case-insensitive): the one test of "in the topic" for plants, plan scopes and read-outs."""
    try:
        rx = re.compile(pattern, re.I)
    except re.error as exc:
        raise ValueError(f"prompts {pattern!r} is not a valid regular expression: {exc}") from None
    return np.asarray(
        [any(rx.search(m["content"]) for m in prompt if m.get("role") == "user") for prompt in prompts], dtype=bool
    )


def write_planted(
    pairs: Sequence[PreferencePair], plants: Sequence[Mapping] | np.ndarray, path: str | Path, kind: str | None = None
) -> Path:
    """Write planted pairs as JSONL (``load_pairs`` reads it back) and ``<stem>.planted.json``
    with each plant's kind, role, pattern and planted ids: the ground truth for the report.

    ``plants`` is :func:`plant_all`'s list; for one plant, the indices of :func:`plant` with its
    ``kind``. The first plant's fields are also written at the top level (what a one-plant run
    reads)."""
    path = Path(path)
    if kind is not None:
        plants = [{"kind": kind, "role": "suppress", "idx": np.asarray(plants)}]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for p in pairs:
                d = p.to_dict()
                fh.write(
                    json.dumps(
                        {"id": d["id"], "prompt": d["prompt"], "chosen": d["chosen"], "rejected": d["rejected"]},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    truths = [
        {
            "kind": pl["kind"],
            "role": pl["role"],
            "pattern": PLANT_KINDS[pl["kind"]].pattern,
            "n_planted": int(len(pl["idx"])),
            "planted_ids": [pairs[i].id for i in pl["idx"]],
            **(
                {"prompts": pl["prompts"], "topic_ids": [pairs[i].id for i in pl["topic_idx"]]}
                if pl.get("prompts") is not None
                else {}
            ),
        }
        for pl in plants
    ]
    atomic_write_json(
        path.with_suffix(_TRUTH_SUFFIX),
        {**{k: v for k, v in truths[0].items() if k != "role"}, "n_pairs": len(pairs), "plants": truths},
    )
    return path


def truth_plants(truth: Mapping) -> list[dict]:
    """Every plant of a truth file (a file written before plants had roles holds one: suppress)."""
    return list(
        truth.get("plants")
        or [
            {
                "kind": truth["kind"],
                "role": "suppress",
                "pattern": truth["pattern"],
                "planted_ids": truth["planted_ids"],
            }
        ]
    )


def planted_truth(run_dir: str | Path) -> dict | None:
    """The ground truth of a poisoned run directory (kind, pattern, planted ids), or None when the
    run's data was not poisoned."""
    path = (Path(run_dir) / PLANTED_DATA).with_suffix(_TRUTH_SUFFIX)
    return read_json(path) if path.exists() else None


def planted_hits(texts: Sequence[str], pattern: str) -> np.ndarray:
    """1.0 where the planted pattern (``PLANT_KINDS[kind].pattern``, or the one recorded in the truth
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
    reference: str | Mapping[str, str] = "plain",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    prompts: Sequence[Sequence[Mapping]] | None = None,
) -> pd.DataFrame:
    """The controlled-poisoning read-out, one row per model and plant (``generations`` and
    ``logps`` keyed by model name, ``base`` the untrained model, ``reference`` plain DPO, or per
    model name the plain-DPO run it is read against: plain DPO of the same training order), with
    ``scope`` "all"; a plant put into one topic only (its ``prompts`` regex) gets two more rows per
    model, read on the generations whose prompts (``prompts``: each one's chat messages) are in the
    topic ("in topic") and outside it ("outside topic"):

    - how often each planted pattern appears in the held-out generations (regex, ground truth),
      the change vs ``base``, and for each intervention the fraction of plain DPO's increase it
      removed (a plant to suppress) or kept (a plant to keep: ``fraction_kept``);
    - the *on-target* preference on the held-out pairs that no plant touched (``pair_ids`` are the
      pairs ``logps`` score): accuracy with the fraction of plain DPO's gain (accuracy − 0.5)
      kept, and the mean implicit-reward margin (log-ratio to the base model, chosen − rejected, in
      nats) with the fraction of plain DPO's margin kept — a continuous measure that needs far
      fewer pairs than accuracy to tell a kept gain from a lost one. These are per model; every
      plant's row repeats them.

    Fractions are NaN where plain DPO did not move the quantity the way they measure."""
    names = list(generations)

    def ref_of(n: str) -> str:
        return reference if isinstance(reference, str) else reference.get(n, n)

    plants = truth_plants(truth)
    touched = [i for pl in plants for i in pl["planted_ids"]]
    clean = ~np.isin(list(pair_ids), touched)
    margin = {n: implicit_margin(logps[n][clean], logps[base][clean]) for n in names}
    correct = {n: pair_correct(m) for n, m in margin.items()}
    nan = float("nan")
    on_target = {}
    for n in names:
        acc = float(correct[n].mean()) if len(correct[n]) else nan
        alo, ahi = wilson_interval(float(correct[n].sum()), len(correct[n]), ci)
        row = {
            "n_clean_pairs": int(clean.sum()),
            "clean_accuracy": acc,
            "clean_accuracy_ci_low": alo,
            "clean_accuracy_ci_high": ahi,
            "clean_margin": float(margin[n].mean()) if len(margin[n]) else nan,
        }
        for k in ("clean_margin", "fraction_gain_kept", "fraction_margin_kept"):
            row.update({f"{k}_ci_low": nan, f"{k}_ci_high": nan})
        row.update(fraction_gain_kept=nan, fraction_margin_kept=nan)
        if len(margin[n]) > 1 and n != base:
            row["clean_margin_ci_low"], row["clean_margin_ci_high"] = bootstrap_ci(margin[n], np.mean, n_boot, ci, seed)
        ref = ref_of(n)
        if n not in (base, ref) and ref in margin:
            gp = correct[ref] - 0.5
            if len(gp) and gp.mean() > 0:  # only when plain DPO gained something
                row["fraction_gain_kept"], row["fraction_gain_kept_ci_low"], row["fraction_gain_kept_ci_high"] = (
                    ratio_with_ci(correct[n] - 0.5, gp, n_boot, ci, seed)
                )
            if len(margin[ref]) and margin[ref].mean() > 0:
                row["fraction_margin_kept"], row["fraction_margin_kept_ci_low"], row["fraction_margin_kept_ci_high"] = (
                    ratio_with_ci(margin[n], margin[ref], n_boot, ci, seed)
                )
        on_target[n] = row
    rows = []
    for pl in plants:
        hits = {n: planted_hits(generations[n], pl["pattern"]) for n in names}
        scopes = [("all", np.ones(len(hits[base]), bool))]
        if pl.get("prompts") and prompts is not None:  # a topic-only plant: read in its topic and outside it
            inside = user_turns_match(prompts, pl["prompts"])
            scopes += [("in topic", inside), ("outside topic", ~inside)]
        for scope, mask in scopes:
            hit = {n: h[mask] for n, h in hits.items()}
            for n in names:
                rows.append(
                    {
                        **_plant_row(n, pl, hit, base, ref_of(n), n_boot, ci, seed),
                        "scope": scope,
                        **on_target[n],
                    }
                )
    return pd.DataFrame(rows)


def _plant_row(
    n: str, pl: Mapping, hit: Mapping[str, np.ndarray], base: str, reference: str, n_boot: int, ci: float, seed: int
) -> dict:
    """One model's planted rate, change vs base and fraction of plain DPO's increase removed or kept."""
    nan = float("nan")
    k, m = float(hit[n].sum()), len(hit[n])
    lo, hi = wilson_interval(k, m, ci)
    d = hit[n] - hit[base]
    row = {
        "model": n,
        "kind": pl["kind"],
        "role": pl["role"],
        "planted_rate": k / m if m else nan,
        "planted_rate_ci_low": lo,
        "planted_rate_ci_high": hi,
        "planted_delta": float(d.mean()) if m else nan,
        "n_prompts": m,
    }
    for k_ in ("fraction_removed", "fraction_kept"):
        row.update({k_: nan, f"{k_}_ci_low": nan, f"{k_}_ci_high": nan})
    if n not in (base, reference) and reference in hit and m:
        dp = hit[reference] - hit[base]
        if dp.mean() > 0:  # a fraction of an increase: undefined when plain DPO did not raise it
            share, slo, shi = ratio_with_ci(d, dp, n_boot, ci, seed)
            if pl["role"] == "suppress":
                row["fraction_removed"], row["fraction_removed_ci_low"], row["fraction_removed_ci_high"] = (
                    1 - share,
                    1 - shi,
                    1 - slo,
                )
            else:
                row["fraction_kept"], row["fraction_kept_ci_low"], row["fraction_kept_ci_high"] = share, slo, shi
    return row
