"""Interventions are a registry (``anatomy_nb.methods``): a new method is one class in one module —
plans, configs, stage 3's prediction and DPO training all pick it up by name."""

import numpy as np
import pytest

from anatomy_nb.config import PipelineConfig, TrainConfig
from anatomy_nb.data.schema import PreferencePair
from anatomy_nb.methods import METHODS, Method, method_variant, register
from anatomy_nb.results.plan import InterventionPlan, PlanError
from anatomy_nb.stages.train import prepare, train


def test_the_built_in_methods_are_registered_in_order_with_their_variants():
    assert list(METHODS) == ["reward_shaping", "filter", "inoculate", "steer", "ablate"]
    assert method_variant("filter_flip") == ("filter", {"filter_mode": "flip"})
    assert [m for m, how in METHODS.items() if how.needs_direction] == ["steer", "ablate"]
    assert [m for m, how in METHODS.items() if how.suppress_only] == ["inoculate", "ablate"]
    with pytest.raises(ValueError, match="already registered"):

        @register
        class Another(Method):
            name = "filter"


@pytest.fixture
def toy_method():
    """A method that only a test knows: half of reward shaping, and it can only suppress."""

    @register
    class HalfShaping(Method):
        name = "half_shaping"
        default_strength = 2.0
        strength_range = (0.0, 10.0, False)
        suppress_only = True
        scored = True

        def offsets(self, choice, scores):
            return 0.5 * choice.sign * choice.strength * np.asarray(scores, dtype=np.float64)

        def predict(self, signal, choice):
            return signal * (1 - 0.5 * choice.strength), "first-order (half margin)"

    yield HalfShaping
    del METHODS["half_shaping"]


PAIRS = [
    PreferencePair(
        id=f"t{i}",
        prompt=({"role": "user", "content": f"Question {i}?"},),
        chosen=f"Great question! Answer {i}.",
        rejected=f"Answer {i}, I suppose.",
    )
    for i in range(16)
]
ENTRY = {"concept": "text:flattery", "action": "suppress", "method": "half_shaping", "pattern": "flattery_opener"}


def test_a_registered_method_is_validated_planned_and_trained_with(toy_method, tiny_lm, tmp_path):
    # plans and configs know it by name, with its own range and its suppress-only rule
    plan = InterventionPlan.from_dict({"concepts": [{**ENTRY, "strength": 3.0}]})
    assert plan.concepts[0].method == "half_shaping"
    with pytest.raises(PlanError, match="outside"):
        InterventionPlan.from_dict({"concepts": [{**ENTRY, "strength": 11.0}]})
    with pytest.raises(PlanError, match="can only suppress"):
        InterventionPlan.from_dict({"concepts": [{**ENTRY, "action": "amplify", "strength": 1.0}]})
    assert PipelineConfig(methods=["half_shaping@4"]).methods == ["half_shaping@4"]
    with pytest.raises(ValueError, match="can only suppress"):
        PipelineConfig(methods=["half_shaping@-1"])
    # training asks it for the per-response reward: half of λ·s(y), s = 1 on every chosen response
    cfg = TrainConfig(max_length=64, batch_size=4, max_steps=1, heldout_fraction=0.25, progress=False)
    prep = prepare(tmp_path, plan, pairs=PAIRS, model=tiny_lm, config=cfg)
    np.testing.assert_allclose(prep.offsets, np.tile([1.5, 0.0], (len(prep.train_pairs), 1)))
    result = train(tmp_path, plan, pairs=PAIRS, model=tiny_lm, config=cfg)
    assert result.manifest["complete"] and result.manifest["plan"]["concepts"][0]["method"] == "half_shaping"
