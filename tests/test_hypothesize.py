"""Stage 2 on synthetic feature tables with known answers, and on a real (tiny) feature store."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from anatomy_nb.concepts.activity import PairFeatures
from anatomy_nb.concepts.clustering import ConceptConfig, cluster_features
from anatomy_nb.config import HypothesizeConfig
from anatomy_nb.results.hypothesize import Hypotheses, rank_hypotheses
from anatomy_nb.stages.hypothesize import hypothesize, score_concepts

from helpers import synthetic, with_edges

CFG = HypothesizeConfig(concepts=ConceptConfig(min_support=5, k_neighbors=5, min_phi=0.2))


def concept_of(labels, features):
    return {int(labels[f]) for f in features}


def test_clustering_groups_cofiring_features_and_ignores_sides():
    pf = synthetic()
    labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), CFG.concepts)
    assert len(concept_of(labels, range(6))) == 1 and len(concept_of(labels, range(6, 12))) == 1
    assert concept_of(labels, range(6)) != concept_of(labels, range(6, 12))
    swapped = cluster_features(sp.vstack([pf.fires_rejected, pf.fires_chosen]), CFG.concepts)
    np.testing.assert_array_equal(labels, swapped)  # unsigned: which side is which does not matter


def test_planted_concept_is_found_and_ranked_first():
    pf = synthetic(planted=0.25)
    labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), CFG.concepts)
    table, features = score_concepts(pf, labels, CFG)
    table = table.sort_values("p")
    (a,) = concept_of(labels, range(6))
    (b,) = concept_of(labels, range(6, 12))
    assert table.iloc[0]["concept"] == a and table.iloc[0]["q"] < 1e-3 and table.iloc[0]["n_features"] == 6
    assert table.iloc[0]["predicted_direction"] == "up" and table.iloc[0]["predicted_change"] == pytest.approx(
        0.85 * 0.25, abs=0.07
    )
    assert table.iloc[0]["split_half_agreement"] == 1.0
    assert not table.set_index("concept").loc[b, "significant"]


@pytest.mark.parametrize("planted,edges", [(0.0, False), (0.25, False), (0.25, True)])
def test_shuffled_sides_keep_false_discoveries_within_the_fdr(planted, edges):
    """With sides shuffled at random, no concept truly separates them: across repeated data sets,
    BH at q < 0.05 makes any discovery in at most about 5 % of them (the complete null), also
    with the opening / ending views in the same family."""
    sims, with_discovery = 60, 0
    for s in range(sims):
        rng = np.random.default_rng(1000 + s)
        pf = synthetic(n=200, d=60, planted=planted, seed=s, swap=rng.uniform(size=200) < 0.5)
        if edges:
            pf = with_edges(pf, seed=s)
        labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), CFG.concepts)
        table, _ = score_concepts(pf, labels, CFG)
        with_discovery += bool(table["significant"].any())
    assert with_discovery / sims <= 0.10, with_discovery


def test_fdr_holds_with_real_and_null_concepts():
    """Many concepts, a known subset truly different: the false discovery proportion averages <= q."""
    rng = np.random.default_rng(7)
    fdps, powers = [], []
    for _ in range(40):
        n, C = 150, 200
        truth = np.zeros(C, bool)
        truth[:20] = True
        d = rng.normal(0, 1, (n, C)) + truth * 0.4
        from anatomy_nb.core.stats import bh_qvalues, paired_test

        sig = bh_qvalues(paired_test(d).p) < 0.05
        fdps.append((sig & ~truth).sum() / max(sig.sum(), 1))
        powers.append((sig & truth).sum() / truth.sum())
    assert np.mean(fdps) <= 0.05 + 0.02 and np.mean(powers) > 0.8


def test_an_ending_only_concept_is_found_by_the_ending_view():
    """A sign-off: concept B (features 6-11) fires somewhere in 30 % of all responses, and 10 % of
    chosen responses get it at their end. In the whole response that is a small lift on a common
    concept; in the ending tokens, where B is otherwise rare, it is the strongest difference."""
    pf = with_edges(synthetic(n=600, planted=0.0, seed=5), seed=5)
    rng = np.random.default_rng(5)
    planted = rng.uniform(size=600) < 0.10
    Fc, (Oc, Or), (Ec, Er) = pf.fires_chosen.toarray(), pf.edges["opening"], pf.edges["ending"]
    Ec = Ec.toarray()
    Fc[planted, 6:12] = Ec[planted, 6:12] = rng.uniform(size=(planted.sum(), 6)) < 0.85
    pf = PairFeatures(
        sp.csr_matrix(Fc),
        pf.fires_rejected,
        pf.ntok,
        pf.groups,
        pf.prompts,
        pf.chosen,
        pf.rejected,
        edges={"opening": (Oc, Or), "ending": (sp.csr_matrix(Ec), Er)},
    )
    labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), CFG.concepts)
    (b,) = concept_of(labels, range(6, 12))
    table, _ = score_concepts(pf, labels, CFG)
    rows = table[table.concept == b].set_index("view")
    assert set(table.view) == {"overall", "opening", "ending"}
    assert rows.loc["ending", "significant"] and rows.loc["ending", "p"] < rows.loc["overall", "p"] / 100
    assert rows.loc["ending", "chosen_rate"] > rows.loc["ending", "rejected_rate"] + 0.05
    assert not rows.loc["opening", "significant"]
    top = rank_hypotheses(table).iloc[0]
    assert (top["concept"], top["view"]) == (b, "ending")
    # the views can be switched off: then only the whole-response rows are tested
    off, _ = score_concepts(pf, labels, HypothesizeConfig(concepts=CFG.concepts, test_edges=False))
    assert set(off.view) == {"overall"}


def test_deterministic_with_a_seed():
    pf = synthetic(seed=3)
    run = lambda: score_concepts(
        pf, cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), CFG.concepts), CFG
    )[0]
    pd.testing.assert_frame_equal(run(), run())


def test_topic_only_signal_is_found_by_the_prompt_conditioned_view():
    """A concept preferred only inside one topic: flat overall, clear inside vs outside."""
    pf = synthetic(n=600, planted=0.0, seed=4)
    topic = np.repeat([0, 1, 2], 200)
    Fc = pf.fires_chosen.toarray()
    rng = np.random.default_rng(0)
    boost = (topic == 1) & (rng.uniform(size=600) < 0.5)
    Fc[boost, 6:12] = rng.uniform(size=(boost.sum(), 6)) < 0.85
    Fr = pf.fires_rejected.toarray()
    flip = (topic != 1) & (rng.uniform(size=600) < 0.08)  # a little the other way elsewhere
    Fr[flip, 6:12] = 1
    pf2 = PairFeatures(sp.csr_matrix(Fc), sp.csr_matrix(Fr), pf.ntok, pf.groups, pf.prompts, pf.chosen, pf.rejected)
    labels = cluster_features(sp.vstack([pf2.fires_chosen, pf2.fires_rejected]), CFG.concepts)
    (b,) = concept_of(labels, range(6, 12))
    table, _ = score_concepts(pf2, labels, CFG, topic_of_group=topic)
    t1 = table[(table.view == "topic") & (table.topic == 1) & (table.concept == b)].iloc[0]
    assert t1["significant"] and t1["mean_diff"] > 0.2


def test_hypothesize_on_a_real_store_writes_a_keyed_artifact(tiny_lm, tiny_sae_, hh_pairs, tmp_path):
    from anatomy_nb.config import ExtractConfig
    from anatomy_nb.stages.extract import extract

    store = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, ExtractConfig(shard_size=10, progress=False))
    h = hypothesize(tmp_path, HypothesizeConfig(concepts=ConceptConfig(min_support=3)), model=tiny_lm, sae=tiny_sae_)
    assert isinstance(h, Hypotheses) and h.manifest["features_key"] == store.manifest["key"]
    t = h.table
    for col in [
        "features",
        "chosen_rate",
        "rejected_rate",
        "mean_diff",
        "cohens_d",
        "z",
        "p",
        "q",
        "split_half_agreement",
        "length_controlled_mean_diff",
        "n_units",
        "predicted_direction",
        "predicted_change",
        "name",
        "label",
        "promoted_tokens",
        "text_stats",
    ]:
        assert col in t.columns, col
    named = t[t["name"].str.len() > 0]
    assert all(lbl.startswith(n) for n, lbl in zip(named["name"], named["label"]))  # the name comes first
    # ranks count from 1 in each listing a reader sees: the prompt-independent rows and the topic rows
    assert list(h.ranked()["rank"]) == list(range(1, len(h.ranked()) + 1))
    assert list(h.ranked_by_topic()["rank"]) == list(range(1, len(h.ranked_by_topic()) + 1))
    assert h.manifest["promoted_tokens"] == "ok" and t["promoted_tokens"].str.len().gt(0).all()
    assert (h.features["concept"] >= -1).all() and len(h.features) == tiny_sae_.d_sae
    # every concept is also tested on the responses' opening and ending tokens, in the same family
    n = h.manifest["n_concepts"]
    assert len(h.by_edge()) == 2 * n and set(h.by_edge()["view"]) == {"opening", "ending"}
    assert len(h.ranked()) == 3 * n
    # an edge is part of the response
    assert (
        h.by_edge()["chosen_rate"]
        <= h.by_edge()["concept"].map(h.overall().set_index("concept")["chosen_rate"]) + 1e-12
    ).all()
    # the length-control placebo: both sides, no control and the configured degree, and a verdict
    placebo = h.length_placebo
    assert set(zip(placebo["view"], placebo["side"], placebo["degree"])) == {
        (v, s, d) for v in ("overall", "opening", "ending") for s in ("chosen", "rejected") for d in (0, 2)
    }
    assert placebo["frac_p05"].between(0, 1).all()
    info = h.manifest["length_placebo"]
    assert info["degree"] == 2 and info["calibrated"] == (info["frac_p05_controlled"] <= 0.10)
    # the worst view and side (rounded)
    assert info["frac_p05_controlled"] == pytest.approx(placebo[placebo["degree"] == 2]["frac_p05"].max(), abs=1e-4)
    again = hypothesize(
        tmp_path, HypothesizeConfig(concepts=ConceptConfig(min_support=3)), model=tiny_lm, sae=tiny_sae_
    )
    assert again.path == h.path  # unchanged: reused
    other = hypothesize(
        tmp_path, HypothesizeConfig(concepts=ConceptConfig(min_support=4)), model=tiny_lm, sae=tiny_sae_
    )
    assert other.path != h.path
    assert Hypotheses.from_run(tmp_path).path == other.path


def test_offline_sentence_embeddings_for_topics():
    from anatomy_nb.concepts.topics import TopicConfig, cluster_prompts, embed_prompts

    E = embed_prompts(["How do I bake bread?", "Bread baking tips please", "How can I hurt someone?"])
    assert E.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    assert E[0] @ E[1] > E[0] @ E[2]
    texts = ["bake bread", "bread recipe", "sourdough bread", "kill a person", "hurt someone", "harm people"]
    t = cluster_prompts(None, texts, TopicConfig(n_topics=2, source="embeddings"))
    assert len(set(t.labels[:3])) == 1 and len(set(t.labels[3:])) == 1 and t.labels[0] != t.labels[3]


def test_other_concept_sources_are_tested_in_the_same_family(tiny_lm, tiny_sae_, tmp_path):
    """Stage 2 tests any concept source beside the SAE concepts: a text rule that every chosen
    response carries is found (sign test), one that no response carries is not; both rows are in the
    one BH family and rank like the rest; the SAE concepts are tested exactly as without them."""
    from anatomy_nb.concepts.sources import TextConcept
    from anatomy_nb.config import ExtractConfig
    from anatomy_nb.core.stats import bh_qvalues
    from anatomy_nb.stages.extract import extract

    from helpers import synthetic_pairs

    extract(synthetic_pairs(), tiny_lm, tiny_sae_, tmp_path, ExtractConfig(shard_size=24, progress=False))
    cfg = HypothesizeConfig(
        concepts=ConceptConfig(min_support=3), promoted_tokens=0, linear_baseline=False, length_placebo_draws=0
    )
    plain = hypothesize(tmp_path, cfg)
    sources = [
        TextConcept("text:flattery", r"(?i)^great question", label="flattering opener"),
        TextConcept("text:pineapple", "pineapple"),
    ]
    h = hypothesize(tmp_path, cfg, sources=sources)
    assert h.path != plain.path and h.manifest["sources"][0]["pattern"] == r"(?i)^great question"
    t = h.table
    # whole response and per topic (no token edges)
    assert set(t[t["source"] == "text"]["view"]) == {"overall", "topic"}
    rows = t[(t["source"] == "text") & (t["view"] == "overall")].set_index("ref")
    assert set(rows.index) == {"text:flattery", "text:pineapple"}
    flat = rows.loc["text:flattery"]
    assert (
        flat["significant"]
        and flat["chosen_rate"] == 1.0
        and flat["rejected_rate"] == 0.0
        and flat["label"] == "flattering opener"
    )
    assert not rows.loc["text:pineapple", "significant"] and rows.loc["text:pineapple", "p"] == 1.0
    np.testing.assert_allclose(t["q"].to_numpy(), bh_qvalues(t["p"].to_numpy()))  # one family
    assert list(h.ranked()["rank"]) == list(range(1, len(h.ranked()) + 1))
    # the SAE concepts' statistics do not change (only their q, through the larger family)
    sae_rows = t[t["source"] == "sae"].set_index(["view", "topic", "concept"]).sort_index()
    before = plain.table.set_index(["view", "topic", "concept"]).sort_index()
    np.testing.assert_allclose(sae_rows["p"], before["p"])
    assert h.manifest["n_concepts"] == plain.manifest["n_concepts"]


def test_a_run_written_before_per_listing_ranks_is_read_with_them(tmp_path):
    """Format-2 hypotheses counted ranks over every row, topic rows included (the first row of the
    prompt-independent listing could read 12); read now, each listing counts from 1."""
    import json
    import shutil

    from anatomy_nb.results.hypothesize import number_ranks

    rows = ["topic", "overall", "topic", "opening", "overall", "topic"]
    t = pd.DataFrame({"rank": range(1, 7), "view": rows, "concept": range(6)})
    assert list(number_ranks(t)["rank"]) == [1, 1, 2, 2, 3, 3]
    old = tmp_path / "old"
    old.mkdir()
    pd.DataFrame(
        {
            "rank": range(1, 7),
            "view": rows,
            "concept": range(6),
            "topic": [0, -1, 1, -1, -1, 0],
            "significant": True,
            "q": 0.01,
            "p": 0.001,
            "cohens_d": 1.0,
            "length_controlled_cohens_d": 1.0,
        }
    ).to_parquet(old / "hypotheses.parquet")
    for name in ("features", "topics", "topic_summary", "baseline_text_stats"):
        pd.DataFrame({"x": [0]}).to_parquet(old / f"{name}.parquet")
    (old / "manifest.json").write_text(json.dumps({"complete": True, "format": 2}))
    h = Hypotheses(old)
    assert list(h.ranked()["rank"]) == [1, 2, 3] and list(h.ranked_by_topic()["rank"]) == [1, 2, 3]
    shutil.rmtree(old)
