"""Two audits compared by concept: what one data set (or one annotator) rewards that the other does not.

``compare_audits(a, b)`` compares two run directories' feature stores (two data sets extracted with
the same model and SAE); ``compare_audits(a)`` compares the annotators of one data set whose pairs
record each annotator's vote (``metadata["annotator_votes"]``: PandaLM through
``load_pairs(..., annotator="each")`` or the alias ``pandalm-annotators``). Written under
``run_dir/compare_audits/<key>/`` with the stage protocol:

- **One concept space.** The features of every response of both sides are clustered once
  (``concepts.clustering`` on the pooled firing sets), so concept k means the same on both sides.
- **Two data sets.** Per data set, each concept's effect at equal lengths: the intercept of the per-unit
  (prompt) chosen − rejected difference of its activity regressed on length (within that data set),
  so that two data sets with opposite length biases are not reported as opposite in every concept that
  grows with length; the two effects compared with their own standard errors and Welch–Satterthwaite
  degrees of freedom (``core.contrast.controlled_difference``), BH over concepts.
- **Annotators of the same pairs.** Where two annotators agree, their per-pair effects are equal and
  say nothing about how they differ: only the pairs where both prefer a response and they disagree
  carry signal. On those, the mean of annotator A's chosen − rejected difference of each concept at
  equal lengths is tested against zero by sign-flip permutation (``core.contrast.sign_flip_test``,
  length a Freedman–Lane nuisance: ``controlled_contributions``; under the null either annotator was
  as likely to prefer either side), BH over concepts. The
  number of such pairs and the smallest effect the test could find are in the manifest.

Tables: ``differences.parquet`` (a row per comparison × concept: each side's effect, the difference,
the test, q, rank within the comparison), ``concepts.parquet`` (members, name) and
``comparisons.parquet`` (per comparison: units or disagreeing pairs, discoveries, minimum detectable
effect). The reader is ``results.compare_audits.CompareResult`` (no torch).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..concepts.activity import PairFeatures, concept_activity
from ..concepts.clustering import cluster_features
from ..concepts.phrases import PhraseConfig, concept_phrases
from ..config import CompareAuditsConfig
from ..core.contrast import controlled_contributions, controlled_difference, minimum_detectable_d, sign_flip_test
from ..core.files import content_hash
from ..core.stage import terminal
from ..core.stats import bh_qvalues, group_means, length_controlled, length_regressors, paired_test
from ..results.compare_audits import FORMAT, CompareResult
from ..results.extract import FeatureStore
from ..results.run import RunDir, RunLike

__all__ = ["STAGE", "annotator_differences", "annotator_votes", "compare_audits", "dataset_differences"]

log = logging.getLogger(__name__)
STAGE = "compare_audits"


def _units(pf: PairFeatures, labels: np.ndarray, cfg: CompareAuditsConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Per unit (prompt, or pair), the chosen − rejected concept activity and the length regressors
    (None without length control)."""
    Uc, Ur = concept_activity(pf, labels)
    groups = pf.groups if cfg.group_by_prompt else None
    Du = np.asarray(group_means(Uc - Ur, groups))
    if cfg.length_control_degree <= 0:
        return Du, None
    return Du, np.asarray(
        group_means(length_regressors(np.log(np.maximum(pf.ntok, 1)), cfg.length_control_degree), groups)
    )


def dataset_differences(
    pf_a: PairFeatures, pf_b: PairFeatures, labels: np.ndarray, cfg: CompareAuditsConfig
) -> tuple[pd.DataFrame, dict]:
    """Per concept (``labels``: the shared clustering), each data set's length-controlled effect
    (``stats.length_controlled``: the per-unit chosen − rejected activity at equal lengths), their
    difference A − B tested with the effects' own errors (``core.contrast.controlled_difference``),
    BH q over the concepts. Returns (table, counts)."""
    (Da, La), (Db, Lb) = _units(pf_a, labels, cfg), _units(pf_b, labels, cfg)
    effect = {}
    for name, D, L in (("a", Da, La), ("b", Db, Lb)):
        effect[name] = length_controlled(D, L) if L is not None else paired_test(D)
    t = controlled_difference(Da, La, Db, Lb)
    table = pd.DataFrame(
        {
            "concept": np.arange(Da.shape[1]),
            "effect_a": effect["a"].mean,
            "effect_b": effect["b"].mean,
            "d_a": effect["a"].cohens_d,
            "d_b": effect["b"].cohens_d,
            "difference": t.mean,
            "t": t.t,
            "p": t.p,
        }
    )
    table["q"] = bh_qvalues(np.nan_to_num(table["p"].to_numpy(), nan=1.0))
    n_a, n_b = len(Da), len(Db)
    # the standardised difference of two samples: its effective n is 1 / (1/n_a + 1/n_b)
    effective = int(1 / (1 / max(n_a, 1) + 1 / max(n_b, 1)))
    return table, {
        "units_a": n_a,
        "units_b": n_b,
        "minimum_detectable_d": minimum_detectable_d(effective, len(table), cfg.fdr),
    }


def _standardised(effect: np.ndarray, d: np.ndarray) -> np.ndarray:
    """An effect in units of the per-pair differences' standard deviation (a Cohen's d)."""
    sd = d.std(0, ddof=1) if len(d) > 1 else np.zeros(d.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, effect / sd, 0.0)


def annotator_votes(pairs: Sequence) -> tuple[list[str], np.ndarray]:
    """(annotator names, pairs × annotators votes): +1 where the annotator prefers the pair's
    "chosen" side, −1 "rejected", 0 a tie or no vote — from ``metadata["annotator_votes"]``."""
    names = sorted({k for p in pairs for k in (p.metadata.get("annotator_votes") or {})})
    if not names:
        raise ValueError(
            "the pairs record no annotator votes (metadata['annotator_votes']): load them with "
            "load_pairs(..., annotator='each'), e.g. the alias 'pandalm-annotators'"
        )
    votes = np.asarray([[int((p.metadata.get("annotator_votes") or {}).get(n, 0)) for n in names] for p in pairs])
    return names, votes


def annotator_differences(
    pf: PairFeatures, votes: np.ndarray, names: Sequence[str], labels: np.ndarray, cfg: CompareAuditsConfig
) -> tuple[pd.DataFrame, list[dict]]:
    """Per annotator pair (``cfg.annotators``, 1-based positions in ``names``; None: every pair) and
    concept: on the pairs where both annotators prefer a response and disagree, the mean of A's
    chosen − rejected difference of the concept's activity (length regressed out) — what A rewards
    that B does not — tested by sign flips, BH over concepts. Returns (table, one count per pair)."""
    Uc, Ur = concept_activity(pf, labels)
    D = Uc - Ur  # per pair, as the store's sides
    L = length_regressors(np.log(np.maximum(pf.ntok, 1)), max(cfg.length_control_degree, 1))
    chosen = cfg.annotators or [[i + 1, j + 1] for i, j in itertools.combinations(range(len(names)), 2)]
    rows, counts = [], []
    for a, b in chosen:
        if not (1 <= a <= len(names) and 1 <= b <= len(names)):
            raise ValueError(f"annotators: {[a, b]} names an annotator the data lacks (it records {list(names)})")
        va, vb = votes[:, a - 1], votes[:, b - 1]
        disagree = (va != 0) & (vb != 0) & (va != vb)
        sign = va[disagree].astype(np.float64)[:, None]  # orient each pair as annotator A saw it
        Da = sign * D[disagree]
        controlled = cfg.length_control_degree > 0 and disagree.sum() > L.shape[1] + 1
        W = controlled_contributions(Da, sign * L[disagree] if controlled else None)
        mean, p, runs = sign_flip_test(W, cfg.fdr, cfg.max_permutations, seed=cfg.seed)
        q = bh_qvalues(p)
        m = int(disagree.sum())
        comparison = f"{names[a - 1]} vs {names[b - 1]}"
        rows.append(
            pd.DataFrame(
                {
                    "comparison": comparison,
                    "concept": np.arange(D.shape[1]),
                    "effect_a": mean,
                    "effect_b": -mean,
                    "d_a": _standardised(mean, Da),
                    "difference": 2 * mean,
                    "t": np.nan,
                    "p": p,
                    "q": q,
                    "permutations": runs,
                }
            )
        )
        counts.append(
            {
                "comparison": comparison,
                "a": names[a - 1],
                "b": names[b - 1],
                "pairs_both_prefer": int(((va != 0) & (vb != 0)).sum()),
                "disagreeing_pairs": m,
                "discoveries": int((q < cfg.fdr).sum()),
                "minimum_detectable_d": minimum_detectable_d(m, D.shape[1], cfg.fdr),
            }
        )
    return pd.concat(rows, ignore_index=True), counts


def _same_sae(a: dict, b: dict) -> bool:
    """Two stores' records of one SAE under the first fingerprint formula (whose value depended on
    the thread count: ``LoadedSAE.known_as``)."""
    if a["name"] != b["name"]:
        return False
    from ..lm.sae import load_sae

    sae = load_sae(a["name"])
    return sae.known_as(a["fingerprint"]) is not None and sae.known_as(b["fingerprint"]) is not None


def compare_audits(
    a: RunLike,
    b: RunLike | None = None,
    *,
    run_dir: RunLike | None = None,
    config: CompareAuditsConfig | dict | None = None,
    force: bool = False,
) -> CompareResult:
    """Compare two data sets (``a`` and ``b``: run directories with feature stores of the same model
    and SAE) or, with ``b`` None, the annotators of ``a``'s pairs; write (or reuse)
    ``run_dir/compare_audits/<key>/`` (``run_dir`` defaults to ``a``)."""
    cfg = CompareAuditsConfig.from_dict(config)
    store_a = RunDir.of(a).store
    store_b = RunDir.of(b).store if b is not None else None
    run = RunDir.of(run_dir if run_dir is not None else a)
    if store_b is not None:
        for part in ("model", "sae"):
            if store_a.manifest[part]["fingerprint"] != store_b.manifest[part]["fingerprint"]:
                if part == "sae" and _same_sae(store_a.manifest["sae"], store_b.manifest["sae"]):
                    continue
                raise ValueError(
                    f"{store_a.path} and {store_b.path} were extracted with different {part}s "
                    f"({store_a.manifest[part]['name']} vs {store_b.manifest[part]['name']}): "
                    "one concept space needs the same model and SAE on both sides"
                )
    keys = [store_a.manifest["key"], store_b.manifest["key"] if store_b is not None else None]
    stage = run.stage(STAGE, content_hash(FORMAT, keys, cfg.key_params()), FORMAT)
    if stage.reuse(force):
        return CompareResult(stage.path, stage.manifest(), reused=True)
    say = (lambda s: terminal(f"[compare-audits] {s}")) if cfg.progress else (lambda s: None)
    t0 = time.time()
    pf_a = PairFeatures.from_store(store_a)
    pf_b = PairFeatures.from_store(store_b) if store_b is not None else None
    sides = [pf_a] if pf_b is None else [pf_a, pf_b]
    pooled = sp.vstack([m for pf in sides for m in (pf.fires_chosen, pf.fires_rejected)])
    labels = cluster_features(pooled, cfg.concepts)
    n_concepts = int(labels.max()) + 1 if (labels >= 0).any() else 0
    say(f"one concept space: {n_concepts} concepts from {pooled.shape[0]:,} responses")
    if pf_b is not None:
        table, counts = dataset_differences(pf_a, pf_b, labels, cfg)
        table.insert(0, "comparison", "a vs b")
        counts = [
            {
                "comparison": "a vs b",
                "a": str(store_a.path),
                "b": str(store_b.path),
                **counts,
                "discoveries": int((table["q"] < cfg.fdr).sum()),
            }
        ]
    else:
        names, votes = annotator_votes(store_a.pairs())
        table, counts = annotator_differences(pf_a, votes, names, labels, cfg)
    table["significant"] = table["q"] < cfg.fdr
    table = table.sort_values(
        ["comparison", "q", "difference"],
        key=lambda c: c.abs() if c.name == "difference" else c,
        ascending=[True, True, False],
        kind="stable",
    )
    table.insert(0, "rank", table.groupby("comparison").cumcount() + 1)
    concepts = _concept_table(labels, [store_a] + ([store_b] if store_b is not None else []), sides, cfg)
    table = table.merge(concepts[["concept", "n_features", "name"]], on="concept", how="left")
    stage.begin()
    stage.write_parquet("differences", table.reset_index(drop=True))
    stage.write_parquet("concepts", concepts)
    stage.write_parquet("comparisons", pd.DataFrame(counts))
    manifest = stage.finish(
        {
            "mode": "data sets" if store_b is not None else "annotators",
            "a": {"path": str(store_a.path), "key": store_a.manifest["key"], "n_pairs": store_a.n_pairs},
            "b": None
            if store_b is None
            else {"path": str(store_b.path), "key": store_b.manifest["key"], "n_pairs": store_b.n_pairs},
            "model": store_a.manifest["model"],
            "sae": store_a.manifest["sae"],
            "n_concepts": int(len(concepts)),
            "comparisons": counts,
            "config": cfg.to_dict(),
            "seconds": round(time.time() - t0, 2),
        }
    )
    say(f"done in {manifest['seconds']:.0f} s → {stage.path}")
    return CompareResult(stage.path, manifest)


def _concept_table(
    labels: np.ndarray, stores: Sequence[FeatureStore], sides: Sequence[PairFeatures], cfg: CompareAuditsConfig
) -> pd.DataFrame:
    """Per concept of the shared space: its member features and a name from each side's texts (the
    distinctive phrases around its peaks, ``concepts.phrases``), joined."""
    n = int(labels.max()) + 1 if (labels >= 0).any() else 0
    members = [np.flatnonzero(labels == c).tolist() for c in range(n)]
    support = sum(np.asarray(pf.fires_chosen.sum(0) + pf.fires_rejected.sum(0)).ravel() for pf in sides)
    names = [[] for _ in range(n)]
    if cfg.name_phrases > 0 and n:
        for store in stores:
            for c, phrases in enumerate(
                concept_phrases(store, members, support, PhraseConfig(n_phrases=cfg.name_phrases), None, cfg.seed)
            ):
                names[c] += [p for p in phrases if p not in names[c]]
    return pd.DataFrame(
        {
            "concept": np.arange(n),
            "n_features": [len(m) for m in members],
            "features": members,
            "name": [" · ".join(f"“{p}”" for p in ps[: cfg.name_phrases + 1]) for ps in names],
        }
    )
