"""Two audits compared by concept (stages/compare_audits.py): known answers on constructed feature
tables (a concept one side rewards and the other lacks is found first; identical sides give no more
discoveries than the FDR promises), in both modes, and the stage on tiny stores."""

import json
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from anatomy_nb.concepts.activity import PairFeatures
from anatomy_nb.concepts.clustering import cluster_features
from anatomy_nb.config import CompareAuditsConfig, ConceptConfig
from anatomy_nb.core.contrast import controlled_contributions, minimum_detectable_d, sign_flip_test
from anatomy_nb.stages.compare_audits import annotator_differences, dataset_differences

from helpers import synthetic, synthetic_pairs

CFG = CompareAuditsConfig(concepts=ConceptConfig(min_support=5, k_neighbors=5, min_phi=0.2), progress=False)


def shared_labels(*pfs):
    return cluster_features(sp.vstack([m for pf in pfs for m in (pf.fires_chosen, pf.fires_rejected)]), CFG.concepts)


def block_a(labels):
    (concept,) = {int(labels[f]) for f in range(6)}
    return concept


def test_a_concept_one_data_set_rewards_and_the_other_lacks_is_found_first():
    a, b = synthetic(planted=0.3, seed=0), synthetic(planted=0.0, seed=1)
    labels = shared_labels(a, b)
    table, counts = dataset_differences(a, b, labels, CFG)
    table = table.sort_values("q")
    assert int(table.iloc[0]["concept"]) == block_a(labels) and table.iloc[0]["q"] < 0.05
    assert table.iloc[0]["difference"] > 0 and table.iloc[0]["effect_b"] == pytest.approx(0, abs=0.05)
    assert counts["units_a"] == counts["units_b"] == 400 and 0 < counts["minimum_detectable_d"] < 1


def test_identical_data_sets_give_no_more_discoveries_than_the_fdr_promises():
    """The global null: both sides drawn alike; BH at 0.05 makes any discovery in ≤ ~5 % of draws."""
    any_discovery = 0
    for s in range(20):
        a, b = synthetic(planted=0.2, seed=100 + s), synthetic(planted=0.2, seed=200 + s)
        table, _ = dataset_differences(a, b, shared_labels(a, b), CFG)
        any_discovery += bool((table["q"] < 0.05).any())
    assert any_discovery <= 3, any_discovery


def test_opposite_length_biases_are_not_reported_as_opposite_concepts():
    """A concept that only grows with length, chosen longer in A and shorter in B: without the length
    control it differs between the data sets; at equal lengths it does not."""
    rng = np.random.default_rng(3)
    n = 400

    def lengthy(longer_chosen: bool):
        ntok = rng.integers(20, 400, size=(n, 2))
        ntok = np.sort(ntok, axis=1)[:, ::-1] if longer_chosen else np.sort(ntok, axis=1)
        fires = [rng.uniform(size=(n, 20)) < np.clip(np.log(ntok[:, [s]]) / 7, 0, 1) for s in (0, 1)]
        fires = [np.hstack([f, rng.uniform(size=(n, 40)) < 0.2]) for f in fires]
        return PairFeatures(
            sp.csr_matrix(fires[0].astype(np.float32)),
            sp.csr_matrix(fires[1].astype(np.float32)),
            ntok,
            np.arange(n),
            [""] * n,
            [""] * n,
            [""] * n,
        )

    a, b = lengthy(True), lengthy(False)
    labels = np.r_[np.zeros(20, int), np.arange(1, 41)]
    raw, _ = dataset_differences(a, b, labels, CompareAuditsConfig(length_control_degree=0, progress=False))
    controlled, _ = dataset_differences(a, b, labels, CFG)
    assert raw.loc[0, "q"] < 1e-6 and controlled.loc[0, "q"] > 0.05


def annotated(n=500, seed=0, follows=True):
    """Pairs whose sides carry block A at random; annotator 1 prefers the side with block A when only
    one side has it (``follows``), annotator 2 votes at random, annotator 3 like annotator 2."""
    rng = np.random.default_rng(seed)
    pf = synthetic(n=n, planted=0.0, seed=seed)
    a_c, a_r = pf.fires_chosen[:, :6].sum(1).A.ravel() >= 3, pf.fires_rejected[:, :6].sum(1).A.ravel() >= 3
    random_votes = lambda: np.where(rng.uniform(size=n) < 0.5, 1, -1)
    v1 = np.where(follows & (a_c != a_r) & (rng.uniform(size=n) < 0.9), np.where(a_c, 1, -1), random_votes())
    return pf, np.column_stack([v1, random_votes(), random_votes()])


def test_what_one_annotator_rewards_on_the_pairs_they_disagree_on_is_found_first():
    pf, votes = annotated()
    labels = shared_labels(pf)
    table, counts = annotator_differences(
        pf, votes, ["annotator1", "annotator2", "annotator3"], labels, replace(CFG, annotators=[[1, 2], [2, 3]])
    )
    first = table[table["comparison"] == "annotator1 vs annotator2"].sort_values("q").iloc[0]
    assert int(first["concept"]) == block_a(labels) and first["q"] < 0.05 and first["difference"] > 0
    null = table[table["comparison"] == "annotator2 vs annotator3"]
    assert not (null["q"] < 0.05).any()
    c = {x["comparison"]: x for x in counts}
    agree = (votes[:, 0] == votes[:, 1]).sum()
    assert c["annotator1 vs annotator2"]["disagreeing_pairs"] == len(votes) - agree and c["annotator1 vs annotator2"][
        "pairs_both_prefer"
    ] == len(votes)


def test_annotators_who_agree_on_the_concept_give_no_more_discoveries_than_the_fdr_promises():
    any_discovery = 0
    for s in range(10):
        pf, votes = annotated(n=300, seed=50 + s, follows=False)
        table, _ = annotator_differences(
            pf,
            votes,
            ["a1", "a2", "a3"],
            shared_labels(pf),
            replace(CFG, annotators=[[1, 2]], max_permutations=4000),
        )
        any_discovery += bool((table["q"] < 0.05).any())
    assert any_discovery <= 2, any_discovery


def test_the_sign_flip_test_is_exact_in_distribution_and_stops_early_where_p_is_large():
    rng = np.random.default_rng(4)
    null = rng.normal(0, 1, size=(60, 200))
    _, p, runs = sign_flip_test(null, max_permutations=20_000)
    assert 0.02 < (p < 0.05).mean() < 0.09 and runs.min() < 20_000  # calibrated, and most stopped early
    shifted = null + 0.8
    _, p, runs = sign_flip_test(shifted[:, :5], max_permutations=20_000)
    assert (p < 1e-3).all() and (runs == 20_000).all()
    x = np.linspace(-0.5, 1.5, 100)[:, None]  # one-signed mostly: the intercept extrapolates
    d = rng.normal(0, 1, size=(100, 3)) + 2 * x
    w = controlled_contributions(d, x)
    X = np.column_stack([np.ones(100), x])
    np.testing.assert_allclose(w.mean(0), np.linalg.lstsq(X, d, rcond=None)[0][0], atol=1e-10)  # the intercept
    np.testing.assert_array_equal(controlled_contributions(d, None), d)
    assert minimum_detectable_d(100, 1, 0.05) == pytest.approx((1.959964 + 0.841621) / 10, abs=1e-4)


def test_compare_audits_on_tiny_stores_both_modes_cli_notebook_and_report(tmp_path, tiny_lm, tiny_sae_, hh_pairs):
    """The stage end to end on the tiny model: two data sets (the flattering-opener pairs against
    HH-RLHF), then PandaLM's annotators from one extraction; reused when unchanged; the command line,
    notebook 07 and the report show it."""
    import nbformat

    from anatomy_nb import CompareResult, compare_audits
    from anatomy_nb.cli import main
    from anatomy_nb.config import ExtractConfig
    from anatomy_nb.data.pairs import load_pairs
    from anatomy_nb.lm.sae import tiny_sae
    from anatomy_nb.stages.extract import extract
    from anatomy_nb.ui.notebooks import run_notebook
    from anatomy_nb.ui.report import report

    from helpers import assert_clean_outputs

    x = ExtractConfig(shard_size=24, progress=False)
    extract(synthetic_pairs(), tiny_lm, tiny_sae_, tmp_path / "a", x)
    extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path / "b", x)
    cfg = {"concepts": {"min_support": 3}, "progress": False}
    res = compare_audits(tmp_path / "a", tmp_path / "b", run_dir=tmp_path / "ab", config=cfg)
    assert res.mode == "data sets" and not res.reused
    d = res.differences()
    assert list(d["rank"]) == list(range(1, len(d) + 1)) and len(d) == res.manifest["n_concepts"]
    assert {"effect_a", "effect_b", "difference", "q", "significant", "name"} <= set(d.columns)
    counts = res.comparisons().iloc[0]
    assert (counts["units_a"], counts["units_b"]) == (48, len({p.prompt_key for p in hh_pairs}))
    assert len(res.sentences()) == 1 and list(res.table().columns)[:3] == ["#", "concept", "name"]
    assert compare_audits(tmp_path / "a", tmp_path / "b", run_dir=tmp_path / "ab", config=cfg).reused
    assert CompareResult.from_run(tmp_path / "ab").path == res.path

    other_sae = tiny_sae(tiny_lm.d_model, layer=2, d_sae=96, k=6, seed=7)
    extract(hh_pairs, tiny_lm, other_sae, tmp_path / "c", x)
    with pytest.raises(ValueError, match="different saes"):
        compare_audits(tmp_path / "a", tmp_path / "c", run_dir=tmp_path / "ac", config=cfg)
    with pytest.raises(ValueError, match="annotator_votes"):
        compare_audits(tmp_path / "a", config=cfg)

    annotated = load_pairs("pandalm-annotators", limit=30)
    extract(annotated, tiny_lm, tiny_sae_, tmp_path / "panda", x)
    res = compare_audits(tmp_path / "panda", config=cfg)
    c = res.comparisons()
    assert res.mode == "annotators" and list(c["comparison"]) == [
        "annotator1 vs annotator2",
        "annotator1 vs annotator3",
        "annotator2 vs annotator3",
    ]
    votes = np.asarray([[p.metadata["annotator_votes"][f"annotator{k}"] for k in (1, 2, 3)] for p in annotated])
    assert c.iloc[0]["disagreeing_pairs"] == int(((votes[:, 0] * votes[:, 1]) == -1).sum())
    assert all("annotator" in s for s in res.sentences())

    assert (
        main(
            [
                "compare-audits",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--run-dir",
                str(tmp_path / "ab"),
                "--concepts.min-support",
                "3",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    out = run_notebook(
        "07_compare_audits",
        tmp_path / "ab",
        {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "config": cfg},
        progress=False,
    )
    assert_clean_outputs(nbformat.read(out, as_version=4))
    assert "Two audits compared" in out.with_suffix(".html").read_text()
    page = report(tmp_path / "ab").read_text()
    assert "id='compare-audits'" in page and "svg" in page
    json.dumps(res.manifest)  # the manifest is plain JSON
