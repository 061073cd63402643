"""Feature concepts: SAE features grouped by when they fire, never by which side they favour.

Clustering uses only the *symmetric* activity of each feature — whether it fires on each
response, chosen and rejected alike. The signed chosen-minus-rejected quantity is what stage 2
tests afterwards; clustering on it would make those tests circular (features would be grouped
because they separate the sides, then "found" to separate them).

Method: the phi correlation of binary firing across responses; a k-nearest-neighbour graph on
it (positive correlations only; ``concepts.cofiring``, exact or sketched, linear memory); Leiden communities (leidenalg,
seeded) under the constant Potts
model (CPM): a community must be denser than ``resolution`` in mean edge weight, which does not
depend on how many features there are, so the same default gives tight concepts for a 96-feature
test SAE and for the 4,608-feature default one. Features that fire on too few responses to test
are left out (label −1).

Why CPM at 0.05 (measured with ``benchmarks/planted.py``, 600 HH-RLHF pairs, the shipped SAE):
modularity-style (RB) Leiden at resolution 1 gave ~26 concepts of ~120 features, and a planted
concept in 5 % of pairs drowned among its co-members (rank 3 to not found). CPM 0.05 gives ~480
concepts (median a few features) and ranks the plant first in most cases (README table).
"""

from __future__ import annotations

import igraph as ig
import leidenalg
import numpy as np
import scipy.sparse as sp

from ..config import ConceptConfig
from .cofiring import binary_columns, cofiring_neighbors

__all__ = ["ConceptConfig", "cluster_features", "membership_matrix"]


def cluster_features(fires: sp.spmatrix, cfg: ConceptConfig | None = None) -> np.ndarray:
    """Concept label per feature (−1: too rare to test), from unsigned co-firing only.

    ``fires``: responses × features, 1 where the feature fires anywhere in the response (both
    sides of every pair stacked). Labels are numbered by concept size, largest first.
    """
    cfg = cfg or ConceptConfig()
    fires = binary_columns(fires)
    support = np.diff(fires.indptr)
    testable = np.flatnonzero(support >= cfg.min_support)
    labels = np.full(fires.shape[1], -1, dtype=np.int64)
    if len(testable) == 0:
        return labels
    if len(testable) == 1:
        labels[testable] = 0
        return labels
    A = cofiring_neighbors(
        fires[:, testable],
        cfg.k_neighbors,
        cfg.min_phi,
        cfg.neighbors,
        cfg.sketch_dims,
        cfg.sketch_candidates,
        cfg.seed,
    ).tocoo()
    upper = A.row < A.col
    g = ig.Graph(n=len(testable), edges=list(zip(A.row[upper].tolist(), A.col[upper].tolist())), directed=False)
    g.es["weight"] = A.data[upper].tolist()
    partition_type = leidenalg.CPMVertexPartition if cfg.quality == "cpm" else leidenalg.RBConfigurationVertexPartition
    part = leidenalg.find_partition(
        g, partition_type, weights="weight", resolution_parameter=cfg.resolution, seed=cfg.seed
    )
    raw = np.asarray(part.membership)
    # renumber by size (largest first), ties by smallest member feature: stable across runs
    sizes = np.bincount(raw)
    smallest = np.full(len(sizes), np.iinfo(np.int64).max)
    np.minimum.at(smallest, raw, testable)
    order = np.lexsort((smallest, -sizes))
    order = order[sizes[order] > 0]
    remap = np.empty(len(sizes), dtype=np.int64)
    remap[order] = np.arange(len(order))
    labels[testable] = remap[raw]
    return labels


def membership_matrix(labels: np.ndarray) -> sp.csr_matrix:
    """(d_sae × n_concepts) matrix averaging member features: column c sums to 1 over concept c."""
    valid = labels >= 0
    n_concepts = int(labels.max()) + 1 if valid.any() else 0
    feats = np.flatnonzero(valid)
    sizes = np.bincount(labels[valid], minlength=n_concepts)
    data = 1.0 / sizes[labels[valid]]
    return sp.csr_matrix((data, (feats, labels[valid])), shape=(len(labels), n_concepts))
