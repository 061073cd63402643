"""Reading stage 2's artifact (no torch): the hypotheses table, per-feature tests, topics,
baselines and the length placebo; and the ranking rule every view of them shares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.files import read_json
from ..core.run import RunLike, RunPaths
from ..core.stage import check_format
from .extract import EDGES

__all__ = ["SPLIT_HALF_OK", "Hypotheses", "number_ranks", "rank_hypotheses", "split_half_mark"]

#: a signal "replicates" when its sign agreed in at least this share of the random half/half splits
SPLIT_HALF_OK = 0.9


def split_half_mark(agreement: float | None) -> str:
    """✓ / ✗ for a split-half sign agreement (– when it could not be computed)."""
    if agreement is None or not np.isfinite(agreement):
        return "–"
    return "✓" if agreement >= SPLIT_HALF_OK else "✗"


def rank_hypotheses(table: pd.DataFrame) -> pd.DataFrame:
    """Significant first, then by |length-controlled Cohen's d|, then by p.

    Effect size, not p: with thousands of pairs tiny effects get tiny p-values. Length-controlled,
    because chosen and rejected responses differ in length in most preference data and a
    response-level "fires anywhere" grows with length, so hundreds of concepts separate the sides
    only through length (on 600 HH-RLHF pairs, ~60 % of concepts are significant before length
    control). The raw effect and its q stay in the table; length itself is a text-statistic
    baseline. Measured by ``benchmarks/planted.py`` (README): ranking by the raw d put a planted
    concept at 5 % of pairs 17th–140th, the length-controlled d puts it first in most cells; the
    quadratic control (``length_control_degree=2``) in 11/15 cells vs 8/15 for the linear one, and
    20/30 vs 14/30 on seeds drawn after that choice.

    Where the length-controlled d is undefined (a subset too small to fit the control, in the
    viewer), the raw d stands in. The viewer's re-scored signals are ranked by this same rule.
    """
    lc = table["length_controlled_cohens_d"].abs().fillna(table["cohens_d"].abs()).fillna(0.0)
    key = table.assign(_sig=~table["significant"].astype(bool), _d=-lc, _p=table["p"].fillna(1.0))
    return table.loc[key.sort_values(["_sig", "_d", "_p"], kind="stable").index]


def number_ranks(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (in rank order) with ``rank`` counted from 1 within each listing people read: the
    prompt-independent rows (whole response, opening, ending: ``Hypotheses.ranked``) and the topic
    × concept rows (``Hypotheses.ranked_by_topic``). Format 2 counted over both at once, so the
    first row a reader saw could be rank 12."""
    listing = np.where(table["view"].to_numpy() == "topic", 1, 0)
    rank = pd.Series(listing).groupby(listing).cumcount().to_numpy() + 1
    out = table.drop(columns="rank", errors="ignore")
    out.insert(0, "rank", rank)
    return out


#: the format stage 2 writes and the newest this reader reads (3: ranks count within each listing)
FORMAT = 3


class Hypotheses:
    """The hypotheses artifact: ranked tables plus the clustering and topics behind them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_json(self.path / "manifest.json")
        check_format(self.path, self.manifest, 1, FORMAT)
        self.table = pd.read_parquet(self.path / "hypotheses.parquet")
        if self.manifest.get("format", 1) < 3:  # written before ranks counted per listing
            self.table = number_ranks(self.table)
        self.features = pd.read_parquet(self.path / "features.parquet")
        self.topics = pd.read_parquet(self.path / "topics.parquet")
        self.topic_summary = pd.read_parquet(self.path / "topic_summary.parquet")
        self.baseline_text_stats = pd.read_parquet(self.path / "baseline_text_stats.parquet")
        lin = self.path / "baseline_linear.parquet"
        self.baseline_linear = pd.read_parquet(lin) if lin.exists() else None
        placebo = self.path / "length_placebo.parquet"
        self.length_placebo = pd.read_parquet(placebo) if placebo.exists() else None

    @classmethod
    def from_run(cls, run: RunLike) -> Hypotheses:
        return cls(RunPaths.of(run).latest("hypothesize"))

    def topic_of_prompt(self) -> dict[str, int]:
        """Each distinct prompt's stage-2 topic id, keyed by its text (``PreferencePair.prompt_text``)."""
        return dict(zip(self.topics["prompt"], self.topics["topic"].astype(int)))

    def feature_labels(self, d_sae: int | None = None) -> np.ndarray:
        """Per SAE feature, its concept id (−1: not clustered, too rare to test)."""
        f = self.features
        labels = np.full(int(d_sae if d_sae is not None else len(f)), -1, dtype=np.int64)
        labels[f["feature"].to_numpy()] = f["concept"].to_numpy()
        return labels

    def overall(self) -> pd.DataFrame:
        return self.table[self.table["view"] == "overall"]

    def by_topic(self) -> pd.DataFrame:
        return self.table[self.table["view"] == "topic"]

    def by_edge(self) -> pd.DataFrame:
        """The concepts tested on the responses' opening / ending tokens (views "opening", "ending")."""
        return self.table[self.table["view"].isin(EDGES)]

    def ranked(self) -> pd.DataFrame:
        """Every prompt-independent hypothesis in rank order: each concept over the whole response
        (view "overall") and over its opening / ending tokens; ``where`` names the view for people."""
        t = self.table[self.table["view"] != "topic"]
        return t.assign(where=t["view"].replace({"overall": "whole response"}))

    def ranked_by_topic(self) -> pd.DataFrame:
        """The topic × concept signals in rank order (significant first, then the effect at equal
        lengths), each named by its topic: signals that live inside one kind of prompt."""
        t = rank_hypotheses(self.by_topic())
        return t.assign(
            rank=np.arange(1, len(t) + 1),
            where=lambda d: (
                "topic "
                + d["topic"].astype(str)
                + ": "
                + d.get("topic_label", pd.Series("", index=d.index)).astype(str)
            ),
        )

    def top(self, n: int = 20, view: str | None = "overall") -> pd.DataFrame:
        t = self.table if view is None else self.table[self.table["view"] == view]
        return t.head(n)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Hypotheses({m['n_concepts']} concepts, {m['n_topics']} topics, {m['n_significant']} significant at "
            f"q<{m['config']['fdr']}, path={str(self.path)!r})"
        )
