"""Stage 5: did the audit predict what DPO changed, and better than simpler predictors?

``predicted_vs_actual`` sets stage 2's predicted change of every concept (overall and per topic)
against the change of its activity on each model's generations (paired over prompts, vs the base
model) and scores the fit (``core.stats.prediction_scores``: R² with its interval, Spearman, sign
agreement, R² without the top 1 / 3 / 10 concepts by |predicted|).

``predictor_table`` asks whether that beats simpler predictors. For every trained model, on the
concepts and actual changes of the overall fit (the rows ``in_fit``), each predictor of
``concepts.predictors`` is scored the same way and compared with the audit by a paired bootstrap
of ΔR² = R²(audit) − R²(predictor) over the same resampled concepts (``core.stats.delta_r2``).
The last row is the ceiling: the split-half reliability of the audit (halves of the preference
data's prompts) times that of the measured change (halves of the evaluated prompts), each
Spearman–Brown corrected: the R² a predictor would reach if it knew each concept's true change,
through the sampling noise of both sides.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..concepts.activity import PairFeatures, concept_activity
from ..concepts.predictors import PREDICTORS, concept_predictions, split_half_reliability
from ..config import EvalConfig
from ..core.stats import LEAVE_OUT, bh_qvalues, delta_r2, group_means, paired_test, prediction_scores
from ..data.textstats import text_stats
from ..results.evaluate import BASE, CEILING, PREDICTOR_COLUMNS
from ..results.train import active_entries
from .readouts import R2_COLUMNS, targeted_concepts

__all__ = ["PREDICTION_COLUMNS", "SPLIT_HALF_DRAWS", "predicted_vs_actual", "predictor_inputs", "predictor_table"]

#: random half/half splits behind the ceiling row (its interval is their spread)
SPLIT_HALF_DRAWS = 50
#: the r2 table's columns: ``r2_with_ci``'s, Spearman and the leave-top-k-out R²
PREDICTION_COLUMNS = [*R2_COLUMNS, "spearman", *(f"r2_without_top{k}" for k in LEAVE_OUT)]


def predicted_vs_actual(
    hyps, store, heldout, prompts, activity, manifests, cfg: EvalConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = hyps.table
    n_concepts = next(iter(activity.values())).shape[1]
    # topic of each evaluated prompt: its prompt group in the store → the topic of that group
    row_of = store.pair_index()
    groups = store.prompt_groups()
    topic_of_group = dict(zip(hyps.topics["prompt_group"].to_numpy(), hyps.topics["topic"].to_numpy()))
    prompt_topic = np.asarray([topic_of_group.get(int(groups[row_of[pid]]), -1) for pid, _ in prompts])
    base = activity[BASE]
    rows, r2_rows = [], []
    for name, act in activity.items():
        if name == BASE:
            continue
        targeted = targeted_concepts(active_entries(manifests[name]))
        D = act - base  # prompts × concepts, paired
        for view in ("overall", "topic"):
            sub = table[table["view"] == view]
            if sub.empty:
                continue
            if view == "overall":
                t = paired_test(D)
                actual = pd.DataFrame(
                    {
                        "concept": np.arange(n_concepts),
                        "actual_change": D.mean(0),
                        "base_activity": base.mean(0),
                        "model_activity": act.mean(0),
                        "n_prompts": len(D),
                        "actual_p": t.p,
                    }
                )
                df = sub.merge(actual, on="concept", how="left")
            else:
                parts = []
                for k in sorted(set(sub["topic"].astype(int))):
                    inside = prompt_topic == k
                    if inside.sum() < cfg.min_topic_prompts:
                        continue
                    t = paired_test(D[inside])
                    parts.append(
                        pd.DataFrame(
                            {
                                "topic": k,
                                "concept": np.arange(n_concepts),
                                "actual_change": D[inside].mean(0),
                                "base_activity": base[inside].mean(0),
                                "model_activity": act[inside].mean(0),
                                "n_prompts": int(inside.sum()),
                                "actual_p": t.p,
                            }
                        )
                    )
                if not parts:
                    continue
                df = sub.merge(pd.concat(parts, ignore_index=True), on=["topic", "concept"], how="inner")
            df = df.dropna(subset=["actual_change"])
            df["actual_q"] = bh_qvalues(df["actual_p"].to_numpy()) if len(df) else []
            raw_pred = df["inside_mean_diff"] if view == "topic" and "inside_mean_diff" in df else df["mean_diff"]
            if cfg.concepts == "significant":
                df["predicted"] = df["predicted_change"]
                df["in_fit"] = df["significant"].astype(bool)
            else:
                df["predicted"] = raw_pred
                df["in_fit"] = True
            df["targeted"] = df["concept"].astype(int).isin(targeted)
            keep = [
                "view",
                "topic",
                "concept",
                "label",
                "rank",
                "n_features",
                "significant",
                "predicted_direction",
                "predicted_change",
                "mean_diff",
                "predicted",
                "actual_change",
                "base_activity",
                "model_activity",
                "n_prompts",
                "actual_p",
                "actual_q",
                "targeted",
                "in_fit",
            ]
            df = df[[c for c in keep if c in df]].copy()
            df.insert(0, "model", name)
            rows.append(df)
            fit = df[df["in_fit"]]
            r = prediction_scores(
                fit["predicted"].to_numpy(), fit["actual_change"].to_numpy(), cfg.n_boot, cfg.ci, cfg.seed
            )
            r2_rows.append({"model": name, "view": view, **r})
    pva = (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(
            columns=[
                "model",
                "view",
                "topic",
                "concept",
                "predicted",
                "actual_change",
                "actual_p",
                "actual_q",
                "targeted",
                "in_fit",
            ]
        )
    )
    return pva, pd.DataFrame(r2_rows, columns=["model", "view", *PREDICTION_COLUMNS])


def predictor_inputs(hyps, store, concepts: np.ndarray, cfg: EvalConfig) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Every predictor's value for ``concepts`` (a row each, in that order), the audit's split-half
    reliabilities (one per split) and the linear classifier's fit info, from the preference data
    alone: the feature store and the stage-2 clustering."""
    concepts = np.asarray(concepts, dtype=int)
    pf = PairFeatures.from_store(store)
    labels = hyps.feature_labels(store.d_sae)
    hcfg = hyps.manifest.get("config", {})
    groups = pf.groups if hcfg.get("group_by_prompt", True) else None
    Uc_all, Ur_all = concept_activity(pf, labels, dense=False)
    Uc, Ur = Uc_all[:, concepts].toarray(), Ur_all[:, concepts].toarray()
    overall = hyps.table[(hyps.table["view"] == "overall")].set_index("concept")
    members = [list(overall.at[c, "features"]) if c in overall.index else [] for c in concepts]
    table, info = concept_predictions(
        Uc,
        Ur,
        pf.ntok,
        text_stats(pf.chosen),
        text_stats(pf.rejected),
        pf.fires_chosen,
        pf.fires_rejected,
        members,
        groups,
        int(hcfg.get("length_control_degree", 2)),
        cfg.seed,
    )
    table["concept"] = concepts
    reliability = split_half_reliability(
        np.asarray(group_means(Uc - Ur, groups)), n_splits=SPLIT_HALF_DRAWS, seed=cfg.seed
    )
    return table, reliability, info


def predictor_table(
    pva: pd.DataFrame,
    predictions: pd.DataFrame,
    reliability: np.ndarray,
    activity: Mapping[str, np.ndarray],
    cfg: EvalConfig,
) -> pd.DataFrame:
    """Per trained model: a row per predictor (``PREDICTORS``) with its prediction scores and ΔR²
    against the audit, then the ceiling row (``CEILING``)."""
    by_concept = predictions.set_index("concept")
    rows = []
    for name in activity:
        if name == BASE:
            continue
        fit = pva[(pva["model"] == name) & (pva["view"] == "overall") & pva["in_fit"].astype(bool)]
        fit = fit[fit["concept"].isin(by_concept.index)]
        concepts = fit["concept"].to_numpy(dtype=int)
        actual = fit["actual_change"].to_numpy(dtype=np.float64)
        audit = fit["predicted"].to_numpy(dtype=np.float64)
        for predictor in PREDICTORS:
            pred = audit if predictor == "audit" else by_concept.loc[concepts, predictor].to_numpy(dtype=np.float64)
            scores = prediction_scores(pred, actual, cfg.n_boot, cfg.ci, cfg.seed)
            d, lo, hi = (
                delta_r2(audit, pred, actual, cfg.n_boot, cfg.ci, cfg.seed)
                if predictor != "audit"
                else (np.nan, np.nan, np.nan)
            )
            rows.append(
                {
                    "model": name,
                    "predictor": predictor,
                    **scores,
                    "delta_r2": d,
                    "delta_ci_low": lo,
                    "delta_ci_high": hi,
                }
            )
        D = activity[name][:, concepts] - activity[BASE][:, concepts]
        measured = split_half_reliability(D, n_splits=len(reliability), seed=cfg.seed)
        product = reliability * measured
        a = (1 - cfg.ci) / 2
        finite = product[np.isfinite(product)]
        rows.append(
            {
                "model": name,
                "predictor": CEILING,
                "n_concepts": int(len(concepts)),
                "r2": float(np.median(finite)) if len(finite) else np.nan,
                "ci_low": float(np.quantile(finite, a)) if len(finite) else np.nan,
                "ci_high": float(np.quantile(finite, 1 - a)) if len(finite) else np.nan,
                "reliability_predicted": float(np.nanmedian(reliability)) if np.isfinite(reliability).any() else np.nan,
                "reliability_measured": float(np.nanmedian(measured)) if np.isfinite(measured).any() else np.nan,
            }
        )
    return pd.DataFrame(rows).reindex(columns=PREDICTOR_COLUMNS)
