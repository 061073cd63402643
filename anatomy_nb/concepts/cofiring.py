"""Which features fire together: each feature's nearest neighbours by phi correlation of binary
firing across responses, in memory that grows linearly with the number of features.

A dense features × features phi matrix needs d_sae² memory (65,536 features: 32 GiB in float64),
so neither path below ever builds one:

- ``exact``: co-firing counts for a block of features at a time (dense BLAS over response
  chunks), phi, then the top ``k`` of each row. Memory is block × features; time grows with
  responses × features², which is cheap for the default 4,608-feature SAE and not for 131k.
- ``sketch``: a random projection of every feature's centred firing vector (``dims`` numbers per
  feature, one sparse product over all responses) gives an unbiased estimate of phi; each
  feature's ``candidates`` most similar features by that estimate are then re-scored *exactly*
  from the firing data, and the top ``k`` exact values kept. The sketch only proposes
  neighbours; every weight in the graph is an exact phi. What it can miss is a weak neighbour
  the noisy estimate ranked below ``candidates`` others (agreement with ``exact``:
  ``benchmarks/scale.py``, docs/explanation.md).

``auto`` takes ``exact`` while responses × features² ≤ ``EXACT_BUDGET``.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
import scipy.sparse as sp

__all__ = ["BLOCK_BYTES", "EXACT_BUDGET", "binary_columns", "cofiring_neighbors", "phi_correlation", "phi_from_counts"]

log = logging.getLogger(__name__)

EXACT_BUDGET = 2e12  # responses × features²: ~1 min of BLAS on two cores
BLOCK_BYTES = 1 << 29  # working memory per block of rows (512 MiB)


def binary_columns(fires: sp.spmatrix) -> sp.csc_matrix:
    """``fires`` as a CSC matrix of ones where it is non-zero, sharing its index arrays (at 100k
    pairs × 1,500 firing features per response every copy of them is gigabytes)."""
    X = sp.csc_matrix(fires)
    if not (X.data != 0).all():
        X = X.copy()
        X.eliminate_zeros()
    return sp.csc_matrix((np.ones(X.nnz, dtype=np.float32), X.indices, X.indptr), shape=X.shape)


def phi_from_counts(co: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, n: int) -> np.ndarray:
    """Phi of binary firing from co-firing counts ``co`` and the two features' firing counts
    ``p_a``, ``p_b`` (broadcast against ``co``: column and row vectors for a matrix, equal-length
    vectors for pairs), over ``n`` responses; 0 where a feature never or always fires."""
    cov = co - p_a * p_b / n
    denom = np.sqrt(p_a * (n - p_a) / n * (p_b * (n - p_b) / n))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, cov / denom, 0.0)


def phi_correlation(fires: sp.spmatrix, features: np.ndarray) -> np.ndarray:
    """The dense phi matrix between the given feature columns (diagonal 0). Quadratic memory:
    kept as the reference the scalable paths are tested against."""
    F = sp.csc_matrix(fires)[:, features].astype(np.float64)
    p = np.asarray(F.sum(0)).ravel()
    phi = phi_from_counts((F.T @ F).toarray(), p[:, None], p[None, :], F.shape[0])
    np.fill_diagonal(phi, 0.0)
    return phi


def _row_blocks(n_rows: int, n_cols: int, block_bytes: int, itemsize: int = 8):
    step = max(1, block_bytes // max(1, n_cols * itemsize))
    for start in range(0, n_rows, step):
        yield np.arange(start, min(n_rows, start + step))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` largest scores (unordered; ties as ``argpartition``
    leaves them, which is what the dense path always did: the concepts stay the ones the
    reference runs were measured with)."""
    k = min(k, scores.shape[1])
    return np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]


def _exact(F: sp.csr_matrix, p: np.ndarray, k: int, block_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, m = F.shape
    chunk = max(1, block_bytes // (4 * m))  # responses densified at a time
    dense = F.toarray().astype(np.float32) if n <= chunk else None
    rows, cols, weights = [], [], []
    for block in _row_blocks(m, m, block_bytes):
        co = np.zeros((len(block), m), dtype=np.float64)
        for start in range(0, n, chunk):
            Fd = dense if dense is not None else F[start : start + chunk].toarray().astype(np.float32)
            co += (Fd[:, block].T @ Fd).astype(np.float64)  # counts: exact in float32 below 2**24
            if dense is not None:
                break
        phi = phi_from_counts(co, p[block][:, None], p[None, :], n)
        phi[np.arange(len(block)), block] = 0.0  # its own phi (1) is not a neighbour; 0 is dropped by min_phi
        nbrs = _top_k(phi, k)
        rows.append(np.repeat(block, nbrs.shape[1]))
        cols.append(nbrs.ravel())
        weights.append(np.take_along_axis(phi, nbrs, axis=1).ravel())
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)


@numba.njit(parallel=True, cache=False)
def _cofire_counts_kernel(indptr, indices, n, starts, rows, cols, out):  # pragma: no cover - compiled
    n_groups = len(starts) - 1
    n_threads = numba.get_num_threads()
    per = (n_groups + n_threads - 1) // n_threads
    for t in numba.prange(n_threads):
        marker = np.zeros(n, dtype=np.bool_)
        for g in range(t * per, min(n_groups, (t + 1) * per)):
            i = rows[starts[g]]
            for a in range(indptr[i], indptr[i + 1]):
                marker[indices[a]] = True
            for x in range(starts[g], starts[g + 1]):
                j = cols[x]
                c = 0
                for a in range(indptr[j], indptr[j + 1]):
                    c += marker[indices[a]]
                out[x] = c
            for a in range(indptr[i], indptr[i + 1]):
                marker[indices[a]] = False


def _cofire_counts(F: sp.csc_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact number of responses on which features ``rows[x]`` and ``cols[x]`` both fire, for
    pairs grouped by row: one response marker per thread, no quadratic memory."""
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1, len(rows)].astype(np.int64)
    out = np.zeros(len(rows), dtype=np.int64)
    _cofire_counts_kernel(F.indptr, F.indices, F.shape[0], starts, rows.astype(np.int64), cols.astype(np.int64), out)
    return out


def _sketch(
    F: sp.csc_matrix, p: np.ndarray, k: int, dims: int, candidates: int, seed: int, block_bytes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, m = F.shape
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((n, dims), dtype=np.float32)
    # m × dims: Σ over each feature's responses (F.T of a CSC is a CSR, no copy)
    S = np.asarray(F.T @ R, dtype=np.float64)
    S -= np.outer(p / n, R.sum(0, dtype=np.float64))  # centre the firing vectors
    norms = np.linalg.norm(S, axis=1, keepdims=True)
    Z = (S / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    del S, R
    n_cand = min(candidates, m - 1)
    cand_rows, cand_cols = [], []
    for block in _row_blocks(m, m, block_bytes, itemsize=4):
        sims = Z[block] @ Z.T
        sims[np.arange(len(block)), block] = -np.inf
        nb = _top_k(sims, n_cand)
        cand_rows.append(np.repeat(block, nb.shape[1]))
        cand_cols.append(nb.ravel())
    rows, cols = np.concatenate(cand_rows), np.concatenate(cand_cols)
    co = _cofire_counts(F, rows, cols).astype(np.float64)
    phi = phi_from_counts(co, p[rows], p[cols], n)
    # keep each row's k best exact values (ties: lowest feature id)
    order = np.lexsort((cols, -phi, rows))
    rows, cols, phi = rows[order], cols[order], phi[order]
    first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
    rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
    keep = rank < k
    return rows[keep], cols[keep], phi[keep]


def cofiring_neighbors(
    fires: sp.spmatrix,
    k: int,
    min_phi: float,
    method: str = "auto",
    dims: int = 256,
    candidates: int = 128,
    seed: int = 0,
    block_bytes: int = BLOCK_BYTES,
) -> sp.csr_matrix:
    """The symmetric k-nearest-neighbour graph of the columns of ``fires`` (responses × features,
    non-zero = fires) by phi correlation: each feature's ``k`` highest-phi partners, edges below
    ``min_phi`` dropped, an edge kept when either end chose it (weight = phi). ``block_bytes``
    bounds the working memory of one block of rows (results do not depend on it)."""
    F = binary_columns(fires)
    n, m = F.shape
    if m < 2:
        return sp.csr_matrix((m, m))
    k = min(k, m - 1)
    if method == "auto":
        method = "exact" if n * float(m) ** 2 <= EXACT_BUDGET else "sketch"
    p = np.diff(F.indptr).astype(np.float64)
    if method == "exact":
        rows, cols, w = _exact(F.tocsr(), p, k, block_bytes)
    elif method == "sketch":
        rows, cols, w = _sketch(F, p, k, dims, max(candidates, k), seed, block_bytes)
    else:
        raise ValueError(f"unknown neighbour method {method!r}: use 'auto', 'exact' or 'sketch'")
    log.info("co-firing neighbours: %s over %d responses × %d features", method, n, m)
    keep = w >= min_phi
    A = sp.coo_matrix((w[keep], (rows[keep], cols[keep])), shape=(m, m)).tocsr()
    return A.maximum(A.T).tocsr()
