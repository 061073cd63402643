"""Stage 1: SAE features of every (prompt, chosen, rejected), written as a feature store.

For each pair the prompt is run once, up to the SAE's layer only (early exit), and its KV cache
is shared by the chosen and the rejected response, which run together as a batch of two. The
SAE encodes the residual stream at every response token; the store keeps, per response, the
activations pooled over response tokens only (max, mean and firing count, sparse) and the sets of
features firing in its opening and its ending tokens (``ExtractConfig.edge_tokens``), per prompt
the same pooled over the prompt's message contents (for topic clustering), per feature its
top-activating contexts and token-level activation histograms, and every response's tokens so
any context can be shown later.

Work is split into shards of pairs, each written atomically: a killed run resumes where it
stopped and gives the same store as an uninterrupted one. Under ``accelerate launch`` each
rank computes every ``world_size``-th shard and rank 0 merges.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import RunDir, atomic_save_npy, atomic_write_json, content_hash, read_json
from .data import PairSet, PreferencePair
from .models import LoadedModel, decoder_layers, load_model, render_example, truncated_to_layer
from .sae import LoadedSAE, load_sae

__all__ = ["ExtractConfig", "FeatureStore", "extract", "STAGE"]

log = logging.getLogger(__name__)

STAGE = "features"
STORE_FORMAT = 1
CHOSEN, REJECTED = 0, 1
EDGES = ("opening", "ending")  # the response's first / last ExtractConfig.edge_tokens tokens
HIST_EDGES = np.concatenate([[0.0], np.geomspace(1e-2, 1e4, 48)]).astype(np.float32)


@dataclass
class ExtractConfig:
    """Parameters of the feature store (all but ``progress`` are part of its key)."""

    max_prompt_tokens: int = 1024  # longer prompts keep their first token and their last tokens
    max_response_tokens: int = 512  # at most 65,535 (counts are stored as uint16)
    shard_size: int = 128
    top_contexts: int = 32  # per feature: the responses where it peaks highest
    shared_prefix: bool = True  # False runs prompt+response twice (the naive baseline)
    store_prompts: bool = True
    # per response, also the features firing in its first / last this many tokens (sets only): an
    # opener or a sign-off is specific there and diluted in the whole response; 0 = not stored
    edge_tokens: int = 8
    progress: bool = True

    def __post_init__(self):
        if not 1 <= self.max_response_tokens <= 65_535:
            raise ValueError(f"max_response_tokens must be in 1..65535, got {self.max_response_tokens}")
        if self.max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2, got {self.max_prompt_tokens}")
        if self.edge_tokens < 0:
            raise ValueError(f"edge_tokens must be >= 0, got {self.edge_tokens}")
        if self.shard_size < 1 or self.top_contexts < 1:
            raise ValueError("shard_size and top_contexts must be >= 1")


# --- one pair -----------------------------------------------------------------------------------


class _Encoder:
    """Runs the model to the SAE's layer and encodes; owns the hook for its lifetime."""

    def __init__(self, lm: LoadedModel, sae: LoadedSAE):
        self.lm, self.sae = lm, sae
        self.block = decoder_layers(lm.model)[sae.layer]
        self._captured: torch.Tensor | None = None

    def __enter__(self):
        self._handle = self.block.register_forward_hook(self._hook)
        self._trunc = truncated_to_layer(self.lm.model, self.sae.layer)
        self.base = self._trunc.__enter__()
        return self

    def __exit__(self, *exc):
        self._trunc.__exit__(*exc)
        self._handle.remove()

    def _hook(self, module, inputs, output):
        self._captured = output[0] if isinstance(output, tuple) else output

    def run(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        self.base(input_ids=ids.to(self.lm.device), past_key_values=cache, use_cache=cache is not None)
        return self._captured

    def encode(self, resid: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(resid).float()

    @torch.no_grad()
    def pair(self, prompt: list[int], chosen: list[int], rejected: list[int], shared_prefix: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Residual stream (float) at prompt positions and at each response's positions."""
        from transformers import DynamicCache

        P = len(prompt)
        if not shared_prefix:
            outs = []
            for resp in (chosen, rejected):
                x = self.run(torch.tensor([prompt + resp]))
                outs.append(x[0, P:].float())
            return x[0, :P].float(), outs
        cache = DynamicCache()
        prompt_resid = self.run(torch.tensor([prompt]), cache)[0].float()
        cache.batch_repeat_interleave(2)
        R = max(len(chosen), len(rejected))
        pad = self.lm.tokenizer.pad_token_id or 0
        # Right padding needs no mask: causal attention never lets a real token see a later pad.
        batch = torch.tensor([resp + [pad] * (R - len(resp)) for resp in (chosen, rejected)])
        x = self.run(batch, cache).float()
        return prompt_resid, [x[0, : len(chosen)], x[1, : len(rejected)]]


def _feature_dtype(d_sae: int):
    """Pooled statistics take 8 bytes per firing feature: uint16 id, float16 max and mean,
    uint16 count (responses are capped well below 65,535 tokens)."""
    return np.uint16 if d_sae <= np.iinfo(np.uint16).max + 1 else np.int32


def _pool(acts: torch.Tensor) -> dict[str, np.ndarray]:
    """Sparse max / mean / firing count of (T, d_sae) activations over T tokens."""
    T = acts.shape[0]
    if T == 0:
        empty = np.zeros(0, dtype=np.int64)
        return {"feat": empty, "max": empty.astype(np.float32), "mean": empty.astype(np.float32), "count": empty, "argmax": empty}
    fired = acts > 0
    count = fired.sum(0)
    feat = torch.nonzero(count, as_tuple=True)[0]
    mx, argmax = acts[:, feat].max(0)
    mean = acts[:, feat].sum(0) / T
    return {"feat": feat.cpu().numpy(), "max": mx.cpu().numpy(), "mean": mean.cpu().numpy(), "count": count[feat].cpu().numpy(), "argmax": argmax.cpu().numpy()}


def _truncate_prompt(ids: list[int], mask: list[bool], limit: int) -> tuple[list[int], list[bool], bool]:
    if len(ids) <= limit:
        return ids, mask, False
    keep = limit - 1  # keep position 0 (the attention sink the model expects) and the most recent turns
    return ids[:1] + ids[-keep:], mask[:1] + mask[-keep:], True


# --- shards -------------------------------------------------------------------------------------


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


@torch.no_grad()
def _compute_shard(enc: _Encoder, pairs: Sequence[PreferencePair], cfg: ExtractConfig, d_sae: int) -> dict[str, np.ndarray]:
    tok = enc.lm.tokenizer
    resp = {k: [] for k in ("feat", "max", "mean", "count")}
    resp_nnz, resp_ntok, tokens, cand, cand_val = [], [], [], [], []
    edge = {e: [] for e in EDGES}
    prm = {k: [] for k in ("feat", "max", "mean", "count")}
    prm_nnz, prm_ntok = [], []
    hist = np.zeros((d_sae, 2, len(HIST_EDGES) - 1), dtype=np.int64)
    n_trunc_prompt = n_trunc_resp = 0
    for local, pair in enumerate(pairs):
        c = render_example(tok, pair.prompt, pair.chosen)
        r_ids = tok(pair.rejected, add_special_tokens=False)["input_ids"]
        p_ids, p_mask, cut = _truncate_prompt(c.prompt_ids, c.prompt_content, cfg.max_prompt_tokens)
        n_trunc_prompt += cut
        sides = []
        for ids in (c.response_ids, list(r_ids)):
            n_trunc_resp += len(ids) > cfg.max_response_tokens
            sides.append(ids[: cfg.max_response_tokens])
        prompt_resid, side_resid = enc.pair(p_ids, sides[0], sides[1], cfg.shared_prefix)
        for side, (ids, x) in enumerate(zip(sides, side_resid)):
            acts = enc.encode(x)
            pooled = _pool(acts)
            if cfg.edge_tokens:
                for e, window in zip(EDGES, (acts[: cfg.edge_tokens], acts[-cfg.edge_tokens :])):
                    edge[e].append(torch.nonzero((window > 0).any(0), as_tuple=True)[0].cpu().numpy())
            for k in resp:
                resp[k].append(pooled[k])
            resp_nnz.append(len(pooled["feat"]))
            resp_ntok.append(len(ids))
            tokens.append(np.asarray(ids, dtype=np.int32))
            row = 2 * local + side
            cand.append(np.stack([pooled["feat"], np.full_like(pooled["feat"], row), pooled["argmax"]], 1))
            cand_val.append(pooled["max"])
            nz = torch.nonzero(acts > 0, as_tuple=True)
            if nz[0].numel():
                vals = acts[nz].cpu().numpy()
                bins = np.clip(np.searchsorted(HIST_EDGES, vals, side="right") - 1, 0, len(HIST_EDGES) - 2)
                flat = (nz[1].cpu().numpy() * 2 + side) * (len(HIST_EDGES) - 1) + bins
                hist += np.bincount(flat, minlength=hist.size).reshape(hist.shape)
        if cfg.store_prompts:
            keep = torch.tensor([i for i, m in enumerate(p_mask) if m and i > 0], dtype=torch.long)
            pooled = _pool(enc.encode(prompt_resid[keep.to(prompt_resid.device)]) if keep.numel() else prompt_resid[:0].new_zeros((0, d_sae)))
            for k in prm:
                prm[k].append(pooled[k])
            prm_nnz.append(len(pooled["feat"]))
            prm_ntok.append(int(keep.numel()))
    fdt = _feature_dtype(d_sae)
    out = {
        "resp_nnz": np.asarray(resp_nnz, dtype=np.int64),
        "resp_feat": np.concatenate(resp["feat"]).astype(fdt),
        "resp_max": np.concatenate(resp["max"]).astype(np.float16),
        "resp_mean": np.concatenate(resp["mean"]).astype(np.float16),
        "resp_count": np.concatenate(resp["count"]).astype(np.uint16),
        "resp_ntok": np.asarray(resp_ntok, dtype=np.int32),
        "tok_len": np.asarray([len(t) for t in tokens], dtype=np.int64),
        "tokens": np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        "hist": hist,
        "truncated": np.asarray([n_trunc_prompt, n_trunc_resp], dtype=np.int64),
    }
    if cfg.edge_tokens:
        for e, sets in edge.items():
            out[f"resp_{e}_nnz"] = np.asarray([len(f) for f in sets], dtype=np.int64)
            out[f"resp_{e}_feat"] = np.concatenate(sets).astype(fdt) if sets else np.zeros(0, fdt)
    cand_arr = np.concatenate(cand) if cand else np.zeros((0, 3), np.int64)
    vals = np.concatenate(cand_val).astype(np.float32) if cand else np.zeros(0, np.float32)
    out.update(_top_per_feature(cand_arr, vals, cfg.top_contexts))
    if cfg.store_prompts:
        out.update(
            prompt_nnz=np.asarray(prm_nnz, dtype=np.int64),
            prompt_feat=np.concatenate(prm["feat"]).astype(fdt),
            prompt_max=np.concatenate(prm["max"]).astype(np.float16),
            prompt_mean=np.concatenate(prm["mean"]).astype(np.float16),
            prompt_count=np.concatenate(prm["count"]).astype(np.uint16),
            prompt_ntok=np.asarray(prm_ntok, dtype=np.int32),
        )
    return out


def _top_per_feature(cand: np.ndarray, val: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Keep the ``n`` highest (feature, row, position) candidates per feature; ties broken by
    row then position so the result does not depend on how the work was split."""
    if len(cand) == 0:
        return {"top_feat": np.zeros(0, np.int32), "top_row": np.zeros(0, np.int64), "top_pos": np.zeros(0, np.int32), "top_val": np.zeros(0, np.float32)}
    order = np.lexsort((cand[:, 2], cand[:, 1], -val, cand[:, 0]))
    cand, val = cand[order], val[order]
    feat = cand[:, 0]
    starts = np.r_[0, np.flatnonzero(np.diff(feat)) + 1]
    rank = np.arange(len(feat)) - np.repeat(starts, np.diff(np.r_[starts, len(feat)]))
    keep = rank < n
    return {"top_feat": feat[keep].astype(np.int32), "top_row": cand[keep, 1].astype(np.int64), "top_pos": cand[keep, 2].astype(np.int32), "top_val": val[keep]}


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for k, v in arrays.items():
        np.save(tmp / f"{k}.npy", v, allow_pickle=False)
    (tmp / "done").write_text("ok\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_shard(path: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, allow_pickle=False) for p in path.glob("*.npy")}


def _merge(shard_dirs: list[Path], out: Path, shard_size: int, cfg: ExtractConfig) -> dict[str, Any]:
    parts = [_load_shard(p) for p in shard_dirs]
    cat = lambda k: np.concatenate([p[k] for p in parts])
    arrays: dict[str, np.ndarray] = {}
    arrays["resp_indptr"] = np.r_[0, np.cumsum(cat("resp_nnz"))].astype(np.int64)
    for k in ("resp_feat", "resp_max", "resp_mean", "resp_count", "resp_ntok", "tokens"):
        arrays[k] = cat(k)
    arrays["tok_indptr"] = np.r_[0, np.cumsum(cat("tok_len"))].astype(np.int64)
    if cfg.edge_tokens:
        for e in EDGES:
            arrays[f"resp_{e}_indptr"] = np.r_[0, np.cumsum(cat(f"resp_{e}_nnz"))].astype(np.int64)
            arrays[f"resp_{e}_feat"] = cat(f"resp_{e}_feat")
    if cfg.store_prompts:
        arrays["prompt_indptr"] = np.r_[0, np.cumsum(cat("prompt_nnz"))].astype(np.int64)
        for k in ("prompt_feat", "prompt_max", "prompt_mean", "prompt_count", "prompt_ntok"):
            arrays[k] = cat(k)
    # Top contexts: shard-local rows become global response rows, then re-select per feature.
    rows = [p["top_row"] + 2 * shard_size * i for i, p in enumerate(parts)]
    cand = np.stack([cat("top_feat").astype(np.int64), np.concatenate(rows), cat("top_pos").astype(np.int64)], 1)
    top = _top_per_feature(cand, cat("top_val"), cfg.top_contexts)
    d_sae = parts[0]["hist"].shape[0]
    arrays["top_indptr"] = np.r_[0, np.cumsum(np.bincount(top["top_feat"], minlength=d_sae))].astype(np.int64)
    arrays["top_row"], arrays["top_pos"], arrays["top_val"] = top["top_row"], top["top_pos"], top["top_val"]
    arrays["hist"] = sum(p["hist"] for p in parts)
    arrays["hist_edges"] = HIST_EDGES
    for k, v in arrays.items():
        atomic_save_npy(out / f"{k}.npy", v)
    trunc = sum(p["truncated"] for p in parts)
    return {"truncated_prompts": int(trunc[0]), "truncated_responses": int(trunc[1])}


# --- the public API -----------------------------------------------------------------------------


def _distributed():
    """accelerate's process state: rank and world size under ``accelerate launch``, else 1 process."""
    from accelerate import PartialState

    # cpu=True lets several CPU processes (torchrun / accelerate launch) form a gloo group.
    return PartialState(cpu=not torch.cuda.is_available())



def store_key(pairs: PairSet | Sequence[PreferencePair], lm: LoadedModel, sae: LoadedSAE, cfg: ExtractConfig) -> str:
    pair_hash = pairs.content_hash() if isinstance(pairs, PairSet) else content_hash([p.to_dict() for p in pairs])
    params = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    return content_hash(STORE_FORMAT, pair_hash, lm.fingerprint, str(lm.model.dtype), sae.fingerprint, sae.layer, params)


def extract(
    pairs: PairSet | Sequence[PreferencePair],
    model: LoadedModel | str,
    sae: LoadedSAE | str,
    run_dir: str | Path | RunDir,
    config: ExtractConfig | None = None,
) -> "FeatureStore":
    """Write (or reuse) the feature store of ``pairs`` under ``run_dir/features/<key>``.

    The key hashes the pairs, the model, the SAE weights and the config: an unchanged call
    returns the existing store at once; a changed one computes a new store. Interrupted runs
    resume from their finished shards.
    """
    cfg = config or ExtractConfig()
    lm = load_model(model) if isinstance(model, str) else model
    sae_ = load_sae(sae) if isinstance(sae, str) else sae
    if sae_.d_in != lm.d_model:
        raise ValueError(f"SAE {sae_.name} reads d_in={sae_.d_in} but model {lm.name} has d_model={lm.d_model}")
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    pair_list = list(pairs)
    if not pair_list:
        raise ValueError("no pairs to extract")
    key = store_key(pairs if isinstance(pairs, PairSet) else pair_list, lm, sae_, cfg)
    out = run.artifact_dir(STAGE, key)
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and read_json(manifest_path).get("complete"):
        run.record(STAGE, key, n_pairs=len(pair_list))
        return FeatureStore(out)

    state = _distributed()
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        with open(out / "pairs.jsonl.tmp", "w") as fh:
            for p in pair_list:
                fh.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        (out / "pairs.jsonl.tmp").replace(out / "pairs.jsonl")
    shard_root = out / "shards"
    n_shards = (len(pair_list) + cfg.shard_size - 1) // cfg.shard_size
    mine = [i for i in range(n_shards) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not (shard_root / _shard_name(i) / "done").exists()]
    t0 = time.time()
    n_tokens = 0
    if todo:
        lm.model.eval()
        with _Encoder(lm, sae_) as enc, tqdm(total=sum(len(pair_list[i * cfg.shard_size : (i + 1) * cfg.shard_size]) for i in todo), desc=f"extract (rank {state.process_index})" if state.num_processes > 1 else "extract", unit="pair", disable=not cfg.progress) as bar:
            for i in todo:
                chunk = pair_list[i * cfg.shard_size : (i + 1) * cfg.shard_size]
                arrays = _compute_shard(enc, chunk, cfg, sae_.d_sae)
                _write_shard(shard_root / _shard_name(i), arrays)
                n_tokens += int(arrays["tok_len"].sum())
                bar.update(len(chunk))
    state.wait_for_everyone()
    if state.is_main_process:
        shard_dirs = [shard_root / _shard_name(i) for i in range(n_shards)]
        missing = [p.name for p in shard_dirs if not (p / "done").exists()]
        if missing:
            raise RuntimeError(f"{out}: shards missing after extraction: {missing[:5]}")
        info = _merge(shard_dirs, out, cfg.shard_size, cfg)
        pair_ids = [p.id for p in pair_list]
        prompt_keys = [content_hash([dict(m) for m in p.prompt]) for p in pair_list]
        first = {}
        groups = np.asarray([first.setdefault(k, len(first)) for k in prompt_keys], dtype=np.int64)
        atomic_save_npy(out / "prompt_group.npy", groups)
        manifest = {
            "complete": True,
            "format": STORE_FORMAT,
            "key": key,
            "n_pairs": len(pair_list),
            "n_prompts": len(first),
            "d_sae": sae_.d_sae,
            "layer": sae_.layer,
            "model": {"name": lm.name, "fingerprint": lm.fingerprint, "dtype": str(lm.model.dtype)},
            "sae": {"name": sae_.name, "fingerprint": sae_.fingerprint, "hook_name": f"blocks.{sae_.layer}.hook_resid_post"},
            "config": asdict(cfg),
            "pair_ids_hash": content_hash(pair_ids),
            "seconds_last_session": round(time.time() - t0, 2),
            "world_size": state.num_processes,
            **info,
        }
        token_ids = np.unique(np.load(out / "tokens.npy"))
        atomic_write_json(out / "token_text.json", {int(t): lm.tokenizer.decode([int(t)]) for t in token_ids})
        atomic_write_json(manifest_path, manifest)
        shutil.rmtree(shard_root, ignore_errors=True)
        run.record(STAGE, key, n_pairs=len(pair_list))
    state.wait_for_everyone()
    return FeatureStore(out)


# --- reading a store ----------------------------------------------------------------------------


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
    def from_run(cls, run_dir: str | Path | RunDir) -> "FeatureStore":
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        return cls(run.latest(STAGE))

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

    def pairs(self) -> list[dict]:
        with open(self.path / "pairs.jsonl") as fh:
            return [json.loads(line) for line in fh]

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
        import scipy.sparse as sp

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

    def response_tokens(self, row: int) -> np.ndarray:
        ptr = self.array("tok_indptr")
        return np.asarray(self.array("tokens")[ptr[row] : ptr[row + 1]])

    def token_text(self) -> dict[int, str]:
        if "_token_text" not in self._cache:
            self._cache["_token_text"] = {int(k): v for k, v in read_json(self.path / "token_text.json").items()}
        return self._cache["_token_text"]

    def top_contexts(self, feature: int, n: int = 10, window: int = 12) -> list[dict]:
        """The responses where ``feature`` peaks highest, each with a token window around the peak."""
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
