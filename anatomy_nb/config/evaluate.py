"""Stage 5's parameters: generations, behaviour sets, intervals and the prediction's report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..core.config_base import NOT_KEYED, Config
from ..core.config_base import described as _help
from .hypothesize import ExplainConfig


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
            from ..data.judges import CONSTRUCTED_FAMILIES, DIRECTION_METHODS, FAMILIES

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
class EvalConfig(Config):
    """Stage 5. CPU-sized defaults: on a GPU raise ``n_prompts``, ``max_new_tokens`` and ``n_*``."""

    n_prompts: int = field(default=30, metadata=_help("distinct held-out prompts to generate from"))
    max_new_tokens: int = 32
    max_prompt_tokens: int = field(default=384, metadata=_help("longer prompts keep their last tokens"))
    batch_size: int = field(default=8, metadata=_help("prompts per generation batch"))
    do_sample: bool = field(default=False, metadata=_help("greedy by default; True samples with temperature and seed"))
    temperature: float = 1.0
    seed: int = 0
    concepts: Literal["significant", "all"] = field(
        default="significant", metadata=_help("which stage-2 rows the R² is fitted on: 'significant' | 'all'")
    )
    min_topic_prompts: int = field(
        default=3, metadata=_help("topic rows need this many evaluated prompts in the topic")
    )
    fdr: float = field(default=0.05, metadata=_help("off-target: BH q over concepts below this"))
    n_boot: int = field(default=1000, metadata=_help("bootstrap resamples per interval"))
    ci: float = field(default=0.95, metadata=_help("interval coverage"))
    max_pref_pairs: int = field(default=60, metadata=_help("held-out pairs scored for preference accuracy"))
    pref_max_length: int = field(default=256, metadata=_help("tokens of prompt + response when scoring log-probs"))
    behaviour: bool = field(
        default=True, metadata=_help("run the behaviour sets (sycophancy, persona, refusal, over-refusal)")
    )
    n_ab: int = field(default=8, metadata=_help("items per A/B set (CAA sycophancy, Anthropic persona)"))
    n_harmful: int = field(
        default=6, metadata=_help("harmful prompts (AdvBench / StrongREJECT / HarmBench, sampled evenly)")
    )
    n_xstest: int = field(default=6, metadata=_help("XSTest safe prompts (over-refusal)"))
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
