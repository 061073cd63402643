"""Stage 2's parameters: concepts, topics, LLM explanations, the refusal judge and the tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..core.config_base import Config
from ..core.config_base import described as _help
from .compare_audits import ConceptConfig


@dataclass
class TopicConfig(Config):
    """How prompts are clustered into topics (``anatomy_nb.concepts.topics``)."""

    n_topics: int | None = field(
        default=None, metadata=_help("None: about one topic per 60 distinct prompts, between 2 and 12")
    )
    source: Literal["sae", "embeddings"] = field(
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
