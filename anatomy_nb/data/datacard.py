"""A data card for a preference data set: what was loaded, what was skipped and why, and how
chosen and rejected responses differ in simple terms before any SAE is involved."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .chat import render_prompt
from .schema import PairSet

__all__ = ["DataCard", "data_card"]


@dataclass
class DataCard:
    source: str
    n_records: int
    n_pairs: int
    n_distinct_prompts: int
    skipped: dict
    skipped_examples: list[str]
    lengths: pd.DataFrame  # per pair: prompt / chosen / rejected token counts
    multi_turn_fraction: float
    examples: pd.DataFrame = field(repr=False)

    def summary(self) -> pd.DataFrame:
        L = self.lengths
        rows = [
            ("source", self.source),
            ("records read", self.n_records),
            ("pairs kept", self.n_pairs),
            ("distinct prompts", self.n_distinct_prompts),
            ("records skipped", sum(self.skipped.values())),
            ("multi-turn prompts", f"{self.multi_turn_fraction:.1%}"),
            (
                "median tokens: prompt / chosen / rejected",
                f"{L.prompt.median():.0f} / {L.chosen.median():.0f} / {L.rejected.median():.0f}",
            ),
            ("chosen longer than rejected", f"{(L.chosen > L.rejected).mean():.1%}"),
        ]
        rows += [(f"skipped: {reason}", n) for reason, n in sorted(self.skipped.items())]
        return pd.DataFrame(rows, columns=["", "value"]).set_index("")


def data_card(pairs: PairSet, tokenizer, n_examples: int = 5, seed: int = 0) -> DataCard:
    """Counts, skips, token lengths (with the model's tokenizer) and a few random examples."""
    prompt_len, chosen_len, rejected_len = [], [], []
    for p in pairs:
        prompt_len.append(len(render_prompt(tokenizer, p.prompt)[0]))
        chosen_len.append(len(tokenizer(p.chosen, add_special_tokens=False)["input_ids"]))
        rejected_len.append(len(tokenizer(p.rejected, add_special_tokens=False)["input_ids"]))
    lengths = pd.DataFrame(
        {"id": [p.id for p in pairs], "prompt": prompt_len, "chosen": chosen_len, "rejected": rejected_len}
    )
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pairs), size=min(n_examples, len(pairs)), replace=False)
    examples = pd.DataFrame(
        [
            {
                "id": pairs[i].id,
                "prompt": pairs[i].prompt_text,
                "chosen": pairs[i].chosen,
                "rejected": pairs[i].rejected,
            }
            for i in sorted(idx)
        ]
    )
    distinct = len({p.prompt_key for p in pairs})
    multi = float(np.mean([sum(m["role"] == "user" for m in p.prompt) > 1 for p in pairs])) if len(pairs) else 0.0
    rep = pairs.report
    return DataCard(
        source=rep.source,
        n_records=rep.n_records,
        n_pairs=len(pairs),
        n_distinct_prompts=distinct,
        skipped=dict(rep.skipped),
        skipped_examples=list(rep.examples),
        lengths=lengths,
        multi_turn_fraction=multi,
        examples=examples,
    )
