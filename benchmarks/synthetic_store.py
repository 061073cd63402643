"""Synthetic feature stores at the scale practitioners work at, for ``benchmarks/scale.py``.

No model runs: responses fire *groups* of co-firing features (a stand-in for concepts), group
popularity follows a power law, and the mean number of distinct features per response is pinned
to a real SAE's (the default SAE: ~670; a wide public SAE: ~1,500). Chosen and rejected share
most of their pair's groups; a few planted groups favour chosen. Prompts fire topic-specific
groups, so prompt topics exist. The store is written in the layout ``stages.extract`` writes
(firing sets through its ``write_firing_sets``: bitsets where dense), so stage 2 runs on it
unchanged; the values no stage reads (responses' max / mean / count, prompts' max / count) only
with ``pooled_values=True``, as ``ExtractConfig.pooled_values``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from anatomy_nb.config import ExtractConfig
from anatomy_nb.core.files import atomic_save_npy, atomic_write_json, content_hash
from anatomy_nb.results.extract import FeatureStore
from anatomy_nb.results.run import RunDir
from anatomy_nb.stages.extract import HIST_EDGES, STAGE, STORE_FORMAT, write_firing_sets

GROUP = 8  # features per co-firing group
KEEP = 0.7  # a member fires when its group is active with this probability
EDGE = 0.32  # share of a response's features that also fire in its opening (or ending) tokens
WORDS = np.array(
    "the a of to and in is it that for you with on as are this be can or your not have but by from they more what "
    "about which when one all there their will would if so an also how some into other only than then these may "
    "should most our such just like time people make use them because any each well very way even many over much new "
    "good need first help work".split()
)


def _popularity(n_groups: int, per_response: float, rng: np.random.Generator, alpha: float = 1.0) -> np.ndarray:
    """Per group, the probability it is active in a response: power law in a random order of
    groups, scaled so that a response fires ``per_response`` distinct features on average."""
    raw = (1.0 + np.arange(n_groups)) ** -alpha
    lo, hi = 1e-9, 1e9
    for _ in range(200):
        c = np.sqrt(lo * hi)
        lo, hi = (c, hi) if (np.minimum(c * raw, 0.9) * GROUP * KEEP).sum() < per_response else (lo, c)
    return rng.permutation(np.minimum(lo * raw, 0.9))


def _sample_groups(
    rng: np.random.Generator, pi: np.ndarray, n_rows: int, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Active groups per row (sorted, distinct): Poisson many draws from ``pi``."""
    lam = pi.sum()
    counts = rng.poisson(lam * scale)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    groups = rng.choice(len(pi), size=len(rows), p=pi / lam)
    key = np.unique(rows * len(pi) + groups)
    return key // len(pi), key % len(pi)


def _expand(
    rng: np.random.Generator, rows: np.ndarray, groups: np.ndarray, n_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Groups → member features (each kept with KEEP); returns CSR indptr and sorted feature ids."""
    feats = (groups[:, None] * GROUP + np.arange(GROUP)).ravel()
    rows = np.repeat(rows, GROUP)
    keep = rng.random(len(feats)) < KEEP
    feats, rows = feats[keep], rows[keep]
    return np.r_[0, np.cumsum(np.bincount(rows, minlength=n_rows))].astype(np.int64), feats


def _pilot_mean(pi: np.ndarray, rng: np.random.Generator, scale: np.ndarray) -> float:
    """Distinct features per response that ``pi`` gives after the pair sharing below."""
    n = len(scale) // 2
    pr, pg = _sample_groups(rng, pi, n, 0.6 * np.sqrt(scale[0::2] * scale[1::2]))
    sr, sg = _sample_groups(rng, pi, 2 * n, 0.4 * scale)
    distinct = np.unique(np.r_[2 * pr, 2 * pr + 1, sr] * len(pi) + np.r_[pg, pg, sg])
    return len(distinct) * GROUP * KEEP / (2 * n)


def write_synthetic_store(
    run_dir: str | Path,
    n_pairs: int,
    d_sae: int,
    per_response: float,
    seed: int = 0,
    n_topics: int = 12,
    n_planted: int = 20,
    pooled_values: bool = False,
) -> FeatureStore:
    """Write (or reuse) a synthetic store under ``run_dir/extract/<key>`` and return it."""
    run = RunDir(run_dir)
    key = content_hash(
        "synthetic", 3, STORE_FORMAT, n_pairs, d_sae, per_response, seed, n_topics, n_planted, pooled_values
    )
    stage = run.stage(STAGE, key, STORE_FORMAT)
    if stage.reuse():
        return FeatureStore(stage.path)
    t0 = time.time()
    out = stage.begin()
    rng = np.random.default_rng(seed)
    n_groups = d_sae // GROUP
    n_resp = 2 * n_pairs
    ntok = np.clip(rng.lognormal(np.log(180), 0.6, n_resp), 8, 1024).astype(np.int32)
    ntok[0::2] = np.clip(ntok[0::2] * 1.1, 8, 1024)  # chosen a little longer, as in most data sets
    scale = (ntok / np.median(ntok)) ** 0.3  # longer responses fire more features
    pi = _popularity(n_groups, per_response, rng)
    # overlaps and dedup: calibrate once
    pi = _popularity(n_groups, per_response**2 / _pilot_mean(pi, rng, scale[:2000]), rng)
    # a pair's shared groups (60 %) + each side's own (40 %); planted groups favour chosen
    share = 0.6
    pr, pg = _sample_groups(rng, pi, n_pairs, share * np.sqrt(scale[0::2] * scale[1::2]))
    sr, sg = _sample_groups(rng, pi, n_resp, (1 - share) * scale)
    planted = rng.choice(
        np.argsort(pi)[n_groups // 4 : n_groups // 2], size=min(n_planted, n_groups // 4), replace=False
    )
    extra_rows = rng.choice(n_pairs, size=(len(planted), max(1, n_pairs // 20)))
    rows = np.concatenate([2 * pr, 2 * pr + 1, sr, 2 * extra_rows.ravel()])
    groups = np.concatenate([pg, pg, sg, np.repeat(planted, extra_rows.shape[1])])
    key_rg = np.unique(rows * n_groups + groups)
    indptr, feats = _expand(rng, key_rg // n_groups, key_rg % n_groups, n_resp)
    layouts = {"resp": write_firing_sets(out, "resp", indptr, feats, d_sae)}
    for stat, dtype in (("max", np.float16), ("mean", np.float16), ("count", np.uint16)):
        vals = rng.gamma(2.0, 1.0, len(feats)) if stat != "count" else rng.integers(1, 20, len(feats))
        if pooled_values:  # drawn either way: the rest of the store does not depend on pooled_values
            atomic_save_npy(out / f"resp_{stat}.npy", vals.astype(dtype))
    atomic_save_npy(out / "resp_ntok.npy", ntok)
    row_of = np.repeat(np.arange(n_resp), np.diff(indptr))
    for edge in ("opening", "ending"):
        keep = rng.random(len(feats)) < EDGE
        layouts[f"resp_{edge}"] = write_firing_sets(
            out, f"resp_{edge}", np.r_[0, np.cumsum(np.bincount(row_of[keep], minlength=n_resp))], feats[keep], d_sae
        )
    # top contexts from a sample of firing entries, ordered by feature
    sample = np.sort(rng.choice(len(feats), size=min(len(feats), 20_000_000), replace=False))
    order = np.argsort(feats[sample], kind="stable")
    top_feat, top_row = feats[sample][order], row_of[sample][order]
    starts = np.r_[0, np.flatnonzero(np.diff(top_feat)) + 1]
    rank = np.arange(len(top_feat)) - np.repeat(starts, np.diff(np.r_[starts, len(top_feat)]))
    keep = rank < 8
    top_feat, top_row = top_feat[keep], top_row[keep]
    atomic_save_npy(
        out / "top_indptr.npy", np.r_[0, np.cumsum(np.bincount(top_feat, minlength=d_sae))].astype(np.int64)
    )
    atomic_save_npy(out / "top_row.npy", top_row.astype(np.int64))
    atomic_save_npy(out / "top_pos.npy", (rng.random(len(top_row)) * ntok[top_row]).astype(np.int32))
    atomic_save_npy(out / "top_val.npy", rng.gamma(2.0, 1.0, len(top_row)).astype(np.float32))
    atomic_save_npy(out / "hist.npy", np.zeros((d_sae, 2, len(HIST_EDGES) - 1), dtype=np.int64))
    atomic_save_npy(out / "hist_edges.npy", HIST_EDGES)
    vocab = len(WORDS)
    tokens = rng.integers(0, vocab, int(ntok.sum())).astype(np.int32)
    tok_indptr = np.r_[0, np.cumsum(ntok)].astype(np.int64)
    atomic_save_npy(out / "tokens.npy", tokens)
    atomic_save_npy(out / "tok_indptr.npy", tok_indptr)
    atomic_write_json(out / "token_text.json", {i: f" {w}" for i, w in enumerate(WORDS)})
    # prompts: one per pair, 10 % shared; each topic boosts its own tenth of the groups
    n_prompts = max(1, int(n_pairs * 0.9))
    prompt_group = np.sort(np.r_[np.arange(n_prompts), rng.integers(0, n_prompts, n_pairs - n_prompts)])
    topic = rng.integers(0, n_topics, n_prompts)
    boost = np.zeros((n_topics, n_groups))
    for t in range(n_topics):
        boost[t, rng.choice(n_groups, n_groups // 10, replace=False)] = 1.0
    pr_rows, pr_groups = _sample_groups(rng, pi, n_prompts, np.full(n_prompts, 1.0))
    t_rows = np.repeat(np.arange(n_prompts), 20)
    t_groups = (
        np.array([rng.choice(np.flatnonzero(boost[t]), 20) for t in topic]).ravel()
        if n_prompts
        else np.zeros(0, np.int64)
    )
    key_p = np.unique(np.r_[pr_rows, t_rows] * n_groups + np.r_[pr_groups, t_groups])
    p_indptr, p_feats = _expand(rng, key_p // n_groups, key_p % n_groups, n_prompts)
    per_pair = np.diff(p_indptr)[prompt_group]
    pair_indptr = np.r_[0, np.cumsum(per_pair)].astype(np.int64)
    idx = np.repeat(p_indptr[prompt_group], per_pair) + (
        np.arange(per_pair.sum()) - np.repeat(pair_indptr[:-1], per_pair)
    )
    layouts["prompt"] = write_firing_sets(out, "prompt", pair_indptr, p_feats[idx], d_sae)
    pvals = rng.gamma(2.0, 1.0, len(idx))
    atomic_save_npy(out / "prompt_mean.npy", (pvals / 3).astype(np.float16))
    if pooled_values:
        atomic_save_npy(out / "prompt_max.npy", pvals.astype(np.float16))
        atomic_save_npy(out / "prompt_count.npy", np.ones(len(idx), np.uint16))
    atomic_save_npy(out / "prompt_ntok.npy", rng.integers(10, 200, n_pairs).astype(np.int32))
    atomic_save_npy(out / "prompt_group.npy", prompt_group.astype(np.int64))
    words = WORDS[rng.integers(0, vocab, int(ntok.sum()))]
    with open(out / "pairs.jsonl.tmp", "w", encoding="utf-8") as fh:
        for i in range(n_pairs):
            texts = [" ".join(words[tok_indptr[r] : tok_indptr[r + 1]]) for r in (2 * i, 2 * i + 1)]
            prompt = f"topic {topic[prompt_group[i]]} question {prompt_group[i]}: " + " ".join(
                WORDS[(prompt_group[i] + np.arange(12) * (topic[prompt_group[i]] + 1)) % vocab]
            )
            fh.write(
                json.dumps(
                    {
                        "id": f"syn-{i}",
                        "prompt": [{"role": "user", "content": prompt}],
                        "chosen": texts[0],
                        "rejected": texts[1],
                    }
                )
                + "\n"
            )
    (out / "pairs.jsonl.tmp").replace(out / "pairs.jsonl")
    stage.finish(
        {
            "n_pairs": n_pairs,
            "n_prompts": n_prompts,
            "d_sae": d_sae,
            "layer": 0,
            "model": {"name": "synthetic", "fingerprint": "synthetic", "dtype": "none"},
            "sae": {"name": f"synthetic-{d_sae}", "fingerprint": key, "hook_name": "none"},
            "config": ExtractConfig(pooled_values=pooled_values).to_dict(),
            "synthetic": {
                "per_response": per_response,
                "seed": seed,
                "planted_groups": planted.tolist(),
                "group_size": GROUP,
            },
            "seconds_last_session": round(time.time() - t0, 2),
            "world_size": 1,
            "truncated_prompts": 0,
            "truncated_responses": 0,
            "firing_sets": layouts,
        },
        n_pairs=n_pairs,
    )
    return FeatureStore(out)
