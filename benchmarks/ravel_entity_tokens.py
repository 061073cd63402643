"""Does swapping *every* token of the entity raise RAVEL's whole-residual ceiling on the default model?

The interchange of ``stages.subspace`` edits the entity's last token. Most RAVEL city names are
several tokens for SmolLM2's tokenizer, so the base city's first tokens stay in the prompt for later
layers to read. This script tests that explanation on the test pairs of the default
``SubspaceConfig``: on the pairs whose base and source names have the same number of tokens, it swaps
the source's whole residual in at every entity token (position by position) and compares Cause and
Isolate with the last-token swap on the same pairs, layer by layer. No training.

Usage::

    python benchmarks/ravel_entity_tokens.py --layers 4,10,15,21 --out
    benchmarks/results/ravel-entity-tokens-2026-11-30.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import anatomy_nb as anb
from anatomy_nb.data.ravel import load_ravel
from anatomy_nb.lm.models import load_model
from anatomy_nb.lm.ops import ResidualCapture, ResidualEdit, ResidualHooks
from anatomy_nb.stages.subspace import ravel_scores, ravel_splits
from anatomy_nb.stages.subspace.das import Example, interchange_predictions, last_logits, pad_id, padded


def entity_span(tokenizer: Any, template: str, ids: list[int], last: int) -> tuple[int, int]:
    """First and last token of the entity in ``ids`` (the text before it, tokenised without its
    trailing space, is a prefix of the prompt's tokens)."""
    before = template.split("%s")[0].rstrip(" ")
    head = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
    if ids[: len(head)] != head:
        raise ValueError(f"template {template!r}: the text before the entity does not tokenise as a prefix")
    return len(head), last


@torch.no_grad()
def span_swap_predictions(
    lm: Any,
    layer: int,
    examples: list[Example],
    spans: list[tuple[tuple[int, int], tuple[int, int]]],
    batch_size: int = 32,
) -> np.ndarray:
    """Greedy answers with the source's residual put in at every entity token of the base (the two
    spans have equal length): one interchange edit per offset into the entity, each at one token
    per sequence (a shorter entity repeats its last token, which the identity swap leaves as is)."""
    out, eye = [], torch.eye(lm.d_model)
    for i in range(0, len(examples), batch_size):
        batch, where = examples[i : i + batch_size], spans[i : i + batch_size]
        source_ids, source_mask = padded([e.source_ids for e in batch], pad_id(lm))
        with ResidualCapture(lm, layer) as capture:
            source_h = capture(source_ids, attention_mask=source_mask).float()
        rows, edits = torch.arange(len(batch)), []
        for k in range(max(b1 - b0 + 1 for (b0, b1), _ in where)):
            at_base = torch.tensor([min(b0 + k, b1) for (b0, b1), _ in where])
            at_source = torch.tensor([min(s0 + k, s1) for _, (s0, s1) in where])
            edits.append(
                ResidualEdit(
                    layer=layer,
                    kind="interchange",
                    basis=eye,
                    source=source_h[rows, at_source].to(lm.device),
                    positions=at_base.to(lm.device),
                )
            )
        ids, mask = padded([e.base_ids for e in batch], pad_id(lm))
        with ResidualHooks(lm.model, edits):
            out.append(last_logits(lm, ids, mask).argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,10,15,21")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    cfg = anb.SubspaceConfig()
    lm = load_model(cfg.model)
    splits = ravel_splits(lm, cfg, load_ravel(cfg.entity_type), print)
    eye, result = (
        torch.eye(lm.d_model),
        {
            "model": lm.name,
            "what": (
                "whole residual swapped at the entity's last token vs at every entity token, on test pairs whose "
                "two names have the same token count"
            ),
            "attributes": {},
        },
    )
    for a, (_, test) in splits.pairs.items():
        spans = [
            (
                entity_span(lm.tokenizer, e.meta["base_template"], e.base_ids, e.base_position),
                entity_span(lm.tokenizer, e.meta["source_template"], e.source_ids, e.source_position),
            )
            for e in test
        ]
        same = [i for i, (b, s) in enumerate(spans) if b[1] - b[0] == s[1] - s[0]]
        examples = [test[i] for i in same]
        lengths = np.bincount([b[1] - b[0] + 1 for b, _ in spans]).tolist()
        rows = {"n_test": len(test), "n_same_length": len(same), "base_entity_tokens_histogram": lengths, "layers": {}}
        for layer in (int(x) for x in args.layers.split(",")):
            last = ravel_scores(interchange_predictions(lm, layer, eye, examples), examples)
            every = ravel_scores(span_swap_predictions(lm, layer, examples, [spans[i] for i in same]), examples)
            rows["layers"][layer] = {
                "last_token": {k: round(v, 3) for k, v in last.items()},
                "every_entity_token": {k: round(v, 3) for k, v in every.items()},
            }
            print(
                f"{a} layer {layer}: last token cause {last['cause']:.2f} isolate {last['isolate']:.2f}; every "
                f"entity token cause {every['cause']:.2f} isolate {every['isolate']:.2f} (n {len(examples)}; "
                f"{time.time() - t0:.0f} s)",
                flush=True,
            )
        result["attributes"][a] = rows
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
