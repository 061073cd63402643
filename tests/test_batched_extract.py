"""Batched extraction (several pairs per forward, length-sorted, padded) against the one-pair path."""

import random

import numpy as np
import pytest
import torch

from anatomy_nb.config import ExtractConfig
from anatomy_nb.lm.ops import ResidualCapture
from anatomy_nb.stages.extract import extract, length_batches
from anatomy_nb.stages.extract_batching import gpu_batch_limits

CFG = dict(shard_size=7, top_contexts=5, progress=False)


def test_batched_residuals_equal_each_prompt_alone(tiny_lm):
    """Padding, masks and positions: every row equals its prompt + response run alone (fp32, 1e-4),
    including an empty response and prompts of very different lengths."""
    rng = random.Random(0)
    V = tiny_lm.model.config.vocab_size
    prompts = [[1] + [rng.randrange(2, V) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    responses = [[[rng.randrange(2, V) for _ in range(rng.randint(1, 30))] for _ in range(2)] for _ in range(6)]
    responses[3][1] = []
    with ResidualCapture(tiny_lm, 2) as capture:
        batched = capture.shared_prefix_batch(prompts, responses)
        for (prompt_x, side_x), prompt, sides in zip(batched, prompts, responses):
            ref_prompt, ref_sides = capture.separately(prompt, sides)
            torch.testing.assert_close(prompt_x, ref_prompt, atol=1e-4, rtol=0)
            for got, ref in zip(side_x, ref_sides):
                assert got.shape == ref.shape
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="one list of responses per prompt"):
        capture.shared_prefix_batch(prompts[:2], [responses[0][:1], responses[1]])


def test_batched_store_equals_one_pair_store(tiny_lm, tiny_sae_, hh_pairs, tmp_path):
    one = extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path / "one", ExtractConfig(batch_size=1, **CFG))
    # 5 pairs or 3,000 padded tokens per forward: several batches per shard, of different sizes
    many = extract(
        hh_pairs, tiny_lm, tiny_sae_, tmp_path / "many", ExtractConfig(batch_size=5, batch_tokens=3000, **CFG)
    )
    assert one.path.name == many.path.name  # batching does not change the store's key
    for prefix in ["resp", "prompt"] + [f"resp_{e}" for e in one.edges]:
        np.testing.assert_array_equal(
            one.pooled("fires", prefix=prefix).toarray(), many.pooled("fires", prefix=prefix).toarray()
        )
    np.testing.assert_allclose(
        one.pooled("mean", prefix="prompt").toarray(),
        many.pooled("mean", prefix="prompt").toarray(),
        rtol=1e-3,
        atol=1e-4,
    )
    for name in ("tokens", "tok_indptr", "resp_ntok", "top_row", "top_pos", "top_indptr", "hist"):
        np.testing.assert_array_equal(one.array(name), many.array(name), err_msg=name)
    np.testing.assert_allclose(one.array("top_val"), many.array("top_val"), atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        one.array("top_window").astype(np.float32), many.array("top_window").astype(np.float32), atol=2e-3, rtol=2e-3
    )


def test_length_batches_respect_both_limits():
    sizes = [50, 10, 400, 12, 11, 60, 1000, 52]
    batches = length_batches(sizes, max_pairs=3, max_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(sizes[i] for i in b) <= 200
    assert [1, 4, 3] in batches  # similar lengths share a batch
    assert [6] in batches  # one pair over the token limit still runs, alone


def test_gpu_batch_limits_grow_with_free_memory_and_shrink_with_width():
    _, small = gpu_batch_limits(8 << 30, d_sae=16384, d_model=2304, d_ff=9216)
    _, large = gpu_batch_limits(80 << 30, d_sae=16384, d_model=2304, d_ff=9216)
    _, wide = gpu_batch_limits(80 << 30, d_sae=131072, d_model=2304, d_ff=9216)
    assert small < large and wide < large
    # the SAE activations of a batch fit in the 40 % of free memory it was sized for
    assert wide * 131072 * 4 * 3 <= 0.4 * (80 << 30)


@pytest.mark.long  # `make test-e2e` (CI): the whole GPU check on the tiny model, ~60 s
def test_gpu_check_dry_run(tmp_path):
    """The GPU check runs end to end on CPU (tiny shapes), so it has not rotted when a GPU is lent."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "gpu_check.py"), "--dry-run", "--pairs", "8", "--out", str(out)],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    assert report["dry_run"] and len(report["runs"]) == 2
    for run in report["runs"]:
        assert [e["batch"] for e in run["extract"]] == ["1", "8", "32", "auto"]
        assert all(e["tokens_per_s"] > 0 for e in run["extract"])
        assert run["concepts"] > 0
    assert report["runs"][0]["dpo_seconds_per_step"] > 0
