"""Stage 3, Python side: the plan the toggles write, the predictions they show, the viewer's
state, the report, and that dataset text is escaped on every static rendering path."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anatomy_nb.results.plan import PlanError, load_plan
from anatomy_nb.results.run import RunDir
from anatomy_nb.stages.plan import default_plan, set_choice
from anatomy_nb.stages.plan import plan as make_plan
from anatomy_nb.stages.prediction import ConceptSpace, badge

from helpers import assert_clean_outputs
from tinyrun import RAW, make_run

WIDGETS = Path(__file__).resolve().parent.parent / "widgets"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_lm, tiny_sae_):
    return make_run(tmp_path_factory.mktemp("stage3"), tiny_lm, tiny_sae_)


def _space(chosen, rejected, groups=None):
    C = chosen.shape[1]
    concepts = pd.DataFrame(
        {
            "concept": np.arange(C),
            "label": [f"c{c}" for c in range(C)],
            "significant": False,
            "features": [[c] for c in range(C)],
        }
    )
    return ConceptSpace(concepts, np.asarray(chosen, float), np.asarray(rejected, float), groups)


# --- headless core: known answers -------------------------------------------------------------------


def test_badge_follows_the_interval_and_firing_rates():
    assert badge(0.01, 0.2, 0.5, 0.1) == "chosen"
    assert badge(-0.3, -0.02, 0.1, 0.5) == "rejected"
    assert badge(-0.1, 0.1, 0.4, 0.3) == "both"
    assert badge(-0.1, 0.1, 0.01, 0.3) == "neither"


def test_rescore_is_the_paired_mean_with_a_t_interval_inside_a_subset():
    rng = np.random.default_rng(0)
    uc, ur = rng.random((50, 3)), rng.random((50, 3))
    uc[:, 0] += 0.5  # concept 0 clearly on chosen
    sp_ = _space(uc, ur)
    sub = np.arange(0, 50, 2)
    r = sp_.rescore(sub)
    d = (uc - ur)[sub]
    assert np.allclose(r["mean_diff"], d.mean(0))
    half = (r["ci_high"] - r["ci_low"]) / 2
    from scipy import stats

    assert np.allclose(half, stats.t.ppf(0.975, len(sub) - 1) * d.std(0, ddof=1) / np.sqrt(len(sub)))
    assert r["badge"].iloc[0] == "chosen" and r["n_units"].iloc[0] == 25


def test_rescore_averages_pairs_that_share_a_prompt_into_one_unit():
    uc = np.array([[1.0], [0.0], [1.0]])
    ur = np.zeros((3, 1))
    sp_ = _space(uc, ur, groups=np.array([0, 0, 1]))
    r = sp_.rescore(None)
    assert r["n_units"].iloc[0] == 2 and r["mean_diff"].iloc[0] == pytest.approx((0.5 + 1.0) / 2)


def test_rescore_controls_length_as_stage_2_does():
    """Concept 0 tracks response length only, concept 1 has a real effect as well: inside a lasso
    the length-controlled d is ~0 for the first and clear for the second, and on all pairs it is
    exactly stage 2's (hypothesize.score_concepts)."""
    from anatomy_nb.concepts.activity import length_diffs
    from anatomy_nb.core.stats import length_controlled

    rng = np.random.default_rng(1)
    n = 400
    ntok = rng.integers(20, 300, size=(n, 2))
    ntok[:, 0] = ntok[:, 0] * 1.5  # chosen longer, as in much preference data
    L = np.log(ntok)
    uc = np.column_stack([0.2 * L[:, 0], 0.2 * L[:, 0] + 0.15]) + rng.normal(0, 0.1, (n, 2))
    ur = np.column_stack([0.2 * L[:, 1], 0.2 * L[:, 1]]) + rng.normal(0, 0.1, (n, 2))
    concepts = pd.DataFrame({"concept": [0, 1], "label": ["length", "real"]})
    space = ConceptSpace(concepts, uc, ur, None, ntok=ntok, length_degree=2)
    sub = space.rescore(np.arange(0, n, 2))
    assert sub["cohens_d"].iloc[0] > 0.3 and abs(sub["length_controlled_cohens_d"].iloc[0]) < 0.15
    assert sub["length_controlled_cohens_d"].iloc[1] > 0.8
    expect = length_controlled(uc - ur, length_diffs(ntok, None, 2)).cohens_d
    np.testing.assert_allclose(space.rescore(None)["length_controlled_cohens_d"], expect)
    # without lengths (a space built by hand) the column is there and empty
    assert _space(uc, ur).rescore(None)["length_controlled_cohens_d"].isna().all()


def test_filter_prediction_is_exact_on_the_data_including_spill_over():
    # concept 1 is a copy of concept 0 on half the pairs: dropping pairs carried by 0 moves 1 too
    uc = np.array([[1, 1], [1, 0], [0, 0], [0, 0]], float)
    ur = np.array([[0, 0], [0, 0], [0, 0], [1, 1]], float)
    sp_ = _space(uc, ur)
    plan = _plan(2)
    set_choice(plan, 0, "suppress", "filter", 0.5)
    table, edges = sp_.predict(plan)
    assert table.loc[0, "pairs_removed"] == 2
    keep = [2, 3]
    expect = (uc - ur)[keep].mean(0)
    assert np.allclose(table["after"], expect)
    assert table.loc[0, "basis"].startswith("data") and table.loc[1, "basis"] == "spill-over"
    assert table.loc[1, "spillover"] == pytest.approx(expect[1] - (uc - ur)[:, 1].mean())
    # flip instead of drop: the carried pairs count with the opposite sign
    set_choice(plan, 0, "suppress", "filter", 0.5, filter_mode="flip")
    table, _ = sp_.predict(plan)
    d = uc - ur
    d[:2] *= -1
    assert np.allclose(table["after"], d.mean(0))
    assert set(edges.columns) >= {"source", "target", "correlation", "shift"}


def test_reward_shaping_explains_a_concept_away_and_drags_correlated_ones_by_their_slope():
    rng = np.random.default_rng(1)
    a = rng.random((400, 1))
    uc = np.hstack([a + 0.2, 0.5 * (a + 0.2), rng.random((400, 1))])  # concept 1 = 0.5 × concept 0; 2 independent
    b = rng.random((400, 1))
    ur = np.hstack([b, 0.5 * b, rng.random((400, 1))])
    sp_ = _space(uc, ur)
    before = (uc - ur).mean(0)
    plan = _plan(3)
    set_choice(plan, 0, "suppress")  # reward shaping, λ = 1
    table, edges = sp_.predict(plan)
    assert plan.concepts[0].method == "reward_shaping" and plan.concepts[0].strength == 1.0
    assert table.loc[0, "after"] == pytest.approx(0.0, abs=1e-12)
    assert table.loc[1, "spillover"] == pytest.approx(-0.5 * before[0], rel=1e-6)  # slope 0.5
    assert abs(table.loc[2, "spillover"]) < 0.1 * abs(before[0])
    top = edges.iloc[0]
    assert (top["source"], top["target"]) == (0, 1) and top["correlation"] == pytest.approx(1.0)
    # amplify doubles the signal at λ = 1; allow restores the baseline
    set_choice(plan, 0, "amplify", strength=1.0)
    assert sp_.predict(plan)[0].loc[0, "after"] == pytest.approx(2 * before[0])
    set_choice(plan, 0, "allow")
    assert np.allclose(sp_.predict(plan)[0]["after"], before)


def _plan(n):
    from anatomy_nb.results.plan import ConceptChoice, InterventionPlan

    return InterventionPlan(concepts=[ConceptChoice(concept=f"sae:{c}", features=[c]) for c in range(n)])


def test_set_choice_validates_and_names_the_entry():
    plan = _plan(3)
    with pytest.raises(PlanError, match=r"entry 2 \('sae:2'\).*strength"):
        set_choice(plan, 2, "suppress", "filter", 5.0)
    assert plan.concepts[2].action == "allow"  # unchanged after a refused choice
    with pytest.raises(PlanError, match="not in the plan"):
        set_choice(plan, 9, "suppress")
    set_choice(plan, 1, "suppress", "inoculate")
    assert plan.concepts[1].instruction  # an inoculation gets a default instruction
    set_choice(plan, 1, "suppress", "steer")
    assert plan.concepts[1].strength == 4.0  # the new method's default strength


# --- on a real (tiny) run directory --------------------------------------------------------------------


def test_default_plan_lists_every_concept_as_allow_with_its_features(run):
    from anatomy_nb.results.hypothesize import Hypotheses

    hyp = Hypotheses.from_run(run)
    plan = default_plan(hyp, layer=2)
    ov = hyp.overall()
    assert len(plan.concepts) == len(ov) > 1 and not plan.active
    assert plan.hypotheses == hyp.manifest["key"]
    c0 = next(c for c in plan.concepts if c.concept == f"sae:{int(ov.iloc[0]['concept'])}")
    assert c0.features == [int(f) for f in ov.iloc[0]["features"]] and c0.layer == 2
    # the signal ConceptSpace computes is the table's own mean difference
    space = ConceptSpace.from_run(run, hyp)
    assert np.allclose(space.signal(), space.concepts["mean_diff"].to_numpy())


def test_toggles_write_the_plan_file_on_each_valid_change_and_refuse_invalid_ones(run):
    from anatomy_nb.ui.viewer import ConceptToggles

    path = RunDir(run).plan_path
    path.unlink(missing_ok=True)
    t = ConceptToggles(run)
    first = json.loads(path.read_text())
    assert all(c["action"] == "allow" for c in first["concepts"]) and "plan written" in t.status
    target = t.rows[0]["concept"]
    # what the front-end sends: the whole choices dict with one entry changed
    t.choices = {
        **t.choices,
        target: {**t.choices[target], "action": "suppress", "method": "reward_shaping", "strength": 0.5},
    }
    saved = {c["concept"]: c for c in json.loads(path.read_text())["concepts"]}
    assert (
        saved[target]["action"] == "suppress"
        and saved[target]["method"] == "reward_shaping"
        and saved[target]["strength"] == 0.5
    )
    assert load_plan(path).active[0].concept == target  # what stage 4 reads
    row = next(p for p in t.preview if p["concept"] == target)
    assert row["after"] == pytest.approx(row["before"] * 0.5, abs=1e-9) and t.error == ""
    assert t.spill and all(e["source"] == target for e in t.spill)
    before = path.read_text()
    t.choices = {**t.choices, target: {**t.choices[target], "method": "filter", "strength": 7}}
    assert "strength" in t.error and path.read_text() == before  # refused, file untouched
    assert t.choices[target]["method"] == "reward_shaping"  # the controls snap back
    # an action without a method gets reward shaping and its default strength, shown back
    other = t.rows[1]["concept"]
    t.choices = {**t.choices, other: {"action": "amplify", "method": "", "strength": ""}}
    assert t.choices[other]["method"] == "reward_shaping" and t.error == ""
    saved = {c["concept"]: c for c in json.loads(path.read_text())["concepts"]}
    assert saved[other]["action"] == "amplify"
    # a plan given as a parameter wins over the file, and is written back
    t2 = ConceptToggles(
        run, plan={"concepts": [{"concept": other, "action": "suppress", "method": "ablate", "strength": 0.5}]}
    )
    saved = {c["concept"]: c for c in json.loads(path.read_text())["concepts"]}
    assert saved[other]["method"] == "ablate" and saved[target]["action"] == "allow"
    assert len(saved) == len(t2.rows)


def test_plan_rejects_unknown_concepts(run):
    with pytest.raises(PlanError, match="not in the hypotheses table"):
        make_plan(
            run,
            {"concepts": [{"concept": "sae:9999", "action": "suppress", "method": "filter", "strength": 0.5}]},
            write=False,
        )


def test_viewer_state_selection_rescoring_and_drilldown(run):
    from anatomy_nb.config import MapConfig
    from anatomy_nb.ui.viewer import AuditViewer, ViewerData

    data = ViewerData(run, maps=MapConfig(method="svd"))
    v = AuditViewer(run, data=data)
    n_pairs = data.space.n_pairs
    assert len(v.data_map["x"]) == n_pairs and len(v.feature_map["x"]) == len(v.feature_map["concept"]) > 0
    assert all(0 <= x <= 1 for x in v.data_map["x"] + v.feature_map["y"])
    assert v.scope == "all pairs" and {r["concept"] for r in v.concepts} == set(data.space.concepts["concept"])
    # the fields practitioners compare: z and the split-half check on every row; the other views ranked
    overall = data.hyp.overall().set_index("concept")
    for r in v.concepts:
        assert r["z"] == pytest.approx(overall.loc[r["concept"], "z"], rel=1e-6, abs=1e-9) or r["z"] is None
        assert r["split_mark"] == ("✓" if overall.loc[r["concept"], "split_half_agreement"] >= 0.9 else "✗")
    assert set(v.view_rows) == {"topic", "opening", "ending"}
    assert len(v.view_rows["opening"]) == len(data.hyp.by_edge().query("view == 'opening'"))
    topic_rows = v.view_rows["topic"]
    assert len(topic_rows) == min(300, len(data.hyp.by_topic())) and all(
        r["where"].startswith("topic ") for r in topic_rows
    )
    # significant first
    assert [r["significant"] for r in topic_rows] == sorted((r["significant"] for r in topic_rows), reverse=True)
    c = v.concepts[0]["concept"]
    v.selected_concept = c
    dd = v.drilldown
    assert dd["concept"] == c and dd["contexts"] and sum(dd["histogram"]["chosen"]) == n_pairs
    assert {"split_half", "length_control", "promoted_tokens", "examples"} <= set(dd)
    for ctx in dd["contexts"]:  # every token of a top context carries the feature's activation on it
        assert len(ctx["activations"]) == len(ctx["tokens"]) and ctx["activations"][ctx["peak"]] == pytest.approx(
            ctx["value"], rel=1e-2
        )
    assert len(v.pair_effect) == n_pairs
    # a lasso selection re-scores every concept inside it
    sel = list(range(0, n_pairs, 3))
    v.selected_pairs = sel
    assert v.scope.startswith("selection") and all(r["n_units"] <= len(sel) for r in v.concepts)
    expect = data.space.rescore(sel).set_index("concept")["mean_diff"]
    assert all(r["mean_diff"] == pytest.approx(expect[r["concept"]]) for r in v.concepts)
    assert v.drilldown["selection"]["n_units"] <= len(sel)
    # a topic selects its pairs
    k = int(v.topics[0]["topic"])
    v.selected_topic = k
    assert v.selected_pairs == np.flatnonzero(data.topic_of_pair == k).tolist() and v.scope.startswith(f"topic {k}")
    v.selected_topic = -1
    assert v.selected_pairs == [] and v.scope == "all pairs"


def test_maps_with_umap_are_cached_in_the_run_dir(run):
    from anatomy_nb.config import MapConfig
    from anatomy_nb.ui.viewer_data import compute_maps

    m = compute_maps(run, cfg=MapConfig(method="umap", n_neighbors=5))
    assert m["data"]["method"] == "umap" and m["features"]["method"] == "umap"
    xy = np.array([m["data"]["x"], m["data"]["y"]])
    assert xy.std(1).min() > 0.05  # a real layout, not collapsed
    assert (run / "cache" / "maps" / m["key"] / "maps.json").exists()
    assert compute_maps(run, cfg=MapConfig(method="umap", n_neighbors=5)) == m  # reused


# --- untrusted text --------------------------------------------------------------------------------------


def test_front_end_never_parses_data_as_html():
    source = "\n".join(p.read_text() for p in WIDGETS.glob("*.js"))
    js = re.sub(r"^\s*//.*$", "", source, flags=re.M)  # code, not the comments that name the sinks
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        ".href",
        ".src =",
    ):
        assert sink not in js, f"{sink} in widgets/*.js"
    assert "textContent" in js
    assert not re.search(r"https?://|@import|url\(", js + (WIDGETS / "anatomy.css").read_text()), (
        "the front-end must not fetch anything"
    )


def test_every_static_view_escapes_the_xss_pairs(run):
    from anatomy_nb.config import MapConfig
    from anatomy_nb.ui.report import report as build_report
    from anatomy_nb.ui.viewer import AuditViewer, ConceptToggles, ViewerData
    from anatomy_nb.ui.viewer_data import static_drilldown_html

    data = ViewerData(run, maps=MapConfig(method="svd"))
    v = AuditViewer(run, data=data)
    htmls = [v.static_html(), ConceptToggles(run, data=data, autosave=False).static_html()]
    htmls += [static_drilldown_html(data.drilldown(int(c))) for c in data.space.concepts["concept"]]
    everything = "".join(htmls)
    for raw in RAW:
        assert raw not in everything
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in everything or "&lt;img src=x onerror=" in everything
    # the raw text reaches the widget state untouched (the front-end shows it with textContent)
    assert any("<script>window.__pwned=1</script>" in t for t in v.data_map["text"])
    # the summary page: no script at all, escaped tables
    index = build_report(run, render=False)
    page = index.read_text()
    assert "<script" not in page.lower() and "Content-Security-Policy" in page
    for raw in RAW:
        assert raw not in page


def test_notebook_03_runs_headless_with_a_plan_parameter_and_reports(run):
    import nbformat

    from anatomy_nb.results.hypothesize import Hypotheses
    from anatomy_nb.ui.notebooks import run_notebook
    from anatomy_nb.ui.report import report as build_report

    cid = int(Hypotheses.from_run(run).overall().iloc[0]["concept"])
    plan = {"concepts": [{"concept": f"sae:{cid}", "action": "suppress", "method": "filter", "strength": 0.05}]}
    out = run_notebook("03_plan", run, {"plan": plan, "config": {"maps": {"method": "svd"}}}, progress=False)
    nb = nbformat.read(out, as_version=4)
    assert_clean_outputs(nb)
    assert not [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    saved = {c["concept"]: c for c in json.loads(RunDir(run).plan_path.read_text())["concepts"]}
    assert saved[f"sae:{cid}"]["method"] == "filter" and saved[f"sae:{cid}"]["strength"] == 0.05
    index = build_report(run)
    html = (index.parent / "03_plan.html").read_text()
    assert "application/vnd.jupyter.widget-view+json" not in html  # static views instead of blank widgets
    assert not re.search(r"<script[^>]*src=[\"']https?://", html)  # nothing fetched from a network
    assert "Intervention plan" in html and "plotly" in html.lower()
    for raw in RAW:
        assert raw not in html
    assert "03_plan.html" in index.read_text()


def test_a_scoped_entry_is_predicted_on_its_pairs_only():
    """Shaping scoped to half the pairs removes that half's share of Δ; a scoped filter drops only
    its pairs; a topic id is read from stage 2's topics."""
    from types import SimpleNamespace

    from anatomy_nb.data.schema import PreferencePair

    users = ["quantum vibes?", "Quantum healing?", "bake bread", "bake cake"]
    pairs = [
        PreferencePair(id=f"p{i}", prompt=({"role": "user", "content": u},), chosen="a", rejected="b")
        for i, u in enumerate(users)
    ]
    sp_ = _space(np.array([[1.0, 0.5]] * 4), np.zeros((4, 2)))
    sp_.store = SimpleNamespace(pairs=lambda: pairs)
    sp_.topic_of_prompt = {p.prompt_text: k for p, k in zip(pairs, [4, 4, 0, 0])}
    shaped = {
        "concepts": [
            {
                "concept": "sae:0",
                "action": "suppress",
                "method": "reward_shaping",
                "strength": 1.0,
                "prompts": "quantum",
            }
        ]
    }
    table, _ = sp_.predict(shaped)
    assert table.loc[0, "after"] == pytest.approx(0.5) and table.loc[0, "basis"].endswith("in scope")
    by_topic = {"concepts": [{**shaped["concepts"][0], "prompts": None, "topic": 4}]}
    assert sp_.predict(by_topic)[0].loc[0, "after"] == pytest.approx(0.5)
    filtered = {"concepts": [{**shaped["concepts"][0], "method": "filter", "strength": 0.5}]}
    table, _ = sp_.predict(filtered)
    assert table.loc[0, "pairs_removed"] == 2 and table.loc[0, "after"] == pytest.approx(1.0)
    everywhere = {"concepts": [{**filtered["concepts"][0], "prompts": None}]}
    assert sp_.predict(everywhere)[0].loc[0, "pairs_removed"] == 4
