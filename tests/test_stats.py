"""Statistics against known answers: reference implementations, planted effects, null data."""

import numpy as np
import pytest
import scipy.stats as sps

from anatomy_nb.core.stats import (
    bh_qvalues,
    group_means,
    length_controlled,
    length_placebo,
    length_regressors,
    paired_test,
    split_half_agreement,
    welch_inside_outside,
)


def reference_bh_reject(p, alpha):
    """Benjamini–Hochberg step-up, written out: reject the k smallest where k = max{i: p(i) <= i α / m}."""
    m = len(p)
    order = np.argsort(p)
    passed = [i for i in range(1, m + 1) if p[order[i - 1]] <= i * alpha / m]
    k = max(passed) if passed else 0
    reject = np.zeros(m, bool)
    reject[order[:k]] = True
    return reject


@pytest.mark.parametrize("seed", range(5))
def test_bh_matches_the_step_up_rule(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=20)])
    q = bh_qvalues(p)
    for alpha in (0.01, 0.05, 0.1, 0.2):
        np.testing.assert_array_equal(q <= alpha, reference_bh_reject(p, alpha))
    assert np.all(q >= p - 1e-15) and np.all(q <= 1)


def test_paired_and_welch_match_scipy():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1, size=(80, 7))
    t = paired_test(d)
    ref = sps.ttest_1samp(d, 0)
    np.testing.assert_allclose(t.t, ref.statistic)
    np.testing.assert_allclose(t.p, ref.pvalue)
    inside = rng.uniform(size=80) < 0.3
    w = welch_inside_outside(d, inside)
    ref = sps.ttest_ind(d[inside], d[~inside], equal_var=False)
    np.testing.assert_allclose(w.t, ref.statistic)
    np.testing.assert_allclose(w.p, ref.pvalue)


def test_constant_columns():
    d = np.zeros((30, 3))
    d[:, 1] = 1.0  # every unit agrees: sign-test p
    t = paired_test(d)
    assert t.p[0] == 1.0 and t.p[1] == pytest.approx(2 * 0.5**30) and t.t[0] == 0


def test_length_control_removes_a_pure_length_effect_and_keeps_a_real_one():
    rng = np.random.default_rng(2)
    n = 600
    len_diff = rng.normal(0.4, 0.5, n)  # chosen responses tend to be longer
    only_length = 0.5 * len_diff + rng.normal(0, 0.5, n)
    real = 0.3 + 0.5 * len_diff + rng.normal(0, 0.5, n)
    d = np.column_stack([only_length, real])
    raw, lc = paired_test(d), length_controlled(d, len_diff)
    assert raw.p[0] < 1e-10  # the naive test is fooled by length
    assert lc.p[0] > 0.01 and abs(lc.mean[0]) < 0.1
    assert lc.p[1] < 1e-6 and lc.mean[1] == pytest.approx(0.3, abs=0.08)


def test_a_curved_length_effect_needs_the_quadratic_control():
    # activity = (centred log length)², no side effect at all; chosen responses are shorter, and
    # the length gap varies. Δ log length alone leaves Var(δ) − mean(δ)² = 0.16 in the intercept.
    rng = np.random.default_rng(7)
    n = 3000
    log_rejected = rng.normal(4.5, 1.0, n)
    log_chosen = log_rejected + rng.normal(-0.3, 0.5, n)
    L = np.column_stack([log_chosen, log_rejected])
    activity = (L - L.mean()) ** 2
    d = (activity[:, 0] - activity[:, 1] + rng.normal(0, 0.2, n))[:, None]
    linear = length_controlled(d, length_regressors(L, 1))
    curved = length_controlled(d, length_regressors(L, 2))
    assert linear.p[0] < 1e-6 and linear.mean[0] == pytest.approx(0.16, abs=0.05)
    assert curved.p[0] > 0.01 and abs(curved.mean[0]) < 0.02
    # a real effect on top survives the curved control with its size
    real = length_controlled(d + 0.1, length_regressors(L, 2))
    assert real.p[0] < 1e-6 and real.mean[0] == pytest.approx(0.1, abs=0.02)


def test_length_regressors_vanish_at_equal_lengths():
    L = np.array([[3.0, 3.0], [5.0, 5.0], [2.0, 4.0]])
    X = length_regressors(L, 3)
    assert X.shape == (3, 3)
    np.testing.assert_array_equal(X[:2], 0.0)  # so the intercept is the effect at equal lengths
    with pytest.raises(ValueError, match="degree"):
        length_regressors(L, 0)


def test_length_placebo_passes_a_smooth_length_effect_and_flags_a_step():
    # activities that depend on length only; chosen responses are shorter, as in HH-RLHF
    rng = np.random.default_rng(0)
    n, n_hyp = 1000, 30
    ntok = np.exp(np.column_stack([rng.normal(4.2, 0.7, n), rng.normal(4.5, 0.7, n)])).astype(int) + 1
    rate = rng.uniform(0.002, 0.05, n_hyp)
    # "fires anywhere"
    saturating = [rng.binomial(10, 1 - np.exp(-np.outer(ntok[:, side], rate))) / 10 for side in (0, 1)]
    r = length_placebo(*saturating, ntok, degrees=(0, 2))
    assert (r[r["degree"] == 0]["frac_p05"] > 0.9).all()  # uncontrolled: length alone separates
    assert (r[r["degree"] == 2]["frac_p05"] <= 0.10).all()  # the control removes it
    # a jump at one length is not a low-degree curve: the placebo shows the control failing
    threshold = np.quantile(ntok, 0.3)
    step = [(ntok[:, [side]] > threshold) + rng.normal(0, 0.05, (n, n_hyp)) for side in (0, 1)]
    r = length_placebo(*step, ntok, degrees=(2,))
    assert r["frac_p05"].max() > 0.10


def test_grouping_makes_the_prompt_the_unit():
    rng = np.random.default_rng(3)
    base = rng.normal(0.15, 1, size=(100, 4))
    dup = np.repeat(base, 3, axis=0)  # three pairs per prompt, identical signal
    groups = np.repeat(np.arange(100), 3)
    grouped = paired_test(group_means(dup, groups))
    ungrouped = paired_test(dup)
    np.testing.assert_allclose(grouped.t, paired_test(base).t)
    assert grouped.n[0] == 100 and ungrouped.n[0] == 300
    np.testing.assert_allclose(ungrouped.t / grouped.t, np.sqrt(299 / 99), rtol=0.01)  # pseudo-replication inflates t


def test_split_half_agreement():
    rng = np.random.default_rng(4)
    strong = rng.normal(1.0, 1, 400)
    one_outlier = np.zeros(400)
    one_outlier[0] = 50.0
    a = split_half_agreement(np.column_stack([strong, one_outlier]), n_splits=40)
    assert a[0] == 1.0 and a[1] == 0.0  # an effect carried by one unit never replicates in both halves


def test_null_p_values_are_uniform():
    rng = np.random.default_rng(5)
    p = paired_test(rng.normal(size=(60, 4000))).p
    assert abs((p < 0.05).mean() - 0.05) < 0.012
    assert sps.kstest(p, "uniform").pvalue > 0.001
