"""The feature store against brute force, and its durability (keys, resume, ranks, determinism)."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import anatomy_nb.stages.extract as ex
from anatomy_nb.config import ExtractConfig
from anatomy_nb.data.chat import render_example
from anatomy_nb.lm.ops import decoder_layers
from anatomy_nb.results.extract import STATS, FeatureStore
from anatomy_nb.stages.extract import extract

CFG = ExtractConfig(shard_size=6, top_contexts=5, pooled_values=True, progress=False)  # checks max / mean / count
LEAN = ExtractConfig.from_dict({**CFG.to_dict(), "pooled_values": False})  # the default


@pytest.fixture(scope="module")
def store(tiny_lm, tiny_sae_, hh_pairs, tmp_path_factory):
    return extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path_factory.mktemp("run"), CFG)


@pytest.fixture(scope="module")
def lean(tiny_lm, tiny_sae_, hh_pairs, tmp_path_factory):
    return extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path_factory.mktemp("lean"), LEAN)


def arrays(store):
    return {p.stem: np.load(p) for p in sorted(store.path.glob("*.npy"))}


@torch.no_grad()
def brute_force(lm, sae, pair):
    """Full forward over prompt+response, per side; SAE activations at each response token."""
    out = {}
    captured = {}
    h = decoder_layers(lm.model)[sae.layer].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    try:
        for side in ("chosen", "rejected"):
            r = render_example(lm.tokenizer, pair.prompt, getattr(pair, side))
            lm.model(input_ids=torch.tensor([r.prompt_ids + r.response_ids]))
            x = captured["x"][0]
            out[side] = sae.encode(x[len(r.prompt_ids) :]).float()
            keep = [i for i, m in enumerate(r.prompt_content) if m and i > 0]
            out["prompt"] = sae.encode(x[keep]).float()
    finally:
        h.remove()
    return out


def test_pooled_stats_match_brute_force(store, tiny_lm, tiny_sae_, hh_pairs):
    mx, mean, count = store.pooled("max").toarray(), store.pooled("mean").toarray(), store.pooled("count").toarray()
    pmax = store.pooled("max", prefix="prompt").toarray()
    assert store.edges == ["opening", "ending"]
    opening, ending = (
        store.pooled("fires", prefix="resp_opening").toarray(),
        store.pooled("fires", prefix="resp_ending").toarray(),
    )
    W = CFG.edge_tokens
    for i, pair in enumerate(hh_pairs[:6]):
        bf = brute_force(tiny_lm, tiny_sae_, pair)
        for side, row in (("chosen", 2 * i), ("rejected", 2 * i + 1)):
            acts = bf[side].numpy()
            assert store.token_counts()[i, row % 2] == acts.shape[0]
            np.testing.assert_allclose(mx[row], acts.max(0), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(mean[row], acts.mean(0), rtol=2e-3, atol=2e-3)
            np.testing.assert_array_equal(count[row], (acts > 0).sum(0))
            assert acts.shape[0] > 2 * W  # the edges are proper subsets here
            np.testing.assert_array_equal(opening[row], (acts[:W] > 0).any(0))
            np.testing.assert_array_equal(ending[row], (acts[-W:] > 0).any(0))
        np.testing.assert_allclose(pmax[i], bf["prompt"].numpy().max(0), rtol=2e-3, atol=2e-3)
    # sides are where they say they are
    np.testing.assert_array_equal(store.pooled("max", "chosen").toarray(), mx[0::2])
    np.testing.assert_array_equal(store.pooled("max", "rejected").toarray(), mx[1::2])


def test_shared_prefix_equals_naive(store, tiny_lm, tiny_sae_, hh_pairs, tmp_path):
    naive = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, ExtractConfig(**{**CFG.__dict__, "shared_prefix": False}))
    assert naive.path.name != store.path.name  # a different parameter, a different store
    np.testing.assert_allclose(naive.pooled("max").toarray(), store.pooled("max").toarray(), atol=1e-3)
    np.testing.assert_array_equal(naive.pooled("count").toarray(), store.pooled("count").toarray())


def test_top_contexts_and_histograms_match_pooled(store):
    mx = store.pooled("max").toarray()
    count = store.pooled("count").toarray()
    hist = store.array("hist")
    for f in range(store.d_sae):
        ctx = store.top_contexts(f, n=CFG.top_contexts)
        expected = np.sort(mx[:, f][mx[:, f] > 0])[::-1][: CFG.top_contexts]
        np.testing.assert_allclose([c["value"] for c in ctx], expected, rtol=2e-3)  # pooled values are float16
        for c in ctx:
            row = 2 * c["pair"] + (c["side"] == "rejected")
            assert mx[row, f] == pytest.approx(c["value"], rel=1e-3)
            assert c["tokens"][c["peak"]] == store.token_text()[int(store.response_tokens(row)[c["position"]])]
        # token-level histogram counts every firing token, per side
        assert hist[f, 0].sum() == count[0::2, f].sum() and hist[f, 1].sum() == count[1::2, f].sum()


def test_unchanged_call_reuses_store(store, tiny_lm, tiny_sae_, hh_pairs, monkeypatch):
    monkeypatch.setattr(ex, "compute_shard", lambda *a, **k: pytest.fail("recomputed an unchanged store"))
    again = extract(hh_pairs, tiny_lm, tiny_sae_, store.path.parent.parent, CFG)
    assert again.path == store.path


def test_changed_inputs_change_key(store, tiny_lm, tiny_sae_, hh_pairs):
    from anatomy_nb.lm.sae import tiny_sae

    key = ex.store_key(hh_pairs, tiny_lm, tiny_sae_, CFG)
    assert key == store.manifest["key"]
    assert (
        ex.store_key(
            hh_pairs, tiny_lm, tiny_sae_, ExtractConfig.from_dict({**CFG.to_dict(), "max_response_tokens": 64})
        )
        != key
    )
    assert ex.store_key(hh_pairs[:5], tiny_lm, tiny_sae_, CFG) != key
    assert ex.store_key(hh_pairs, tiny_lm, tiny_sae(tiny_lm.d_model, layer=2, d_sae=96, k=6, seed=1), CFG) != key
    assert (
        ex.store_key(hh_pairs, tiny_lm, tiny_sae_, ExtractConfig.from_dict({**CFG.to_dict(), "progress": True})) == key
    )


def test_killed_run_resumes_to_identical_store(store, tiny_lm, tiny_sae_, hh_pairs, tmp_path, monkeypatch):
    real = ex.compute_shard
    calls = {"n": 0}

    def dies_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ex, "compute_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    out = tmp_path / "extract" / store.manifest["key"]
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000", "shard-00001"]
    with pytest.raises(FileNotFoundError):
        FeatureStore(out)
    # the rerun computes only the missing shards
    calls["n"] = -100
    seen = []
    monkeypatch.setattr(
        ex, "compute_shard", lambda capture, sae, chunk, *a: seen.append(chunk[0].id) or real(capture, sae, chunk, *a)
    )
    resumed = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    assert seen == [hh_pairs[12].id, hh_pairs[18].id]
    a, b = arrays(resumed), arrays(store)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_full_disk_names_the_shard_keeps_what_was_written_and_resumes(
    store, tiny_lm, tiny_sae_, hh_pairs, tmp_path, monkeypatch
):
    """ENOSPC while writing the third shard: the error names that shard and the space left, the two
    finished shards stay, no half-written shard is left to be trusted, and the rerun completes."""
    import errno

    real_save = np.save
    calls = {"n": 0}

    def full_on_third_shard(path, *a, **k):
        if "shard-00002" in str(path):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *a, **k)

    monkeypatch.setattr(ex.np, "save", full_on_third_shard)
    with pytest.raises(
        OSError, match=r"shard-00002: the disk is full \(\d+ MiB free in .*nothing written before was changed"
    ):
        extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    out = tmp_path / "extract" / store.manifest["key"]
    assert calls["n"] == 1 and sorted(p.name for p in (out / "shards").iterdir() if not p.name.startswith(".")) == [
        "shard-00000",
        "shard-00001",
    ]
    monkeypatch.setattr(ex.np, "save", real_save)
    resumed = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    a, b = arrays(resumed), arrays(store)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_ranks_write_their_shards_and_rank0_merges(store, tiny_lm, tiny_sae_, hh_pairs, tmp_path, monkeypatch):
    def as_rank(i):
        return lambda: SimpleNamespace(
            process_index=i, num_processes=2, is_main_process=i == 0, wait_for_everyone=lambda: None
        )

    seen = {0: [], 1: []}
    real = ex.compute_shard
    for rank in (1, 0):  # rank 1 finishes first; rank 0 then computes its own shards and merges
        monkeypatch.setattr(ex, "process_state", as_rank(rank))
        monkeypatch.setattr(
            ex,
            "compute_shard",
            lambda capture, sae, chunk, *a, r=rank: seen[r].append(chunk[0].id) or real(capture, sae, chunk, *a),
        )
        if rank == 1:
            with pytest.raises(FileNotFoundError):  # rank 1 alone has no finished store to return
                extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
        else:
            merged = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    assert seen[1] == [hh_pairs[6].id, hh_pairs[18].id] and seen[0] == [hh_pairs[0].id, hh_pairs[12].id]
    a, b = arrays(merged), arrays(store)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert merged.manifest["world_size"] == 2


def test_deterministic_across_runs(store, tiny_lm, tiny_sae_, hh_pairs, tmp_path):
    again = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    for k, v in arrays(store).items():
        assert v.tobytes() == np.load(again.path / f"{k}.npy").tobytes(), k


def test_store_layout_and_run_index(store):
    m = store.manifest
    assert m["complete"] and m["n_pairs"] == 20 and m["d_sae"] == 96 and m["layer"] == 2
    index = json.loads((store.path.parent.parent / "index.json").read_text())
    assert index["extract"]["key"] == m["key"]
    assert FeatureStore.from_run(store.path.parent.parent).path == store.path
    assert len(store.pairs()) == 20 and store.pairs()[0].id == "test-0"
    assert store.pooled("max", "chosen").shape == (20, 96)
    # the tiny SAE fires densely
    assert m["firing_sets"] == dict.fromkeys(["prompt", "resp", "resp_ending", "resp_opening"], "bits")
    assert not (store.path / "shards").exists()
    assert store.bytes_per_pair() > 0
    # groups: every pair gets the index of its distinct prompt
    assert len(store.prompt_groups()) == 20


def test_a_lean_store_reads_as_the_full_one_for_every_stage(store, lean, tiny_lm, tiny_sae_):
    """Without pooled_values the store drops only the values no stage reads: the firing sets, the
    prompts' means and the edges are the same, and so is stage 2's output."""
    from anatomy_nb.stages.hypothesize import hypothesize

    assert lean.path.name != store.path.name and lean.manifest["config"]["pooled_values"] is False
    for name in ("resp_max", "resp_mean", "resp_count", "prompt_max", "prompt_count"):
        assert (store.path / f"{name}.npy").exists() and not (lean.path / f"{name}.npy").exists(), name
    assert lean.has_prompts and lean.edges == store.edges == ["opening", "ending"]
    for stat, side, prefix in [
        ("fires", None, "resp"),
        ("fires", "chosen", "resp"),
        ("fires", "rejected", "resp"),
        ("mean", None, "prompt"),
        ("fires", None, "prompt"),
        ("fires", "chosen", "resp_opening"),
        ("fires", "rejected", "resp_opening"),
        ("fires", None, "resp_ending"),
    ]:
        a, b = store.pooled(stat, side, prefix=prefix), lean.pooled(stat, side, prefix=prefix)
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.data, b.data)
    for k in ("tokens", "top_row", "top_val", "hist", "resp_ntok", "prompt_ntok"):
        np.testing.assert_array_equal(store.array(k), lean.array(k), err_msg=k)
    assert lean.bytes_per_pair() < store.bytes_per_pair()
    cfg = {"promoted_tokens": 0, "concepts": {"min_support": 3}}
    full_h, lean_h = hypothesize(store.path.parent.parent, cfg), hypothesize(lean.path.parent.parent, cfg)
    assert len(full_h.table)
    pd.testing.assert_frame_equal(full_h.table, lean_h.table)
    pd.testing.assert_frame_equal(full_h.features, lean_h.features)


def test_a_lean_store_names_the_statistic_it_lacks_and_the_setting(lean):
    for stat, prefix in (("max", "resp"), ("count", "resp"), ("mean", "resp"), ("max", "prompt")):
        with pytest.raises(
            ValueError,
            match=rf"{re.escape(str(lean.path))}: this store has no {prefix}_{stat} .*ExtractConfig.pooled_values=True",
        ):
            lean.pooled(stat, "chosen", prefix=prefix)
    with pytest.raises(ValueError, match="firing sets only"):
        lean.pooled("max", prefix="resp_opening")
    with pytest.raises(ValueError, match="stat must be one of"):
        lean.pooled("maximum")


@pytest.mark.parametrize("layout", ["bits", "ids"])
def test_both_firing_set_layouts_give_the_same_store(
    store, tiny_lm, tiny_sae_, hh_pairs, tmp_path, monkeypatch, layout
):
    """Forced to one layout for every family, the store decodes to the same CSR and the same values
    (the tiny SAE is dense enough that "auto" picks bits; real SAEs' edges pick ids)."""
    monkeypatch.setattr(ex, "FIRING_LAYOUT", layout)
    forced = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    families = ["resp", "prompt", "resp_opening", "resp_ending"]
    assert forced.manifest["firing_sets"] == dict.fromkeys(families, layout)
    other = {"bits": ("indptr", "feat"), "ids": ("bits",)}[layout]
    assert all(
        forced.firing_layout(f) == layout and not any((forced.path / f"{f}_{a}.npy").exists() for a in other)
        for f in families
    )
    for f in families:
        for rows in (None, slice(0, None, 2), slice(1, None, 2), slice(3, 9), 5, -1):
            for a, b in zip(store.firing_sets(f, rows), forced.firing_sets(f, rows)):
                np.testing.assert_array_equal(a, b, err_msg=f"{f} {rows}")
    for stat in STATS:
        for side in (None, "chosen", "rejected"):
            for prefix in ("resp", "prompt"):
                assert (store.pooled(stat, side, prefix=prefix) != forced.pooled(stat, side, prefix=prefix)).nnz == 0, (
                    stat,
                    side,
                    prefix,
                )
    assert forced.n_firing("resp").tolist() == np.diff(store.firing_sets("resp")[0]).tolist()


def _csr(rng, n_rows, d, mean):
    sets = [np.sort(rng.choice(d, size=min(d, rng.poisson(mean)), replace=False)) for _ in range(n_rows)]
    sets[1] = sets[1][:0]  # an empty row
    return np.r_[0, np.cumsum([len(s) for s in sets])], np.concatenate(sets).astype(np.int64)


@pytest.mark.parametrize("mean,expected", [(13.0, "bits"), (8.0, "ids")])
def test_the_writer_picks_bits_above_one_in_sixteen_features_and_the_reader_decodes_both(
    tmp_path, monkeypatch, mean, expected
):
    """d_sae = 163 (not a multiple of 8): a bitset row is 21 bytes, against 2 bytes per uint16 id,
    so bits pay off above ~10.5 firing features per row. Decoding matches the CSR written, both
    ways, in blocks of rows smaller than the store (forced here)."""
    import anatomy_nb.results.extract as st
    from anatomy_nb.core.files import atomic_write_json

    d, n = 163, 40
    indptr, feat = _csr(np.random.default_rng(0), n, d, mean)
    assert ex.firing_layout(n, indptr[-1], d) == ("bits" if indptr[-1] / n > 10.5 else "ids") == expected
    for layout in ("bits", "ids"):
        out = tmp_path / layout
        out.mkdir()
        assert ex.write_firing_sets(out, "resp", indptr, feat, d, layout=layout) == layout
        atomic_write_json(out / "manifest.json", {"complete": True, "n_pairs": n // 2, "d_sae": d})
        fs = FeatureStore(out)
        for block_bytes, block_rows in ((1 << 26, 8192), (3 * d, 3)):  # one block; a few rows per block
            monkeypatch.setattr(st, "_BLOCK_BYTES", block_bytes)
            monkeypatch.setattr(st, "_ROWS", block_rows)
            fs._cache.clear()
            got_ptr, got_ids = fs.firing_sets("resp")
            np.testing.assert_array_equal(got_ptr, indptr)
            np.testing.assert_array_equal(got_ids, feat)
            ptr, ids = fs.firing_sets("resp", slice(1, None, 2))
            np.testing.assert_array_equal(ptr, np.r_[0, np.cumsum(np.diff(indptr)[1::2])])
            np.testing.assert_array_equal(
                ids, np.concatenate([feat[indptr[i] : indptr[i + 1]] for i in range(1, n, 2)])
            )
            np.testing.assert_array_equal(fs.firing_sets("resp", 7)[1], feat[indptr[7] : indptr[8]])
            np.testing.assert_array_equal(fs.n_firing("resp"), np.diff(indptr))
        assert fs.pooled("fires", "rejected").shape == (n // 2, d)
    with pytest.raises(ValueError, match="not ascending"):
        ex.write_firing_sets(tmp_path / "bits", "resp", np.array([0, 2]), np.array([5, 3]), d, layout="bits")


def test_long_inputs_are_truncated_and_counted(tiny_lm, tiny_sae_, hh_pairs, tmp_path):
    cfg = ExtractConfig(shard_size=10, max_prompt_tokens=40, max_response_tokens=16, progress=False)
    st = extract(hh_pairs[:10], tiny_lm, tiny_sae_, tmp_path, cfg)
    assert st.token_counts().max() == 16
    assert st.manifest["truncated_prompts"] > 0 and st.manifest["truncated_responses"] > 0


def test_model_sae_mismatch_is_a_clear_error(tiny_lm, hh_pairs, tmp_path):
    from anatomy_nb.lm.sae import tiny_sae

    with pytest.raises(ValueError, match="d_in=32 but model tiny-llama has d_model=64"):
        extract(hh_pairs, tiny_lm, tiny_sae(32, layer=1), tmp_path, CFG)
    with pytest.raises(
        ValueError,
        match=r"reads the output of block 7 \(hook 'blocks.7.hook_resid_post'\) but model tiny-llama has blocks 0..3",
    ):
        extract(hh_pairs, tiny_lm, tiny_sae(64, layer=7), tmp_path, CFG)


@pytest.mark.long  # `make test-e2e` (CI): two extraction processes, ~20 s
def test_torchrun_two_processes_match_one(tiny_lm, tiny_sae_, tmp_path):
    """A real distributed run (torchrun, gloo on CPU, as `accelerate launch --multi_gpu` uses):
    each rank writes its shards, rank 0 merges; bitwise equal to one process at equal threads."""
    import os
    import shutil
    import subprocess
    import sys

    from anatomy_nb.lm.sae import save_sae

    sae_dir = save_sae(tiny_sae_, tmp_path / "sae")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "-m",
        "anatomy_nb.cli",
        "extract",
        "--model",
        "tiny-llama",
        "--sae",
        str(sae_dir),
        "--n-pairs",
        "14",
        "--shard-size",
        "3",
    ]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    subprocess.run(
        [torchrun, "--nproc_per_node", "2", *args, "--run-dir", str(tmp_path / "two")],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        [sys.executable, *args, "--run-dir", str(tmp_path / "one")],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    two, one = FeatureStore.from_run(tmp_path / "two"), FeatureStore.from_run(tmp_path / "one")
    assert two.manifest["world_size"] == 2 and one.manifest["world_size"] == 1
    assert two.path.name == one.path.name
    for k, v in arrays(one).items():
        assert v.tobytes() == np.load(two.path / f"{k}.npy").tobytes(), k


def test_top_contexts_carry_every_tokens_activation(store, tiny_lm, tiny_sae_, hh_pairs):
    """The drilldown shades each token of a top context by strength: the stored window is the
    feature's activation on each token around the peak, as a full forward gives it."""
    checked = 0
    for feature in range(tiny_sae_.d_sae):
        for hit in store.top_contexts(feature, n=2, window=12):
            if hit["pair"] >= 6:
                continue
            acts = brute_force(tiny_lm, tiny_sae_, hh_pairs[hit["pair"]])[hit["side"]][:, feature].numpy()
            a = hit["position"] - hit["peak"]
            want = acts[a : a + len(hit["tokens"])]
            np.testing.assert_allclose(hit["activations"], want, rtol=2e-3, atol=2e-3)
            assert hit["activations"][hit["peak"]] == pytest.approx(hit["value"], rel=2e-3, abs=2e-3)
            checked += 1
        if checked >= 20:
            break
    assert checked >= 20
