"""Every parameter of every stage, in one place: the config dataclasses.

Python calls, the notebooks' ``config`` dicts, ``configs/*.yaml`` through ``anatomy-nb run``, and
the command-line flags all build these classes (``core.config_base.Config``), and all of them
reject an unknown key by naming it and the valid ones. Importing this package never imports torch.
One module per stage (``config/<stage>.py``, named like the stage); this package re-exports them all.

=======================  =================================  =====================================
stage                    config                             notebook / CLI
=======================  =================================  =====================================
0  the default SAE       ``RecipeConfig`` (``SAETrainingConfig``)  ``00_train_sae`` / ``anatomy-nb train-sae``
1  extract               ``ExtractConfig``                  ``01_extract`` / ``anatomy-nb extract``
2  hypothesize           ``HypothesizeConfig`` (``ConceptConfig``, ``TopicConfig``)  ``02_hypothesize``
3  plan                  ``PlanConfig`` (``MapConfig``)     ``03_plan``
4  train                 ``TrainConfig``                    ``04_train`` / ``anatomy-nb train``
5  evaluate              ``EvalConfig``                     ``05_evaluate`` / ``anatomy-nb evaluate``
   the whole pipeline    ``PipelineConfig``                 ``anatomy-nb run``
=======================  =================================  =====================================
"""

from __future__ import annotations

from ..core.config_base import DEFAULT_MODEL, DEFAULT_SAE, ConfigError
from .compare_audits import CompareAuditsConfig, ConceptConfig
from .evaluate import EvalConfig, JudgeConfig
from .extract import ExtractConfig
from .hypothesize import ExplainConfig, HypothesizeConfig, TopicConfig
from .pipeline import STAGES, STANDALONE_STAGES, PipelineConfig
from .plan import MapConfig, PlanConfig
from .sae import RecipeConfig, SAETrainingConfig
from .subspace import SubspaceConfig
from .train import TrainConfig

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SAE",
    "STAGES",
    "STANDALONE_STAGES",
    "CompareAuditsConfig",
    "ConceptConfig",
    "ConfigError",
    "EvalConfig",
    "ExplainConfig",
    "ExtractConfig",
    "HypothesizeConfig",
    "JudgeConfig",
    "MapConfig",
    "PipelineConfig",
    "PlanConfig",
    "RecipeConfig",
    "SAETrainingConfig",
    "SubspaceConfig",
    "TopicConfig",
    "TrainConfig",
    "reference_markdown",
]


def reference_markdown() -> str:
    """Every config's keys as markdown tables (type, default, meaning): ``docs/reference.md``'s
    "Config keys" section is this text (a test keeps the two equal)."""
    out = []
    for cls, where in (
        (ExtractConfig, "stage 1 · `extract` · notebook 01 · `anatomy-nb extract`"),
        (HypothesizeConfig, "stage 2 · `hypothesize` · notebook 02 · `anatomy-nb hypothesize`"),
        (PlanConfig, "stage 3 · `plan` · notebook 03 · `anatomy-nb plan`"),
        (TrainConfig, "stage 4 · `train` · notebook 04 · `anatomy-nb train`"),
        (EvalConfig, "stage 5 · `evaluate` · notebook 05 · `anatomy-nb evaluate`"),
        (
            PipelineConfig,
            "the whole pipeline · `run` · `anatomy-nb run` (each stage's block takes that stage's keys)",
        ),
        (RecipeConfig, "the default SAE · notebook 00 · `anatomy-nb train-sae`"),
        (SubspaceConfig, "concept subspaces from counterfactuals · notebook 06 · `anb.learn_subspace`"),
        (
            CompareAuditsConfig,
            "two audits compared by concept · notebook 07 · `anb.compare_audits` · `anatomy-nb compare-audits`",
        ),
    ):
        summary = " ".join(line.strip() for line in (cls.__doc__ or "").split("\n\n")[0].splitlines())
        out += [
            f"### `{cls.__name__}` — {where}",
            "",
            summary,
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, tp, default, note in cls.reference_rows():
            if cls is PipelineConfig and "." in key:
                continue  # the stage blocks are the stage configs above
            out.append(f"| `{key}` | {tp.replace(' | ', ' or ')} | `{default}` | {note} |")
        out.append("")
    return "\n".join(out)
