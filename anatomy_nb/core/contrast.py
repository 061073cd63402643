"""Statistics for contrasting two audits (``stages.compare_audits``): the difference of two data sets'
length-controlled effects with their own standard errors, a sign-flip permutation test (with the
length control as a Freedman–Lane nuisance) over the pairs where two annotators disagree, and the
smallest effect a test could find. Vectorised over concepts, no loop over them.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

from .stats import PairedTest

__all__ = ["controlled_contributions", "controlled_difference", "minimum_detectable_d", "sign_flip_test"]


def _design(n: int, length_diff: np.ndarray | None) -> np.ndarray:
    x = np.zeros((n, 0)) if length_diff is None else np.asarray(length_diff, dtype=np.float64).reshape(n, -1)
    return np.column_stack([np.ones(n), x])


def controlled_difference(
    d_a: np.ndarray, x_a: np.ndarray | None, d_b: np.ndarray, x_b: np.ndarray | None
) -> PairedTest:
    """Per column, the length-controlled effect of sample A minus that of sample B, tested with the
    effects' own standard errors: each is the intercept of d = a + Σⱼ bⱼ·Δⱼ + e fitted within its
    sample (``x``: chosen − rejected differences of powers of log length, ``stats.length_regressors``;
    None: no control, the plain mean), and t = (a_A − a_B) / √(se_A² + se_B²) with Welch–Satterthwaite
    degrees of freedom. The intercepts' errors include the slopes' (a sample whose chosen responses
    are all longer extrapolates to equal lengths), which a t-test on residuals would leave out."""
    parts = []
    for d, x in ((d_a, x_a), (d_b, x_b)):
        d = np.asarray(d, dtype=np.float64)
        X = _design(len(d), x)
        inv = np.linalg.pinv(X.T @ X)
        beta = inv @ X.T @ d
        dof = max(len(d) - X.shape[1], 1)
        s2 = ((d - X @ beta) ** 2).sum(0) / dof
        parts.append((beta[0], s2 * inv[0, 0], dof, np.sqrt(s2)))
    (ma, va, na, sa), (mb, vb, nb, sb) = parts
    diff, se = ma - mb, np.sqrt(va + vb)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, diff / se, 0.0)
        df = np.where(se > 0, (va + vb) ** 2 / (va**2 / na + vb**2 / nb), 1.0)
        d_eff = np.where(np.sqrt(sa**2 + sb**2) > 0, diff / np.sqrt((sa**2 + sb**2) / 2), 0.0)
    p = np.where(se > 0, 2 * sps.t.sf(np.abs(t), np.maximum(df, 1)), np.where(diff != 0, 0.0, 1.0))
    return PairedTest(n=np.full(len(diff), na + nb), mean=diff, sd=se, cohens_d=d_eff, t=t, p=p)


def controlled_contributions(d: np.ndarray, length_diff: np.ndarray | None) -> np.ndarray:
    """Per unit and column, contributions w whose mean is the length-controlled effect (the intercept
    of d = a + Σⱼ bⱼ·Δⱼ + e) and whose random re-signing is the Freedman–Lane null of that intercept:
    w = n·c∘r, with c the intercept's row of the OLS hat matrix and r the residuals of the fit
    without an intercept (length alone). With no control, w = d: the plain sign flip."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    X = _design(n, length_diff)
    if X.shape[1] == 1:
        return d
    c = (np.linalg.pinv(X.T @ X) @ X.T)[0]  # the intercept = c @ d
    x = X[:, 1:]
    r = d - x @ (np.linalg.pinv(x.T @ x) @ x.T @ d)
    return n * c[:, None] * r


def sign_flip_test(
    d: np.ndarray, fdr: float = 0.05, max_permutations: int | None = None, batch: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column, a two-sided sign-flip permutation test of mean(d) = 0: under the null each unit's
    difference is as likely to carry either sign (two annotators who disagree on a pair are
    exchangeable), so the observed |mean| is ranked among the means of randomly re-signed units.

    Monte Carlo with sequential stopping (Besag & Clifford 1991): permutations run in batches, and a
    column stops once 100 permuted means reached its observed one (its p is then known to ~±10 %,
    and far above any discovery threshold). The rest run up to ``max_permutations`` (default: enough
    for BH at ``fdr`` to reach a first discovery among the columns, 2·columns/fdr, at least 10,000).
    Returns (observed means, p = (hits + 1) / (permutations + 1), permutations run), per column."""
    d = np.asarray(d, dtype=np.float64)
    n, k = d.shape
    observed = d.mean(0) if n else np.zeros(k)
    if n == 0:
        return observed, np.ones(k), np.zeros(k, dtype=np.int64)
    limit = max_permutations or max(10_000, int(np.ceil(2 * k / fdr)))
    rng = np.random.default_rng(seed)
    hits, runs = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    live = np.flatnonzero(np.abs(observed) > 0)
    target = np.abs(observed) * (1 - 1e-12)  # ties count as reaching it
    done = 0
    while len(live) and done < limit:
        m = min(batch, limit - done)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(m, n))
        means = np.abs(signs @ d[:, live]) / n
        hits[live] += (means >= target[live]).sum(0)
        runs[live] += m
        done += m
        live = live[hits[live] < 100]
    p = np.where(np.abs(observed) > 0, (hits + 1) / (runs + 1), 1.0)
    return observed, p, runs


def minimum_detectable_d(n_units: int, n_tests: int, fdr: float, power: float = 0.8) -> float:
    """The smallest standardised effect (Cohen's d) a two-sided test over ``n_units`` finds with
    ``power`` at the level BH needs for a first discovery among ``n_tests`` (``fdr`` / ``n_tests``):
    what "nothing was found" can still hide."""
    if n_units < 2:
        return float("nan")
    alpha = fdr / max(n_tests, 1)
    return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) / np.sqrt(n_units))
