"""Stage 1: SAE features of every (prompt, chosen, rejected), written as a feature store.

For each pair the prompt is run once, up to the SAE's layer only (early exit), and its KV cache
is shared by the chosen and the rejected response. Several pairs run per forward when
``ExtractConfig.batch_size`` allows (length-sorted, padded, masked; on a GPU sized from free
memory), with results equal to one pair at a time. The SAE encodes the residual stream at every
response token; the store keeps, per response, the set
of features firing on its tokens (response tokens only) and the sets firing in its opening and its
ending tokens (``ExtractConfig.edge_tokens``), per prompt the features firing on its message
contents with their mean activation (for topic clustering), per feature its top-activating
contexts and token-level activation histograms, and every response's tokens so any context can be
shown later. The per-feature max / mean / firing count of every response (and the prompt's max /
count) are kept only with ``ExtractConfig.pooled_values``: no stage reads them, and they take 6
bytes per firing feature of a response (4 of a prompt). A firing set is stored as feature ids or,
when denser than 1 in 16 features, as a bitset (``write_firing_sets``).

Work is split into shards of pairs, each written atomically: a killed run resumes where it
stopped and gives the same store as an uninterrupted one. Under ``accelerate launch`` each
rank computes every ``world_size``-th shard and rank 0 merges.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ..config import ExtractConfig
from ..core.files import atomic_save_npy, atomic_write_json, content_hash, naming_full_disk
from ..core.stage import show_progress
from ..data.chat import render_example, truncate_prompt
from ..data.pairs import load_pairs
from ..data.schema import PairSet, PreferencePair
from ..lm.models import LoadedModel, load_model
from ..lm.ops import ResidualCapture
from ..lm.sae import LoadedSAE, hook_name, legacy_fingerprints, load_sae
from ..results.extract import EDGES, FeatureStore
from ..results.extract import FORMAT as STORE_FORMAT
from ..results.run import RunDir, RunLike
from .extract_batching import batch_limits, length_batches

__all__ = ["ExtractConfig", "FeatureStore", "compute_shard", "extract", "store_key", "write_firing_sets", "STAGE"]

log = logging.getLogger(__name__)

STAGE = "extract"
CONTEXT_WINDOW = 12  # tokens either side of a top context's peak whose activations are kept
HIST_EDGES = np.concatenate([[0.0], np.geomspace(1e-2, 1e4, 48)]).astype(np.float32)


def feature_dtype(d_sae: int):
    """Feature ids are uint16 up to 65,536 features (2 bytes per firing feature), else int32. The
    values kept with ``pooled_values`` are float16 max and mean and uint16 count (responses are
    capped below 65,536 tokens)."""
    return np.uint16 if d_sae <= np.iinfo(np.uint16).max + 1 else np.int32


def _pool(acts: torch.Tensor) -> dict[str, np.ndarray]:
    """Sparse max / mean / firing count of (T, d_sae) activations over T tokens."""
    T = acts.shape[0]
    if T == 0:
        empty = np.zeros(0, dtype=np.int64)
        return {
            "feat": empty,
            "max": empty.astype(np.float32),
            "mean": empty.astype(np.float32),
            "count": empty,
            "argmax": empty,
        }
    fired = acts > 0
    count = fired.sum(0)
    feat = torch.nonzero(count, as_tuple=True)[0]
    mx, argmax = acts[:, feat].max(0)
    mean = acts[:, feat].sum(0) / T
    return {
        "feat": feat.cpu().numpy(),
        "max": mx.cpu().numpy(),
        "mean": mean.cpu().numpy(),
        "count": count[feat].cpu().numpy(),
        "argmax": argmax.cpu().numpy(),
    }


# --- firing sets -------------------------------------------------------------------------------

#: "auto": per store and array family, whichever of a bitset and feature ids is smaller; "bits" or
#: "ids" force one (tests)
FIRING_LAYOUT = "auto"
_BLOCK_BYTES = 1 << 26  # unpacked (rows × d_sae) booleans converted at a time


def firing_layout(n_rows: int, nnz: int, d_sae: int) -> str:
    """ "bits" when a row's bitset (ceil(d_sae / 8) bytes) is smaller than its mean number of
    feature ids (uint16 below 65,537 features: more than d_sae / 16 firing per row), else "ids"."""
    if FIRING_LAYOUT != "auto":
        return FIRING_LAYOUT
    if n_rows == 0:
        return "ids"
    return "bits" if nnz / n_rows * np.dtype(feature_dtype(d_sae)).itemsize > (d_sae + 7) // 8 else "ids"


def write_firing_sets(
    out_dir: str | Path, prefix: str, indptr: np.ndarray, feat: np.ndarray, d_sae: int, layout: str | None = None
) -> str:
    """Write the CSR firing sets ``indptr``/``feat`` (feature ids ascending within a row) as
    ``{prefix}_bits.npy`` ((n_rows, ceil(d_sae / 8)) uint8, ``np.packbits(..., bitorder="little")``)
    or ``{prefix}_indptr.npy`` + ``{prefix}_feat.npy``; ``layout`` None: ``firing_layout``.
    Value arrays stay in this order (row-major, ids ascending), which both layouts keep. Returns
    the layout written; files of the other layout are removed."""
    out_dir = Path(out_dir)
    indptr = np.asarray(indptr, dtype=np.int64)
    n_rows = len(indptr) - 1
    if indptr[0] != 0 or indptr[-1] != len(feat):
        raise ValueError(
            f"{prefix}: indptr covers {indptr[-1] - indptr[0]} entries from {indptr[0]}, feat has {len(feat)}"
        )
    layout = firing_layout(n_rows, len(feat), d_sae) if layout in (None, "auto") else layout
    if layout == "ids":
        atomic_save_npy(out_dir / f"{prefix}_indptr.npy", indptr)
        atomic_save_npy(out_dir / f"{prefix}_feat.npy", np.asarray(feat).astype(feature_dtype(d_sae), copy=False))
        stale = [f"{prefix}_bits.npy"]
    elif layout == "bits":
        bits = np.empty((n_rows, (d_sae + 7) // 8), dtype=np.uint8)
        block = max(1, min(8192, _BLOCK_BYTES // d_sae))
        for a in range(0, n_rows, block):
            b = min(a + block, n_rows)
            ids = np.asarray(feat[indptr[a] : indptr[b]], dtype=np.int64)
            rows = np.repeat(np.arange(b - a), np.diff(indptr[a : b + 1]))
            # a bitset sorts and deduplicates: values stored in feat's order would no longer line up
            if len(ids) and (ids.min() < 0 or ids.max() >= d_sae or (np.diff(rows * d_sae + ids) <= 0).any()):
                raise ValueError(
                    f"{prefix}: rows {a}..{b - 1} hold feature ids out of 0..{d_sae - 1}, repeated or not ascending"
                )
            dense = np.zeros((b - a, d_sae), dtype=bool)
            dense[rows, ids] = True
            bits[a:b] = np.packbits(dense, axis=1, bitorder="little")
        atomic_save_npy(out_dir / f"{prefix}_bits.npy", bits)
        stale = [f"{prefix}_indptr.npy", f"{prefix}_feat.npy"]
    else:
        raise ValueError(f"layout must be 'bits' or 'ids', got {layout!r}")
    for name in stale:
        (out_dir / name).unlink(missing_ok=True)
    return layout


# --- shards -------------------------------------------------------------------------------------


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


@dataclass
class _Tokenized:
    """One pair cut to the config's limits: the prompt (with its content mask) and both responses."""

    prompt: list[int]
    prompt_mask: list[bool]
    sides: list[list[int]]
    cut_prompt: bool
    cut_responses: int

    @property
    def padded_tokens(self) -> int:
        return len(self.prompt) + 2 * max(len(s) for s in self.sides)


def _tokenize(tok, pair: PreferencePair, cfg: ExtractConfig) -> _Tokenized:
    c = render_example(tok, pair.prompt, pair.chosen)
    r_ids = list(tok(pair.rejected, add_special_tokens=False)["input_ids"])
    p_ids, p_mask, cut = truncate_prompt(c.prompt_ids, c.prompt_content, cfg.max_prompt_tokens)
    sides = [ids[: cfg.max_response_tokens] for ids in (c.response_ids, r_ids)]
    return _Tokenized(
        p_ids, p_mask, sides, cut, sum(len(ids) > cfg.max_response_tokens for ids in (c.response_ids, r_ids))
    )


@torch.no_grad()
def compute_shard(
    capture: ResidualCapture,
    sae: LoadedSAE,
    pairs: Sequence[PreferencePair],
    cfg: ExtractConfig,
    limits: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """The store's arrays for one shard of pairs (``capture`` cuts the model at the SAE's layer).

    Pairs run in length-sorted batches of ``limits`` = (pairs, padded tokens) per forward (default
    ``(cfg.batch_size or 1, cfg.batch_tokens)``); the SAE encodes a whole batch's tokens at once;
    the results are written in the pairs' order, so the batching never changes the layout."""
    tok = capture.lm.tokenizer
    d_sae = sae.d_sae
    max_pairs, max_tokens = limits or (cfg.batch_size or 1, cfg.batch_tokens)
    items = [_tokenize(tok, pair, cfg) for pair in pairs]
    per_pair: list[dict[str, Any]] = [{} for _ in items]
    hist = np.zeros((d_sae, 2, len(HIST_EDGES) - 1), dtype=np.int64)
    for batch in length_batches([it.padded_tokens for it in items], max_pairs if cfg.shared_prefix else 1, max_tokens):
        if cfg.shared_prefix:
            resid = capture.shared_prefix_batch([items[i].prompt for i in batch], [items[i].sides for i in batch])
        else:
            resid = [capture.separately(items[i].prompt, items[i].sides) for i in batch]
        side_x = [x for _, xs in resid for x in xs]
        acts_all = _encode(sae, torch.cat(side_x))
        split = np.cumsum([0] + [len(x) for x in side_x])
        for b, local in enumerate(batch):
            per_pair[local]["sides"] = [
                _response_record(
                    acts_all[split[2 * b + side] : split[2 * b + side + 1]], 2 * local + side, side, cfg, hist
                )
                for side in (0, 1)
            ]
        if cfg.store_prompts:
            keeps = [[j for j, m in enumerate(items[local].prompt_mask) if m and j > 0] for local in batch]
            kept = [
                resid[b][0][torch.tensor(k, dtype=torch.long, device=resid[b][0].device)] for b, k in enumerate(keeps)
            ]
            acts_p = _encode(sae, torch.cat(kept))
            psplit = np.cumsum([0] + [len(k) for k in keeps])
            for b, local in enumerate(batch):
                per_pair[local]["prompt"] = _pool(acts_p[psplit[b] : psplit[b + 1]])
    return _shard_arrays(items, per_pair, hist, d_sae, cfg)


def _encode(sae: LoadedSAE, x: torch.Tensor) -> torch.Tensor:
    return sae.encode(x).float() if len(x) else x.new_zeros((0, sae.d_sae))


def _response_record(acts: torch.Tensor, row: int, side: int, cfg: ExtractConfig, hist: np.ndarray) -> dict[str, Any]:
    """One response's pooled statistics, edge sets and top-context candidates; adds its token
    activations to the per-feature histograms ``hist``."""
    pooled = _pool(acts)
    rec: dict[str, Any] = {"pooled": pooled, "ntok": acts.shape[0]}
    if cfg.edge_tokens:
        rec["edges"] = [
            torch.nonzero((w > 0).any(0), as_tuple=True)[0].cpu().numpy()
            for w in (acts[: cfg.edge_tokens], acts[-cfg.edge_tokens :])
        ]
    rec["cand"] = np.stack([pooled["feat"], np.full_like(pooled["feat"], row), pooled["argmax"]], 1)
    rec["window"] = _peak_windows(acts, pooled["feat"], pooled["argmax"])
    nz = torch.nonzero(acts > 0, as_tuple=True)
    if nz[0].numel():
        vals = acts[nz].cpu().numpy()
        bins = np.clip(np.searchsorted(HIST_EDGES, vals, side="right") - 1, 0, len(HIST_EDGES) - 2)
        flat = (nz[1].cpu().numpy() * 2 + side) * (len(HIST_EDGES) - 1) + bins
        hist += np.bincount(flat, minlength=hist.size).reshape(hist.shape)
    return rec


def _peak_windows(acts: torch.Tensor, feat: np.ndarray, argmax: np.ndarray) -> np.ndarray:
    """(firing features, 2·CONTEXT_WINDOW+1) float16: each feature's activation on every token
    around its peak in this response (0 beyond the response), so a drilldown can shade each token
    of a top context by strength, not only mark the peak."""
    width = 2 * CONTEXT_WINDOW + 1
    if len(feat) == 0:
        return np.zeros((0, width), np.float16)
    T = acts.shape[0]
    pos = (
        torch.as_tensor(argmax, device=acts.device)[:, None]
        + torch.arange(-CONTEXT_WINDOW, CONTEXT_WINDOW + 1, device=acts.device)[None, :]
    )
    inside = (pos >= 0) & (pos < T)
    vals = acts[pos.clamp(0, T - 1), torch.as_tensor(feat, device=acts.device)[:, None]] * inside
    return vals.cpu().numpy().astype(np.float16)


def _shard_arrays(
    items: list[_Tokenized], per_pair: list[dict[str, Any]], hist: np.ndarray, d_sae: int, cfg: ExtractConfig
) -> dict[str, np.ndarray]:
    """Concatenate the per-pair records, in pair order, into the shard's arrays."""
    fdt = feature_dtype(d_sae)
    recs = [r for p in per_pair for r in p["sides"]]
    pooled = lambda k, rs: np.concatenate([r[k] for r in rs]) if rs else np.zeros(0)
    resp = [r["pooled"] for r in recs]
    tokens = [np.asarray(s, dtype=np.int32) for it in items for s in it.sides]
    out = {
        "resp_nnz": np.asarray([len(r["feat"]) for r in resp], dtype=np.int64),
        "resp_feat": pooled("feat", resp).astype(fdt),
        "resp_max": pooled("max", resp).astype(np.float16),
        "resp_mean": pooled("mean", resp).astype(np.float16),
        "resp_count": pooled("count", resp).astype(np.uint16),
        "resp_ntok": np.asarray([r["ntok"] for r in recs], dtype=np.int32),
        "tok_len": np.asarray([len(t) for t in tokens], dtype=np.int64),
        "tokens": np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        "hist": hist,
        "truncated": np.asarray(
            [sum(it.cut_prompt for it in items), sum(it.cut_responses for it in items)], dtype=np.int64
        ),
    }
    if cfg.edge_tokens:
        for j, e in enumerate(EDGES):
            sets = [r["edges"][j] for r in recs]
            out[f"resp_{e}_nnz"] = np.asarray([len(f) for f in sets], dtype=np.int64)
            out[f"resp_{e}_feat"] = np.concatenate(sets).astype(fdt) if sets else np.zeros(0, fdt)
    cand = np.concatenate([r["cand"] for r in recs]) if recs else np.zeros((0, 3), np.int64)
    windows = np.concatenate([r["window"] for r in recs]) if recs else np.zeros((0, 2 * CONTEXT_WINDOW + 1), np.float16)
    out.update(_top_per_feature(cand, pooled("max", resp).astype(np.float32), cfg.top_contexts, windows))
    if cfg.store_prompts:
        prm = [p["prompt"] for p in per_pair]
        out.update(
            prompt_nnz=np.asarray([len(p["feat"]) for p in prm], dtype=np.int64),
            prompt_feat=pooled("feat", prm).astype(fdt),
            prompt_max=pooled("max", prm).astype(np.float16),
            prompt_mean=pooled("mean", prm).astype(np.float16),
            prompt_count=pooled("count", prm).astype(np.uint16),
            prompt_ntok=np.asarray(
                [int(sum(m and j > 0 for j, m in enumerate(it.prompt_mask))) for it in items], dtype=np.int32
            ),
        )
    return out


def _top_per_feature(cand: np.ndarray, val: np.ndarray, n: int, window: np.ndarray) -> dict[str, np.ndarray]:
    """Keep the ``n`` highest (feature, row, position) candidates per feature, with their
    activation windows; ties broken by row then position so the result does not depend on how
    the work was split."""
    if len(cand) == 0:
        return {
            "top_feat": np.zeros(0, np.int32),
            "top_row": np.zeros(0, np.int64),
            "top_pos": np.zeros(0, np.int32),
            "top_val": np.zeros(0, np.float32),
            "top_window": np.zeros((0, window.shape[1]), np.float16),
        }
    order = np.lexsort((cand[:, 2], cand[:, 1], -val, cand[:, 0]))
    cand, val, window = cand[order], val[order], window[order]
    feat = cand[:, 0]
    starts = np.r_[0, np.flatnonzero(np.diff(feat)) + 1]
    rank = np.arange(len(feat)) - np.repeat(starts, np.diff(np.r_[starts, len(feat)]))
    keep = rank < n
    return {
        "top_feat": feat[keep].astype(np.int32),
        "top_row": cand[keep, 1].astype(np.int64),
        "top_pos": cand[keep, 2].astype(np.int32),
        "top_val": val[keep],
        "top_window": window[keep],
    }


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with naming_full_disk(path):
        for k, v in arrays.items():
            np.save(tmp / f"{k}.npy", v, allow_pickle=False)
        (tmp / "done").write_text("ok\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_shard(path: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, allow_pickle=False) for p in path.glob("*.npy")}


def _merge(shard_dirs: list[Path], out: Path, shard_size: int, cfg: ExtractConfig) -> dict[str, Any]:
    """Shards → the store. The shards hold every statistic; without ``cfg.pooled_values`` the
    responses' max / mean / count and the prompts' max / count are dropped here (the prompts'
    mean stays: topics read it)."""
    parts = [_load_shard(p) for p in shard_dirs]
    cat = lambda k: np.concatenate([p[k] for p in parts])
    d_sae = parts[0]["hist"].shape[0]
    arrays: dict[str, np.ndarray] = {}
    layouts: dict[str, str] = {}

    def firing_sets(prefix: str) -> None:
        layouts[prefix] = write_firing_sets(
            out, prefix, np.r_[0, np.cumsum(cat(f"{prefix}_nnz"))], cat(f"{prefix}_feat"), d_sae
        )

    firing_sets("resp")
    for k in (*(["resp_max", "resp_mean", "resp_count"] if cfg.pooled_values else []), "resp_ntok", "tokens"):
        arrays[k] = cat(k)
    arrays["tok_indptr"] = np.r_[0, np.cumsum(cat("tok_len"))].astype(np.int64)
    if cfg.edge_tokens:
        for e in EDGES:
            firing_sets(f"resp_{e}")
    if cfg.store_prompts:
        firing_sets("prompt")
        for k in ("prompt_mean", *(["prompt_max", "prompt_count"] if cfg.pooled_values else []), "prompt_ntok"):
            arrays[k] = cat(k)
    # Top contexts: shard-local rows become global response rows, then re-select per feature.
    rows = [p["top_row"] + 2 * shard_size * i for i, p in enumerate(parts)]
    cand = np.stack([cat("top_feat").astype(np.int64), np.concatenate(rows), cat("top_pos").astype(np.int64)], 1)
    top = _top_per_feature(cand, cat("top_val"), cfg.top_contexts, cat("top_window"))
    arrays["top_indptr"] = np.r_[0, np.cumsum(np.bincount(top["top_feat"], minlength=d_sae))].astype(np.int64)
    arrays["top_row"], arrays["top_pos"], arrays["top_val"], arrays["top_window"] = (
        top["top_row"],
        top["top_pos"],
        top["top_val"],
        top["top_window"],
    )
    arrays["hist"] = sum(p["hist"] for p in parts)
    arrays["hist_edges"] = HIST_EDGES
    for k, v in arrays.items():
        atomic_save_npy(out / f"{k}.npy", v)
    trunc = sum(p["truncated"] for p in parts)
    return {"truncated_prompts": int(trunc[0]), "truncated_responses": int(trunc[1]), "firing_sets": layouts}


# --- the public API -----------------------------------------------------------------------------


def process_state() -> PartialState:
    """accelerate's process state: rank and world size under ``accelerate launch``, else 1 process.
    ``cpu=True`` lets several CPU processes (torchrun / accelerate launch) form a gloo group."""
    return PartialState(cpu=not torch.cuda.is_available())


def store_key(pairs: PairSet | Sequence[PreferencePair], lm: LoadedModel, sae: LoadedSAE, cfg: ExtractConfig) -> str:
    pair_hash = pairs.content_hash() if isinstance(pairs, PairSet) else content_hash([p.to_dict() for p in pairs])
    return content_hash(
        STORE_FORMAT, pair_hash, lm.fingerprint, str(lm.model.dtype), sae.fingerprint, sae.layer, cfg.key_params()
    )


def extract(
    pairs: PairSet | Sequence[PreferencePair] | None,
    model: LoadedModel | str | None,
    sae: LoadedSAE | str | None,
    run: RunLike,
    config: ExtractConfig | dict | None = None,
) -> FeatureStore:
    """Write (or reuse) the feature store of ``pairs`` under ``run/extract/<key>``.

    ``pairs``, ``model`` and ``sae`` may be objects, names, or None for the config's ``data``
    (with ``n_pairs``, ``strict``), ``model`` and ``sae`` (with ``sae_id``, ``layer``). The key hashes
    the pairs, the model, the SAE weights and the config: an unchanged call returns the existing
    store at once; a changed one computes a new store. Interrupted runs resume from their
    finished shards.
    """
    cfg = ExtractConfig.from_dict(config)
    if pairs is None or isinstance(pairs, str):
        pairs = load_pairs(pairs or cfg.data, limit=cfg.n_pairs, strict=cfg.strict)
        if pairs.report.skipped:
            log.warning("skipped %d records: %s", sum(pairs.report.skipped.values()), dict(pairs.report.skipped))
    lm = model if isinstance(model, LoadedModel) else load_model(model or cfg.model)
    sae_ = sae if isinstance(sae, LoadedSAE) else load_sae(sae or cfg.sae, cfg.sae_id, layer=cfg.layer)
    if sae_.d_in != lm.d_model:
        raise ValueError(f"SAE {sae_.name} reads d_in={sae_.d_in} but model {lm.name} has d_model={lm.d_model}")
    if not 0 <= sae_.layer < lm.n_layers:
        raise ValueError(
            f"SAE {sae_.name} reads the output of block {sae_.layer} (hook "
            f"{getattr(getattr(sae_.sae.cfg, 'metadata', None), 'hook_name', None)!r}) but model {lm.name} has "
            f"blocks 0..{lm.n_layers - 1}"
        )
    run = RunDir.of(run)
    pair_list = list(pairs)
    if not pair_list:
        raise ValueError("no pairs to extract")
    keyed = pairs if isinstance(pairs, PairSet) else pair_list
    stage = run.stage(STAGE, store_key(keyed, lm, sae_, cfg), STORE_FORMAT)
    if stage.reuse(n_pairs=len(pair_list)):
        return FeatureStore(stage.path)
    for old in sorted(legacy_fingerprints(sae_.sae)):  # a store keyed by the SAE's first fingerprint formula
        if (legacy := run.stage(STAGE, store_key(keyed, lm, sae_.known_as(old), cfg), STORE_FORMAT)).reuse():
            return FeatureStore(legacy.path)

    state = process_state()
    out = stage.begin()
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
    if todo:
        lm.model.eval()
        limits = batch_limits(cfg, lm, sae_)
        n_todo = sum(len(pair_list[i * cfg.shard_size : (i + 1) * cfg.shard_size]) for i in todo)
        desc = f"extract (rank {state.process_index})" if state.num_processes > 1 else "extract"
        with (
            ResidualCapture(lm, sae_.layer) as capture,
            tqdm(total=n_todo, desc=desc, unit="pair", disable=not show_progress(cfg.progress)) as bar,
        ):
            for i in todo:
                chunk = pair_list[i * cfg.shard_size : (i + 1) * cfg.shard_size]
                _write_shard(shard_root / _shard_name(i), compute_shard(capture, sae_, chunk, cfg, limits))
                bar.update(len(chunk))
    state.wait_for_everyone()
    if state.is_main_process:
        shard_dirs = [shard_root / _shard_name(i) for i in range(n_shards)]
        missing = [p.name for p in shard_dirs if not (p / "done").exists()]
        if missing:
            raise RuntimeError(f"{out}: shards missing after extraction: {missing[:5]}")
        info = _merge(shard_dirs, out, cfg.shard_size, cfg)
        first: dict[str, int] = {}
        groups = np.asarray([first.setdefault(p.prompt_key, len(first)) for p in pair_list], dtype=np.int64)
        atomic_save_npy(out / "prompt_group.npy", groups)
        token_ids = np.unique(np.load(out / "tokens.npy"))
        atomic_write_json(out / "token_text.json", {int(t): lm.tokenizer.decode([int(t)]) for t in token_ids})
        stage.finish(
            {
                "n_pairs": len(pair_list),
                "n_prompts": len(first),
                "d_sae": sae_.d_sae,
                "layer": sae_.layer,
                "model": {"name": lm.name, "fingerprint": lm.fingerprint, "dtype": str(lm.model.dtype)},
                "sae": {"name": sae_.name, "fingerprint": sae_.fingerprint, "hook_name": hook_name(sae_.layer)},
                "config": cfg.to_dict(),
                "pair_ids_hash": content_hash([p.id for p in pair_list]),
                "seconds_last_session": round(time.time() - t0, 2),
                "world_size": state.num_processes,
                **info,
            },
            n_pairs=len(pair_list),
        )
        shutil.rmtree(shard_root, ignore_errors=True)
    state.wait_for_everyone()
    return FeatureStore(out)
