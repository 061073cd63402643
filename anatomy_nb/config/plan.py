"""Stage 3's parameters: what the plan views show (the plan itself is data: ``results.plan``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..core.config_base import Config
from ..core.config_base import described as _help


@dataclass
class MapConfig(Config):
    """The viewer's two maps (pairs by prompt, features by co-firing)."""

    method: Literal["auto", "umap", "svd"] = field(
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
