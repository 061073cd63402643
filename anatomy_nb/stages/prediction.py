"""Stage 3's predictions: before anything is trained, the change of every concept under a plan,
including **spill-over** onto concepts correlated with a targeted one (docs/explanation.md, "Stage 3": concepts are
not independent; show it), and the re-scoring of every concept inside a subset of pairs (the
viewer's lasso or topic). No torch.

The prediction model, stated plainly (stage 5 measures the real thing):

* The **signal** of concept c is Δ_c, the mean over units of the per-pair difference
  d_c = u_c(chosen) − u_c(rejected) of its activity u (the fraction of member features firing):
  the quantity stage 2 tests and whose sign DPO is predicted to follow.
* **filter** acts on the data, so its effect is computed exactly: pairs carried by the concept
  (d_c ≥ strength for suppress; −d_c ≥ strength for amplify) are dropped (or flipped), and the
  signal of *every* concept is recomputed on what remains — spill-over included, no model needed.
* **reward_shaping** subtracts sign·λ·d_c from each pair's margin: to first order the concept's
  signal becomes Δ_c·(1 − sign·λ) (λ = 1 explains a suppressed concept away).
* **ablate** removes a fraction (strength) of the concept's projection: Δ_c·(1 − strength).
  **steer** and **inoculate** supply the concept during training so that it need not be learned;
  their size cannot be computed before training, so the nominal prediction is full removal
  (amplify with steer: doubling) and the ``basis`` column says "nominal".
* **spill-over:** a change δ_c of a targeted concept drags every other concept j by
  β_jc·δ_c, where β_jc is the regression slope of u_j on u_c across all responses.
* **scope:** an entry scoped to one topic or to prompts matching a regex (``ConceptChoice.topic`` /
  ``prompts``) filters only its pairs (exact), and shapes only the part of Δ_c its pairs carry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats as sps

from ..concepts.activity import PairFeatures, concept_activity
from ..core.stats import group_means, length_controlled, length_regressors, paired_test
from ..methods import METHODS
from ..results.extract import FeatureStore
from ..results.hypothesize import Hypotheses
from ..results.plan import InterventionPlan, load_plan, sae_concept_id, scope_mask
from ..results.run import RunDir, RunLike

__all__ = ["BADGES", "ConceptSpace", "badge", "overall_rows"]

BADGES = ("chosen", "rejected", "both", "neither")


def badge(lo: float, hi: float, chosen_rate: float, rejected_rate: float, min_rate: float = 0.05) -> str:
    """Where a concept fires, judged by the 95 % interval of its paired difference: on chosen
    (interval above 0), on rejected (below 0), on both (interval covers 0 but it fires on at
    least ``min_rate`` of each side) or neither."""
    if lo > 0:
        return "chosen"
    if hi < 0:
        return "rejected"
    return "both" if min(chosen_rate, rejected_rate) >= min_rate else "neither"


def overall_rows(hyp: Hypotheses) -> pd.DataFrame:
    """The whole-response rows of the SAE concepts, one per concept, ordered by concept id (rows
    of other concept sources are tested in stage 2 but have no per-feature activity here)."""
    t = hyp.table
    return t[(t["view"] == "overall") & (t["source"] == "sae")].sort_values("concept").reset_index(drop=True)


@dataclass
class ConceptSpace:
    """Per-pair activity of every concept on chosen and rejected responses, with the overall rows
    of the hypotheses table: what re-scoring, badges and predictions need."""

    concepts: pd.DataFrame  # overall hypotheses rows, one per concept, ordered by concept id
    chosen: np.ndarray  # n_pairs × n_concepts
    rejected: np.ndarray
    groups: np.ndarray | None = None  # pairs sharing a prompt form one unit
    hypotheses_key: str | None = None
    layer: int | None = None
    ntok: np.ndarray | None = None  # n_pairs × 2 response token counts: rescore's length control
    length_degree: int = 2  # as HypothesizeConfig.length_control_degree
    store: FeatureStore | None = None  # its pairs, read only when a plan entry is scoped
    topic_of_prompt: Mapping[str, int] | None = None  # stage 2's topics, for a topic scope

    @classmethod
    def from_run(cls, run: RunLike, hyp: Hypotheses | None = None, store: FeatureStore | None = None) -> ConceptSpace:
        run = RunDir.of(run)
        hyp = hyp or run.hypotheses
        store = store or run.store
        pf = PairFeatures.from_store(store)
        uc, ur = concept_activity(pf, hyp.feature_labels(store.d_sae))
        config = hyp.manifest.get("config", {})
        layer = int(store.manifest["layer"]) if store.manifest.get("layer") is not None else None
        return cls(
            overall_rows(hyp),
            uc,
            ur,
            pf.groups if config.get("group_by_prompt", True) else None,
            hyp.manifest.get("key"),
            layer,
            pf.ntok,
            int(config.get("length_control_degree", 2)),
            store,
            hyp.topic_of_prompt(),
        )

    def scopes(self, plan: InterventionPlan) -> dict[int, np.ndarray]:
        """Per scoped active entry (by its index in ``plan.active``), the pairs it acts on."""
        scoped = [(i, c) for i, c in enumerate(plan.active) if c.scoped]
        if not scoped:
            return {}
        if self.store is None:
            raise ValueError("a scoped plan entry needs the pairs' prompts: build the space with ConceptSpace.from_run")
        return {i: scope_mask(c, self._pairs, self.topic_of_prompt, i) for i, c in scoped}

    @cached_property
    def _pairs(self) -> list:
        """The store's pairs, read once per space (the viewer predicts a plan at every toggle)."""
        return self.store.pairs()

    @cached_property
    def _length_regressors(self) -> np.ndarray | None:
        """Per pair, stage 2's length-control regressors (they depend only on ``ntok``)."""
        return None if self.ntok is None else length_regressors(np.log(np.maximum(self.ntok, 1)), self.length_degree)

    @property
    def n_concepts(self) -> int:
        return self.chosen.shape[1]

    @property
    def n_pairs(self) -> int:
        return self.chosen.shape[0]

    def _units(self, d: np.ndarray, pairs: np.ndarray | None = None) -> np.ndarray:
        """Per-unit means of per-pair rows ``d`` (optionally only the pairs in ``pairs``)."""
        groups = self.groups
        if pairs is not None:
            d = d[pairs]
            groups = None if groups is None else groups[pairs]
        return d if groups is None or len(d) == 0 else group_means(d, groups)

    def signal(
        self, keep: np.ndarray | None = None, flip: np.ndarray | None = None, within: np.ndarray | None = None
    ) -> np.ndarray:
        """Δ per concept: mean over units of d = u(chosen) − u(rejected), after dropping pairs not
        in ``keep`` and negating those in ``flip`` (boolean masks over pairs). ``within``: the part
        of Δ the pairs in that mask contribute (d set to 0 elsewhere; units and their count kept)."""
        d = self.chosen - self.rejected
        if flip is not None and flip.any():
            d = np.where(flip[:, None], -d, d)
        if within is not None:
            d = np.where(within[:, None], d, 0.0)
        pairs = None if keep is None else np.flatnonzero(keep)
        u = self._units(d, pairs)
        return u.mean(0) if len(u) else np.zeros(self.n_concepts)

    def rescore(self, pairs: Iterable[int] | np.ndarray | None = None) -> pd.DataFrame:
        """Paired statistics of every concept inside a subset of pairs (a selected topic or a lasso
        on the data map), computed as stage 2 does: mean difference with its 95 % interval, Cohen's
        d, p, the length-controlled d (when the space knows response lengths), firing rates and the
        chosen/rejected/both/neither badge. ``None`` means all pairs."""
        idx = (
            np.arange(self.n_pairs)
            if pairs is None
            else np.unique(np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, dtype=np.int64))
        )
        u = self._units(self.chosen - self.rejected, idx)
        n = len(u)
        t = paired_test(u if n else np.zeros((1, self.n_concepts)))  # no pairs: nothing to test
        se = t.sd / math.sqrt(max(n, 1))
        tcrit = sps.t.ppf(0.975, max(n - 1, 1))
        lo, hi = t.mean - tcrit * se, t.mean + tcrit * se
        lc_d = np.full(self.n_concepts, np.nan)
        if self._length_regressors is not None and n > self.length_degree + 1:
            lc_d = length_controlled(u, self._units(self._length_regressors, idx)).cohens_d
        cr = (self.chosen[idx] > 0).mean(0) if len(idx) else np.zeros(self.n_concepts)
        rr = (self.rejected[idx] > 0).mean(0) if len(idx) else np.zeros(self.n_concepts)
        out = pd.DataFrame(
            {
                "concept": self.concepts["concept"].to_numpy(),
                "label": self.concepts["label"].astype(str).to_numpy(),
                "n_units": n,
                "mean_diff": np.nan_to_num(t.mean),
                "ci_low": np.nan_to_num(lo),
                "ci_high": np.nan_to_num(hi),
                "cohens_d": t.cohens_d,
                "z": np.where(se > 0, t.mean / np.where(se > 0, se, 1.0), np.nan),
                "p": t.p,
                "length_controlled_cohens_d": lc_d,
                "chosen_rate": cr,
                "rejected_rate": rr,
            }
        )
        out["badge"] = [badge(a, b, c, r) for a, b, c, r in zip(out["ci_low"], out["ci_high"], cr, rr)]
        return out

    def correlation(self) -> tuple[np.ndarray, np.ndarray]:
        """(Pearson r, regression slope β_jc of u_j on u_c), C × C, over all responses; computed
        once per space (it does not depend on the plan, and stage 5 predicts one plan per model)."""
        return self._correlation

    @cached_property
    def _correlation(self) -> tuple[np.ndarray, np.ndarray]:
        U = np.vstack([self.chosen, self.rejected]).astype(np.float64)
        U = U - U.mean(0)
        cov = U.T @ U / max(len(U) - 1, 1)
        var = np.diag(cov).copy()
        sd = np.sqrt(var)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(np.outer(sd, sd) > 0, cov / np.outer(sd, sd), 0.0)
            slope = np.where(var[None, :] > 0, cov / var[None, :], 0.0)
        np.fill_diagonal(r, 1.0)
        np.fill_diagonal(slope, 1.0)
        return r, slope

    def column(self, concept: str | int) -> int | None:
        """The column of a concept (an ``sae:<id>`` reference or an id); None for other kinds."""
        cid = sae_concept_id(concept)
        if cid is None:
            return None
        hits = np.flatnonzero(self.concepts["concept"].to_numpy() == cid)
        return int(hits[0]) if len(hits) else None

    def predict(self, plan: InterventionPlan | Mapping | str | Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Predicted change of every concept under ``plan``: (per-concept table, spill-over edges).

        Per concept: ``before`` (Δ, no intervention), ``after``, split into the change from the
        concept's own entry (``direct``) and from other targeted concepts (``spillover``);
        ``basis`` says how the number was obtained (see the module docstring). Edges: for each
        targeted concept, every other concept it moves, with the correlation, slope and shift.
        """
        plan = plan if isinstance(plan, InterventionPlan) else load_plan(plan)
        before = self.signal()
        C = self.n_concepts
        keep = np.ones(self.n_pairs, bool)
        flip = np.zeros(self.n_pairs, bool)
        removed: dict[int, int] = {}
        d = self.chosen - self.rejected
        scopes = self.scopes(plan)
        everywhere = np.ones(self.n_pairs, bool)
        active = [(c, self.column(c.concept), scopes.get(i, everywhere)) for i, c in enumerate(plan.active)]
        active = [(c, j, scope) for c, j, scope in active if j is not None]
        for c, j, scope in active:  # data edits first: they change the data every other method trains on
            carried = METHODS[c.method].carried(c, d[:, j])
            if carried is None:
                continue
            carried = carried & keep & ~flip & scope
            removed[j] = int(carried.sum())
            if METHODS[c.method].flips(c):
                flip |= carried
            else:
                keep &= ~carried
        after_data = self.signal(keep, flip)
        r, slope = self.correlation()
        direct = after_data - before  # filter changes are exact and include their spill-over
        basis = np.array(["none"] * C, dtype=object)
        exact = {j for c, j, _ in active if j in removed}  # the data edits: their change is exact
        data_edits = ", ".join(dict.fromkeys(c.method for c, j, _ in active if j in exact))
        basis[np.abs(direct) > 1e-12] = f"data ({data_edits}, exact)"
        deltas = np.zeros(C)
        for c, j, scope in active:
            if j in exact:
                basis[j] = f"data ({data_edits}, exact)"
                continue
            # a scoped entry acts on its pairs' share of the signal only (first order); steer and
            # inoculate are "nominal": their size is unknowable before training
            base = after_data[j] if scope.all() else self.signal(keep, flip, within=scope)[j]
            target, how = METHODS[c.method].predict(base, c)
            deltas[j] += target - base
            basis[j] = how if scope.all() else f"{how}, in scope"
        spill = slope @ deltas - deltas  # what the other targets' changes drag along (β_jj = 1 excluded)
        after = after_data + deltas + spill
        entry = {j: c for c, j, _ in active}
        moved = (np.abs(after - before) > 1e-12) & np.array([j not in entry for j in range(C)])
        basis[moved] = "spill-over"
        own = deltas.copy()
        for _c, j, _ in active:
            if j in exact:
                own[j] += direct[j]
        ov = self.concepts
        table = pd.DataFrame(
            {
                "concept": ov["concept"].to_numpy(),
                "label": ov["label"].astype(str).to_numpy(),
                "action": [entry[j].action if j in entry else "allow" for j in range(C)],
                "method": [entry[j].method if j in entry else "" for j in range(C)],
                "strength": [entry[j].strength if j in entry else np.nan for j in range(C)],
                "significant": ov["significant"].to_numpy() if "significant" in ov else False,
                "before": before,
                "direct": own,
                "spillover": after - before - own,
                "after": after,
                "basis": basis,
                "pairs_removed": [removed.get(j, 0) for j in range(C)],
            }
        )
        edges = []
        for c, j, scope in active:
            if j in exact:
                # exact: the change of each other concept when this data edit alone is applied
                carried = METHODS[c.method].carried(c, d[:, j]) & scope
                solo = self.signal(None, carried) if METHODS[c.method].flips(c) else self.signal(~carried, None)
                shift = solo - before
            else:
                shift = slope[:, j] * deltas[j]
            for k in range(C):
                if k == j:
                    continue
                edges.append(
                    {
                        "source": int(ov["concept"].iloc[j]),
                        "target": int(ov["concept"].iloc[k]),
                        "target_label": str(ov["label"].iloc[k]),
                        "correlation": float(r[k, j]),
                        "slope": float(slope[k, j]),
                        "shift": float(shift[k]),
                    }
                )
        spill_df = pd.DataFrame(edges, columns=["source", "target", "target_label", "correlation", "slope", "shift"])
        if len(spill_df):
            spill_df = spill_df.reindex(spill_df["shift"].abs().sort_values(ascending=False).index).reset_index(
                drop=True
            )
        return table, spill_df
