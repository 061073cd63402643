"""anatomy_nb: see what a preference data set will teach a model, at the level of SAE concepts.

The small functional API, one function per stage, plus the whole pipeline and the report::

    import anatomy_nb as anb
    pairs = anb.load_pairs("hh-rlhf", limit=300)
    store = anb.extract(pairs, anb.load_model(), anb.load_sae(), "runs/default")
    hyp = anb.hypothesize("runs/default")          # concepts, tests, topics, labels, baselines
    plan = anb.plan("runs/default", {"concepts": [{"concept": "sae:3", "action": "suppress"}]})
    result = anb.train("runs/default", plan)       # DPO with the plan applied
    ev = anb.evaluate("runs/default")              # predicted vs actual, behaviour, intervals
    anb.run("configs/poisoning.yaml")              # notebooks 01-05 headless, + anb.report(...)
    anb.RunDir("runs/default").hypotheses.ranked()    # read any result (no torch)

Everything is imported on first use: ``import anatomy_nb`` is cheap and never imports torch, and no
module shares a name with these functions, so they stay callable whatever else was imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # the stages, the pipeline and the report
    "extract": "stages.extract",
    "hypothesize": "stages.hypothesize",
    "plan": "stages.plan",
    "train": "stages.train",
    "evaluate": "stages.evaluate",
    "run": "pipeline",
    "report": "ui.report",
    "run_notebook": "ui.notebooks",
    "learn_subspace": "stages.subspace",
    "compare_audits": "stages.compare_audits",
    # the run directory and what it holds (readers: no torch)
    "RunDir": "results.run",
    "FeatureStore": "results.extract",
    "Hypotheses": "results.hypothesize",
    "InterventionPlan": "results.plan",
    "TrainResult": "results.train",
    "EvalResult": "results.evaluate",
    "SubspaceResult": "results.subspace",
    "CompareResult": "results.compare_audits",
    # parameters
    "ConceptConfig": "config",
    "EvalConfig": "config",
    "ExtractConfig": "config",
    "HypothesizeConfig": "config",
    "MapConfig": "config",
    "PipelineConfig": "config",
    "PlanConfig": "config",
    "RecipeConfig": "config",
    "TopicConfig": "config",
    "TrainConfig": "config",
    "SubspaceConfig": "config",
    "CompareAuditsConfig": "config",
    "DEFAULT_MODEL": "config",
    "DEFAULT_SAE": "config",
    # data, models, SAEs, concept sources
    "DataError": "data.schema",
    "PairSet": "data.schema",
    "PreferencePair": "data.schema",
    "load_pairs": "data.pairs",
    "DataCard": "data.datacard",
    "data_card": "data.datacard",
    "LoadedModel": "lm.models",
    "load_model": "lm.models",
    "tiny_llama": "lm.models",
    "LoadedSAE": "lm.sae",
    "load_sae": "lm.sae",
    "tiny_sae": "lm.sae",
    "recorded_model": "lm.recorded",
    "recorded_sae": "lm.recorded",
    "SAEConcept": "concepts.sources",
    "TextConcept": "concepts.sources",
    "DirectionConcept": "concepts.sources",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # resolve once
        return value
    raise AttributeError(f"module 'anatomy_nb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .concepts.sources import DirectionConcept, SAEConcept, TextConcept
    from .config import (
        DEFAULT_MODEL,
        DEFAULT_SAE,
        CompareAuditsConfig,
        ConceptConfig,
        EvalConfig,
        ExtractConfig,
        HypothesizeConfig,
        MapConfig,
        PipelineConfig,
        PlanConfig,
        RecipeConfig,
        SubspaceConfig,
        TopicConfig,
        TrainConfig,
    )
    from .data.datacard import DataCard, data_card
    from .data.pairs import load_pairs
    from .data.schema import DataError, PairSet, PreferencePair
    from .lm.models import LoadedModel, load_model, tiny_llama
    from .lm.recorded import recorded_model, recorded_sae
    from .lm.sae import LoadedSAE, load_sae, tiny_sae
    from .pipeline import run
    from .results.compare_audits import CompareResult
    from .results.evaluate import EvalResult
    from .results.extract import FeatureStore
    from .results.hypothesize import Hypotheses
    from .results.plan import InterventionPlan
    from .results.run import RunDir
    from .results.subspace import SubspaceResult
    from .results.train import TrainResult
    from .stages.compare_audits import compare_audits
    from .stages.evaluate import evaluate
    from .stages.extract import extract
    from .stages.hypothesize import hypothesize
    from .stages.plan import plan
    from .stages.subspace import learn_subspace
    from .stages.train import train
    from .ui.notebooks import run_notebook
    from .ui.report import report
