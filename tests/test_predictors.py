"""The audit against simpler predictors of what DPO changes (stage 5), on constructed arrays with
known answers (seconds, no training): where only length separates the sides the length predictor
explains the change and the audit adds nothing; a concept independent of length is predicted by the
audit and not by length; pure noise has no split-half reliability."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from anatomy_nb.concepts.predictors import concept_predictions, length_prediction, split_half_reliability
from anatomy_nb.core.stats import delta_r2, prediction_scores, r2_without_top


def responses(n_pairs, n_concepts, rng, length_gap=0.0, effect=None, length_slope=None):
    """Per pair and side: log lengths (chosen longer by ``length_gap`` on average), and concept
    activity = length_slope · centred log length + effect (chosen only) + noise, in [0, 1]."""
    L = rng.normal(4.0, 0.6, size=(n_pairs, 2))
    L[:, 0] += length_gap
    slope = np.zeros(n_concepts) if length_slope is None else length_slope
    eff = np.zeros(n_concepts) if effect is None else effect
    base = rng.uniform(0.2, 0.5, n_concepts)
    U = [
        np.clip(
            base
            + np.outer(L[:, s] - 4.0, slope)
            + (eff if s == 0 else 0.0)
            + rng.normal(0, 0.08, (n_pairs, n_concepts)),
            0,
            1,
        )
        for s in (0, 1)
    ]
    ntok = np.round(np.exp(L)).astype(int)
    return U[0], U[1], ntok


def no_stats(n):
    return pd.DataFrame({"flat": np.zeros(n)})


def test_where_only_length_separates_the_sides_length_explains_the_change_and_the_audit_adds_nothing():
    rng = np.random.default_rng(0)
    n, C = 600, 40
    slope = rng.normal(0, 0.08, C)
    Uc, Ur, ntok = responses(n, C, rng, length_gap=0.5, length_slope=slope)
    audit = (Uc - Ur).mean(0)
    length = length_prediction(Uc, Ur, ntok)
    actual = 0.5 * slope + rng.normal(0, 0.003, C)  # DPO learned length: each concept moves with its length slope
    s_len, s_audit = prediction_scores(length, actual), prediction_scores(audit, actual)
    assert s_len["r2"] > 0.8 and s_audit["r2"] > 0.8
    d, lo, hi = delta_r2(audit, length, actual)
    assert abs(d) < 0.05 and lo < 0.05, (d, lo, hi)  # the audit adds nothing measurable over length


def test_a_concept_effect_independent_of_length_is_found_by_the_audit_not_by_length():
    rng = np.random.default_rng(1)
    n, C = 600, 40
    effect = rng.normal(0, 0.05, C)
    slope = rng.normal(0, 0.08, C)
    Uc, Ur, ntok = responses(n, C, rng, length_gap=0.3, effect=effect, length_slope=slope)
    audit = (Uc - Ur).mean(0)
    length = length_prediction(Uc, Ur, ntok)
    actual = effect + rng.normal(0, 0.005, C)  # DPO learned the concepts, not length
    assert prediction_scores(audit, actual)["r2"] > 0.7
    assert prediction_scores(length, actual)["r2"] < 0.3
    d, lo, hi = delta_r2(audit, length, actual)
    assert lo > 0.3, (d, lo, hi)


def test_pure_noise_has_no_split_half_reliability_and_a_real_effect_has_a_high_one():
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 1, size=(400, 60))
    assert np.median(split_half_reliability(noise, n_splits=50)) < 0.15
    signal = noise * 0.2 + rng.normal(0, 1, 60)  # every unit carries the same per-concept effect
    assert np.median(split_half_reliability(signal, n_splits=50)) > 0.9


def test_leave_top_k_out_removes_the_concepts_of_largest_predicted_change():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, 50)
    y = x + rng.normal(0, 0.5, 50)
    x[0], y[0] = 30.0, 30.0  # one concept carries the fit
    assert prediction_scores(x, y)["r2"] > 0.9
    assert r2_without_top(x, y, 1) == pytest.approx(prediction_scores(x[1:], y[1:])["r2"])
    s = prediction_scores(x, y)
    assert {"spearman", "sign_agreement", "r2_without_top1", "r2_without_top3", "r2_without_top10"} <= set(s)


def test_every_predictor_has_a_value_per_concept_and_the_audit_is_the_mean_paired_difference():
    rng = np.random.default_rng(4)
    n, d_sae = 80, 30
    Fc = sp.csr_matrix((rng.uniform(size=(n, d_sae)) < 0.3).astype(np.float32))
    Fr = sp.csr_matrix((rng.uniform(size=(n, d_sae)) < 0.2).astype(np.float32))
    members = [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    M = np.zeros((d_sae, 3))
    for j, m in enumerate(members):
        M[m, j] = 1 / len(m)
    Uc, Ur = Fc @ M, Fr @ M
    ntok = rng.integers(10, 200, size=(n, 2))
    stats = pd.DataFrame({"bold": rng.integers(0, 3, n), "words": rng.integers(5, 50, n)})
    table, info = concept_predictions(
        Uc, Ur, ntok, stats, stats.sample(frac=1, random_state=0).reset_index(drop=True), Fc, Fr, members
    )
    assert list(table.columns) == ["concept", "audit", "audit_length_controlled", "length", "text_stats", "linear"]
    np.testing.assert_allclose(table["audit"], (Uc - Ur).mean(0))
    assert np.isfinite(table.drop(columns="concept").to_numpy()).all() and 0.3 < info["cv_accuracy"] <= 1.0
    assert (table["linear"] > 0).all()  # chosen fires every concept's features more: every summed weight is positive
