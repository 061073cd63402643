"""``anatomy-nb run``'s parameters: every stage's block plus the plant, the target and the methods."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.config_base import Config
from ..core.config_base import described as _help
from ..data.plant import PLANT_KINDS, ROLES
from ..methods import METHODS, method_variant, variants
from .evaluate import EvalConfig
from .extract import ExtractConfig
from .hypothesize import HypothesizeConfig
from .plan import PlanConfig
from .train import TrainConfig

#: the pipeline's stages, in order; each name is its module (anatomy_nb.stages.<name>), its run-directory
#: folder, its notebook (0N_<name>.ipynb) and its section in the docs
STAGES = ("extract", "hypothesize", "plan", "train", "evaluate")
#: stages outside the pipeline, named the same way (notebooks 06 and 07); training the default SAE
#: (notebook 00, ``anatomy-nb train-sae``) prepares a model for stage 1 and is not a stage
STANDALONE_STAGES = ("subspace", "compare_audits")


@dataclass
class PipelineConfig(Config):
    """``anatomy-nb run``: notebooks 01–05 headless into one run directory. The default is the
    controlled-poisoning experiment (``configs/poisoning.yaml`` spells it out)."""

    run_dir: str = "runs/default"
    # {"kind": bold|opener|emoji|question|word|heading, "fraction": 0.5, "seed": 0}, or a list of them (the
    # first to suppress, the others to keep: configs/compare.yaml); None: the data as is.
    # 0.5: at 0.25 plain DPO on the CPU-sized training (64 pairs) did not learn the plant
    plant: dict | list | None = field(
        default_factory=lambda: {"kind": "bold", "fraction": 0.5, "seed": 0},
        metadata=_help(
            "a concept planted into a fraction of chosen responses, or a list of them (each may say role: suppress | "
            "keep, a later one overlap: the share of its pairs drawn from the first plant's, and prompts: a regex "
            "on the "
            "user's messages, to plant only into one topic's responses); None: the data as is"
        ),
    )
    target: str | int = field(
        default="top",
        metadata=_help(
            "the concept the plans act on: 'top' (the highest-ranked significant concept DPO would raise), "
            "'name:<text>' "
            "(the highest-ranked such concept whose name contains the text, as a person picks one by reading names) "
            "or a "
            "concept id"
        ),
    )
    target_scope: str = field(
        default="all",
        metadata=_help(
            "where the plans act: 'all' (every prompt), 'topic' (only the stage-2 topic whose row of the target is "
            "strongest: stages.plan.choose_topic) or 'prompts:<regex>' (only prompts whose user turns match)"
        ),
    )
    methods: list[str] = field(
        default_factory=lambda: ["reward_shaping", "filter"],
        metadata=_help(
            f"interventions trained besides plain DPO: methods or variants ({', '.join(variants())}); a sweep's "
            "points as method@strength (reward_shaping@0.5; a negative strength amplifies: reward_shaping@-1) or "
            "inoculate#rank (the rank-th instruction)"
        ),
    )
    # shaping λ = 4: at λ = 1 it removed 55 % of the plant, at 4 all of it
    strengths: dict = field(
        default_factory=lambda: {"reward_shaping": 4.0},
        metadata=_help("method (or variant) → strength (else the method's default strength)"),
    )
    order_seeds: list[int] = field(
        default_factory=list,
        metadata=_help(
            "more training orders: each run of order_methods trains once more per seed (TrainConfig.order_seed: "
            "the order of the pairs and the LoRA initialisation), named <run>-order<seed>; the evaluation reads "
            "each intervention against plain DPO of the same order and gives every figure's spread over orders"
        ),
    )
    order_methods: list[str] | None = field(
        default=None, metadata=_help("the runs order_seeds repeats: 'plain' and entries of methods (None: all)")
    )
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    hypothesize: HypothesizeConfig = field(default_factory=HypothesizeConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata=_help(f"which stages run, of {', '.join(STAGES)}")
    )
    html: bool = field(default=True, metadata=_help("render each executed notebook to HTML"))
    report: bool = field(default=True, metadata=_help("write the shareable report (run_dir/report/index.html)"))

    @property
    def plants(self) -> list[dict]:
        """``plant`` as a list (empty: the data as is)."""
        if self.plant is None:
            return []
        return [
            dict(p) if isinstance(p, Mapping) else p
            for p in (self.plant if isinstance(self.plant, list) else [self.plant])
        ]

    def __post_init__(self):
        if self.target_scope not in ("all", "topic") and not self.target_scope.startswith("prompts:"):
            raise ValueError(f"target_scope must be 'all', 'topic' or 'prompts:<regex>', got {self.target_scope!r}")
        if self.target_scope.startswith("prompts:"):
            try:
                re.compile(self.target_scope[len("prompts:") :])
            except re.error as exc:
                raise ValueError(f"target_scope: not a valid regular expression ({exc})") from None
        for i, spec in enumerate(self.plants):
            where = f"plant[{i}]" if isinstance(self.plant, list) else "plant"
            if not isinstance(spec, Mapping) or spec.get("kind") not in PLANT_KINDS:
                raise ValueError(f"{where}.kind must be one of {sorted(PLANT_KINDS)}, got {spec!r}")
            bad_keys = sorted(set(spec) - {"kind", "fraction", "seed", "role", "overlap", "prompts"})
            if bad_keys:
                raise ValueError(
                    f"{where}: unknown keys {bad_keys}; valid: kind, fraction, seed, role, overlap, prompts"
                )
            if spec.get("prompts") is not None:
                try:
                    re.compile(str(spec["prompts"]))
                except re.error as exc:
                    raise ValueError(f"{where}.prompts: not a valid regular expression ({exc})") from None
            if spec.get("overlap") is not None and (
                i == 0 or not isinstance(spec["overlap"], (int, float)) or not 0 <= spec["overlap"] <= 1
            ):
                raise ValueError(
                    f"{where}.overlap: the share (0–1) of this plant's pairs drawn from the first plant's pairs, on "
                    f"a later plant only; got {spec['overlap']!r}"
                )
            if spec.get("role") not in (None, *ROLES):
                raise ValueError(f"{where}.role must be one of {list(ROLES)}, got {spec.get('role')!r}")
        for m in self.methods:
            try:
                method, _ = method_variant(m)
            except ValueError as exc:  # an unknown name, a bad @strength or #rank
                raise ValueError(f"methods: {exc}") from None
            if self.target_scope != "all" and METHODS[method].needs_direction:
                raise ValueError(
                    f"methods: {m!r} edits the model on every prompt; target_scope {self.target_scope!r} applies to "
                    f"{', '.join(n for n, spec in METHODS.items() if not spec.needs_direction)}"
                )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} name one twice (each is one training run)")
        own = self.train.order_seed if self.train.order_seed is not None else self.train.seed
        if own in self.order_seeds:
            raise ValueError(
                f"order_seeds: {own} is the configured runs' own order (train.order_seed, else train.seed)"
            )
        unknown = sorted(set(self.order_methods or []) - {"plain", *self.methods})
        if unknown:
            raise ValueError(f"order_methods {unknown} are not trained (valid: plain, {', '.join(self.methods)})")
        if len(set(self.order_seeds)) != len(self.order_seeds):
            raise ValueError(f"order_seeds {self.order_seeds} name a seed twice")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages {unknown} unknown; known: {list(STAGES)}")
