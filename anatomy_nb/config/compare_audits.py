"""How features are clustered into concepts (``ConceptConfig``: stage 2 and ``compare_audits``) and the
config of ``compare_audits``: two data sets, or one data set's annotators, compared by concept
(``stages.compare_audits``, notebook 07). Both are re-exported by ``anatomy_nb.config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..core.config_base import NOT_KEYED, Config
from ..core.config_base import described as _help


@dataclass
class ConceptConfig(Config):
    """How features are clustered into concepts (``anatomy_nb.concepts.clustering``)."""

    min_support: int = field(
        default=5, metadata=_help("a feature must fire on at least this many responses to be tested")
    )
    k_neighbors: int = field(default=10, metadata=_help("neighbours per feature in the co-firing graph"))
    min_phi: float = field(default=0.05, metadata=_help("kNN edges below this correlation are dropped"))
    resolution: float = field(
        default=0.05, metadata=_help("CPM density threshold: higher gives more, smaller, tighter concepts")
    )
    quality: Literal["cpm", "rb"] = field(
        default="cpm", metadata=_help("'cpm' (constant Potts; graph-size free) or 'rb' (modularity-style)")
    )
    neighbors: Literal["auto", "exact", "sketch"] = field(
        default="auto",
        metadata=_help(
            "'exact' (time ∝ responses × features²), 'sketch' (random projection proposes, exact phi re-scores; "
            "linear) "
            "or 'auto'"
        ),
    )
    sketch_dims: int = field(
        default=256, metadata=_help("sketch: random projection dimensions (estimate noise ≈ 1/√dims)")
    )
    sketch_candidates: int = field(default=128, metadata=_help("sketch: candidates per feature re-scored exactly"))
    seed: int = 0


@dataclass
class CompareAuditsConfig(Config):
    """``compare_audits``: one concept space for both sides (features clustered once on the pooled
    responses), then per concept what one side rewards that the other does not."""

    annotators: list[list[int]] | None = field(
        default=None,
        metadata=_help(
            "annotator mode (one data set, several annotators per pair): the annotator pairs to compare, "
            "e.g. [[1, 2]] (None: every pair of the annotators the data records)"
        ),
    )
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    fdr: float = field(default=0.05, metadata=_help("Benjamini–Hochberg level over the concepts of one comparison"))
    group_by_prompt: bool = field(default=True, metadata=_help("pairs sharing a prompt form one unit (data-set mode)"))
    length_control_degree: int = field(
        default=2, metadata=_help("the per-unit differences are compared with length's powers 1..degree regressed out")
    )
    max_permutations: int | None = field(
        default=None,
        metadata=_help("annotator mode: sign flips per concept at most (None: 2·concepts/fdr, at least 10,000)"),
    )
    name_phrases: int = field(default=3, metadata=_help("distinctive phrases naming each concept (0: none)"))
    seed: int = 0
    progress: bool = field(default=True, metadata=NOT_KEYED)

    def __post_init__(self):
        if not 0 < self.fdr < 1:
            raise ValueError(f"fdr must be in (0, 1), got {self.fdr}")
        if self.length_control_degree < 0:
            raise ValueError(
                f"length_control_degree must be >= 0 (0: no length control), got {self.length_control_degree}"
            )
        for pair in self.annotators or []:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"annotators: each entry names two different annotators, got {pair}")
        if self.max_permutations is not None and self.max_permutations < 100:
            raise ValueError(f"max_permutations must be None or >= 100, got {self.max_permutations}")
