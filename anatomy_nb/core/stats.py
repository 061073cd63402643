"""Statistics for preference data: paired tests vectorised over every hypothesis at once, and the
intervals stage 5 reports (Wilson, percentile bootstrap, R² of predicted vs actual change).

A preference pair is one unit: its chosen and rejected responses share a prompt, so the quantity
tested is the *signed within-pair difference* of a concept's activity. Pairs that share a prompt
are not independent either; ``group_means`` collapses them to one unit per prompt before testing.
All functions take a (units × hypotheses) matrix and return one value per hypothesis; no Python
loop runs over hypotheses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats as sps

__all__ = [
    "LEAVE_OUT",
    "PairedTest",
    "bh_qvalues",
    "bootstrap_ci",
    "delta_r2",
    "implicit_margin",
    "pair_correct",
    "prediction_scores",
    "r2_without_top",
    "r2_with_ci",
    "ratio_with_ci",
    "wilson_interval",
    "group_matrix",
    "group_means",
    "length_controlled",
    "length_placebo",
    "length_regressors",
    "paired_test",
    "paired_test_from_sums",
    "paired_test_sparse",
    "split_half_agreement",
    "welch_each_group",
    "welch_inside_outside",
]


def group_matrix(groups: np.ndarray) -> sp.csr_matrix:
    """(groups × rows) matrix whose product with a (rows × k) matrix averages the rows of each
    group (prompt), in sorted group order."""
    groups = np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    n = len(groups)
    G = sp.csr_matrix((np.ones(n), (inv, np.arange(n))), shape=(len(uniq), n))
    return sp.diags(1.0 / np.asarray(G.sum(1)).ravel()) @ G


def group_means(
    x: np.ndarray | sp.spmatrix, groups: np.ndarray | None, dense: bool = True
) -> np.ndarray | sp.csr_matrix:
    """Average the rows of ``x`` that share a group (prompt): one row per group, in group order.
    ``dense=False`` keeps a sparse ``x`` sparse."""
    if groups is None:
        out = x
    else:
        out = group_matrix(groups) @ x
    if not dense and sp.issparse(out):
        return sp.csr_matrix(out, dtype=np.float64)
    return np.asarray(out.todense() if sp.issparse(out) else out, dtype=np.float64)


@dataclass
class PairedTest:
    """One-sample tests of per-unit paired differences against zero, one entry per column."""

    n: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    cohens_d: np.ndarray  # d_z: mean / sd of the paired differences
    t: np.ndarray
    p: np.ndarray


def paired_test(d: np.ndarray) -> PairedTest:
    """t-test of mean(d[:, j]) = 0 for every column j (d: units × hypotheses of paired differences).

    Columns with zero variance get t = 0, p = 1 (nothing to test) unless their mean is non-zero,
    where every unit agrees: then p is the sign test's exact two-sided p-value.
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.shape[0]
    return _paired_from_moments(n, d.mean(0), d.std(0, ddof=1) if n > 1 else np.zeros(d.shape[1]))


def paired_test_sparse(d: sp.spmatrix) -> PairedTest:
    """``paired_test`` of a sparse (units × hypotheses) matrix from its column sums and sums of
    squares: per-feature tests over 100k+ features without a dense copy. Variances below
    ``1e-12`` of the mean square are taken as 0 (one-pass rounding, not data)."""
    d = sp.csr_matrix(d)
    n, width = d.shape
    values = d.data.astype(np.float64)
    sums = np.bincount(d.indices, weights=values, minlength=width)  # column sums without a copy of d
    return paired_test_from_sums(n, sums, np.bincount(d.indices, weights=values * values, minlength=width))


def paired_test_from_sums(n: int, sums: np.ndarray, sums_of_squares: np.ndarray) -> PairedTest:
    """``paired_test`` from each column's sum and sum of squares over ``n`` units (what a sparse
    or streamed computation gives). Variances below ``1e-12`` of the mean square are taken as 0
    (one-pass rounding, not data)."""
    mean, sq = np.asarray(sums, dtype=np.float64) / n, np.asarray(sums_of_squares, dtype=np.float64) / n
    var = np.maximum(sq - mean**2, 0.0) * n / max(n - 1, 1)
    var[var <= 1e-12 * sq] = 0.0
    return _paired_from_moments(n, mean, np.sqrt(var) if n > 1 else np.zeros(len(mean)))


def _paired_from_moments(n: int, mean: np.ndarray, sd: np.ndarray) -> PairedTest:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sd > 0, mean / (sd / np.sqrt(n)), 0.0)
        cohens = np.where(sd > 0, mean / sd, 0.0)
    p = 2 * sps.t.sf(np.abs(t), df=max(n - 1, 1))
    constant = (sd == 0) & (mean != 0)
    if constant.any():
        p = np.where(constant, min(1.0, 2 * 0.5**n), p)
    p = np.where((sd == 0) & (mean == 0), 1.0, p)
    return PairedTest(n=np.full(len(mean), n), mean=mean, sd=sd, cohens_d=cohens, t=t, p=p)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) over one family of tests."""
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return p
    return sps.false_discovery_control(np.clip(p, 0, 1), method="bh")


def split_half_agreement(d: np.ndarray, n_splits: int = 20, seed: int = 0) -> np.ndarray:
    """Fraction of random half/half splits of the units in which both halves' means have the sign
    of the full-sample mean. Near 1: the effect is carried by many units; near 0.5 or below: by few.
    (All splits at once: two products of a splits × units indicator matrix with ``d``; means within
    ``1e-12`` of zero have no sign.)"""
    d = np.asarray(d, dtype=np.float64)
    n = d.shape[0]
    if n < 4:
        return np.full(d.shape[1], np.nan)
    rng = np.random.default_rng(seed)
    half = n // 2
    A = np.zeros((n_splits, n))
    for s in range(n_splits):  # a loop over splits, not hypotheses
        A[s, rng.permutation(n)[:half]] = 1.0
    sign = _sign(d.mean(0))
    mean_a, mean_b = (A @ d) / half, ((1.0 - A) @ d) / (n - half)
    agree = (_sign(mean_a) == sign) & (_sign(mean_b) == sign) & (sign != 0)
    return agree.sum(0) / n_splits


def _sign(x: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    return np.where(np.abs(x) <= tol, 0.0, np.sign(x))


def length_controlled(d: np.ndarray, length_diff: np.ndarray) -> PairedTest:
    """The paired effect at equal response lengths: the intercept of d = a + Σⱼ bⱼ·Δⱼ + e.

    Max-pooled activity grows with length, so a concept can separate chosen from rejected only
    because chosen responses are longer. ``length_diff`` holds, per unit, differences (chosen −
    rejected) of functions of length: one column (Δ log token count) for a linear control, or the
    columns of ``length_regressors`` (Δ of powers of log length) for a curved one. They are *not*
    centred: every column vanishes when the two lengths agree, so ``a`` is the effect at equal
    lengths, which differs from the raw mean exactly when chosen and rejected differ in length.
    Returns the intercept's estimate, its t and p (OLS, vectorised over columns).
    """
    d = np.asarray(d, dtype=np.float64)
    x = np.asarray(length_diff, dtype=np.float64)
    n = len(x)
    X = np.column_stack([np.ones(n), x.reshape(n, -1)])
    XtX_inv = np.linalg.pinv(X.T @ X)
    beta = XtX_inv @ X.T @ d  # (1 + regressors, H)
    resid = d - X @ beta
    dof = max(n - X.shape[1], 1)
    s2 = (resid**2).sum(0) / dof
    se = np.sqrt(np.maximum(s2 * XtX_inv[0, 0], 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, beta[0] / se, 0.0)
    p = 2 * sps.t.sf(np.abs(t), df=dof)
    p = np.where(se > 0, p, np.where(beta[0] != 0, 0.0, 1.0))
    sd = np.sqrt(s2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_eff = np.where(sd > 0, beta[0] / sd, 0.0)
    return PairedTest(n=np.full(d.shape[1], n), mean=beta[0], sd=sd, cohens_d=d_eff, t=t, p=p)


def length_regressors(log_len: np.ndarray, degree: int) -> np.ndarray:
    """Per pair, Δ (chosen − rejected) of the powers 1..``degree`` of centred log length, the
    regressors of ``length_controlled``. ``log_len``: pairs × 2 (chosen, rejected).

    Why not Δ log length alone: "fires anywhere in the response" saturates as responses grow, so a
    feature's firing is a *curved* function of log length, and a linear control leaves part of a
    pure length effect in the intercept. The quadratic term lets the curve bend; the intercept
    keeps its meaning (all columns are 0 at equal lengths). Centring only helps conditioning.
    """
    if degree < 1:
        raise ValueError(f"length-control degree must be >= 1, got {degree}")
    L = np.asarray(log_len, dtype=np.float64)
    L = L - L.mean()
    return np.column_stack([L[:, 0] ** j - L[:, 1] ** j for j in range(1, degree + 1)])


def length_placebo(
    activity_chosen: np.ndarray,
    activity_rejected: np.ndarray,
    ntok: np.ndarray,
    degrees: tuple[int, ...] = (0, 2),
    draws: int = 20,
    shorter_is_chosen: float = 0.75,
    seed: int = 0,
) -> pd.DataFrame:
    """Is the length control calibrated on *this* data? A placebo on the real activities.

    Placebo pairs join two responses from the same side (chosen with chosen, rejected with
    rejected; different pairs), so nothing separates the placebo sides except length; the
    shorter response is called "chosen" in ``shorter_is_chosen`` of them, like preference data
    where one side is systematically shorter (a stress: in 600 HH-RLHF pairs chosen is shorter in
    53 %). Every hypothesis is then tested with each length
    control in ``degrees`` (0 = none, else ``length_regressors`` of that degree). A calibrated
    control gives p < 0.05 in ~5 % of tests and ~no BH discoveries; degree 0 shows how much pure
    length there is to remove. Returns one row per side × degree, means over ``draws``.
    ``activity_*``: pairs × hypotheses; ``ntok``: pairs × 2 (chosen, rejected) token counts.
    """
    rows = []
    for side, U, nt in (
        ("chosen", np.asarray(activity_chosen, np.float64), ntok[:, 0]),
        ("rejected", np.asarray(activity_rejected, np.float64), ntok[:, 1]),
    ):
        half = len(U) // 2
        for draw in range(draws):
            rng = np.random.default_rng([seed, draw, side == "chosen"])
            perm = rng.permutation(len(U))
            a, b = perm[:half], perm[half : 2 * half]
            a_first = (nt[a] < nt[b]) == (rng.uniform(size=half) < shorter_is_chosen)
            first, second = np.where(a_first, a, b), np.where(a_first, b, a)
            d = U[first] - U[second]
            log_len = np.log(np.maximum(np.column_stack([nt[first], nt[second]]), 1))
            for deg in degrees:
                t = paired_test(d) if deg == 0 else length_controlled(d, length_regressors(log_len, deg))
                p = np.nan_to_num(t.p, nan=1.0)
                rows.append(
                    {
                        "side": side,
                        "degree": deg,
                        "draw": draw,
                        "frac_p05": float((p < 0.05).mean()),
                        "frac_p01": float((p < 0.01).mean()),
                        "bh_discoveries": int((bh_qvalues(p) < 0.05).sum()),
                    }
                )
    out = pd.DataFrame(rows)
    return out.groupby(["side", "degree"], as_index=False)[["frac_p05", "frac_p01", "bh_discoveries"]].mean()


def welch_inside_outside(d: np.ndarray, inside: np.ndarray) -> PairedTest:
    """Δ = mean(d | unit inside) − mean(d | outside) per column, Welch's t-test.

    ``inside``: boolean per unit. This is the prompt-conditioned contrast: a concept preferred
    only for prompts of one topic shows up here even when its overall mean is near zero.
    """
    d = np.asarray(d, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    a, b = d[inside], d[~inside]
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return _welch_from_moments(na, None, None, nb, None, None, d.shape[1])
    return _welch_from_moments(na, a.mean(0), a.var(0, ddof=1), nb, b.mean(0), b.var(0, ddof=1))


def welch_each_group(
    d: np.ndarray, unit_group: np.ndarray, groups: Sequence[int]
) -> dict[int, tuple[PairedTest, np.ndarray]]:
    """``welch_inside_outside`` for every group in ``groups`` (inside = units whose
    ``unit_group`` equals it) from one product of a group indicator matrix with ``d`` and ``d²``;
    with each group's inside mean. Variances within ``1e-12`` of the mean square are taken as 0."""
    d = np.asarray(d, dtype=np.float64)
    unit_group = np.asarray(unit_group)
    groups = list(groups)
    T = np.stack([unit_group == g for g in groups]).astype(np.float64) if groups else np.zeros((0, len(d)))
    n_in = T.sum(1)
    n = len(d)
    s1, s2 = T @ d, T @ (d * d)
    t1, t2 = d.sum(0), (d * d).sum(0)

    def moments(cnt, a1, a2):
        mean = a1 / max(cnt, 1)
        var = np.maximum(a2 - cnt * mean**2, 0.0) / max(cnt - 1, 1)
        return mean, np.where(var <= 1e-12 * a2 / max(cnt, 1), 0.0, var)

    out = {}
    for i, g in enumerate(groups):
        na, nb = int(n_in[i]), n - int(n_in[i])
        ma, va = moments(na, s1[i], s2[i])
        mb, vb = moments(nb, t1 - s1[i], t2 - s2[i])
        test = (
            _welch_from_moments(na, ma, va, nb, mb, vb)
            if na >= 2 and nb >= 2
            else _welch_from_moments(na, None, None, nb, None, None, d.shape[1])
        )
        out[g] = (test, ma)
    return out


def _welch_from_moments(na, ma, va, nb, mb, vb, width: int = 0) -> PairedTest:
    if ma is None:
        nan = np.full(width, np.nan)
        return PairedTest(n=np.full(width, na), mean=nan, sd=nan, cohens_d=nan, t=nan, p=np.ones(width))
    se = np.sqrt(va / na + vb / nb)
    delta = ma - mb
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, delta / se, 0.0)
        dof = np.where(se > 0, (va / na + vb / nb) ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)), 1.0)
        pooled_sd = np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
        cohens = np.where(pooled_sd > 0, delta / pooled_sd, 0.0)
    p = 2 * sps.t.sf(np.abs(t), df=np.maximum(dof, 1))
    p = np.where(se > 0, p, 1.0)
    return PairedTest(n=np.full(len(delta), na), mean=delta, sd=np.sqrt(va), cohens_d=cohens, t=t, p=p)


# --- intervals ---------------------------------------------------------------------------------


def wilson_interval(k: float, n: int, ci: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (NaN for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = float(sps.norm.ppf(0.5 + ci / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def bootstrap_ci(
    values: np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the rows of ``values`` (resampled jointly)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    with np.errstate(all="ignore"):
        boots = np.asarray([stat(values[i]) for i in idx], dtype=np.float64)
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return float("nan"), float("nan")
    a = (1 - ci) / 2
    return float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


def ratio_with_ci(
    x: np.ndarray, x_ref: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """mean(x) / mean(x_ref) with a bootstrap interval, resampling units (prompts, pairs) jointly:
    how much of a reference model's change another model made."""
    value = float(x.mean() / x_ref.mean())
    lo, hi = bootstrap_ci(
        np.stack([x, x_ref], 1),
        lambda v: v[:, 0].mean() / v[:, 1].mean() if v[:, 1].mean() != 0 else np.nan,
        n_boot,
        ci,
        seed,
    )
    return value, lo, hi


def _r2(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1] ** 2)


def r2_with_ci(
    predicted: np.ndarray, actual: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """R² of actual on predicted (squared Pearson r: the variance of the actual change a linear
    function of the prediction explains — the prediction's units differ from the change's, so a
    scale-free fit is the fair one), with a percentile bootstrap interval over concepts; slope and
    intercept of the least-squares line; the fraction of concepts whose sign was predicted."""
    x, y = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    xy = np.stack([x, y], 1)
    r2 = _r2(xy)
    lo, hi = bootstrap_ci(xy, _r2, n_boot, ci, seed) if np.isfinite(r2) else (float("nan"), float("nan"))
    slope, intercept = np.polyfit(x, y, 1).tolist() if len(x) >= 2 and x.std() > 0 else [float("nan")] * 2
    nz = x != 0
    sign = float((np.sign(x[nz]) == np.sign(y[nz])).mean()) if nz.any() else float("nan")
    return {
        "n_concepts": int(len(x)),
        "r2": r2,
        "ci_low": lo,
        "ci_high": hi,
        "pearson_r": float(np.sign(slope) * np.sqrt(r2)) if np.isfinite(r2) else float("nan"),
        "slope": float(slope),
        "intercept": float(intercept),
        "sign_agreement": sign,
    }


# --- DPO's implicit reward --------------------------------------------------------------------------


def implicit_margin(logps: np.ndarray, base_logps: np.ndarray) -> np.ndarray:
    """Per pair: the implicit DPO reward margin in nats (unscaled by β), the log-ratio to the base
    model on chosen minus that on rejected. Inputs: [n_pairs, (chosen, rejected)] log-probs."""
    ratio = np.asarray(logps) - np.asarray(base_logps)
    return ratio[:, 0] - ratio[:, 1]


def pair_correct(margin: np.ndarray) -> np.ndarray:
    """1 where the implicit reward prefers the chosen response, 0.5 on a tie (the base model
    against itself), else 0."""
    return np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))


# --- how well a per-concept prediction fits the measured change -------------------------------------


def _spearman(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


def r2_without_top(predicted: np.ndarray, actual: np.ndarray, k: int) -> float:
    """R² after leaving out the ``k`` concepts of largest |predicted|: whether the fit is more than
    its few strongest concepts (a planted one, a length effect)."""
    x, y = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    keep = np.argsort(-np.abs(x), kind="stable")[k:]
    return _r2(np.stack([x[keep], y[keep]], 1))


#: leave-top-k-out R² is reported for these k
LEAVE_OUT = (1, 3, 10)


def prediction_scores(
    predicted: np.ndarray,
    actual: np.ndarray,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    leave_out: Sequence[int] = LEAVE_OUT,
) -> dict[str, float]:
    """``r2_with_ci`` plus Spearman's rank correlation and the R² without the top-k concepts by
    |predicted| (``r2_without_top<k>``): the prediction's report wherever R² is shown."""
    x, y = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = r2_with_ci(x, y, n_boot, ci, seed)
    out["spearman"] = _spearman(np.stack([x, y], 1))
    for k in leave_out:
        out[f"r2_without_top{k}"] = r2_without_top(x, y, k)
    return out


def delta_r2(
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    actual: np.ndarray,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """R²(a) − R²(b) on the same concepts and actual changes, with a paired percentile bootstrap
    interval (the same resampled concepts for both): the fair way to say one predictor beats
    another — two overlapping R² intervals can still differ when the predictors are correlated."""
    a, b, y = (np.asarray(v, np.float64) for v in (predicted_a, predicted_b, actual))
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(y)
    xyz = np.stack([a[ok], b[ok], y[ok]], 1)

    def diff(v: np.ndarray) -> float:
        return _r2(v[:, [0, 2]]) - _r2(v[:, [1, 2]])

    value = diff(xyz)
    if not np.isfinite(value):
        return value, float("nan"), float("nan")
    lo, hi = bootstrap_ci(xyz, diff, n_boot, ci, seed)
    return value, lo, hi
