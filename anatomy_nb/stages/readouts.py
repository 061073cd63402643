"""Stage 5's tables, computed from what the evaluation measured (no model calls here): predicted
vs actual concept change and its R², held-out preference accuracy, the targeted concepts'
change and the fraction of plain DPO's change each intervention removed, and the long comparison
table with every behaviour metric and its interval."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..concepts.sources import SAEConcept, TextConcept
from ..config import EvalConfig
from ..core.stats import (
    bh_qvalues,
    bootstrap_ci,
    implicit_margin,
    pair_correct,
    paired_test,
    r2_with_ci,
    ratio_with_ci,
    wilson_interval,
)
from ..data.textstats import text_stats
from ..results.evaluate import BASE
from ..results.plan import parse_concept, sae_concept_id
from ..results.train import PLAIN, active_entries, order_of, plain_reference
from .prediction import ConceptSpace

__all__ = [
    "FORMAT_STATS",
    "comparison_table",
    "concept_scores",
    "plan_vs_actual",
    "preference_table",
    "targets_table",
]

log = logging.getLogger(__name__)
FORMAT_STATS = ("bold", "headers", "list_items", "emoji", "words")


# core.stats.r2_with_ci
R2_COLUMNS = ["n_concepts", "r2", "ci_low", "ci_high", "pearson_r", "slope", "intercept", "sign_agreement"]


def targeted_concepts(entries: Sequence[dict]) -> set[int]:
    """The stage-2 concept ids a training run's active plan entries act on."""
    return {cid for e in entries if (cid := sae_concept_id(e["concept"])) is not None}


PLAN_COLUMNS = [
    "model",
    "concept",
    "label",
    "significant",
    "targeted",
    "basis",
    "predicted_shift",
    "actual_shift",
    "actual_p",
    "actual_q",
]
PLAN_R2_COLUMNS = ["model", "concepts", *R2_COLUMNS]


def plan_vs_actual(
    space: ConceptSpace, activity: Mapping[str, np.ndarray], manifests: Mapping[str, dict], cfg: EvalConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 3's prediction of what each intervention changes relative to plain DPO — every
    concept's shift under its plan (``ConceptSpace.predict``: after − before, spill-over onto
    correlated concepts included) — against the shift measured in the held-out generations
    (intervention − plain DPO, paired by prompt, BH over concepts).

    R² and sign agreement per model over the concepts stage 2 found significant, once for all of
    them and once without the targeted ones (``concepts = "spill-over"``): whether the plan said,
    before training, which other concepts the intervention would drag along."""
    if PLAIN not in activity:
        return pd.DataFrame(columns=PLAN_COLUMNS), pd.DataFrame(columns=PLAN_R2_COLUMNS)
    rows, r2_rows = [], []
    for name, act in activity.items():
        reference = plain_reference(name)
        if name in (BASE, reference) or order_of(name)[0] == PLAIN or reference not in activity:
            continue
        entries = active_entries(manifests[name])
        table, _ = space.predict({"concepts": entries})
        ids = table["concept"].to_numpy().astype(int)
        D = (act - activity[reference])[:, ids]
        t = paired_test(D)
        targeted = targeted_concepts(entries)
        df = pd.DataFrame(
            {
                "model": name,
                "concept": ids,
                "label": table["label"].to_numpy(),
                "significant": table["significant"].astype(bool).to_numpy(),
                "targeted": [int(c) in targeted for c in ids],
                "basis": table["basis"].to_numpy(),
                "predicted_shift": (table["after"] - table["before"]).to_numpy(),
                "actual_shift": D.mean(0),
                "actual_p": t.p,
            }
        )
        df["actual_q"] = bh_qvalues(np.nan_to_num(df["actual_p"].to_numpy(), nan=1.0))
        rows.append(df)
        for which, mask in (("significant", df["significant"]), ("spill-over", df["significant"] & ~df["targeted"])):
            fit = df[mask]
            r2_rows.append(
                {
                    "model": name,
                    "concepts": which,
                    **r2_with_ci(
                        fit["predicted_shift"].to_numpy(), fit["actual_shift"].to_numpy(), cfg.n_boot, cfg.ci, cfg.seed
                    ),
                }
            )
    pva = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=PLAN_COLUMNS)
    return pva[PLAN_COLUMNS], pd.DataFrame(r2_rows, columns=PLAN_R2_COLUMNS)


def preference_table(logps: Mapping[str, np.ndarray], manifests: Mapping[str, dict], cfg: EvalConfig) -> pd.DataFrame:
    base = logps[BASE]
    rows = []
    for name, lp in logps.items():
        n = len(lp)
        beta = float(manifests[name]["config"]["beta"]) if name != BASE else float("nan")
        margin = implicit_margin(lp, base)  # zero for the base model itself
        k = float(pair_correct(margin).sum())
        acc = k / n if n else float("nan")
        lo, hi = wilson_interval(k, n, cfg.ci)
        lacc = float((lp[:, 0] > lp[:, 1]).mean()) if n else float("nan")
        llo, lhi = wilson_interval(float((lp[:, 0] > lp[:, 1]).sum()), n, cfg.ci)
        rows.append(
            {
                "model": name,
                "n_pairs": n,
                "accuracy": acc,
                "ci_low": lo,
                "ci_high": hi,
                "mean_margin": float(np.mean(margin) * (beta if np.isfinite(beta) else 1.0)) if n else float("nan"),
                "beta": beta,
                "logp_accuracy": lacc,
                "logp_ci_low": llo,
                "logp_ci_high": lhi,
            }
        )
    return pd.DataFrame(rows)


def concept_scores(entry: dict, fires: np.ndarray, texts: Sequence[str]) -> np.ndarray | None:
    """s_c of generations for a plan entry, through its concept source: sae → the fraction of its
    features firing (from the firing already computed), text → the pattern or statistic (unscaled);
    direction concepts are not scored here (None)."""
    kind = parse_concept(entry["concept"])[0]
    if kind == "sae" and entry.get("features"):
        return SAEConcept(entry["concept"], entry["features"]).from_firing(fires)
    if kind == "text" and entry.get("pattern"):
        return TextConcept(entry["concept"], entry["pattern"]).score_texts([], texts)
    return None


def targets_table(names, manifests, fires, gens, cfg: EvalConfig) -> pd.DataFrame:
    entries: dict[str, dict] = {}
    for n in names[1:]:
        for c in active_entries(manifests[n]):
            entries.setdefault(c["concept"], c)
    cols = [
        "model",
        "concept",
        "label",
        "method",
        "action",
        "base_activity",
        "model_activity",
        "delta",
        "delta_ci_low",
        "delta_ci_high",
        "p",
        "plain_delta",
        "fraction_removed",
        "fraction_removed_ci_low",
        "fraction_removed_ci_high",
        "n_prompts",
    ]
    rows = []
    for cid, entry in entries.items():
        s = {n: concept_scores(entry, fires[n], gens[n]["heldout"]) for n in names}
        if s[BASE] is None:
            log.warning("concept %s (kind %s) is not scored on generations", cid, parse_concept(cid)[0])
            continue
        for n in names:
            plan_entry = (
                next((c for c in active_entries(manifests[n]) if c["concept"] == cid), None) if n != BASE else None
            )
            d = s[n] - s[BASE]
            lo, hi = bootstrap_ci(d, n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)
            row = {
                "model": n,
                "concept": cid,
                "label": entry.get("label", ""),
                "method": plan_entry["method"] if plan_entry else "",
                "action": plan_entry["action"] if plan_entry else "",
                "base_activity": float(s[BASE].mean()),
                "model_activity": float(s[n].mean()),
                "delta": float(d.mean()),
                "delta_ci_low": lo,
                "delta_ci_high": hi,
                "p": float(paired_test(d[:, None]).p[0]),
                "plain_delta": float("nan"),
                "fraction_removed": float("nan"),
                "fraction_removed_ci_low": float("nan"),
                "fraction_removed_ci_high": float("nan"),
                "n_prompts": len(d),
            }
            reference = plain_reference(n)
            if reference in s and n not in (BASE, reference) and order_of(n)[0] != PLAIN:
                dp = s[reference] - s[BASE]
                row["plain_delta"] = float(dp.mean())
                # a fraction of plain DPO's change in the plan's direction; undefined when plain DPO
                # did not move the concept that way (1 − Δ/Δ_plain of a fall is not "removed")
                want_up = plan_entry is None or plan_entry["action"] != "amplify"
                if (dp.mean() > 0) if want_up else (dp.mean() < 0):
                    share, slo, shi = ratio_with_ci(d, dp, cfg.n_boot, cfg.ci, cfg.seed)
                    row["fraction_removed"], row["fraction_removed_ci_low"], row["fraction_removed_ci_high"] = (
                        1 - share,
                        1 - shi,
                        1 - slo,
                    )
            elif order_of(n)[0] == PLAIN:
                row["plain_delta"] = row["delta"]
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def comparison_table(
    names,
    pref,
    targets,
    r2_rows,
    gens,
    ab,
    ab_sets,
    cfg: EvalConfig,
    poison: pd.DataFrame | None = None,
    refusals: dict | None = None,
    judge_name: str = "",
) -> pd.DataFrame:
    """Every one-number-per-model result as a long table. ``refusals``: model → behaviour set →
    the judge's refusal flags per generation; its rows carry the judge's name."""
    refusals = refusals or {}
    rows = []

    def add(model, group, metric, value, lo, hi, n, interval, judge=""):
        rows.append(
            {
                "model": model,
                "group": group,
                "metric": metric,
                "value": float(value),
                "ci_low": float(lo),
                "ci_high": float(hi),
                "n": int(n),
                "interval": interval,
                "judge": judge,
            }
        )

    for r in pref.itertuples():
        add(r.model, "preference", "held-out preference accuracy", r.accuracy, r.ci_low, r.ci_high, r.n_pairs, "wilson")
    for r in targets.itertuples():
        add(
            r.model,
            "target",
            f"Δ activity {r.concept}",
            r.delta,
            r.delta_ci_low,
            r.delta_ci_high,
            r.n_prompts,
            "bootstrap",
        )
        if np.isfinite(r.fraction_removed):
            add(
                r.model,
                "target",
                f"fraction of plain-DPO increase removed {r.concept}",
                r.fraction_removed,
                r.fraction_removed_ci_low,
                r.fraction_removed_ci_high,
                r.n_prompts,
                "bootstrap",
            )
    kinds = list(dict.fromkeys(poison["kind"])) if poison is not None else []
    first_kind, several = (kinds[0] if kinds else None), len(kinds) > 1
    for r in poison.itertuples() if poison is not None else ():
        role = getattr(r, "role", "suppress")
        scope = getattr(r, "scope", "all")
        where = "" if scope == "all" else f", {scope}"
        add(
            r.model,
            "poisoning",
            f"planted {r.kind} in generations" + (" (to keep)" if role == "keep" else "") + where,
            r.planted_rate,
            r.planted_rate_ci_low,
            r.planted_rate_ci_high,
            r.n_prompts,
            "wilson",
        )
        if np.isfinite(r.fraction_removed):
            add(
                r.model,
                "poisoning",
                "fraction of plain-DPO planted increase removed" + (f" ({r.kind})" if several else "") + where,
                r.fraction_removed,
                r.fraction_removed_ci_low,
                r.fraction_removed_ci_high,
                r.n_prompts,
                "bootstrap",
            )
        if np.isfinite(getattr(r, "fraction_kept", np.nan)):
            add(
                r.model,
                "poisoning",
                f"fraction of plain-DPO planted increase kept ({r.kind})" + where,
                r.fraction_kept,
                r.fraction_kept_ci_low,
                r.fraction_kept_ci_high,
                r.n_prompts,
                "bootstrap",
            )
        if r.kind != first_kind or scope != "all":
            continue  # the on-target rows are per model: once
        add(
            r.model,
            "poisoning",
            "held-out preference accuracy, unpoisoned pairs",
            r.clean_accuracy,
            r.clean_accuracy_ci_low,
            r.clean_accuracy_ci_high,
            r.n_clean_pairs,
            "wilson",
        )
        if np.isfinite(r.fraction_gain_kept):
            add(
                r.model,
                "poisoning",
                "fraction of plain-DPO on-target gain kept",
                r.fraction_gain_kept,
                r.fraction_gain_kept_ci_low,
                r.fraction_gain_kept_ci_high,
                r.n_clean_pairs,
                "bootstrap",
            )
        if r.model != BASE:
            add(
                r.model,
                "poisoning",
                "implicit-reward margin, unpoisoned pairs (nats)",
                r.clean_margin,
                r.clean_margin_ci_low,
                r.clean_margin_ci_high,
                r.n_clean_pairs,
                "bootstrap",
            )
        if np.isfinite(r.fraction_margin_kept):
            add(
                r.model,
                "poisoning",
                "fraction of plain-DPO on-target margin kept",
                r.fraction_margin_kept,
                r.fraction_margin_kept_ci_low,
                r.fraction_margin_kept_ci_high,
                r.n_clean_pairs,
                "bootstrap",
            )
    for r in r2_rows.itertuples():
        add(
            r.model,
            "predicted vs actual",
            f"R² ({r.view})",
            r.r2,
            r.ci_low,
            r.ci_high,
            r.n_concepts,
            "bootstrap (concepts)",
        )
    for n in names:
        texts = gens[n]["heldout"]
        st = text_stats(texts)
        st["words"] = [len(t.split()) for t in texts]
        for stat in FORMAT_STATS:
            v = st[stat].to_numpy(dtype=np.float64)
            lo, hi = bootstrap_ci(v, n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)
            add(n, "formatting", stat, v.mean(), lo, hi, len(v), "bootstrap")
        for s, items in ab_sets.items():
            p = ab[n][s]
            pm = np.where(np.asarray([it["matching"] for it in items]) == 0, p, 1 - p)  # P(matching answer)
            lo, hi = bootstrap_ci(pm, n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)
            add(
                n,
                "sycophancy" if "syco" in s else "persona",
                f"{s}: P(matching answer)",
                pm.mean(),
                lo,
                hi,
                len(pm),
                "bootstrap",
            )
        for s, metric in (
            ("harmful", "refusal rate, harmful prompts"),
            ("xstest_safe", "over-refusal rate, XSTest safe prompts"),
        ):
            if s in refusals.get(n, {}):
                ref = refusals[n][s]
                lo, hi = wilson_interval(int(np.sum(ref)), len(ref), cfg.ci)
                add(n, "refusal", metric, np.mean(ref) if len(ref) else np.nan, lo, hi, len(ref), "wilson", judge_name)
    return pd.DataFrame(
        rows, columns=["model", "group", "metric", "value", "ci_low", "ci_high", "n", "interval", "judge"]
    )
