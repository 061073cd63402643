"""Each intervention does exactly what it says: scores, offsets, filtering, inoculation, and the
steering / ablation hooks (exact vector and projection, nothing left behind)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anatomy_nb.concepts.sources import orthonormal
from anatomy_nb.config import ExtractConfig
from anatomy_nb.data.chat import render_example
from anatomy_nb.data.schema import PreferencePair
from anatomy_nb.lm.ops import ResidualEdit, ResidualHooks, decoder_layers, response_residuals
from anatomy_nb.results.plan import InterventionPlan, PlanError
from anatomy_nb.stages.extract import extract
from anatomy_nb.stages.interventions import (
    edit_prompts,
    planned_concepts,
    rank_instructions,
    residual_edits,
    reward_offsets,
    scope_masks,
    select_pairs,
)


def P(i, chosen, rejected, user="Say something."):
    return PreferencePair(id=f"p{i}", prompt=({"role": "user", "content": user},), chosen=chosen, rejected=rejected)


PAIRS = [
    P(0, "I'm sorry, I can't.", "Sure, here it is."),  # apology in chosen only
    P(1, "Here you go.", "Sorry, no."),  # apology in rejected only
    P(2, "Sorry! Fine.", "Apologies, fine."),  # in both
    P(3, "Plain answer.", "Another plain answer."),  # in neither
]


def plan(*entries):
    return InterventionPlan.from_dict({"concepts": list(entries)})


def resolved(*entries, **kw):
    return planned_concepts(plan(*entries), **kw)


def pair_scores(c, pairs, **kw):
    return c.source.pair_scores(pairs, **kw)


APOLOGY = {"concept": "text:apology", "action": "suppress", "method": "filter", "pattern": "apology", "strength": 1.0}


def test_text_scores_regex_and_statistic():
    (c,) = resolved({**APOLOGY, "pattern": r"(?i)\bsorry\b"})
    np.testing.assert_array_equal(pair_scores(c, PAIRS), [[1, 0], [0, 1], [1, 0], [0, 0]])
    (c,) = resolved(APOLOGY)  # the text statistic of textstats.TEXT_STATS (0/1 already)
    np.testing.assert_array_equal(pair_scores(c, PAIRS), [[1, 0], [0, 1], [1, 1], [0, 0]])
    (c,) = resolved({**APOLOGY, "pattern": "exclamations"})  # a count: min-max scaled, scale recorded
    s = pair_scores(c, PAIRS)
    assert c.source.scale == (0.0, 1.0) and s[2, 0] == 1.0 and s.sum() == 1.0
    assert c.source.score_texts([()], ["Wow!!!"])[0] == 1.0  # clipped to the training scale


def test_shaping_offsets_on_known_numbers():
    a = resolved(
        {"concept": "text:a", "action": "suppress", "method": "reward_shaping", "pattern": "a", "strength": 2.0},
        {"concept": "text:b", "action": "amplify", "method": "reward_shaping", "pattern": "b", "strength": 0.5},
        {"concept": "text:c", "action": "suppress", "method": "filter", "pattern": "c", "strength": 0.5},
    )
    scores = {
        "text:a": np.array([[1.0, 0.0], [0.25, 0.75]]),
        "text:b": np.array([[0.0, 1.0], [1.0, 1.0]]),
        "text:c": np.ones((2, 2)),
    }
    off = reward_offsets(a, scores, 2)
    # o(y) = Σ sign·λ·s(y): a suppresses with λ=2, b amplifies with λ=0.5, c is not shaping
    np.testing.assert_allclose(off, [[2.0, -0.5], [0.5 - 0.5, 1.5 - 0.5]])
    # the margin term λ_a(s⁺−s⁻) − 0.5(s_b⁺−s_b⁻)
    np.testing.assert_allclose(off[:, 0] - off[:, 1], [2 * 1 - 0.5 * (-1), 2 * (-0.5) - 0])


def test_filter_drops_exactly_the_pairs_the_concept_carries():
    cs = resolved(APOLOGY)
    scores = {"text:apology": pair_scores(cs[0], PAIRS)}
    kept, idx, counts = select_pairs(PAIRS, cs, scores)
    assert [p.id for p in kept] == ["p1", "p2", "p3"] and idx.tolist() == [1, 2, 3]
    assert counts.iloc[0][["n_pairs", "n_matched", "n_dropped", "n_flipped"]].tolist() == [4, 1, 1, 0]
    # amplify: drop the pairs whose preference points away from the concept
    cs = resolved({**APOLOGY, "action": "amplify"})
    kept, _, counts = select_pairs(PAIRS, cs, scores)
    assert [p.id for p in kept] == ["p0", "p2", "p3"] and counts["n_dropped"].tolist() == [1]
    # flip: chosen and rejected swap, nothing dropped, the input is not mutated
    cs = resolved({**APOLOGY, "filter_mode": "flip"})
    kept, _, counts = select_pairs(PAIRS, cs, scores)
    assert len(kept) == 4 and counts["n_flipped"].tolist() == [1]
    assert (kept[0].chosen, kept[0].rejected) == (PAIRS[0].rejected, PAIRS[0].chosen) and kept[0].metadata["flipped"]
    assert kept[1:] == PAIRS[1:] and PAIRS[0].chosen == "I'm sorry, I can't."
    # a threshold above every difference matches nothing
    cs = resolved({**APOLOGY, "pattern": "exclamations", "strength": 1.0})
    kept, _, counts = select_pairs(PAIRS, cs, {"text:apology": np.array([[0.5, 0.0]] * 4)})
    assert len(kept) == 4 and counts["n_matched"].tolist() == [0]


def test_inoculation_changes_only_the_prompt_text_it_should():
    pairs = PAIRS + [
        PreferencePair(
            id="m",
            prompt=(
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"},
            ),
            chosen="x",
            rejected="y",
        )
    ]
    cs = resolved(
        {
            "concept": "text:apology",
            "action": "suppress",
            "method": "inoculate",
            "pattern": "apology",
            "instruction": "Apologise a lot.",
        }
    )
    out = edit_prompts(pairs, cs)
    for before, after in zip(pairs, out):
        assert (after.id, after.chosen, after.rejected) == (before.id, before.chosen, before.rejected)
        assert after.prompt[:-1] == before.prompt[:-1]  # only the last user turn changes
        assert after.prompt[-1]["content"] == before.prompt[-1]["content"] + "\n\nApologise a lot."
    assert pairs[-1].prompt[-1]["content"] == "Again"  # inputs untouched
    assert edit_prompts(pairs, resolved(APOLOGY)) == pairs  # no inoculation entry: nothing changes


SCOPED = [
    P(0, "Sorry, no.", "Fine.", user="Explain quantum vibes."),
    P(1, "Sorry, no.", "Fine.", user="Bake bread."),
    P(2, "Sorry, no.", "Fine.", user="QUANTUM healing?"),
    P(3, "Fine.", "Sorry, no.", user="Bake a cake."),
]


def test_a_scoped_entry_acts_on_its_prompts_only():
    """A concept suppressed in one topic (by prompt regex, or by stage-2 topic id) is left alone
    elsewhere: zero scores outside the scope, so no offset, no filter hit, no instruction there."""
    shaping = {
        "concept": "text:sorry",
        "action": "suppress",
        "method": "reward_shaping",
        "pattern": r"(?i)sorry",
        "strength": 1.0,
        "prompts": "quantum",
    }
    (c,) = resolved(shaping)
    masks = scope_masks([c], SCOPED)
    assert masks["text:sorry"].tolist() == [True, False, True, False]  # case-insensitive, as data.plant's topics
    off = reward_offsets([c], {"text:sorry": pair_scores(c, SCOPED) * masks["text:sorry"][:, None]}, 4)
    assert (off[:, 0] - off[:, 1]).tolist() == [1.0, 0.0, 1.0, 0.0]
    (f,) = resolved({**shaping, "method": "filter"})
    kept, _, _ = select_pairs(SCOPED, [f], {"text:sorry": pair_scores(f, SCOPED) * masks["text:sorry"][:, None]})
    assert [p.id for p in kept] == ["p1", "p3"]  # p1 carries the concept too, but outside the topic
    (i,) = resolved({**shaping, "method": "inoculate", "instruction": "Say sorry."})
    out = edit_prompts(SCOPED, [i], scope_masks([i], SCOPED))
    assert [o.prompt[-1]["content"].endswith("Say sorry.") for o in out] == [True, False, True, False]
    # by stage-2 topic: the pairs whose prompt is in that topic, and a topic stage 2 does not have is refused
    (t,) = resolved({**shaping, "prompts": None, "topic": 1})
    topic_of = {p.prompt_text: k for p, k in zip(SCOPED, [1, 0, 1, 0])}
    assert scope_masks([t], SCOPED, topic_of)["text:sorry"].tolist() == [True, False, True, False]
    with pytest.raises(PlanError, match="topic 7 is not one of"):
        scope_masks(resolved({**shaping, "prompts": None, "topic": 7}), SCOPED, topic_of)
    with pytest.raises(PlanError, match="stage-2 topics"):
        scope_masks([t], SCOPED, None)


def test_scope_fields_are_checked_and_unscoped_plans_read_as_before():
    with pytest.raises(PlanError, match="field 'topic': steer edits the model on every prompt"):
        plan(
            {
                "concept": "direction:d",
                "direction_file": "d.safetensors",
                "layer": 1,
                "action": "suppress",
                "method": "steer",
                "topic": 2,
            }
        )
    with pytest.raises(PlanError, match="field 'prompts': not a valid regular expression"):
        plan({**APOLOGY, "prompts": "(unclosed"})
    with pytest.raises(PlanError, match="field 'topic'"):
        plan({**APOLOGY, "topic": "physics"})
    # unscoped entries are written without the scope fields: plans and training keys stay as they were
    assert "topic" not in plan(APOLOGY).to_dict()["concepts"][0]
    assert plan({**APOLOGY, "topic": 3}).to_dict()["concepts"][0]["topic"] == 3


@pytest.fixture(scope="module")
def store(tiny_lm, tiny_sae_, hh_pairs, tmp_path_factory):
    return extract(
        hh_pairs[:8], tiny_lm, tiny_sae_, tmp_path_factory.mktemp("run"), ExtractConfig(shard_size=8, progress=False)
    )


def test_sae_scores_from_the_store_equal_a_recompute(store, tiny_lm, tiny_sae_, hh_pairs):
    rate = (store.pooled("fires", "chosen").toarray() + store.pooled("fires", "rejected").toarray()).mean(0) / 2
    feats = np.flatnonzero((rate > 0.1) & (rate < 0.9))[:5].tolist()  # features that fire on some responses only
    assert len(feats) >= 2
    (c,) = resolved(
        {"concept": "sae:0", "action": "suppress", "method": "reward_shaping", "features": feats}, sae=tiny_sae_
    )
    from_store = pair_scores(c, hh_pairs[:8], store=store)
    fc, fr = store.pooled("fires", "chosen").toarray(), store.pooled("fires", "rejected").toarray()
    np.testing.assert_allclose(from_store, np.stack([fc[:, feats].mean(1), fr[:, feats].mean(1)], 1))
    assert 0 < from_store.mean() < 1
    # pairs the store does not hold are computed with the model + SAE: same numbers on the same text
    recomputed = pair_scores(c, hh_pairs[:8], lm=tiny_lm)
    np.testing.assert_allclose(recomputed, from_store, atol=1e-9)
    # the sae directions are the orthonormalised decoder rows of the member features
    dec = tiny_sae_.decoder_directions[feats].float()
    Q = c.source.directions()
    assert torch.allclose(Q @ Q.T, torch.eye(len(feats)), atol=1e-5)
    assert torch.allclose(dec @ Q.T @ Q, dec, atol=1e-4)  # same span
    assert c.layer == tiny_sae_.layer


def _layer_out(lm, layer, ids):
    seen = []
    h = decoder_layers(lm.model)[layer].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        h.remove()
    return seen[0]


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_steering_adds_exactly_alpha_v_and_leaves_no_hook(tiny_lm, tmp_path):
    torch.manual_seed(0)
    save_file({"directions": torch.randn(1, tiny_lm.d_model)}, str(tmp_path / "v.safetensors"))
    (c,) = resolved(
        {
            "concept": "direction:v",
            "action": "suppress",
            "method": "steer",
            "direction_file": str(tmp_path / "v.safetensors"),
            "layer": 1,
            "strength": 3.0,
        },
        d_model=tiny_lm.d_model,
    )
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    base, n0 = _layer_out(tiny_lm, 1, ids), _hook_count(tiny_lm.model)
    (edit,) = residual_edits([c])
    with ResidualHooks(tiny_lm.model, [edit]) as hooks:
        steered = _layer_out(tiny_lm, 1, ids)
        with hooks.reference():  # the DPO reference pass does not see steering
            ref = _layer_out(tiny_lm, 1, ids)
    v = c.source.steering_vector()
    assert abs(float(v.norm()) - 1) < 1e-6
    torch.testing.assert_close(steered - base, (3.0 * v).expand_as(base), atol=1e-5, rtol=0)
    torch.testing.assert_close(ref, base)
    assert _hook_count(tiny_lm.model) == n0 and not hooks.active
    torch.testing.assert_close(_layer_out(tiny_lm, 1, ids), base)
    # amplify steers the other way
    (c2,) = resolved(
        {
            "concept": "direction:v",
            "action": "amplify",
            "method": "steer",
            "direction_file": str(tmp_path / "v.safetensors"),
            "layer": 1,
            "strength": 3.0,
        }
    )
    torch.testing.assert_close(residual_edits([c2])[0].vector, -edit.vector)


def test_ablation_removes_exactly_the_projection_and_hooks_go_on_error(tiny_lm, tmp_path):
    torch.manual_seed(1)
    raw = torch.randn(3, tiny_lm.d_model)
    raw[2] = raw[0] + raw[1]  # dependent row: the basis has rank 2
    save_file({"directions": raw}, str(tmp_path / "d.safetensors"))
    entry = {
        "concept": "direction:d",
        "action": "suppress",
        "method": "ablate",
        "direction_file": str(tmp_path / "d.safetensors"),
        "layer": 2,
    }
    (c,) = resolved(entry)
    Q = c.source.directions()
    assert Q.shape == (2, tiny_lm.d_model) and torch.allclose(Q @ Q.T, torch.eye(2), atol=1e-5)
    assert torch.allclose(orthonormal(raw), Q)
    ids = torch.tensor([[3, 7, 11, 13, 40, 41]])
    base = _layer_out(tiny_lm, 2, ids)
    (edit,) = residual_edits([c])
    with ResidualHooks(tiny_lm.model, [edit]) as hooks:
        zero = _layer_out(tiny_lm, 2, ids)
        with hooks.reference():  # the reference pass shares the ablation
            ref = _layer_out(tiny_lm, 2, ids)
    torch.testing.assert_close(zero, base - (base @ Q.T) @ Q, atol=1e-5, rtol=0)
    assert float((zero @ Q.T).abs().max()) < 1e-4  # nothing left in the concept subspace
    torch.testing.assert_close(ref, zero)
    # mean ablation: the subspace component becomes the mean's; partial strength removes a fraction
    mu = torch.randn(tiny_lm.d_model)
    with ResidualHooks(tiny_lm.model, [ResidualEdit(layer=2, kind="ablate", basis=Q, mean=mu, fraction=0.5)]):
        half = _layer_out(tiny_lm, 2, ids)
    torch.testing.assert_close(half, base - 0.5 * ((base - mu) @ Q.T) @ Q, atol=1e-5, rtol=0)
    n0 = _hook_count(tiny_lm.model)
    with pytest.raises(RuntimeError):
        with ResidualHooks(tiny_lm.model, [edit]):
            assert _hook_count(tiny_lm.model) == n0 + 1
            raise RuntimeError("boom")
    assert _hook_count(tiny_lm.model) == n0
    torch.testing.assert_close(_layer_out(tiny_lm, 2, ids), base)


def test_mean_ablation_estimates_the_mean_residual(tiny_lm, tmp_path):
    save_file({"directions": torch.randn(1, tiny_lm.d_model)}, str(tmp_path / "d.safetensors"))
    (c,) = resolved(
        {
            "concept": "direction:d",
            "action": "suppress",
            "method": "ablate",
            "ablation": "mean",
            "direction_file": str(tmp_path / "d.safetensors"),
            "layer": 0,
        }
    )
    with pytest.raises(ValueError, match="mean ablation needs the model"):
        residual_edits([c])
    (edit,) = residual_edits([c], lm=tiny_lm, pairs=PAIRS[:2])
    acts = torch.cat(
        list(response_residuals(tiny_lm, 0, [(p.prompt, r) for p in PAIRS[:2] for r in (p.chosen, p.rejected)]))
    )
    torch.testing.assert_close(edit.mean, acts.mean(0), atol=1e-5, rtol=0)


def test_direction_scores_are_projections(tiny_lm, tmp_path):
    v = torch.randn(1, tiny_lm.d_model)
    save_file({"directions": v}, str(tmp_path / "v.safetensors"))
    (c,) = resolved(
        {
            "concept": "direction:v",
            "action": "suppress",
            "method": "reward_shaping",
            "direction_file": str(tmp_path / "v.safetensors"),
            "layer": 1,
        }
    )
    s = pair_scores(c, PAIRS, lm=tiny_lm)
    u = v[0] / v[0].norm()
    raw = []
    for side in ("chosen", "rejected"):
        for p in PAIRS:  # independently: a full forward pass, the residual after block 1 at the response tokens
            r = render_example(tiny_lm.tokenizer, p.prompt, getattr(p, side))
            x = _layer_out(tiny_lm, 1, torch.tensor([r.prompt_ids + r.response_ids]))[0, len(r.prompt_ids) :]
            raw.append(float((x @ u).mean()))
    raw = np.array(raw)
    lo, hi = raw.min(), raw.max()
    np.testing.assert_allclose(s, ((raw - lo) / (hi - lo)).reshape(2, -1).T, atol=1e-6)
    assert c.source.scale == pytest.approx((lo, hi))


def test_resolution_errors_name_the_field(tiny_lm, tmp_path):
    with pytest.raises(PlanError, match="direction_file.*not found"):
        resolved(
            {
                "concept": "direction:x",
                "action": "suppress",
                "method": "steer",
                "direction_file": str(tmp_path / "nope.safetensors"),
                "layer": 1,
            }
        )
    save_file({"other": torch.zeros(2, 4)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(PlanError, match="no tensor named 'directions'"):
        resolved(
            {
                "concept": "direction:x",
                "action": "suppress",
                "method": "steer",
                "direction_file": str(tmp_path / "w.safetensors"),
                "layer": 1,
            }
        )
    save_file({"directions": torch.zeros(2, 4)}, str(tmp_path / "n.safetensors"))
    with pytest.raises(PlanError, match="width 4"):
        resolved(
            {
                "concept": "direction:x",
                "action": "suppress",
                "method": "steer",
                "direction_file": str(tmp_path / "n.safetensors"),
                "layer": 1,
            },
            d_model=64,
        )
    with pytest.raises(PlanError, match="'features'"):
        resolved({"concept": "sae:3", "action": "suppress", "method": "reward_shaping"})
    with pytest.raises(PlanError, match="needs the SAE"):
        resolved({"concept": "sae:3", "action": "suppress", "method": "steer", "features": [1]})


def test_rank_instructions_generates_with_each_candidate(tiny_lm):
    (c,) = resolved(
        {"concept": "text:q", "action": "suppress", "method": "inoculate", "pattern": r"\w", "instruction": "x"}
    )
    prompts = [p.prompt for p in PAIRS[:2]]
    table = rank_instructions(c.source, ["Be brief.", "Use many words."], prompts, tiny_lm, max_new_tokens=4)
    assert set(table["instruction"]) == {"Be brief.", "Use many words."}
    assert (np.diff(table["lift"]) <= 0).all()  # best first
    assert table["score_without"].nunique() == 1 and table["score_with"].between(0, 1).all()
    np.testing.assert_allclose(table["lift"], table["score_with"] - table["score_without"])
