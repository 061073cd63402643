"""The intervention plan schema: round trip, and a clear error naming entry and field."""

import json

import pytest

from anatomy_nb.results.plan import InterventionPlan, PlanError, load_plan


def _plan(**entry):
    base = {"concept": "sae:3", "action": "suppress", "method": "reward_shaping", "strength": 2.0, "features": [1, 5]}
    base.update(entry)
    return {"format": 1, "hypotheses": "abc", "concepts": [base]}


def test_round_trip_through_a_run_directory(tmp_path):
    plan = load_plan(_plan())
    path = plan.save(tmp_path)
    assert path == tmp_path / "plan.json"
    again = load_plan(tmp_path)
    assert again.to_dict() == plan.to_dict()
    assert again.active[0].sign == 1 and again.active[0].kind == "sae" and again.active[0].name == "3"
    assert load_plan(json.dumps(_plan())).to_dict() == plan.to_dict()  # a papermill string parameter
    # a run directory means its plan/plan.json (what --plan RUN_DIR on the command line passes)
    from anatomy_nb.results.run import RunDir

    run = RunDir(tmp_path / "run")
    plan.save(run.plan_path)
    assert load_plan(run.path).to_dict() == plan.to_dict() and RunDir(run.path).plan.to_dict() == plan.to_dict()


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"action": "ignore"}, "action"),
        ({"method": "magic"}, "method"),
        ({"strength": -1.0}, "strength"),
        ({"strength": "lots"}, "strength"),
        ({"method": "ablate", "strength": 2.0}, "strength"),
        ({"method": "ablate", "action": "amplify", "strength": 1.0}, "action"),
        ({"method": "inoculate"}, "instruction"),
        ({"concept": "sae:99"}, "concept"),
        ({"concept": "text:bold", "pattern": None}, "pattern"),
        ({"concept": "text:bold", "pattern": "(", "features": []}, "pattern"),
        ({"concept": "text:bold", "pattern": r"\*\*", "method": "steer"}, "method"),
        ({"concept": "direction:x"}, "direction_file"),
        ({"colour": "red"}, "colour"),
        ({"concept": "bold"}, "concept"),
    ],
)
def test_invalid_entries_name_the_field(entry, field):
    with pytest.raises(PlanError) as info:
        load_plan(_plan(**entry), known_concepts=range(10))
    assert info.value.field == field and info.value.index == 0


def test_allow_needs_no_method_and_is_not_active():
    plan = load_plan(_plan(action="allow", method=None))
    assert plan.active == [] and plan.by_method("reward_shaping") == []
    # suppress / amplify without a method means reward shaping (as the toggles and set_choice do)
    assert (
        load_plan({"concepts": [{"concept": "sae:3", "action": "suppress", "features": [1]}]}).active[0].method
        == "reward_shaping"
    )


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="plan.json"):
        load_plan(bad)
    with pytest.raises(FileNotFoundError):
        load_plan(tmp_path / "missing.json")
    assert isinstance(load_plan(None), InterventionPlan)
