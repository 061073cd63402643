"""Stage 3, headless: choose what each concept may do, and see what the choice predicts.

Builds an :class:`~anatomy_nb.plan.InterventionPlan` from the hypotheses of stage 2 (every concept
listed, "allow" by default), edits it (:func:`set_choice`), and predicts — before anything is
trained — the change of every concept under the plan, including **spill-over** onto concepts that
are correlated with a targeted one (DESIGN.md §1: concepts are not independent; show it).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import scipy.stats as sps

from .artifacts import RunDir
from .plan import METHODS, PLAN_FILE, ConceptChoice, InterventionPlan, PlanError, load_plan
from .stats import group_means, length_controlled, length_regressors, paired_test

__all__ = [
    "ConceptSpace",
    "DEFAULT_STRENGTH",
    "badge",
    "concept_name",
    "default_plan",
    "resolve_plan",
    "set_choice",
]

# a strength that is sensible for each method when the user has not chosen one
DEFAULT_STRENGTH = {"reward_shaping": 1.0, "filter": 0.5, "inoculate": 1.0, "steer": 4.0, "ablate": 1.0}
DEFAULT_INSTRUCTION = "In this answer, deliberately show the following trait: {label}"
BADGES = ("chosen", "rejected", "both", "neither")


def concept_name(concept: int | str) -> str:
    """``12`` or ``"12"`` or ``"sae:12"`` → ``"sae:12"``."""
    s = str(concept)
    return s if ":" in s else f"sae:{int(s)}"


def badge(lo: float, hi: float, chosen_rate: float, rejected_rate: float, min_rate: float = 0.05) -> str:
    """Where a concept fires, judged by the 95 % interval of its paired difference: on chosen
    (interval above 0), on rejected (below 0), on both (interval covers 0 but it fires on at
    least ``min_rate`` of each side) or neither."""
    if lo > 0:
        return "chosen"
    if hi < 0:
        return "rejected"
    return "both" if min(chosen_rate, rejected_rate) >= min_rate else "neither"


def _overall(hyp) -> pd.DataFrame:
    t = hyp.table
    return t[t["view"] == "overall"].sort_values("concept").reset_index(drop=True)


def default_plan(hyp, *, layer: int | None = None) -> InterventionPlan:
    """Every concept of the hypotheses table listed as "allow", with its features and label."""
    ov = _overall(hyp)
    entries = [
        ConceptChoice(concept=concept_name(int(r.concept)), features=[int(f) for f in r.features], layer=layer, label=str(r.label or ""))
        for r in ov.itertuples()
    ]
    return InterventionPlan(concepts=entries, hypotheses=hyp.manifest.get("key"))


def set_choice(plan: InterventionPlan, concept: int | str, action: str, method: str | None = None, strength: float | None = None, **fields: Any) -> InterventionPlan:
    """Set one concept's action (and method, strength, other plan fields); validated at once.

    Suppress/amplify without a method means reward shaping (the paper's most reliable). An
    inoculation without an instruction gets one built from the concept's label. Returns ``plan``
    (changed in place) so calls chain; a bad choice raises :class:`PlanError` and changes nothing.
    """
    name = concept_name(concept)
    idx = next((i for i, c in enumerate(plan.concepts) if c.concept == name), None)
    if idx is None:
        raise PlanError(None, name, "concept", f"not in the plan ({len(plan.concepts)} concepts)")
    old = plan.concepts[idx]
    new = ConceptChoice(**{**old.__dict__, **fields})
    new.action = action
    if action == "allow":
        new.method = method
    else:
        new.method = method or old.method or "reward_shaping"
        if strength is None and (old.method != new.method or old.action == "allow"):
            strength = DEFAULT_STRENGTH.get(new.method, 1.0)
    if strength is not None:
        new.strength = strength
    if new.method == "inoculate" and not (new.instruction or "").strip():
        new.instruction = DEFAULT_INSTRUCTION.format(label=new.label or new.concept)
    # validate just this entry, with the plan's error messages
    try:
        checked = InterventionPlan.from_dict({"concepts": [new.__dict__]}).concepts[0]
    except PlanError as exc:  # name the entry's real position in the plan
        raise PlanError(idx, name, exc.field, exc.reason) from None
    plan.concepts[idx] = checked
    return plan


def resolve_plan(run_dir: str | Path, plan: Any, hyp=None, *, layer: int | None = None) -> InterventionPlan:
    """The plan a notebook should use: the default (all allow) overlaid with ``plan`` — a dict, a
    JSON string, a file, an :class:`InterventionPlan` — or, when ``plan`` is None, with the run's
    existing plan file if there is one. Concepts missing from the given plan stay "allow"."""
    from .hypothesize import Hypotheses

    hyp = hyp or Hypotheses.from_run(run_dir)
    known = _overall(hyp)["concept"].astype(int).tolist()
    if plan is None:
        path = Path(run_dir) / PLAN_FILE
        if not path.exists():
            return default_plan(hyp, layer=layer)
        plan = path
    given = load_plan(plan, known_concepts=known)
    base = default_plan(hyp, layer=layer)
    base.hypotheses = given.hypotheses or base.hypotheses
    pos = {c.concept: i for i, c in enumerate(base.concepts)}
    for c in given.concepts:
        if c.kind == "sae" and c.concept in pos:
            ref = base.concepts[pos[c.concept]]
            c.features = c.features or ref.features
            c.label = c.label or ref.label
            c.layer = c.layer if c.layer is not None else ref.layer
            base.concepts[pos[c.concept]] = c
        else:  # text / direction concepts (and ids beyond the table) are kept as given
            base.concepts.append(c)
    return base


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

    @classmethod
    def from_run(cls, run_dir: str | Path | RunDir, hyp=None, store=None) -> "ConceptSpace":
        from .extract import FeatureStore
        from .hypothesize import Hypotheses, PairFeatures, concept_activity

        hyp = hyp or Hypotheses.from_run(run_dir)
        store = store or FeatureStore.from_run(run_dir)
        pf = PairFeatures.from_store(store)
        labels = hyp.features["concept"].to_numpy().astype(np.int64)
        uc, ur = concept_activity(pf, labels)
        config = hyp.manifest.get("config", {})
        layer = int(store.manifest["layer"]) if store.manifest.get("layer") is not None else None
        return cls(_overall(hyp), uc, ur, pf.groups if config.get("group_by_prompt", True) else None, hyp.manifest.get("key"), layer, pf.ntok, int(config.get("length_control_degree", 2)))

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

    def signal(self, keep: np.ndarray | None = None, flip: np.ndarray | None = None) -> np.ndarray:
        """Δ per concept: mean over units of d = u(chosen) − u(rejected), after dropping pairs not
        in ``keep`` and negating those in ``flip`` (boolean masks over pairs)."""
        d = self.chosen - self.rejected
        if flip is not None and flip.any():
            d = np.where(flip[:, None], -d, d)
        pairs = None if keep is None else np.flatnonzero(keep)
        u = self._units(d, pairs)
        return u.mean(0) if len(u) else np.zeros(self.n_concepts)

    def rescore(self, pairs: Iterable[int] | np.ndarray | None = None) -> pd.DataFrame:
        """Paired statistics of every concept inside a subset of pairs (a selected topic or a lasso
        on the data map), computed as stage 2 does: mean difference with its 95 % interval, Cohen's
        d, p, the length-controlled d (when the space knows response lengths), firing rates and the
        chosen/rejected/both/neither badge. ``None`` means all pairs."""
        idx = np.arange(self.n_pairs) if pairs is None else np.unique(np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, dtype=np.int64))
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
        out = pd.DataFrame({
            "concept": self.concepts["concept"].to_numpy(),
            "label": self.concepts["label"].astype(str).to_numpy(),
            "n_units": n,
            "mean_diff": np.nan_to_num(t.mean),
            "ci_low": np.nan_to_num(lo),
            "ci_high": np.nan_to_num(hi),
            "cohens_d": t.cohens_d,
            "p": t.p,
            "length_controlled_cohens_d": lc_d,
            "chosen_rate": cr,
            "rejected_rate": rr,
        })
        out["badge"] = [badge(a, b, c, r) for a, b, c, r in zip(out["ci_low"], out["ci_high"], cr, rr)]
        return out

    def correlation(self) -> tuple[np.ndarray, np.ndarray]:
        """(Pearson r, regression slope β_jc of u_j on u_c), C × C, over all responses."""
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

    def _column(self, concept: str) -> int | None:
        if not concept.startswith("sae:"):
            return None
        cid = int(concept.split(":", 1)[1])
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
        active = [(c, self._column(c.concept)) for c in plan.active]
        active = [(c, j) for c, j in active if j is not None]
        for c, j in active:  # filters first: they change the data every other method trains on
            if c.method != "filter":
                continue
            carried = (c.sign * d[:, j] >= c.strength) & keep & ~flip
            removed[j] = int(carried.sum())
            if c.filter_mode == "flip":
                flip |= carried
            else:
                keep &= ~carried
        after_data = self.signal(keep, flip)
        r, slope = self.correlation()
        direct = after_data - before  # filter changes are exact and include their spill-over
        basis = np.array(["none"] * C, dtype=object)
        basis[np.abs(direct) > 1e-12] = "data (filter, exact)"
        deltas = np.zeros(C)
        for c, j in active:
            if c.method == "filter":
                basis[j] = "data (filter, exact)"
                continue
            base = after_data[j]
            if c.method == "reward_shaping":
                target, how = base * (1 - c.sign * c.strength), "first-order (reward margin)"
            elif c.method == "ablate":
                target, how = base * (1 - c.strength), "first-order (projection removed)"
            else:  # steer, inoculate: size unknowable before training
                target, how = base * (1 - c.sign), "nominal"
            deltas[j] += target - base
            basis[j] = how
        spill = slope @ deltas - deltas  # what the other targets' changes drag along (β_jj = 1 excluded)
        after = after_data + deltas + spill
        entry = {j: c for c, j in active}
        moved = (np.abs(after - before) > 1e-12) & np.array([j not in entry for j in range(C)])
        basis[moved] = "spill-over"
        own = deltas.copy()
        for c, j in active:
            if c.method == "filter":
                own[j] += direct[j]
        ov = self.concepts
        table = pd.DataFrame({
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
        })
        edges = []
        for c, j in active:
            if c.method == "filter":
                # exact: the change of each other concept when this filter alone is applied
                carried = c.sign * d[:, j] >= c.strength
                solo = self.signal(~carried, None) if c.filter_mode == "drop" else self.signal(None, carried)
                shift = solo - before
            else:
                shift = slope[:, j] * deltas[j]
            for k in range(C):
                if k == j:
                    continue
                edges.append({"source": int(ov["concept"].iloc[j]), "target": int(ov["concept"].iloc[k]), "target_label": str(ov["label"].iloc[k]), "correlation": float(r[k, j]), "slope": float(slope[k, j]), "shift": float(shift[k])})
        spill_df = pd.DataFrame(edges, columns=["source", "target", "target_label", "correlation", "slope", "shift"])
        if len(spill_df):
            spill_df = spill_df.reindex(spill_df["shift"].abs().sort_values(ascending=False).index).reset_index(drop=True)
        return table, spill_df


def methods_for(kind: str) -> list[str]:
    """The methods a concept kind admits (text concepts have no residual direction)."""
    return [m for m in METHODS if not (kind == "text" and m in ("steer", "ablate"))]
