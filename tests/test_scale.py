"""The scalable paths of stage 2 give the numbers of the simple ones they replace.

At 100k pairs and 131k-feature SAEs, stage 2 never builds a features × features matrix or a dense
pairs × concepts one: co-firing neighbours come in blocks (exact) or from a sketch whose proposals
are re-scored exactly; tests run on sparse columns and on blocks of concepts. Each is checked here
against the dense reference on data small enough for both (speed and memory: benchmarks/scale.py).
"""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from anatomy_nb.concepts.clustering import cluster_features
from anatomy_nb.concepts.cofiring import cofiring_neighbors
from anatomy_nb.concepts.labels import text_stat_labels
from anatomy_nb.config import ConceptConfig, HypothesizeConfig
from anatomy_nb.core.stats import paired_test, paired_test_sparse, welch_each_group, welch_inside_outside
from anatomy_nb.stages.hypothesize import score_concepts

from helpers import knn_reference, synthetic, with_edges


def grouped_firing(n=1500, n_groups=40, size=6, background=60, seed=0):
    """Responses fire latent groups of ``size`` co-firing features (plus independent background
    features): a known neighbourhood structure."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.03, 0.3, n_groups)
    on = rng.uniform(size=(n, n_groups)) < rates
    F = np.repeat(on, size, axis=1) & (rng.uniform(size=(n, n_groups * size)) < 0.8)
    B = rng.uniform(size=(n, background)) < rng.uniform(0.02, 0.3, background)
    return sp.csr_matrix(np.hstack([F, B]).astype(np.float32)), np.r_[
        np.repeat(np.arange(n_groups), size), -1 - np.arange(background)
    ]


@pytest.mark.parametrize("block_bytes", [1 << 29, 4096])
def test_exact_neighbours_equal_the_dense_phi_graph(block_bytes):
    """Blocks of rows and chunks of responses (4 KiB forces dozens of both) change nothing."""
    fires, _ = grouped_firing()
    expected, _ = knn_reference(fires, k=5, min_phi=0.05)
    got = cofiring_neighbors(fires, k=5, min_phi=0.05, method="exact", block_bytes=block_bytes).toarray()
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_sketched_neighbours_have_exact_weights_and_find_the_groups():
    """The sketch only proposes: every edge it keeps carries the exact phi, and it recovers the
    planted groups' neighbourhoods (recall of the exact graph's edge weight ≥ 0.95)."""
    fires, truth = grouped_firing(seed=1)
    exact_graph, phi = knn_reference(fires, k=5, min_phi=0.05)
    sketch = cofiring_neighbors(
        fires, k=5, min_phi=0.05, method="sketch", dims=64, candidates=16, block_bytes=8192
    ).tocoo()
    np.testing.assert_allclose(sketch.data, phi[sketch.row, sketch.col], atol=1e-9)
    found = sp.csr_matrix(sketch).toarray()
    recall = (exact_graph * (found != 0)).sum() / exact_graph.sum()
    assert recall >= 0.95, recall
    cfg = ConceptConfig(min_support=5, k_neighbors=5, min_phi=0.05)
    labels_exact = cluster_features(fires, cfg)
    labels_sketch = cluster_features(
        fires, ConceptConfig(**{**cfg.to_dict(), "neighbors": "sketch", "sketch_dims": 64, "sketch_candidates": 16})
    )
    grouped = truth >= 0
    assert adjusted_rand_score(truth[grouped], labels_sketch[grouped]) >= 0.9
    assert adjusted_rand_score(labels_exact, labels_sketch) >= 0.9


def test_unknown_neighbour_method_is_refused():
    with pytest.raises(ValueError, match="'exact' or 'sketch'"):
        cofiring_neighbors(grouped_firing(n=50)[0], k=3, min_phi=0.0, method="dense")


def test_sparse_paired_test_equals_the_dense_one():
    rng = np.random.default_rng(0)
    D = np.where(rng.uniform(size=(300, 50)) < 0.2, rng.normal(size=(300, 50)), 0.0)
    D[:, 3] = 0.0  # never differs
    D[:, 4] = 0.5  # constant
    D[:150, 5] = 1.0  # half the units
    dense, sparse = paired_test(D), paired_test_sparse(sp.csr_matrix(D))
    for field in ("mean", "sd", "t", "cohens_d", "p"):
        np.testing.assert_allclose(getattr(sparse, field), getattr(dense, field), rtol=1e-9, atol=1e-12, err_msg=field)


def test_welch_for_every_group_at_once_equals_one_group_at_a_time():
    rng = np.random.default_rng(1)
    D = rng.normal(size=(240, 30)) + (np.arange(240) % 4 == 1)[:, None]
    D[:, 7] = 2.0  # constant everywhere
    group = np.arange(240) % 4
    group[:1] = 9  # a group of one unit: no test
    for g, (test, inside_mean) in welch_each_group(D, group, [0, 1, 2, 3, 9]).items():
        ref = welch_inside_outside(D, group == g)
        for field in ("mean", "t", "cohens_d", "p"):
            np.testing.assert_allclose(
                getattr(test, field), getattr(ref, field), rtol=1e-9, atol=1e-12, err_msg=f"group {g} {field}"
            )
        if g != 9:
            np.testing.assert_allclose(inside_mean, D[group == g].mean(0))


def test_text_stat_labels_read_sparse_activity_like_dense():
    rng = np.random.default_rng(2)
    U = np.where(rng.uniform(size=(400, 25)) < 0.1, rng.uniform(size=(400, 25)), 0.0)
    U[:, 0] = 0.0
    stats = pd.DataFrame(
        {"length": rng.normal(size=400), "bullets": U[:, 3] * 2 + rng.normal(scale=0.1, size=400), "flat": np.ones(400)}
    )
    assert text_stat_labels(sp.csc_matrix(U), stats) == text_stat_labels(U, stats)


def test_concept_blocks_give_the_same_table_as_one_pass():
    """Tests over a few concept columns at a time (every statistic is per column) equal one pass,
    for every view: overall, opening / ending and per topic."""
    pf = with_edges(synthetic(n=300, d=90, seed=3))
    cfg = HypothesizeConfig(concepts=ConceptConfig(min_support=5, k_neighbors=5, min_phi=0.2))
    labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), cfg.concepts)
    topic_of_group = np.arange(pf.n_pairs) % 3
    one, features = score_concepts(pf, labels, cfg, topic_of_group)
    blocked, features_blocked = score_concepts(pf, labels, cfg, topic_of_group, block_bytes=8 * pf.n_pairs * 3)
    assert int(labels.max()) + 1 > 3 and set(one["view"]) == {"overall", "opening", "ending", "topic"}
    pd.testing.assert_frame_equal(blocked, one)
    pd.testing.assert_frame_equal(features_blocked, features)


def test_the_linear_baseline_fits_on_a_sample_above_its_cap():
    from anatomy_nb.stages.hypothesize import linear_baseline

    pf = synthetic(n=200, d=60, seed=4)
    labels = np.zeros(pf.d_sae, dtype=np.int64)
    _, capped = linear_baseline(pf, labels, HypothesizeConfig(linear_baseline_pairs=80))
    _, full = linear_baseline(pf, labels, HypothesizeConfig())
    assert capped["pairs"] == 80 and full["pairs"] == 200
    assert full["cv_accuracy"] > 0.6  # the planted block separates the sides


def test_no_testable_feature_gives_an_empty_table_with_every_column():
    """A data set too small for any concept (every feature below min_support) still writes a
    table a reader can open, with the same columns as a full one."""
    pf = with_edges(synthetic(n=60, d=20, seed=5))
    cfg = HypothesizeConfig()
    full, _ = score_concepts(pf, np.zeros(pf.d_sae, dtype=np.int64), cfg, np.arange(pf.n_pairs) % 2)
    empty, features = score_concepts(pf, np.full(pf.d_sae, -1), cfg, np.arange(pf.n_pairs) % 2)
    assert len(empty) == 0 and set(full.columns) == set(empty.columns)
    assert len(features) == pf.d_sae and (features["concept"] == -1).all()


def test_the_stage_runs_on_a_store_with_no_concepts(tmp_path):
    """The whole stage, not only the tests: labels, baselines and the placebo (skipped, and the
    manifest says why, rather than a nan "miscalibrated" warning)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from synthetic_store import write_synthetic_store

    from anatomy_nb import hypothesize

    write_synthetic_store(tmp_path, 200, 512, 60)
    h = hypothesize(tmp_path, {"promoted_tokens": 0, "concepts": {"min_support": 10**6}})
    assert len(h.table) == 0 and h.manifest["n_concepts"] == 0
    assert h.manifest["length_placebo"] == {"skipped": "no concepts"}


@pytest.mark.parametrize("grouped", [True, False])
def test_feature_difference_sums_equal_the_sparse_prompt_means(grouped):
    """The one-pass kernel behind the per-feature tests equals averaging chosen − rejected per
    prompt with the sparse product, then testing: same p-values, with prompts shared by 1–4 pairs."""
    from anatomy_nb.concepts.activity import PairFeatures, feature_difference_sums
    from anatomy_nb.core.stats import group_means, paired_test_from_sums

    pf = synthetic(n=300, d=80, seed=6)
    groups = np.sort(np.random.default_rng(0).integers(0, 120, pf.n_pairs)) if grouped else None
    pf = PairFeatures(
        pf.fires_chosen,
        pf.fires_rejected,
        pf.ntok,
        groups if grouped else np.arange(pf.n_pairs),
        pf.prompts,
        pf.chosen,
        pf.rejected,
    )
    n, s1, s2 = feature_difference_sums(pf, groups)
    ref = paired_test_sparse(group_means(pf.fires_chosen - pf.fires_rejected, groups, dense=False))
    got = paired_test_from_sums(n, s1, s2)
    assert n == (len(np.unique(groups)) if grouped else pf.n_pairs)
    for field in ("mean", "sd", "t", "p"):
        np.testing.assert_allclose(getattr(got, field), getattr(ref, field), rtol=1e-9, atol=1e-12, err_msg=field)
