"""Every parameter of every stage, in one place: the config dataclasses.

Python calls, the notebooks' ``config`` dicts, ``configs/*.yaml`` through ``anatomy-nb run``, and
the command-line flags all build these classes (``core.config_base.Config``), and all of them
reject an unknown key by naming it and the valid ones. Importing this module never imports torch.

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

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config_compare import CompareAuditsConfig, ConceptConfig
from .config_sae import RecipeConfig, SAETrainingConfig
from .config_subspace import SubspaceConfig
from .core.config_base import DEFAULT_MODEL, DEFAULT_SAE, KEYED_WHEN_SET, NOT_KEYED, Config, ConfigError
from .core.config_base import described as _help
from .data.plant import KINDS, ROLES
from .results.plan import METHOD_VARIANTS, method_variant

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SAE",
    "STAGES",
    "CompareAuditsConfig",
    "ConceptConfig",
    "ConfigError",
    "EvalConfig",
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
]

#: the stages, in order; each name is its module (anatomy_nb.stages.<name>), its run-directory
#: folder, its notebook (0N_<name>.ipynb) and its section in the docs
STAGES = ("extract", "hypothesize", "plan", "train", "evaluate")


# --- stage 1: extract -------------------------------------------------------------------------------


@dataclass
class ExtractConfig(Config):
    """Stage 1. The inputs (data, model, SAE) are used when ``extract`` is not given them as
    objects; they are keyed by content (pairs, weights), so they are not part of the store key."""

    data: str = field(
        default="hh-rlhf",
        metadata=_help("vendored alias, local JSON/JSONL/CSV/Parquet file, or a datasets name", key=False),
    )
    n_pairs: int | None = field(default=300, metadata=_help("pairs to read (None: all)", key=False))
    strict: bool | None = field(
        default=None, metadata=_help("None: strict for your files, lenient (skip + count) for vendored data", key=False)
    )
    model: str = field(default=DEFAULT_MODEL, metadata=_help("model alias, hub id or local directory", key=False))
    sae: str = field(
        default=DEFAULT_SAE,
        metadata=_help("shipped SAE, local sae-lens directory, or a sae-lens release (with sae_id)", key=False),
    )
    sae_id: str | None = field(
        default=None, metadata=_help("for a sae-lens pretrained release, e.g. layer_12/width_16k/canonical", key=False)
    )
    layer: int | None = field(
        default=None, metadata=_help("only for SAEs whose files do not say which layer they read", key=False)
    )
    max_prompt_tokens: int = field(
        default=1024, metadata=_help("longer prompts keep their first token and their last tokens")
    )
    max_response_tokens: int = field(default=512, metadata=_help("at most 65,535 (counts are stored as uint16)"))
    shard_size: int = field(
        default=128, metadata=_help("pairs per shard: the unit of resuming and of work split between ranks")
    )
    top_contexts: int = field(default=32, metadata=_help("per feature: the responses where it peaks highest"))
    batch_size: int | None = field(
        default=None,
        metadata=_help(
            "pairs per forward, length-sorted and padded; None: 1 on CPU, from free memory on a GPU", key=False
        ),
    )
    batch_tokens: int = field(
        default=8192,
        metadata=_help(
            "at most this many padded tokens per forward (a GPU with batch_size=None sizes it from free memory)",
            key=False,
        ),
    )
    shared_prefix: bool = field(default=True, metadata=_help("False runs prompt+response twice (the naive baseline)"))
    store_prompts: bool = field(
        default=True, metadata=_help("also pool each prompt's message contents (topics use them)")
    )
    # an opener or a sign-off is specific to the first / last tokens and diluted in the whole response
    edge_tokens: int = field(
        default=8,
        metadata=_help("per response, also the features firing in its first / last this many tokens; 0 = not stored"),
    )
    pooled_values: bool = field(
        default=False,
        metadata=_help(
            "also store per firing feature the max / mean / firing count over each response's tokens (6 bytes) and the "
            "prompt's max / count (4 bytes): ~12.5 KB more per pair on the default SAE; no stage reads them"
        ),
    )
    progress: bool = field(default=True, metadata=NOT_KEYED)

    def __post_init__(self):
        if not 1 <= self.max_response_tokens <= 65_535:
            raise ValueError(f"max_response_tokens must be in 1..65535, got {self.max_response_tokens}")
        if self.max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2, got {self.max_prompt_tokens}")
        if self.edge_tokens < 0:
            raise ValueError(f"edge_tokens must be >= 0, got {self.edge_tokens}")
        if (self.batch_size is not None and self.batch_size < 1) or self.batch_tokens < 1:
            raise ValueError(
                f"batch_size must be None or >= 1 and batch_tokens >= 1, got {self.batch_size}, {self.batch_tokens}"
            )
        if self.shard_size < 1 or self.top_contexts < 1:
            raise ValueError("shard_size and top_contexts must be >= 1")


# --- stage 2: hypothesize ---------------------------------------------------------------------------


@dataclass
class TopicConfig(Config):
    """How prompts are clustered into topics (``anatomy_nb.concepts.topics``)."""

    n_topics: int | None = field(
        default=None, metadata=_help("None: about one topic per 60 distinct prompts, between 2 and 12")
    )
    source: str = field(
        default="sae", metadata=_help("'sae' (prompt SAE features) or 'embeddings' (offline all-MiniLM-L6-v2)")
    )
    svd_dims: int = field(default=50, metadata=_help("TruncatedSVD dimensions before KMeans"))
    seed: int = 0


@dataclass
class ExplainConfig(Config):
    """LLM explanations of the strongest concepts, scored for fidelity (``concepts.explain``)."""

    backend: str = field(
        default="none",
        metadata=_help(
            "'none', 'openai' (any OpenAI-compatible chat endpoint: vLLM, llama.cpp server, Ollama, a hosted API) or "
            "'transformers' (a local model)"
        ),
    )
    model: str = field(
        default="",
        metadata=_help("the endpoint's model name, or for 'transformers' a model alias, hub id or directory"),
    )
    base_url: str = field(
        default="http://localhost:8000/v1", metadata=_help("'openai': the endpoint, up to /v1", key=False)
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata=_help("'openai': the environment variable holding the key (never stored)", key=False),
    )
    max_workers: int = field(default=8, metadata=_help("'openai': requests in flight at once", key=False))
    cache: bool = field(
        default=True,
        metadata=_help("keep every answer under <run>/cache/llm: a re-run asks only what is new", key=False),
    )
    timeout: float = field(default=120.0, metadata=_help("'openai': seconds per request", key=False))

    def __post_init__(self):
        if self.backend not in ("none", "openai", "transformers"):
            raise ValueError(f"explain.backend must be 'none', 'openai' or 'transformers', got {self.backend!r}")
        if self.backend != "none" and not self.model:
            raise ValueError(
                f"explain.backend={self.backend!r} needs explain.model (the endpoint's model name or a local model)"
            )
        if self.max_workers < 1:
            raise ValueError(f"explain.max_workers must be >= 1, got {self.max_workers}")


@dataclass
class JudgeConfig(ExplainConfig):
    """Stage 5's refusal judge (``data.judges``): the phrase list, an LLM judge (the ``ExplainConfig``
    backends), or ``backend='direction'``, a refusal direction in the base model's residual stream
    fitted on labelled completions (``lm.refusal_direction``)."""

    backend: str = field(
        default="none",
        metadata=_help(
            "'none' (the phrase list), 'direction' (a refusal direction in the base model's residual stream), 'openai' "
            "or 'transformers' (an LLM judge)"
        ),
    )
    layer: int | None = field(
        default=None,
        metadata=_help(
            "'direction': the layer read (None: 60 percent of the way up the stack, 18 of the default model's 30)"
        ),
    )
    n_tokens: int = field(default=64, metadata=_help("'direction': the response tokens whose mean residual is read"))
    method: str = field(
        default="probe",
        metadata=_help(
            "'direction': how it is fitted: 'probe' (logistic regression on the standardised residual) or "
            "'mean-difference' (the difference of class means)"
        ),
    )
    probe_c: float = field(
        default=1e-3,
        metadata=_help("'direction', method 'probe': the inverse L2 strength (scikit-learn's C); smaller is stronger"),
    )
    fit_on: list[str] = field(
        default_factory=lambda: ["llama2", "caa"],
        metadata=_help("'direction': the labelled families it is fitted on (gpt4, llama2, caa); the rest are held out"),
    )
    fit_n: int | None = field(
        default=None,
        metadata=_help(
            "'direction': fit on a seeded sample of this many completions per family and reading (None: all, 2,405 for "
            "the default fit_on)"
        ),
    )

    def __post_init__(self):
        if self.backend == "direction":
            from .data.judges import CONSTRUCTED_FAMILIES, DIRECTION_METHODS, FAMILIES

            unknown = sorted(set(self.fit_on) - set(FAMILIES + CONSTRUCTED_FAMILIES))
            if unknown or not self.fit_on:
                raise ValueError(
                    f"judge.fit_on: unknown or no families {unknown or list(self.fit_on)}; families: "
                    f"{sorted(FAMILIES + CONSTRUCTED_FAMILIES)}"
                )
            if self.n_tokens < 1 or (self.fit_n is not None and self.fit_n < 10):
                raise ValueError(
                    f"judge.n_tokens must be >= 1 and judge.fit_n None or >= 10, got {self.n_tokens}, {self.fit_n}"
                )
            if self.method not in DIRECTION_METHODS or not self.probe_c > 0:
                raise ValueError(
                    f"judge.method must be one of {list(DIRECTION_METHODS)} and judge.probe_c > 0, got "
                    f"{self.method!r}, {self.probe_c}"
                )
            return
        super().__post_init__()


@dataclass
class HypothesizeConfig(Config):
    """Stage 2: concepts, their paired tests, topics, labels and baselines."""

    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    topics: TopicConfig = field(default_factory=TopicConfig)
    group_by_prompt: bool = field(default=True, metadata=_help("pairs sharing a prompt form one unit"))
    # 2 lets the saturating "fires anywhere" curve bend; 1 is the plain Δ log length
    length_control_degree: int = field(
        default=2, metadata=_help("the length control regresses on Δ of log length's powers 1..degree")
    )
    length_placebo_draws: int = field(
        default=20, metadata=_help("placebo pairs that check the length control on this data; 0 = skip")
    )
    length_placebo_concepts: int = field(
        default=1000, metadata=_help("the placebo tests at most this many concepts, drawn at random")
    )
    test_edges: bool = field(
        default=True, metadata=_help("also test each concept on the responses' opening and ending tokens")
    )
    fdr: float = field(default=0.05, metadata=_help("Benjamini–Hochberg level over every test"))
    n_splits: int = field(default=20, metadata=_help("random half/half splits for the sign check"))
    min_topic_prompts: int = field(default=10, metadata=_help("smaller topics are not tested"))
    label_features: int = field(default=3, metadata=_help("member features whose contexts label a concept"))
    name_phrases: int = field(
        default=3, metadata=_help("distinctive phrases around each concept's peaks, shown first in its label (0: none)")
    )
    promoted_tokens: int = field(
        default=8,
        metadata=_help("tokens each concept's decoder direction promotes, shown as a label (0: none; needs the model)"),
    )
    linear_baseline: bool = field(
        default=True, metadata=_help("fit the L1-logistic baseline on per-pair feature differences")
    )
    linear_baseline_pairs: int = field(
        default=20_000,
        metadata=_help(
            "the baseline fits on at most this many pairs, drawn at random (liblinear's time grows with pairs × "
            "firing "
            "features)"
        ),
    )
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    explain_top: int = field(
        default=10, metadata=_help("with an explainer: how many top concepts get an LLM explanation")
    )
    fidelity_texts: int = field(
        default=40, metadata=_help("held-out responses (half firing, half not) to score each explanation")
    )
    seed: int = 0


# --- stage 3: plan ----------------------------------------------------------------------------------


@dataclass
class MapConfig(Config):
    """The viewer's two maps (pairs by prompt, features by co-firing)."""

    method: str = field(
        default="auto", metadata=_help("'umap', 'svd' (TruncatedSVD to 2-D), or 'auto': UMAP from umap_min_points up")
    )
    umap_min_points: int = field(
        default=200, metadata=_help("below this UMAP's numba compile (~30 s) buys little; SVD instead")
    )
    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0


@dataclass
class PlanConfig(Config):
    """Stage 3: what the plan views show (the plan itself is data: ``anatomy_nb.results.plan``)."""

    maps: MapConfig = field(default_factory=MapConfig)
    spill_top: int = field(default=15, metadata=_help("spill-over edges shown"))


# --- stage 4: train ---------------------------------------------------------------------------------


@dataclass
class TrainConfig(Config):
    """DPO hyper-parameters. Defaults are CPU-sized (SmolLM2-135M, 64 training pairs, a few
    minutes on two cores); on GPUs raise ``max_train_pairs`` (None = all) and set ``bf16``."""

    model: str | None = field(default=None, metadata=_help("None: the feature store's model"))
    lora: bool = field(default=True, metadata=_help("False: full fine-tune"))
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target: str | list[str] = field(default="all-linear", metadata=_help("peft target_modules"))
    beta: float = field(default=0.1, metadata=_help("DPO β"))
    learning_rate: float = 5e-5
    epochs: float = 1.0
    max_steps: int = field(default=-1, metadata=_help("> 0 overrides epochs"))
    batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 256
    max_train_pairs: int | None = field(default=64, metadata=_help("CPU-sized; None trains on every training pair"))
    heldout_fraction: float = field(default=0.1, metadata=_help("prompts held out for stage 5 (whole prompts)"))
    warmup_ratio: float = 0.0
    precompute_ref: bool = field(
        default=True,
        metadata=_help(
            "compute the reference log-probs once before training (shared by the run directory's training runs)"
        ),
    )
    gradient_checkpointing: bool = False
    bf16: bool | None = field(default=None, metadata=_help("None: on CUDA only"))
    mean_ablation_pairs: int = field(default=32, metadata=_help("pairs whose mean residual mean-ablation uses"))
    seed: int = field(
        default=0, metadata=_help("the held-out split's seed, and the trainer's unless order_seed is set")
    )
    order_seed: int | None = field(
        default=None,
        metadata=_help(
            "the trainer's seed (the order of the training pairs, the LoRA initialisation) apart from the split's: a "
            "seed control trains the same pairs in another order; None: seed",
            **KEYED_WHEN_SET,
        ),
    )
    progress: bool = field(default=True, metadata=NOT_KEYED)

    def __post_init__(self):
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")


# --- stage 5: evaluate ------------------------------------------------------------------------------


@dataclass
class EvalConfig(Config):
    """Stage 5. CPU-sized defaults: on a GPU raise ``n_prompts``, ``max_new_tokens`` and ``n_*``."""

    n_prompts: int = field(default=24, metadata=_help("distinct held-out prompts to generate from"))
    max_new_tokens: int = 48
    max_prompt_tokens: int = field(default=384, metadata=_help("longer prompts keep their last tokens"))
    batch_size: int = field(default=8, metadata=_help("prompts per generation batch"))
    do_sample: bool = field(default=False, metadata=_help("greedy by default; True samples with temperature and seed"))
    temperature: float = 1.0
    seed: int = 0
    concepts: str = field(
        default="significant", metadata=_help("which stage-2 rows the R² is fitted on: 'significant' | 'all'")
    )
    min_topic_prompts: int = field(
        default=3, metadata=_help("topic rows need this many evaluated prompts in the topic")
    )
    fdr: float = field(default=0.05, metadata=_help("off-target: BH q over concepts below this"))
    n_boot: int = field(default=1000, metadata=_help("bootstrap resamples per interval"))
    ci: float = field(default=0.95, metadata=_help("interval coverage"))
    max_pref_pairs: int = field(default=64, metadata=_help("held-out pairs scored for preference accuracy"))
    pref_max_length: int = field(default=256, metadata=_help("tokens of prompt + response when scoring log-probs"))
    behaviour: bool = field(
        default=True, metadata=_help("run the behaviour sets (sycophancy, persona, refusal, over-refusal)")
    )
    n_ab: int = field(default=24, metadata=_help("items per A/B set (CAA sycophancy, Anthropic persona)"))
    n_harmful: int = field(
        default=12, metadata=_help("harmful prompts (AdvBench / StrongREJECT / HarmBench, sampled evenly)")
    )
    n_xstest: int = field(default=12, metadata=_help("XSTest safe prompts (over-refusal)"))
    behaviour_max_new_tokens: int = field(default=32, metadata=_help("a refusal shows in the first sentence"))
    judge: JudgeConfig = field(
        default_factory=JudgeConfig,
        metadata=_help(
            "the refusal judge: backend 'none' = the phrase list; 'direction' = a refusal direction in the base "
            "model's "
            "residual stream; 'openai' / 'transformers' = an LLM judge (data.judges)"
        ),
    )
    judge_agreement_n: int = field(
        default=100,
        metadata=_help("human-labelled XSTest completions per family and reading the judge is measured on (0 = skip)"),
    )
    progress: bool = field(default=True, metadata=NOT_KEYED)

    def __post_init__(self):
        if self.concepts not in ("significant", "all"):
            raise ValueError(f"concepts must be 'significant' or 'all', got {self.concepts!r}")
        if not 0 < self.ci < 1:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}")
        if self.n_prompts < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("n_prompts, max_new_tokens and batch_size must be >= 1")
        if self.judge_agreement_n < 0:
            raise ValueError(f"judge_agreement_n must be >= 0, got {self.judge_agreement_n}")


# --- the whole pipeline -----------------------------------------------------------------------------


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
            f"interventions trained besides plain DPO: methods or variants ({', '.join(METHOD_VARIANTS)}); a sweep's "
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
    # lr 1e-3: at 5e-5 (and 5e-4) 64 pairs teach nothing measurable; 20 % of the prompts held out
    # (60 pairs, about half of them unpoisoned) so the on-target preference is measured on enough pairs
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-3, heldout_fraction=0.2))
    evaluate: EvalConfig = field(
        default_factory=lambda: EvalConfig(
            n_prompts=30, max_new_tokens=32, n_ab=8, n_harmful=6, n_xstest=6, max_pref_pairs=60
        )
    )
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
            if not isinstance(spec, Mapping) or spec.get("kind") not in KINDS:
                raise ValueError(f"{where}.kind must be one of {sorted(KINDS)}, got {spec!r}")
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
            if self.target_scope != "all" and method in ("steer", "ablate"):
                raise ValueError(
                    f"methods: {m!r} edits the model on every prompt; target_scope {self.target_scope!r} applies to "
                    "reward_shaping, filter and inoculate"
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
