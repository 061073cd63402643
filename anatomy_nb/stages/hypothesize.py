"""Stage 2: concepts that separate chosen from rejected, tested and labelled.

Reads the feature store of stage 1 and writes, under ``run_dir/hypothesize/<key>/``:

- ``hypotheses.parquet`` — one row per concept over the whole response (``view="overall"``), over
  the responses' first / last few tokens (``view="opening"`` / ``"ending"``, when the store has
  them) and per topic × concept (``view="topic"``): member features, label fields, firing rates
  on chosen and rejected, mean paired difference, Cohen's d, t/z, p, Benjamini–Hochberg q over
  *every* row, split-half sign agreement, the length-controlled effect, number of units, and the predicted direction and
  size
  of the change DPO would make; ``source`` / ``ref`` say which concept source a row tests (``sae``
  for the clusters; extra sources passed to ``hypothesize(..., sources=)`` — text rules, directions —
  are tested the same way, in the same BH family);
- ``features.parquet`` — per feature: its concept, support and its own paired test (a separate
  BH family, for drill-downs); ``topics.parquet`` / ``topic_summary.parquet`` — the prompt topics;
- ``baseline_text_stats.parquet`` and ``baseline_linear.parquet`` — the baselines: plain text
  statistics tested the same way, and an L1-logistic classifier on per-pair feature differences;
- ``length_placebo.parquet`` — whether the length control is calibrated on this data (placebo
  pairs of same-side responses that differ only in length; ``stats.length_placebo``), per view.

Method (docs/explanation.md, "Stage 2"): concepts are clusters of features by *unsigned* co-firing
(``concepts.clustering``); the tested quantity is the signed per-pair difference of a concept's activity,
b = mean over member features of 1{fires on chosen} − 1{fires on rejected}; pairs that share a
prompt are averaged into one unit; tests are vectorised over all concepts and topics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..concepts.activity import PairFeatures, concept_activity, feature_difference_sums, length_diffs
from ..concepts.clustering import cluster_features, membership_matrix
from ..concepts.explain import Usage, make_explainer, usage_of
from ..concepts.labels import add_explanations, context_labels, describe_explainer, short_label, text_stat_labels
from ..concepts.phrases import PhraseConfig, concept_phrases
from ..concepts.topics import cluster_prompts
from ..config import HypothesizeConfig
from ..core.files import content_hash
from ..core.stage import StepTimer
from ..core.stats import (
    bh_qvalues,
    group_means,
    length_controlled,
    length_placebo,
    paired_test,
    paired_test_from_sums,
    split_half_agreement,
    welch_each_group,
)
from ..data.textstats import text_stats
from ..results.extract import FeatureStore
from ..results.hypothesize import FORMAT, Hypotheses, number_ranks, rank_hypotheses
from ..results.plan import concept_ref, parse_concept
from ..results.run import RunDir, RunLike
from .hypothesize_baselines import linear_baseline, stat_columns, text_stat_baseline

__all__ = [
    "HypothesizeConfig",
    "Hypotheses",
    "PairFeatures",
    "hypothesize",
    "linear_baseline",
    "score_concepts",
    "text_stat_baseline",
    "STAGE",
]

log = logging.getLogger(__name__)
STAGE = "hypothesize"


def _view_stats(Du: np.ndarray, len_diff: np.ndarray, cfg: HypothesizeConfig) -> dict[str, np.ndarray]:
    """The tests of one view on a block of concept columns (units × concepts differences)."""
    t = paired_test(Du)
    return {
        "n_units": t.n,
        **stat_columns("", t),
        "split_half_agreement": split_half_agreement(Du, cfg.n_splits, cfg.seed),
        **stat_columns("length_controlled_", length_controlled(Du, len_diff)),
    }


def _rates(Uc: np.ndarray, Ur: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "chosen_rate": (Uc > 0).mean(0),
        "rejected_rate": (Ur > 0).mean(0),
        "chosen_activity": Uc.mean(0),
        "rejected_activity": Ur.mean(0),
    }


def concept_members(labels: np.ndarray) -> list[list[int]]:
    """Member features of each concept, in feature order (one sort, not one scan per concept)."""
    n_concepts = int(labels.max()) + 1 if (labels >= 0).any() else 0
    feats = np.flatnonzero(labels >= 0)
    feats = feats[np.argsort(labels[feats], kind="stable")]
    return (
        [f.tolist() for f in np.split(feats, np.cumsum(np.bincount(labels[labels >= 0], minlength=n_concepts))[:-1])]
        if n_concepts
        else []
    )


def score_concepts(
    pf: PairFeatures,
    labels: np.ndarray,
    cfg: HypothesizeConfig,
    topic_of_group: np.ndarray | None = None,
    sources: Mapping[str, np.ndarray] | None = None,
    block_bytes: int = 1 << 28,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The statistics of every concept (overall, opening / ending, and inside vs outside each topic)
    and of every feature. ``sources``: other concept sources' per-pair scores (ref → (n_pairs, 2)),
    tested like the clusters over the whole response and per topic. Returns (hypotheses without
    labels, per-feature table).

    Concept activity stays sparse; the tests run on blocks of concept columns of about
    ``block_bytes`` each, so memory does not grow with the number of concepts (every statistic is
    per column, so blocks give the same numbers as one pass).
    """
    members = concept_members(labels)
    n_concepts = len(members)
    Uc_all, Ur_all = concept_activity(pf, labels, dense=False)
    refs, kinds = [concept_ref(c) for c in range(n_concepts)], ["sae"] * n_concepts
    if sources:  # other sources join as extra columns
        scores = [np.asarray(v, dtype=np.float64) for v in sources.values()]
        Uc_all = sp.hstack([Uc_all, sp.csc_matrix(np.column_stack([v[:, 0] for v in scores]))], format="csc")
        Ur_all = sp.hstack([Ur_all, sp.csc_matrix(np.column_stack([v[:, 1] for v in scores]))], format="csc")
        for ref in sources:
            refs.append(ref)
            kinds.append(parse_concept(ref)[0])
            members.append([])
    edge_activity = (
        {edge: concept_activity(pf, labels, edge, dense=False) for edge in pf.edges} if cfg.test_edges else {}
    )
    groups = pf.groups if cfg.group_by_prompt else None
    len_diff = length_diffs(pf.ntok, groups, cfg.length_control_degree)
    n_units = len(len_diff)
    topics: list[int] = []
    if topic_of_group is not None:
        unit_topic = topic_of_group if cfg.group_by_prompt else topic_of_group[pf.groups]
        topics = [
            int(k)
            for k in np.unique(unit_topic)
            if cfg.min_topic_prompts <= (unit_topic == k).sum() <= n_units - cfg.min_topic_prompts
        ]
    width = max(1, block_bytes // (8 * max(pf.n_pairs, 1)))  # dense pairs × concepts blocks
    parts: dict[Any, list[dict[str, np.ndarray]]] = {}
    for lo in range(0, max(len(refs), 1), width):  # once even with no concepts: the table keeps its columns
        hi = min(len(refs), lo + width)
        Uc, Ur = Uc_all[:, lo:hi].toarray(), Ur_all[:, lo:hi].toarray()
        Du = group_means(Uc - Ur, groups)
        parts.setdefault("overall", []).append({**_rates(Uc, Ur), **_view_stats(Du, len_diff, cfg)})
        # Where in the response: an opener or a sign-off lives in a few edge tokens, where the
        # concept's generic features rarely fire otherwise; "anywhere" dilutes it with the rest
        # of the response (docs/explanation.md, benchmark). Same concepts, same family of tests.
        for edge, (Ec_all, Er_all) in edge_activity.items():
            if lo < n_concepts:
                Ec, Er = Ec_all[:, lo : min(hi, n_concepts)].toarray(), Er_all[:, lo : min(hi, n_concepts)].toarray()
                parts.setdefault(edge, []).append(
                    {**_rates(Ec, Er), **_view_stats(group_means(Ec - Er, groups), len_diff, cfg)}
                )
        if topics:
            for k, (w, inside_mean) in welch_each_group(Du, unit_topic, topics).items():
                inside = unit_topic == k
                lc_in = length_controlled(Du[inside], len_diff[inside])
                split_in = split_half_agreement(Du[inside], cfg.n_splits, cfg.seed)
                parts.setdefault(("topic", k), []).append(
                    {
                        "n_units": np.full(hi - lo, int(inside.sum())),
                        **stat_columns("", w),
                        "inside_mean_diff": inside_mean,
                        "split_half_agreement": split_in,
                        **stat_columns("length_controlled_", lc_in),
                    }
                )
    joined = {
        key: {col: np.concatenate([b[col] for b in blocks]) for col in blocks[0]} for key, blocks in parts.items()
    }
    overall = joined.get("overall", {})
    base = pd.DataFrame(
        {
            "concept": np.arange(len(refs)),
            "source": kinds,
            "ref": refs,
            "n_features": [len(m) for m in members],
            "features": members,
        }
    )
    rates = {
        c: overall.get(c, np.zeros(0)) for c in ("chosen_rate", "rejected_rate", "chosen_activity", "rejected_activity")
    }
    frames = [base.assign(**rates, view="overall", topic=-1, **{c: v for c, v in overall.items() if c not in rates})]
    frames += [
        base.iloc[:n_concepts].assign(view=edge, topic=-1, **joined[edge]) for edge in edge_activity if edge in joined
    ]
    frames += [
        base.assign(**rates, view="topic", topic=k, **joined[("topic", k)]) for k in topics if ("topic", k) in joined
    ]
    table = pd.concat(frames, ignore_index=True)
    table["n_units"] = table["n_units"].astype(np.int64)
    table["z"] = table["t"]  # large-sample z; t is reported as z for familiarity
    table["q"] = bh_qvalues(table["p"].to_numpy())
    table["significant"] = table["q"] < cfg.fdr
    # Predicted change under DPO: direction of the paired difference; size = the difference in
    # concept activity between chosen and rejected (DPO raises what chosen has more of). Stage 5
    # measures the actual change and the R² of this prediction.
    delta = np.where(table["view"] == "topic", table.get("inside_mean_diff", table["mean_diff"]), table["mean_diff"])
    table["predicted_direction"] = np.where(table["significant"], np.where(delta > 0, "up", "down"), "none")
    table["predicted_change"] = np.where(table["significant"], delta, 0.0)
    table["effect_survives_length_control"] = table["length_controlled_p"] < cfg.fdr
    return table, feature_tests(pf, labels, groups)


def feature_tests(pf: PairFeatures, labels: np.ndarray, groups: np.ndarray | None) -> pd.DataFrame:
    """Per feature: its concept, support, firing rates and own paired test (a separate BH family,
    for drill-downs and for comparison with concepts), from sparse column sums."""
    Fc, Fr = pf.fires_chosen, pf.fires_rejected
    ft = paired_test_from_sums(*feature_difference_sums(pf, groups))
    chosen, rejected = np.asarray(Fc.sum(0), dtype=np.float64).ravel(), np.asarray(Fr.sum(0), dtype=np.float64).ravel()
    features = pd.DataFrame(
        {
            "feature": np.arange(pf.d_sae),
            "concept": labels,
            "support": chosen + rejected,
            "chosen_rate": chosen / pf.n_pairs,
            "rejected_rate": rejected / pf.n_pairs,
            **stat_columns("", ft),
        }
    )
    testable = features["support"].to_numpy() > 0
    features["q"] = np.nan
    features.loc[testable, "q"] = bh_qvalues(features.loc[testable, "p"].to_numpy())
    return features


# --- the stage -----------------------------------------------------------------------------------------


def _promoted(
    store: FeatureStore, labels: np.ndarray, cfg: HypothesizeConfig, model: Any, sae: Any
) -> tuple[list[str], str, Any]:
    """Per concept, the tokens its mean decoder direction promotes (needs the model and SAE, so
    it is optional: the reason is recorded when they cannot be loaded). Also returns the model
    when it was loaded (its tokenizer decodes the phrase names), else ``model``."""
    n_concepts = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if cfg.promoted_tokens <= 0 or not n_concepts:
        return [""] * n_concepts, "not computed", model
    lm = model
    try:
        from ..lm.models import load_model  # the optional labels need torch; the tests above do not
        from ..lm.ops import promoted_tokens
        from ..lm.sae import load_sae

        lm = model or load_model(store.manifest["model"]["name"])
        sae_ = sae or load_sae(store.manifest["sae"]["name"], device="cpu")
        directions = membership_matrix(labels).T @ sae_.decoder_directions.float().cpu().numpy()
        return promoted_tokens(lm, directions, cfg.promoted_tokens), "ok", lm
    except Exception as exc:  # labels are optional; say why they are missing
        note = f"unavailable: {type(exc).__name__}: {exc}"
        log.warning("promoted tokens %s", note)
        return [""] * n_concepts, note, lm


def hypothesize(
    run: RunLike,
    config: HypothesizeConfig | dict | None = None,
    *,
    store: FeatureStore | None = None,
    model: Any = None,
    sae: Any = None,
    explainer: Any = None,
    sources: Sequence[Any] = (),
) -> Hypotheses:
    """Cluster, test and label; write (or reuse) ``run/hypothesize/<key>``.

    ``store`` defaults to the run's latest feature store. ``model``/``sae`` (LoadedModel /
    LoadedSAE) enable promoted-token labels; by default they are loaded by the names the store
    recorded, and the labels are skipped (and the manifest says why) when that fails.
    ``explainer`` (a ``concepts.explain.ExplainerBackend``) adds an LLM explanation and its fidelity
    on held-out responses to the ``explain_top`` strongest concepts. ``sources``: other concept
    sources (``concepts.sources``: text rules, directions) tested beside the SAE concepts.
    """
    cfg = HypothesizeConfig.from_dict(config)
    run = RunDir.of(run)
    store = store or run.store
    stage = run.stage(
        STAGE,
        content_hash(
            FORMAT,
            store.manifest["key"],
            cfg.key_params(),
            describe_explainer(explainer),
            [s.describe() for s in sources],
        ),
        FORMAT,
    )
    if stage.reuse():
        return Hypotheses(stage.path)
    timer = StepTimer(log=log)
    with timer.step("read store"):
        pf = PairFeatures.from_store(store)
    with timer.step("cluster features"):
        labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), cfg.concepts)
    with timer.step("prompt topics"):  # over distinct prompts
        first_pair = pd.Series(np.arange(pf.n_pairs)).groupby(pf.groups).first().to_numpy()
        prompt_feats = pf.prompt_features[first_pair] if pf.prompt_features is not None else None
        topics = cluster_prompts(prompt_feats, [pf.prompts[i] for i in first_pair], cfg.topics)
    with timer.step("other concept sources"):
        pairs = store.pairs() if sources else []
        source_scores = {s.ref: s.pair_scores(pairs, store=store, lm=model) for s in sources}
    with timer.step("tests"):
        table, features = score_concepts(pf, labels, cfg, topics.labels, source_scores)
    with timer.step("text statistics"):
        stats_c, stats_r = text_stats(pf.chosen), text_stats(pf.rejected)
    with timer.step("labels"):
        U = sp.vstack(concept_activity(pf, labels, dense=False), format="csc")  # responses × concepts
        stat_label = text_stat_labels(U, pd.concat([stats_c, stats_r], ignore_index=True))
        peaks, contexts = context_labels(store, features, labels, cfg.label_features)
        promoted, promoted_note, lm = _promoted(store, labels, cfg, model, sae)
        tokenizer = getattr(lm, "tokenizer", None)
        phrases = (
            concept_phrases(
                store,
                concept_members(labels),
                features["support"].to_numpy(),
                PhraseConfig(n_phrases=cfg.name_phrases),
                tokenizer.decode if tokenizer is not None else None,
                cfg.seed,
            )
            if cfg.name_phrases > 0
            else [[] for _ in peaks]
        )
        lab = pd.DataFrame(
            {
                "concept": np.arange(len(stat_label)),
                "name": [" · ".join(f"“{p}”" for p in ps) for ps in phrases],
                "peak_tokens": peaks,
                "promoted_tokens": promoted,
                "text_stats": stat_label,
                "example_contexts": [[dict(c) for c in cs] for cs in contexts],
            }
        )
        lab["label"] = [short_label(p, s, n) for p, s, n in zip(peaks, stat_label, lab["name"])]
        table = table.merge(lab, on="concept", how="left")
        named = {s.ref: s.label or s.ref for s in sources}
        table["label"] = [named.get(r, lbl) for r, lbl in zip(table["ref"], table["label"])]
        topic_words = dict(zip(topics.summary["topic"], topics.summary["top_words"]))
        table["topic_label"] = table["topic"].map(lambda t: "all prompts" if t < 0 else topic_words.get(t, ""))
        table = number_ranks(rank_hypotheses(table).reset_index(drop=True))
    if explainer is None and cfg.explain.backend != "none":
        explainer = make_explainer(cfg.explain, run.path / "cache" / "llm", lm=model)
    llm_usage: dict[str, Any] = {"skipped": "no explainer (HypothesizeConfig.explain.backend)"}
    if explainer is not None:
        with timer.step("LLM explanations"):
            table = add_explanations(table, U, pf.chosen + pf.rejected, explainer, cfg)
        llm_usage = usage_of(explainer, timer.seconds["LLM explanations"])
        log.info("LLM explanations of %d concepts: %s", min(cfg.explain_top, len(table)), Usage(**llm_usage).summary())
    stage.begin()
    with timer.step("linear baseline"):
        if cfg.linear_baseline and pf.n_pairs >= 10:
            lin, lin_info = linear_baseline(pf, labels, cfg)
            stage.write_parquet("baseline_linear", lin)
        else:
            lin_info = {"skipped": "fewer than 10 pairs" if pf.n_pairs < 10 else "disabled"}
    with timer.step("write tables"):
        stage.write_parquet("hypotheses", table)
        stage.write_parquet("features", features)
        stage.write_parquet(
            "topics",
            pd.DataFrame(
                {
                    "prompt_group": np.arange(len(topics.labels)),
                    "topic": topics.labels,
                    "prompt": [pf.prompts[i] for i in first_pair],
                }
            ),
        )
        stage.write_parquet("topic_summary", topics.summary)
        stage.write_parquet("baseline_text_stats", text_stat_baseline(pf, cfg, stats_c, stats_r))
    placebo_info: dict[str, Any] = {
        "skipped": "length_placebo_draws = 0"
        if cfg.length_placebo_draws <= 0
        else "no concepts"
        if not (labels >= 0).any()
        else "fewer than 8 pairs"
    }
    if cfg.length_placebo_draws > 0 and pf.n_pairs >= 8 and (labels >= 0).any():
        with timer.step("length placebo"):
            placebo, placebo_info = _length_placebo(pf, labels, cfg)
            stage.write_parquet("length_placebo", placebo)
        if not placebo_info["calibrated"]:
            log.warning(
                "the length control looks miscalibrated on this data: in placebo pairs that differ only in length, "
                "%.0f %% of concept tests have p < 0.05 (expected ~5 %%); length-controlled effects may still carry "
                "length",
                100 * placebo_info["frac_p05_controlled"],
            )
    overall = table[(table["view"] == "overall") & (table["source"] == "sae")]
    stage.finish(
        {
            "features_key": store.manifest["key"],
            "config": cfg.to_dict(),
            "n_pairs": pf.n_pairs,
            "n_units": int(len(np.unique(pf.groups))) if cfg.group_by_prompt else pf.n_pairs,
            "n_concepts": int(len(overall)),
            "n_features_tested": int((labels >= 0).sum()),
            "n_topics": int(len(topics.summary)),
            "n_tests": int(len(table)),
            "n_significant": int(table["significant"].sum()),
            "n_significant_overall": int(overall["significant"].sum()),
            "sources": [s.describe() for s in sources],
            "promoted_tokens": promoted_note,
            "llm": llm_usage,
            "linear_baseline": lin_info,
            "length_placebo": placebo_info,
            "seconds": round(sum(timer.seconds.values()), 2),
            "step_seconds": timer.seconds,
        }
    )
    return Hypotheses(stage.path)


def _length_placebo(
    pf: PairFeatures, labels: np.ndarray, cfg: HypothesizeConfig
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The length placebo per view, on at most ``length_placebo_concepts`` concepts drawn at
    random: the check estimates a fraction of tests, which a sample estimates as well, and its
    cost grows with concepts × draws."""
    n_concepts = int(labels.max()) + 1 if (labels >= 0).any() else 0
    cols = np.arange(n_concepts)
    if n_concepts > cfg.length_placebo_concepts:
        cols = np.sort(np.random.default_rng(cfg.seed).choice(n_concepts, cfg.length_placebo_concepts, replace=False))
    frames = []
    for view in [None, *(pf.edges if cfg.test_edges else ())]:
        Uc, Ur = concept_activity(pf, labels, view, dense=False)
        result = length_placebo(
            Uc[:, cols].toarray(),
            Ur[:, cols].toarray(),
            pf.ntok,
            degrees=(0, cfg.length_control_degree),
            draws=cfg.length_placebo_draws,
            seed=cfg.seed,
        )
        frames.append(result.assign(view=view or "overall"))
    placebo = pd.concat(frames, ignore_index=True)
    return placebo, {**_placebo_summary(placebo, cfg.length_control_degree), "concepts": int(len(cols))}


def _placebo_summary(placebo: pd.DataFrame, degree: int, tolerance: float = 0.10) -> dict[str, Any]:
    """The manifest's verdict: calibrated when, on both sides and in every view, at most
    ``tolerance`` (twice the nominal 5 %) of placebo tests reach p < 0.05 under the configured
    control."""
    by = placebo.groupby(["side", "degree"])["frac_p05"].max()
    controlled = float(by.xs(degree, level="degree").max())
    return {
        "degree": degree,
        "frac_p05_controlled": round(controlled, 4),
        "frac_p05_uncontrolled": round(float(by.xs(0, level="degree").max()), 4),
        "calibrated": controlled <= tolerance,
    }
