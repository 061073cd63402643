"""Stage 2's baselines beside the concepts: the paired test of every text statistic (bold, lists,
questions, …) and an L1-logistic classifier of chosen vs rejected on SAE feature differences — what a
simpler audit would have found, shown next to the concepts (``hypothesize``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from ..concepts.activity import PairFeatures
from ..config import HypothesizeConfig
from ..core.stats import bh_qvalues, group_means, paired_test

__all__ = ["linear_baseline", "stat_columns", "text_stat_baseline"]


def stat_columns(prefix: str, t) -> dict[str, np.ndarray]:
    """A paired test's columns (mean difference, Cohen's d, t, p), each name prefixed."""
    return {f"{prefix}mean_diff": t.mean, f"{prefix}cohens_d": t.cohens_d, f"{prefix}t": t.t, f"{prefix}p": t.p}


def text_stat_baseline(
    pf: PairFeatures, cfg: HypothesizeConfig, stats_c: pd.DataFrame, stats_r: pd.DataFrame
) -> pd.DataFrame:
    D = stats_c.to_numpy(np.float64) - stats_r.to_numpy(np.float64)
    Du = group_means(D, pf.groups if cfg.group_by_prompt else None)
    t = paired_test(Du)
    out = pd.DataFrame(
        {
            "statistic": list(stats_c.columns),
            "chosen_mean": stats_c.mean().to_numpy(),
            "rejected_mean": stats_r.mean().to_numpy(),
            **stat_columns("", t),
        }
    )
    out["q"] = bh_qvalues(out["p"].to_numpy())
    return out.sort_values("p").reset_index(drop=True)


def linear_baseline(
    pf: PairFeatures, labels: np.ndarray, cfg: HypothesizeConfig, top: int = 30
) -> tuple[pd.DataFrame, dict]:
    """L1-logistic regression predicting which side is chosen from per-pair feature differences.

    Each pair enters once, randomly oriented (chosen − rejected → 1, or rejected − chosen → 0), so
    the classifier cannot use an intercept; its largest coefficients are the features it relies on.
    Above ``cfg.linear_baseline_pairs`` pairs it fits on a random sample of that many.
    """
    rng = np.random.default_rng(cfg.seed)
    rows = np.arange(pf.n_pairs)
    if pf.n_pairs > cfg.linear_baseline_pairs:
        rows = np.sort(rng.choice(pf.n_pairs, cfg.linear_baseline_pairs, replace=False))
    X = (pf.fires_chosen[rows].astype(np.float64) - pf.fires_rejected[rows].astype(np.float64)).tocsr()
    y = rng.integers(0, 2, X.shape[0])
    X = sp.diags(np.where(y == 1, 1.0, -1.0)) @ X
    clf = LogisticRegression(l1_ratio=1.0, C=0.1, solver="liblinear", fit_intercept=False, max_iter=2000)
    folds = int(min(5, max(2, X.shape[0] // 20)))
    acc = cross_val_score(clf, X, y, cv=folds, scoring="accuracy") if X.shape[0] >= 20 else np.array([np.nan])
    clf.fit(X, y)
    coef = clf.coef_.ravel()
    order = np.argsort(-np.abs(coef))[:top]
    order = order[coef[order] != 0]
    table = pd.DataFrame({"feature": order, "coefficient": coef[order], "concept": labels[order]})
    return table, {
        "cv_accuracy": float(np.nanmean(acc)),
        "folds": folds,
        "nonzero_coefficients": int((coef != 0).sum()),
        "pairs": int(len(rows)),
    }
