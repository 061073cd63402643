import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import SMALL, synthetic_pairs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each test's outcome on the item (rep_setup / rep_call), so fixtures can react to a failure
    (the browser tests save a screenshot)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def tiny_lm():
    from anatomy_nb.lm.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_sae_(tiny_lm):
    from anatomy_nb.lm.sae import tiny_sae

    return tiny_sae(tiny_lm.d_model, layer=2, d_sae=96, k=6)


@pytest.fixture(scope="session")
def hh_pairs():
    from anatomy_nb.data.pairs import load_pairs

    return load_pairs("hh-rlhf", limit=20)


@pytest.fixture(scope="session")
def tiny_eval(tmp_path_factory, tiny_lm, tiny_sae_):
    """A tiny run with every stage's artifact: plain DPO and reward shaping on the top concept (the
    plan written by stage 3), evaluated once."""
    import time

    import numpy as np

    from anatomy_nb.config import ConceptConfig, EvalConfig, ExtractConfig, HypothesizeConfig, TrainConfig
    from anatomy_nb.lm.sae import load_sae, save_sae
    from anatomy_nb.results.hypothesize import Hypotheses
    from anatomy_nb.stages.evaluate import evaluate
    from anatomy_nb.stages.extract import extract
    from anatomy_nb.stages.hypothesize import hypothesize
    from anatomy_nb.stages.plan import plan as make_plan
    from anatomy_nb.stages.train import train

    t = [time.time()]
    root = tmp_path_factory.mktemp("evaluate")
    sae = load_sae(str(save_sae(tiny_sae_, root / "sae")))  # loadable by name, for the notebook
    run = root / "run"
    extract(synthetic_pairs(), tiny_lm, sae, run, ExtractConfig(shard_size=24, progress=False))
    hypothesize(
        run,
        HypothesizeConfig(concepts=ConceptConfig(min_support=3), promoted_tokens=0, linear_baseline=False),
        model=tiny_lm,
        sae=sae,
    )
    t.append(time.time())
    top = Hypotheses.from_run(run).overall().iloc[0]
    tcfg = TrainConfig(
        max_length=64,
        batch_size=4,
        max_steps=4,
        learning_rate=5e-3,
        heldout_fraction=0.3,
        max_train_pairs=16,
        progress=False,
    )
    train(run, None, model=tiny_lm, config=tcfg)
    plan = make_plan(
        run,
        {
            "concepts": [
                {
                    "concept": f"sae:{int(top.concept)}",
                    "action": "suppress",
                    "method": "reward_shaping",
                    "strength": 2.0,
                    "features": [int(f) for f in top.features],
                }
            ]
        },
    )
    train(run, plan, model=tiny_lm, config=tcfg)
    t.append(time.time())
    res = evaluate(run, config=EvalConfig(**SMALL), lm=tiny_lm, sae=sae)
    t.append(time.time())
    print("fixture seconds (extract+hypothesize, train x2, evaluate):", np.diff(t).round(1))
    return SimpleNamespace(
        run=run, res=res, sae=sae, lm=tiny_lm, concept=int(top.concept), features=[int(f) for f in top.features]
    )
