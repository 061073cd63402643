"""Simpler predictors of what DPO will change, scored beside the audit's own prediction.

The audit predicts each concept's change under DPO from the chosen − rejected difference of its
activity. A reviewer's question is whether that beats one number (the data's length bias), plain
text statistics, or a linear classifier on the same SAE features. Each predictor here gives one
value per concept, made from the preference data alone (nothing from training), on the same
concepts and units (prompts) the audit uses:

- ``audit`` — the audit's own prediction: the mean paired difference of concept activity;
- ``audit_length_controlled`` — the audit's effect at equal response lengths (the intercept of
  ``core.stats.length_controlled``);
- ``length`` — how the concept's activity tracks response length across all responses (a
  regression on powers of centred log length), times the data's mean chosen − rejected difference
  of those powers: what DPO would change if length were all it learned;
- ``text_stats`` — the same through every text statistic of ``data.textstats`` (bold, lists,
  questions, length, …): a ridge regression of activity on the standardised statistics, times
  their mean chosen − rejected difference;
- ``linear`` — an L2 logistic classifier of chosen vs rejected on per-pair SAE feature
  differences (each pair once, randomly oriented, no intercept), its weights summed over each
  concept's member features.

Split-half reliability is the ceiling, not a rival: the audit computed on one random half of the
prompts against the other half (Spearman–Brown corrected to the full data), times the same
reliability of the measured change over the evaluated prompts — the R² a perfect predictor would
reach through both sampling noises. Numpy / scikit-learn only; arrays in, tables out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..core.stats import group_means, length_regressors

__all__ = [
    "PREDICTORS",
    "concept_predictions",
    "length_prediction",
    "linear_prediction",
    "split_half_reliability",
    "text_stat_prediction",
]

#: the predictors, in the order tables show them (the audit first: the others are compared with it)
PREDICTORS = ("audit", "audit_length_controlled", "length", "text_stats", "linear")


def _powers(log_len: np.ndarray, degree: int) -> np.ndarray:
    """Per response, powers 1..degree of log length centred as ``length_regressors`` centres them
    (over both sides), so that the fit's Δ matches the audit's length control."""
    L = np.asarray(log_len, dtype=np.float64)
    centred = L - L.mean()
    return np.concatenate([np.column_stack([centred[:, s] ** j for j in range(1, degree + 1)]) for s in (0, 1)])


def _fit_slopes(X: np.ndarray, U: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """Least-squares (optionally ridge) coefficients of every column of ``U`` on ``X`` with an
    intercept: (regressors × concepts)."""
    Xc = X - X.mean(0)
    Uc = U - U.mean(0)
    A = Xc.T @ Xc + ridge * len(X) * np.eye(X.shape[1])
    return np.linalg.lstsq(A, Xc.T @ Uc, rcond=None)[0]


def length_prediction(
    Uc: np.ndarray, Ur: np.ndarray, ntok: np.ndarray, groups: np.ndarray | None = None, degree: int = 2
) -> np.ndarray:
    """Per concept, the change length alone predicts: activity regressed on powers of log length
    over every response (chosen and rejected), times the mean over units of their chosen −
    rejected difference. ``Uc``/``Ur``: pairs × concepts; ``ntok``: pairs × 2 token counts."""
    log_len = np.log(np.maximum(np.asarray(ntok, dtype=np.float64), 1))
    B = _fit_slopes(_powers(log_len, degree), np.vstack([Uc, Ur]))
    delta = np.asarray(group_means(length_regressors(log_len, degree), groups)).mean(0)
    return delta @ B


def text_stat_prediction(
    Uc: np.ndarray,
    Ur: np.ndarray,
    stats_c: pd.DataFrame,
    stats_r: pd.DataFrame,
    groups: np.ndarray | None = None,
    ridge: float = 1e-3,
) -> np.ndarray:
    """Per concept, the change the text statistics predict: activity regressed (ridge, on the
    standardised statistics) on every statistic over every response, times the statistics' mean
    chosen − rejected difference over units. Constant statistics are dropped."""
    S = np.vstack([stats_c.to_numpy(np.float64), stats_r.to_numpy(np.float64)])
    sd = S.std(0)
    keep = sd > 0
    if not keep.any():
        return np.zeros(np.asarray(Uc).shape[1])
    Z = S[:, keep] / sd[keep]
    n = len(stats_c)
    dz = np.asarray(group_means(Z[:n] - Z[n:], groups)).mean(0)
    return dz @ _fit_slopes(Z, np.vstack([Uc, Ur]), ridge)


def linear_prediction(
    fires_chosen: sp.spmatrix,
    fires_rejected: sp.spmatrix,
    members: Sequence[Sequence[int]],
    C: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Per concept, the summed weight an L2 logistic classifier of chosen vs rejected puts on its
    member features (per-pair feature differences, each pair once, randomly oriented, no
    intercept: the classifier can use nothing but the features). Returns (per concept, fit info)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    X = (sp.csr_matrix(fires_chosen, dtype=np.float64) - sp.csr_matrix(fires_rejected, dtype=np.float64)).tocsr()
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, X.shape[0])
    if len(np.unique(y)) < 2:
        y[0] = 1 - y[0]
    X = sp.diags(np.where(y == 1, 1.0, -1.0)) @ X
    clf = LogisticRegression(C=C, solver="liblinear", fit_intercept=False, max_iter=2000)
    folds = int(min(5, max(2, X.shape[0] // 20)))
    acc = float(np.mean(cross_val_score(clf, X, y, cv=folds, scoring="accuracy"))) if X.shape[0] >= 20 else float("nan")
    clf.fit(X, y)
    w = clf.coef_.ravel()
    summed = np.asarray([w[list(m)].sum() if len(m) else 0.0 for m in members])
    return summed, {"cv_accuracy": acc, "folds": folds, "C": C, "pairs": int(X.shape[0])}


def split_half_reliability(
    D: np.ndarray, concepts: np.ndarray | None = None, n_splits: int = 20, seed: int = 0
) -> np.ndarray:
    """Per random half/half split of the units (rows of ``D``: units × concepts of paired
    differences), the Spearman–Brown corrected correlation between the two halves' mean
    differences over the concepts (``concepts``: the columns to use): how reproducible the
    per-concept means are at the full sample size. Pure noise gives ≈ 0."""
    D = np.asarray(D, dtype=np.float64)
    if concepts is not None:
        D = D[:, np.asarray(concepts, dtype=int)]
    n = D.shape[0]
    if n < 4 or D.shape[1] < 3:
        return np.full(n_splits, np.nan)
    rng = np.random.default_rng(seed)
    out = np.empty(n_splits)
    for s in range(n_splits):
        perm = rng.permutation(n)
        a, b = D[perm[: n // 2]].mean(0), D[perm[n // 2 :]].mean(0)
        r = np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else 0.0
        out[s] = 2 * r / (1 + r) if r > 0 else 0.0  # a negative half-half correlation is no reliability
    return out


def concept_predictions(
    Uc: np.ndarray,
    Ur: np.ndarray,
    ntok: np.ndarray,
    stats_c: pd.DataFrame,
    stats_r: pd.DataFrame,
    fires_chosen: sp.spmatrix,
    fires_rejected: sp.spmatrix,
    members: Sequence[Sequence[int]],
    groups: np.ndarray | None = None,
    degree: int = 2,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Every predictor's value per concept (rows: concepts in order; columns: ``PREDICTORS``),
    and the linear classifier's fit info."""
    from ..core.stats import length_controlled

    Uc, Ur = np.asarray(Uc, dtype=np.float64), np.asarray(Ur, dtype=np.float64)
    Du = np.asarray(group_means(Uc - Ur, groups))
    log_len = np.log(np.maximum(np.asarray(ntok, dtype=np.float64), 1))
    lc = length_controlled(Du, np.asarray(group_means(length_regressors(log_len, degree), groups)))
    linear, info = linear_prediction(fires_chosen, fires_rejected, members, seed=seed)
    table = pd.DataFrame(
        {
            "concept": np.arange(Uc.shape[1]),
            "audit": Du.mean(0),
            "audit_length_controlled": lc.mean,
            "length": length_prediction(Uc, Ur, ntok, groups, degree),
            "text_stats": text_stat_prediction(Uc, Ur, stats_c, stats_r, groups),
            "linear": linear,
        }
    )
    return table, info
