"""Reading a feature store (stage 1's artifact): memory-mapped arrays, never loaded whole, no torch.

Response rows: ``2*i`` is pair ``i``'s chosen response, ``2*i+1`` its rejected one. The layout
(README, "The feature store") is written by ``anatomy_nb.stages.extract``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..core.files import read_json
from ..core.run import Run, RunLike
from ..data.schema import PreferencePair

__all__ = ["CHOSEN", "EDGES", "REJECTED", "FeatureStore"]

CHOSEN, REJECTED = 0, 1
EDGES = ("opening", "ending")  # the response's first / last ExtractConfig.edge_tokens tokens


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
        if not self.manifest.get("complete"):
            raise FileNotFoundError(f"{self.path}: feature store is incomplete; run extract() again to finish it")
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_run(cls, run: RunLike) -> "FeatureStore":
        return Run.of(run).store

    def __repr__(self) -> str:
        m = self.manifest
        return f"FeatureStore({m['n_pairs']} pairs, d_sae={m['d_sae']}, layer={m['layer']}, model={m['model']['name']!r}, path={str(self.path)!r})"

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

    @property
    def has_prompts(self) -> bool:
        return (self.path / "prompt_indptr.npy").exists()

    def token_counts(self) -> np.ndarray:
        """(n_pairs, 2) response token counts: column 0 chosen, column 1 rejected."""
        return np.asarray(self.array("resp_ntok")).reshape(-1, 2)

    def prompt_groups(self) -> np.ndarray:
        """Per pair, the index of its distinct prompt: pairs sharing a prompt share a group."""
        return np.asarray(self.array("prompt_group"))

    @property
    def edges(self) -> list[str]:
        """The response edges this store has firing sets for (``pooled("fires", prefix="resp_<edge>")``)."""
        return [e for e in EDGES if (self.path / f"resp_{e}_indptr.npy").exists()]

    def pooled(self, stat: str = "max", side: str | None = None, prefix: str = "resp"):
        """A scipy CSR matrix of pooled activations.

        ``stat``: ``"max"``, ``"mean"``, ``"count"`` or ``"fires"`` (0/1). ``side``:
        ``"chosen"`` or ``"rejected"`` (n_pairs × d_sae), or None for all response rows.
        ``prefix="prompt"`` gives the prompt rows instead (n_pairs × d_sae); ``"resp_opening"`` /
        ``"resp_ending"`` the features firing in a response's edge tokens (``"fires"`` only).
        """
        indptr = np.asarray(self.array(f"{prefix}_indptr"))
        feat = self.array(f"{prefix}_feat")
        if stat == "fires":
            data = np.ones(len(feat), dtype=np.float32)
        else:
            data = np.asarray(self.array(f"{prefix}_{stat}"), dtype=np.float32)
        m = sp.csr_matrix((data, np.asarray(feat, dtype=np.int32), indptr), shape=(len(indptr) - 1, self.d_sae))
        if prefix == "prompt" or side is None:
            return m
        return m[{"chosen": CHOSEN, "rejected": REJECTED}[side] :: 2]

    def _check_feature(self, feature: int) -> None:
        if not 0 <= int(feature) < self.d_sae:
            raise IndexError(f"feature {feature} is out of range: this store's SAE has {self.d_sae} features ({self.path})")

    def response_tokens(self, row: int) -> np.ndarray:
        ptr = self.array("tok_indptr")
        return np.asarray(self.array("tokens")[ptr[row] : ptr[row + 1]])

    def token_text(self) -> dict[int, str]:
        if "_token_text" not in self._cache:
            self._cache["_token_text"] = {int(k): v for k, v in read_json(self.path / "token_text.json").items()}
        return self._cache["_token_text"]

    def top_contexts(self, feature: int, n: int = 10, window: int = 12) -> list[dict]:
        """The responses where ``feature`` peaks highest, each with a token window around the peak."""
        self._check_feature(feature)
        ptr = self.array("top_indptr")
        lo, hi = int(ptr[feature]), int(min(ptr[feature + 1], ptr[feature] + n))
        text = self.token_text()
        out = []
        for j in range(lo, hi):
            row, pos, val = int(self.array("top_row")[j]), int(self.array("top_pos")[j]), float(self.array("top_val")[j])
            toks = self.response_tokens(row)
            a, b = max(0, pos - window), min(len(toks), pos + window + 1)
            out.append({
                "pair": row // 2,
                "side": "chosen" if row % 2 == CHOSEN else "rejected",
                "position": pos,
                "value": val,
                "tokens": [text.get(int(t), "") for t in toks[a:b]],
                "peak": pos - a,
            })
        return out

    def histogram(self, feature: int) -> dict[str, np.ndarray]:
        """Token-level activation histogram (non-zero activations) of one feature, per side."""
        self._check_feature(feature)
        h = np.asarray(self.array("hist")[feature])
        return {"edges": np.asarray(self.array("hist_edges")), "chosen": h[CHOSEN], "rejected": h[REJECTED]}

    def bytes_per_pair(self, pooled_only: bool = True) -> float:
        names = ["resp_indptr", "resp_feat", "resp_max", "resp_mean", "resp_count", "resp_ntok"]
        if self.manifest["config"].get("store_prompts", True):
            names += ["prompt_indptr", "prompt_feat", "prompt_max", "prompt_mean", "prompt_count", "prompt_ntok"]
        names += [f"resp_{e}_{a}" for e in self.edges for a in ("indptr", "feat")]
        if not pooled_only:
            names = [p.stem for p in self.path.glob("*.npy")]
        return sum((self.path / f"{n}.npy").stat().st_size for n in names) / self.n_pairs
