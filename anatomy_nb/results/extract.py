"""Reading a feature store (stage 1's artifact): memory-mapped arrays, never loaded whole, no torch.

Response rows: ``2*i`` is pair ``i``'s chosen response, ``2*i+1`` its rejected one. The layout
(docs/reference.md, "the feature store") is written by ``anatomy_nb.stages.extract``. A family of
firing sets (``resp``, ``prompt``, ``resp_opening``, ``resp_ending``) is stored either as CSR
feature ids (``{prefix}_indptr`` + ``{prefix}_feat``) or, when dense, as one bitset row per row
(``{prefix}_bits``); ``FeatureStore.firing_sets`` gives CSR for both, decoded in blocks of rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..core.files import read_json
from ..core.run import RunLike, RunPaths
from ..core.stage import check_format
from ..data.schema import PreferencePair

__all__ = ["CHOSEN", "EDGES", "REJECTED", "STATS", "FeatureStore"]

CHOSEN, REJECTED = 0, 1
SIDES = {"chosen": CHOSEN, "rejected": REJECTED}
EDGES = ("opening", "ending")  # the response's first / last ExtractConfig.edge_tokens tokens
STATS = ("fires", "max", "mean", "count")  # pooled(): a firing set, or a value per firing feature
_BLOCK_BYTES = 1 << 26  # unpacked bitset rows (one byte per feature) decoded at a time
_ROWS = 8192  # rows gathered at a time


def _row_blocks(n: int, d_sae: int):
    step = max(1, min(_ROWS, _BLOCK_BYTES // max(d_sae, 1)))
    return ((a, min(a + step, n)) for a in range(0, n, step))


def _take_rows(values: np.ndarray, indptr: np.ndarray, rows: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of a CSR array (``values`` in row order): their indptr and their values,
    gathered in blocks of rows so the index arrays stay small."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():  # contiguous: one slice
        lo, hi = indptr[rows[0]], indptr[rows[-1] + 1]
        return (indptr[rows[0] : rows[-1] + 2] - lo).astype(np.int64), np.asarray(values[lo:hi], dtype=dtype)
    lens = indptr[rows + 1] - indptr[rows]
    out_ptr = np.r_[0, np.cumsum(lens)].astype(np.int64)
    out = np.empty(int(out_ptr[-1]), dtype=dtype)
    for a, b in _row_blocks(len(rows), 1):
        lo, hi = out_ptr[a], out_ptr[b]
        idx = np.repeat(indptr[rows[a:b]] - out_ptr[a:b], lens[a:b]) + np.arange(lo, hi)
        out[lo:hi] = values[idx]
    return out_ptr, out


#: the format stage 1 writes and the newest this reader reads (2: firing sets as bitsets when dense;
#: pooled values only with pooled_values)
FORMAT = 2


class FeatureStore:
    """Read access to a finished feature store; arrays are memory-mapped, nothing is loaded whole.

    Response rows: ``2*i`` is pair ``i``'s chosen response, ``2*i+1`` its rejected one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"{self.path}: no manifest.json; not a finished feature store")
        self.manifest = read_json(mpath)
        check_format(self.path, self.manifest, 1, FORMAT)
        if not self.manifest.get("complete"):
            raise FileNotFoundError(f"{self.path}: feature store is incomplete; run extract() again to finish it")
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_run(cls, run: RunLike) -> FeatureStore:
        return cls(RunPaths.of(run).latest("extract"))

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"FeatureStore({m['n_pairs']} pairs, d_sae={m['d_sae']}, layer={m['layer']}, "
            f"model={m['model']['name']!r}, path={str(self.path)!r})"
        )

    def array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        return self._cache[name]

    @property
    def n_pairs(self) -> int:
        return int(self.manifest["n_pairs"])

    @property
    def d_sae(self) -> int:
        return int(self.manifest["d_sae"])

    def pairs(self) -> list[PreferencePair]:
        """The pairs in store order (row ``i`` of every per-pair array)."""
        with open(self.path / "pairs.jsonl", encoding="utf-8") as fh:
            return [PreferencePair.from_dict(json.loads(line)) for line in fh]

    def pair_index(self) -> dict[str, int]:
        """Pair id → store row."""
        with open(self.path / "pairs.jsonl", encoding="utf-8") as fh:
            return {str(json.loads(line)["id"]): i for i, line in enumerate(fh)}

    def _has(self, name: str) -> bool:
        return (self.path / f"{name}.npy").exists()

    def firing_layout(self, prefix: str = "resp") -> str | None:
        """How the ``prefix`` firing sets are stored: "bits", "ids", or None (not stored)."""
        return "bits" if self._has(f"{prefix}_bits") else "ids" if self._has(f"{prefix}_indptr") else None

    @property
    def has_prompts(self) -> bool:
        return self.firing_layout("prompt") is not None

    def token_counts(self) -> np.ndarray:
        """(n_pairs, 2) response token counts: column 0 chosen, column 1 rejected."""
        return np.asarray(self.array("resp_ntok")).reshape(-1, 2)

    def prompt_groups(self) -> np.ndarray:
        """Per pair, the index of its distinct prompt: pairs sharing a prompt share a group."""
        return np.asarray(self.array("prompt_group"))

    @property
    def edges(self) -> list[str]:
        """The response edges this store has firing sets for (``pooled("fires", prefix="resp_<edge>")``)."""
        return [e for e in EDGES if self.firing_layout(f"resp_{e}") is not None]

    def _layout_or_raise(self, prefix: str) -> str:
        layout = self.firing_layout(prefix)
        if layout is None:
            raise FileNotFoundError(
                f"{self.path}: this store has no {prefix!r} firing sets (stored: "
                f"{[p for p in ('resp', 'prompt', *(f'resp_{e}' for e in EDGES)) if self.firing_layout(p)]})"
            )
        return layout

    def _bits_indptr(self, prefix: str) -> np.ndarray:
        """Full-store indptr of a bitset family (popcount per row), cached: values arrays index by it."""
        key = f"_{prefix}_indptr"
        if key not in self._cache:
            bits = self.array(f"{prefix}_bits")
            counts = np.empty(len(bits), dtype=np.int64)
            for a, b in _row_blocks(len(bits), bits.shape[1] * 8):
                counts[a:b] = np.bitwise_count(np.asarray(bits[a:b])).sum(1)
            self._cache[key] = np.r_[0, np.cumsum(counts)].astype(np.int64)
        return self._cache[key]

    def _indptr(self, prefix: str) -> np.ndarray:
        return (
            self._bits_indptr(prefix)
            if self._layout_or_raise(prefix) == "bits"
            else np.asarray(self.array(f"{prefix}_indptr"), dtype=np.int64)
        )

    def n_firing(self, prefix: str = "resp") -> np.ndarray:
        """Per row, how many features fire (``prefix`` as in ``firing_sets``), without decoding ids."""
        return np.diff(self._indptr(prefix))

    def firing_sets(self, prefix: str = "resp", rows: int | slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The features firing per row as CSR ``(indptr, indices)`` (int64, int32; ids ascending
        within a row), whatever the stored layout. ``prefix``: ``"resp"`` (response rows),
        ``"prompt"`` (one row per pair), ``"resp_opening"`` / ``"resp_ending"``; ``rows``: one row,
        a slice of rows (e.g. ``slice(0, None, 2)``: the chosen responses) or None for all."""
        layout = self._layout_or_raise(prefix)
        n = len(self.array(f"{prefix}_bits" if layout == "bits" else f"{prefix}_indptr")) - (layout == "ids")
        if isinstance(rows, (int, np.integer)):
            if not -n <= rows < n:
                raise IndexError(f"row {rows} is out of range: {prefix} has {n} rows ({self.path})")
            sel = slice(int(rows) % n, int(rows) % n + 1)
        elif rows is None or isinstance(rows, slice):
            sel = rows or slice(None)
        else:
            raise TypeError(f"rows must be an int, a slice or None, got {type(rows).__name__}")
        if layout == "ids":
            r = np.arange(n)[sel]
            return _take_rows(self.array(f"{prefix}_feat"), np.asarray(self.array(f"{prefix}_indptr")), r, np.int32)
        bits = self.array(f"{prefix}_bits")[sel]
        d = self.d_sae
        counts = np.empty(len(bits), dtype=np.int64)
        for a, b in _row_blocks(len(bits), d):
            counts[a:b] = np.bitwise_count(np.asarray(bits[a:b])).sum(1)
        indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        ids = np.arange(d, dtype=np.int32)
        for a, b in _row_blocks(len(bits), d):
            fired = np.unpackbits(np.asarray(bits[a:b]), axis=1, count=d, bitorder="little").view(bool)
            # row-major: ids ascending per row
            indices[indptr[a] : indptr[b]] = np.broadcast_to(ids, fired.shape)[fired]
        return indptr, indices

    def _missing(self, prefix: str, stat: str) -> Exception:
        if prefix.startswith("resp_"):
            return ValueError(
                f"{self.path}: {prefix} holds firing sets only; ask for pooled('fires', prefix={prefix!r}), not "
                f"{stat!r}"
            )
        return ValueError(
            f"{self.path}: this store has no {prefix}_{stat} (the {stat} of each firing feature): it was extracted "
            "without "
            "ExtractConfig.pooled_values=True. Extract again with pooled_values=True to store max / mean / count, "
            "or use pooled('fires')" + (" or pooled('mean', prefix='prompt')" if prefix == "prompt" else "")
        )

    def pooled(self, stat: str = "max", side: str | None = None, prefix: str = "resp") -> sp.csr_matrix:
        """A scipy CSR matrix of pooled activations.

        ``stat``: ``"fires"`` (0/1: the feature fired on at least one token; every store has it),
        ``"max"``, ``"mean"`` or ``"count"`` (only in stores extracted with
        ``ExtractConfig.pooled_values=True``, except the prompts' ``"mean"``, always stored).
        ``side``: ``"chosen"`` or ``"rejected"`` (n_pairs × d_sae), or None for all response rows.
        ``prefix="prompt"`` gives the prompt rows instead (n_pairs × d_sae); ``"resp_opening"`` /
        ``"resp_ending"`` the features firing in a response's edge tokens (``"fires"`` only).
        """
        if stat not in STATS:
            raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
        if side is not None and side not in SIDES:
            raise ValueError(f"side must be 'chosen', 'rejected' or None, got {side!r}")
        self._layout_or_raise(prefix)
        if stat != "fires" and not self._has(f"{prefix}_{stat}"):
            raise self._missing(prefix, stat)
        rows = None if prefix == "prompt" or side is None else slice(SIDES[side], None, 2)
        indptr, indices = self.firing_sets(prefix, rows)
        if stat == "fires":
            data = np.ones(len(indices), dtype=np.float32)
        elif rows is None:
            data = np.asarray(self.array(f"{prefix}_{stat}"), dtype=np.float32)
        else:
            full = self._indptr(prefix)
            data = _take_rows(self.array(f"{prefix}_{stat}"), full, np.arange(len(full) - 1)[rows], np.float32)[1]
        return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, self.d_sae))

    def _check_feature(self, feature: int) -> None:
        if not 0 <= int(feature) < self.d_sae:
            raise IndexError(
                f"feature {feature} is out of range: this store's SAE has {self.d_sae} features ({self.path})"
            )

    def response_tokens(self, row: int) -> np.ndarray:
        ptr = self.array("tok_indptr")
        return np.asarray(self.array("tokens")[ptr[row] : ptr[row + 1]])

    def token_text(self) -> dict[int, str]:
        if "_token_text" not in self._cache:
            self._cache["_token_text"] = {int(k): v for k, v in read_json(self.path / "token_text.json").items()}
        return self._cache["_token_text"]

    def top_contexts(self, feature: int, n: int = 10, window: int = 12) -> list[dict]:
        """The responses where ``feature`` peaks highest, each with a token window around the peak
        and, in stores that kept them, the feature's activation on each token of the window."""
        self._check_feature(feature)
        ptr = self.array("top_indptr")
        lo, hi = int(ptr[feature]), int(min(ptr[feature + 1], ptr[feature] + n))
        text = self.token_text()
        windows = self.array("top_window") if (self.path / "top_window.npy").exists() else None
        half = (windows.shape[1] - 1) // 2 if windows is not None else 0
        out = []
        for j in range(lo, hi):
            row, pos, val = (
                int(self.array("top_row")[j]),
                int(self.array("top_pos")[j]),
                float(self.array("top_val")[j]),
            )
            toks = self.response_tokens(row)
            a, b = max(0, pos - window), min(len(toks), pos + window + 1)
            hit = {
                "pair": row // 2,
                "side": "chosen" if row % 2 == CHOSEN else "rejected",
                "position": pos,
                "value": val,
                "tokens": [text.get(int(t), "") for t in toks[a:b]],
                "peak": pos - a,
            }
            if windows is not None:  # the feature's activation on each shown token (None beyond what was kept)
                w = np.asarray(windows[j], dtype=np.float32)
                hit["activations"] = [float(w[t - pos + half]) if abs(t - pos) <= half else None for t in range(a, b)]
            out.append(hit)
        return out

    def histogram(self, feature: int) -> dict[str, np.ndarray]:
        """Token-level activation histogram (non-zero activations) of one feature, per side."""
        self._check_feature(feature)
        h = np.asarray(self.array("hist")[feature])
        return {"edges": np.asarray(self.array("hist_edges")), "chosen": h[CHOSEN], "rejected": h[REJECTED]}

    def pooled_arrays(self) -> list[str]:
        """The per-pair pooled arrays this store holds: firing sets (ids or bits), values, token counts."""
        names = [
            f"{p}_{a}" for p in ("resp", "prompt", *(f"resp_{e}" for e in EDGES)) for a in ("indptr", "feat", "bits")
        ]
        names += [f"{p}_{s}" for p in ("resp", "prompt") for s in STATS[1:]] + ["resp_ntok", "prompt_ntok"]
        return [n for n in names if self._has(n)]

    def bytes_per_pair(self, pooled_only: bool = True) -> float:
        """Bytes on disk per pair: of the pooled arrays (``pooled_arrays``), or of every array."""
        names = self.pooled_arrays() if pooled_only else [p.stem for p in self.path.glob("*.npy")]
        return sum((self.path / f"{n}.npy").stat().st_size for n in names) / self.n_pairs
