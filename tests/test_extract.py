"""The feature store against brute force, and its durability (keys, resume, ranks, determinism)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import anatomy_nb.stages.extract as ex
from anatomy_nb.config import ExtractConfig
from anatomy_nb.results.store import FeatureStore
from anatomy_nb.stages.extract import extract
from anatomy_nb.lm.chat import render_example
from anatomy_nb.lm.ops import decoder_layers

CFG = ExtractConfig(shard_size=6, top_contexts=5, progress=False)


@pytest.fixture(scope="module")
def store(tiny_lm, tiny_sae_, hh_pairs, tmp_path_factory):
    return extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path_factory.mktemp("run"), CFG)


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
            out[side] = sae.encode(x[len(r.prompt_ids):]).float()
            keep = [i for i, m in enumerate(r.prompt_content) if m and i > 0]
            out["prompt"] = sae.encode(x[keep]).float()
    finally:
        h.remove()
    return out


def test_pooled_stats_match_brute_force(store, tiny_lm, tiny_sae_, hh_pairs):
    mx, mean, count = store.pooled("max").toarray(), store.pooled("mean").toarray(), store.pooled("count").toarray()
    pmax = store.pooled("max", prefix="prompt").toarray()
    assert store.edges == ["opening", "ending"]
    opening, ending = store.pooled("fires", prefix="resp_opening").toarray(), store.pooled("fires", prefix="resp_ending").toarray()
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
    assert ex.store_key(hh_pairs, tiny_lm, tiny_sae_, ExtractConfig.from_dict({**CFG.to_dict(), "max_response_tokens": 64})) != key
    assert ex.store_key(hh_pairs[:5], tiny_lm, tiny_sae_, CFG) != key
    assert ex.store_key(hh_pairs, tiny_lm, tiny_sae(tiny_lm.d_model, layer=2, d_sae=96, k=6, seed=1), CFG) != key
    assert ex.store_key(hh_pairs, tiny_lm, tiny_sae_, ExtractConfig.from_dict({**CFG.to_dict(), "progress": True})) == key


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
    monkeypatch.setattr(ex, "compute_shard", lambda capture, sae, chunk, *a: seen.append(chunk[0].id) or real(capture, sae, chunk, *a))
    resumed = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    assert seen == [hh_pairs[12].id, hh_pairs[18].id]
    a, b = arrays(resumed), arrays(store)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_full_disk_names_the_shard_keeps_what_was_written_and_resumes(store, tiny_lm, tiny_sae_, hh_pairs, tmp_path, monkeypatch):
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
    with pytest.raises(OSError, match=r"shard-00002: the disk is full \(\d+ MiB free in .*nothing written before was changed"):
        extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    out = tmp_path / "extract" / store.manifest["key"]
    assert calls["n"] == 1 and sorted(p.name for p in (out / "shards").iterdir() if not p.name.startswith(".")) == ["shard-00000", "shard-00001"]
    monkeypatch.setattr(ex.np, "save", real_save)
    resumed = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, CFG)
    a, b = arrays(resumed), arrays(store)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_ranks_write_their_shards_and_rank0_merges(store, tiny_lm, tiny_sae_, hh_pairs, tmp_path, monkeypatch):
    def as_rank(i):
        return lambda: SimpleNamespace(process_index=i, num_processes=2, is_main_process=i == 0, wait_for_everyone=lambda: None)

    seen = {0: [], 1: []}
    real = ex.compute_shard
    for rank in (1, 0):  # rank 1 finishes first; rank 0 then computes its own shards and merges
        monkeypatch.setattr(ex, "process_state", as_rank(rank))
        monkeypatch.setattr(ex, "compute_shard", lambda capture, sae, chunk, *a, r=rank: seen[r].append(chunk[0].id) or real(capture, sae, chunk, *a))
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
    assert not (store.path / "shards").exists()
    assert store.bytes_per_pair() > 0
    # groups: every pair gets the index of its distinct prompt
    assert len(store.prompt_groups()) == 20


def test_long_inputs_are_truncated_and_counted(tiny_lm, tiny_sae_, hh_pairs, tmp_path):
    cfg = ExtractConfig(shard_size=10, max_prompt_tokens=40, max_response_tokens=16, progress=False)
    st = extract(hh_pairs[:10], tiny_lm, tiny_sae_, tmp_path, cfg)
    assert st.token_counts().max() == 16
    assert st.manifest["truncated_prompts"] > 0 and st.manifest["truncated_responses"] > 0


def test_model_sae_mismatch_is_a_clear_error(tiny_lm, hh_pairs, tmp_path):
    from anatomy_nb.lm.sae import tiny_sae

    with pytest.raises(ValueError, match="d_in=32 but model tiny-llama has d_model=64"):
        extract(hh_pairs, tiny_lm, tiny_sae(32, layer=1), tmp_path, CFG)
    with pytest.raises(ValueError, match=r"reads the output of block 7 \(hook 'blocks.7.hook_resid_post'\) but model tiny-llama has blocks 0..3"):
        extract(hh_pairs, tiny_lm, tiny_sae(64, layer=7), tmp_path, CFG)


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
    args = ["-m", "anatomy_nb.cli", "extract", "--model", "tiny-llama", "--sae", str(sae_dir), "--n-pairs", "14", "--shard-size", "3"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    subprocess.run([torchrun, "--nproc_per_node", "2", *args, "--run-dir", str(tmp_path / "two")], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([sys.executable, *args, "--run-dir", str(tmp_path / "one")], check=True, env=env, capture_output=True, timeout=300)
    two, one = FeatureStore.from_run(tmp_path / "two"), FeatureStore.from_run(tmp_path / "one")
    assert two.manifest["world_size"] == 2 and one.manifest["world_size"] == 1
    assert two.path.name == one.path.name
    for k, v in arrays(one).items():
        assert v.tobytes() == np.load(two.path / f"{k}.npy").tobytes(), k
