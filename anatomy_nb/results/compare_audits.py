"""Reading ``compare_audits`` (no torch): per comparison and concept what one side rewards that the
other does not, the shared concepts, and per comparison the units or disagreeing pairs it rests on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.run import RunLike, RunPaths
from ..core.stage import Artifact

__all__ = ["CompareResult"]


#: the format this stage writes (``stages``) and the newest this reader reads
FORMAT = 1


@dataclass
class CompareResult(Artifact):
    """A finished ``compare_audits``."""

    readable_formats = (1, FORMAT)

    @classmethod
    def from_run(cls, run: RunLike) -> CompareResult:
        return cls(RunPaths.of(run).latest("compare_audits"))

    @property
    def mode(self) -> str:
        """ "data sets" or "annotators"."""
        return str(self.manifest["mode"])

    @property
    def fdr(self) -> float:
        return float(self.manifest["config"]["fdr"])

    def differences(self) -> pd.DataFrame:
        """A row per comparison × concept, ranked within each comparison (q, then |difference|):
        ``effect_a`` / ``effect_b`` (each side's mean chosen − rejected concept activity at equal
        lengths; annotators: A's and B's on the pairs they disagree on), ``difference`` (A − B), the
        test (Welch's t; annotators: sign flips), p, BH q, ``significant``, the concept's name."""
        return pd.read_parquet(self.path / "differences.parquet")

    def concepts(self) -> pd.DataFrame:
        """The shared concept space: members and name of every concept."""
        return pd.read_parquet(self.path / "concepts.parquet")

    def comparisons(self) -> pd.DataFrame:
        """Per comparison: its sides, the units (data sets) or disagreeing pairs (annotators) it rests
        on, its discoveries, and the smallest effect the test could find (80 % power, BH's first step)."""
        return pd.read_parquet(self.path / "comparisons.parquet")

    def sentences(self) -> list[str]:
        """What was found, one sentence per comparison, "no difference found" with its power."""
        out = []
        d = self.differences()
        for c in self.comparisons().to_dict(orient="records"):
            rows = d[(d["comparison"] == c["comparison"]) & d["significant"]]
            base = (
                f"{c['disagreeing_pairs']} pairs where both prefer a side and disagree (of {c['pairs_both_prefer']})"
                if self.mode == "annotators"
                else f"{c['units_a']} and {c['units_b']} prompts"
            )
            side_a, side_b = ("A", "B") if self.mode == "data sets" else (c["a"], c["b"])
            if rows.empty:
                out.append(
                    f"{c['comparison']}: no difference found at q < {self.fdr:g} on {base}; the smallest effect the "
                    f"test could have found is d ≈ {c['minimum_detectable_d']:.2f} (80 % power)."
                )
                continue
            more = rows[rows["difference"] > 0]
            less = rows[rows["difference"] < 0]
            out.append(
                f"{c['comparison']}: {len(rows)} concept{'s' * (len(rows) != 1)} differ at q < {self.fdr:g} on {base}: "
                f"{len(more)} that {side_a} rewards more than {side_b}, {len(less)} that {side_b} rewards more."
            )
        return out

    def table(self, comparison: str | None = None, top: int = 15, digits: int = 3) -> pd.DataFrame:
        """The strongest rows of one comparison (the first by default) side by side, as people read them."""
        d = self.differences()
        comparison = comparison or str(d["comparison"].iloc[0])
        d = d[d["comparison"] == comparison].head(top)
        out = pd.DataFrame(
            {"#": d["rank"].to_numpy(), "concept": d["concept"].to_numpy(), "name": d["name"].to_numpy()}
        )
        out["side A rewards"] = [f"{v:+.{digits}f}" for v in d["effect_a"]]
        out["side B rewards"] = [f"{v:+.{digits}f}" for v in d["effect_b"]]
        out["A − B"] = [f"{v:+.{digits}f}" for v in d["difference"]]
        out["q"] = [f"{v:.2g}" if np.isfinite(v) else "" for v in d["q"]]
        out["significant"] = np.where(d["significant"], "yes", "")
        return out

    def __repr__(self) -> str:
        return f"CompareResult({self.mode}, {len(self.comparisons())} comparisons, path={str(self.path)!r})"
