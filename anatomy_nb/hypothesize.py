"""Stage 2: concepts that separate chosen from rejected, tested and labelled.

Reads the feature store of stage 1 and writes, under ``run_dir/hypotheses/<key>/``:

- ``hypotheses.parquet`` — one row per concept over the whole response (``view="overall"``), over
  the responses' first / last few tokens (``view="opening"`` / ``"ending"``, when the store has
  them) and per topic × concept (``view="topic"``): member features, label fields, firing rates
  on chosen and rejected, mean paired difference, Cohen's d, t/z, p, Benjamini–Hochberg q over
  *every* row, split-half sign agreement, the length-controlled effect, number of units, and the predicted direction and size
  of the change DPO would make;
- ``features.parquet`` — per feature: its concept, support and its own paired test (a separate
  BH family, for drill-downs); ``topics.parquet`` / ``topic_summary.parquet`` — the prompt topics;
- ``baseline_text_stats.parquet`` and ``baseline_linear.parquet`` — the baselines: plain text
  statistics tested the same way, and an L1-logistic classifier on per-pair feature differences;
- ``length_placebo.parquet`` — whether the length control is calibrated on this data (placebo
  pairs of same-side responses that differ only in length; ``stats.length_placebo``), per view.

Method (DESIGN.md §1 step 2): concepts are clusters of features by *unsigned* co-firing
(``concepts.py``); the tested quantity is the signed per-pair difference of a concept's activity,
b = mean over member features of 1{fires on chosen} − 1{fires on rejected}; pairs that share a
prompt are averaged into one unit; tests are vectorised over all concepts and topics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .artifacts import RunDir, atomic_path, atomic_write_json, content_hash, read_json
from .concepts import ConceptConfig, cluster_features, membership_matrix
from .extract import EDGES, FeatureStore
from .stats import bh_qvalues, group_means, length_controlled, length_placebo, length_regressors, paired_test, split_half_agreement, welch_inside_outside
from .textstats import text_stats
from .topics import TopicConfig, cluster_prompts

__all__ = ["HypothesizeConfig", "Hypotheses", "PairFeatures", "hypothesize", "score_concepts", "STAGE"]

log = logging.getLogger(__name__)
STAGE = "hypotheses"
FORMAT = 1


@dataclass
class HypothesizeConfig:
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    topics: TopicConfig = field(default_factory=TopicConfig)
    group_by_prompt: bool = True  # pairs sharing a prompt form one unit
    # the length control regresses on Δ of log length's powers 1..degree (stats.length_regressors):
    # 2 lets the saturating "fires anywhere" curve bend; 1 is the plain Δ log length
    length_control_degree: int = 2
    # placebo pairs (stats.length_placebo) that check the length control on this data; 0 = skip
    length_placebo_draws: int = 20
    # also test each concept on the responses' opening and ending tokens (views "opening" /
    # "ending"), when the feature store has them (ExtractConfig.edge_tokens)
    test_edges: bool = True
    fdr: float = 0.05
    n_splits: int = 20  # random half/half splits for the sign check
    min_topic_prompts: int = 10  # smaller topics are not tested
    label_features: int = 3  # member features whose contexts label a concept
    promoted_tokens: int = 8
    linear_baseline: bool = True
    explain_top: int = 10  # with an explainer: how many top concepts get an LLM explanation
    fidelity_texts: int = 40  # held-out responses (half firing, half not) to score each explanation
    seed: int = 0


@dataclass
class PairFeatures:
    """What stage 2 needs from stage 1, in memory: binary firing per response side, lengths,
    prompt groups, prompt features and texts. Built from a FeatureStore or assembled directly."""

    fires_chosen: sp.csr_matrix  # n_pairs × d_sae, 0/1
    fires_rejected: sp.csr_matrix
    ntok: np.ndarray  # n_pairs × 2 (chosen, rejected) response token counts
    groups: np.ndarray  # n_pairs: distinct-prompt index
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    prompt_features: sp.csr_matrix | None = None  # n_pairs × d_sae (mean over prompt contents)
    # per response edge ("opening" / "ending": the first / last ExtractConfig.edge_tokens tokens),
    # binary firing there as (chosen, rejected); empty for stores written without edges
    edges: dict[str, tuple[sp.csr_matrix, sp.csr_matrix]] = field(default_factory=dict)

    @classmethod
    def from_store(cls, store: FeatureStore) -> "PairFeatures":
        pairs = store.pairs()
        prompts = []
        for p in pairs:
            users = [m["content"] for m in p["prompt"] if m["role"] == "user"]
            prompts.append(users[-1] if users else p["prompt"][-1]["content"])
        has_prompts = (store.path / "prompt_indptr.npy").exists()
        return cls(
            fires_chosen=store.pooled("fires", "chosen").tocsr(),
            fires_rejected=store.pooled("fires", "rejected").tocsr(),
            ntok=store.token_counts().astype(np.int64),
            groups=store.prompt_groups(),
            prompts=prompts,
            chosen=[p["chosen"] for p in pairs],
            rejected=[p["rejected"] for p in pairs],
            prompt_features=store.pooled("mean", prefix="prompt").tocsr() if has_prompts else None,
            edges={edge: (store.pooled("fires", "chosen", prefix=f"resp_{edge}").tocsr(), store.pooled("fires", "rejected", prefix=f"resp_{edge}").tocsr()) for edge in store.edges},
        )

    @property
    def n_pairs(self) -> int:
        return self.fires_chosen.shape[0]

    @property
    def d_sae(self) -> int:
        return self.fires_chosen.shape[1]


def concept_activity(pf: PairFeatures, labels: np.ndarray, edge: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per pair and concept, the fraction of the concept's features firing on chosen / rejected:
    anywhere in the response, or with ``edge`` only in its opening / ending tokens."""
    M = membership_matrix(labels)
    Fc, Fr = pf.edges[edge] if edge else (pf.fires_chosen, pf.fires_rejected)
    return (np.asarray((Fc.astype(np.float64) @ M).todense()), np.asarray((Fr.astype(np.float64) @ M).todense()))


def length_diffs(ntok: np.ndarray, groups: np.ndarray | None, degree: int) -> np.ndarray:
    """Per unit (prompt group, or pair), the regressors of the length control: chosen − rejected
    differences of powers of log token count (``stats.length_regressors``)."""
    return group_means(length_regressors(np.log(np.maximum(ntok, 1)), degree), groups)


def _stat_columns(prefix: str, t) -> dict[str, np.ndarray]:
    return {f"{prefix}mean_diff": t.mean, f"{prefix}cohens_d": t.cohens_d, f"{prefix}t": t.t, f"{prefix}p": t.p}


def score_concepts(pf: PairFeatures, labels: np.ndarray, cfg: HypothesizeConfig, topic_of_group: np.ndarray | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The statistics of every concept (overall, and inside vs outside each topic) and of every
    feature. Returns (hypotheses without labels, per-feature table)."""
    Fc, Fr = pf.fires_chosen.astype(np.float64), pf.fires_rejected.astype(np.float64)
    Uc, Ur = concept_activity(pf, labels)
    n_concepts = Uc.shape[1]
    D = Uc - Ur  # per pair, per concept: signed difference of member-feature firing
    groups = pf.groups if cfg.group_by_prompt else None
    Du = group_means(D, groups)
    len_diff = length_diffs(pf.ntok, groups, cfg.length_control_degree)
    overall = paired_test(Du)
    lc = length_controlled(Du, len_diff)
    split = split_half_agreement(Du, cfg.n_splits, cfg.seed)
    sizes = np.bincount(labels[labels >= 0], minlength=n_concepts)
    members = [np.flatnonzero(labels == c).tolist() for c in range(n_concepts)]
    base = pd.DataFrame({
        "concept": np.arange(n_concepts),
        "n_features": sizes,
        "features": members,
        "chosen_rate": (Uc > 0).mean(0),
        "rejected_rate": (Ur > 0).mean(0),
        "chosen_activity": Uc.mean(0),
        "rejected_activity": Ur.mean(0),
    })
    rows = base.assign(view="overall", topic=-1, n_units=overall.n, **_stat_columns("", overall), split_half_agreement=split, **_stat_columns("length_controlled_", lc))
    frames = [rows]
    if cfg.test_edges:
        # Where in the response: an opener or a sign-off lives in a few edge tokens, where the
        # concept's generic features rarely fire otherwise; "anywhere" dilutes it with the rest
        # of the response (README, benchmark). Same concepts, same family of tests.
        for edge in pf.edges:
            Ec, Er = concept_activity(pf, labels, edge)
            De = group_means(Ec - Er, groups)
            rates = dict(chosen_rate=(Ec > 0).mean(0), rejected_rate=(Er > 0).mean(0), chosen_activity=Ec.mean(0), rejected_activity=Er.mean(0))
            stats = {**_stat_columns("", paired_test(De)), **_stat_columns("length_controlled_", length_controlled(De, len_diff))}
            frames.append(base.assign(view=edge, topic=-1, n_units=len(De), split_half_agreement=split_half_agreement(De, cfg.n_splits, cfg.seed), **rates, **stats))
    if topic_of_group is not None:
        unit_topic = topic_of_group if cfg.group_by_prompt else topic_of_group[pf.groups]
        for k in np.unique(unit_topic):
            inside = unit_topic == k
            if inside.sum() < cfg.min_topic_prompts or (~inside).sum() < cfg.min_topic_prompts:
                continue
            w = welch_inside_outside(Du, inside)
            lc_in = length_controlled(Du[inside], len_diff[inside])
            split_in = split_half_agreement(Du[inside], cfg.n_splits, cfg.seed)
            frames.append(base.assign(view="topic", topic=int(k), n_units=int(inside.sum()), **_stat_columns("", w), inside_mean_diff=Du[inside].mean(0), split_half_agreement=split_in, **_stat_columns("length_controlled_", lc_in)))
    table = pd.concat(frames, ignore_index=True)
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
    # per-feature tests: a separate family, for drill-downs and for comparison with concepts
    Dfeat = group_means((Fc - Fr), groups)
    ft = paired_test(Dfeat)
    support = np.asarray((Fc + Fr).sum(0)).ravel()
    features = pd.DataFrame({"feature": np.arange(pf.d_sae), "concept": labels, "support": support, "chosen_rate": np.asarray(Fc.mean(0)).ravel(), "rejected_rate": np.asarray(Fr.mean(0)).ravel(), **_stat_columns("", ft)})
    testable = support > 0
    features["q"] = np.nan
    features.loc[testable, "q"] = bh_qvalues(features.loc[testable, "p"].to_numpy())
    return table, features


def _rank(table: pd.DataFrame) -> pd.DataFrame:
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
    """
    lc = table["length_controlled_cohens_d"].abs().fillna(0.0)
    key = table.assign(_sig=~table["significant"], _d=-lc, _p=table["p"])
    return table.loc[key.sort_values(["_sig", "_d", "_p"], kind="stable").index]


# --- labels ----------------------------------------------------------------------------------------


def _text_stat_labels(pf: PairFeatures, labels: np.ndarray, stats_df: pd.DataFrame) -> list[str]:
    """Per concept, the text statistics its activity correlates with most (Pearson over responses)."""
    U = np.vstack(concept_activity(pf, labels))
    S = stats_df.to_numpy(dtype=np.float64)
    Zu = (U - U.mean(0)) / np.where(U.std(0) > 0, U.std(0), 1)
    Zs = (S - S.mean(0)) / np.where(S.std(0) > 0, S.std(0), 1)
    R = Zu.T @ Zs / len(U)
    names = list(stats_df.columns)
    out = []
    for c in range(R.shape[0]):
        top = np.argsort(-np.abs(R[c]))[:2]
        out.append(", ".join(f"{'+' if R[c, j] > 0 else '−'}{names[j]} (r={R[c, j]:.2f})" for j in top if abs(R[c, j]) >= 0.1))
    return out


def _context_labels(store: FeatureStore | None, features: pd.DataFrame, labels: np.ndarray, n_features: int) -> tuple[list[str], list[list[dict]]]:
    """Per concept: the tokens its most frequent members peak on, and a few top contexts."""
    n_concepts = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if store is None:
        return [""] * n_concepts, [[] for _ in range(n_concepts)]
    support = features["support"].to_numpy()
    peaks, contexts = [], []
    for c in range(n_concepts):
        members = np.flatnonzero(labels == c)
        top = members[np.argsort(-support[members])[:n_features]]
        tokens: Counter = Counter()
        ctx = []
        for f in top:
            for i, hit in enumerate(store.top_contexts(int(f), n=8, window=8)):
                tokens[hit["tokens"][hit["peak"]].strip() or repr(hit["tokens"][hit["peak"]])] += 1
                if i < 2:
                    ctx.append({**hit, "feature": int(f)})
        peaks.append(" · ".join(t for t, _ in tokens.most_common(5)))
        contexts.append(ctx)
    return peaks, contexts


def promoted_tokens(sae, lm, labels: np.ndarray, n: int) -> list[str]:
    """Per concept, the tokens its mean decoder direction promotes through the unembedding."""
    import torch

    n_concepts = int(labels.max()) + 1 if (labels >= 0).any() else 0
    W_dec = sae.decoder_directions.float().cpu()
    W_U = lm.model.get_output_embeddings().weight.detach().float().cpu()
    norm = getattr(getattr(lm.model, "model", lm.model), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        W_U = W_U * norm.weight.detach().float().cpu()
    M = torch.from_numpy(membership_matrix(labels).T.toarray()).float()  # C × d_sae
    dirs = torch.nn.functional.normalize(M @ W_dec, dim=-1)
    logits = dirs @ W_U.T
    top = logits.topk(n, dim=-1).indices
    tok = lm.tokenizer
    return [" · ".join(repr(tok.decode([int(t)]))[1:-1] for t in top[c]) for c in range(n_concepts)]


# --- baselines ---------------------------------------------------------------------------------------


def text_stat_baseline(pf: PairFeatures, cfg: HypothesizeConfig, stats_c: pd.DataFrame, stats_r: pd.DataFrame) -> pd.DataFrame:
    D = stats_c.to_numpy(np.float64) - stats_r.to_numpy(np.float64)
    Du = group_means(D, pf.groups if cfg.group_by_prompt else None)
    t = paired_test(Du)
    out = pd.DataFrame({"statistic": list(stats_c.columns), "chosen_mean": stats_c.mean().to_numpy(), "rejected_mean": stats_r.mean().to_numpy(), **_stat_columns("", t)})
    out["q"] = bh_qvalues(out["p"].to_numpy())
    return out.sort_values("p").reset_index(drop=True)


def linear_baseline(pf: PairFeatures, labels: np.ndarray, cfg: HypothesizeConfig, top: int = 30) -> tuple[pd.DataFrame, dict]:
    """L1-logistic regression predicting which side is chosen from per-pair feature differences.

    Each pair enters once, randomly oriented (chosen − rejected → 1, or rejected − chosen → 0), so
    the classifier cannot use an intercept; its largest coefficients are the features it relies on.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    X = (pf.fires_chosen.astype(np.float64) - pf.fires_rejected.astype(np.float64)).tocsr()
    rng = np.random.default_rng(cfg.seed)
    y = rng.integers(0, 2, X.shape[0])
    X = sp.diags(np.where(y == 1, 1.0, -1.0)) @ X
    clf = LogisticRegression(l1_ratio=1.0, C=0.1, solver="liblinear", fit_intercept=False, max_iter=2000)
    folds = int(min(5, max(2, X.shape[0] // 20)))
    acc = cross_val_score(clf, X, y, cv=folds, scoring="accuracy") if X.shape[0] >= 20 else np.array([np.nan])
    clf.fit(X, y)
    coef = clf.coef_.ravel()
    order = np.argsort(-np.abs(coef))[:top]
    order = order[coef[order] != 0]
    table = pd.DataFrame({"feature": order, "coefficient": coef[order], "concept": labels[order]})
    return table, {"cv_accuracy": float(np.nanmean(acc)), "folds": folds, "nonzero_coefficients": int((coef != 0).sum())}


# --- the stage -----------------------------------------------------------------------------------------


class Hypotheses:
    """The hypotheses artifact: ranked tables plus the clustering and topics behind them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_json(self.path / "manifest.json")
        self.table = pd.read_parquet(self.path / "hypotheses.parquet")
        self.features = pd.read_parquet(self.path / "features.parquet")
        self.topics = pd.read_parquet(self.path / "topics.parquet")
        self.topic_summary = pd.read_parquet(self.path / "topic_summary.parquet")
        self.baseline_text_stats = pd.read_parquet(self.path / "baseline_text_stats.parquet")
        lin = self.path / "baseline_linear.parquet"
        self.baseline_linear = pd.read_parquet(lin) if lin.exists() else None
        placebo = self.path / "length_placebo.parquet"
        self.length_placebo = pd.read_parquet(placebo) if placebo.exists() else None

    @classmethod
    def from_run(cls, run_dir: str | Path | RunDir) -> "Hypotheses":
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        return cls(run.latest(STAGE))

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

    def top(self, n: int = 20, view: str | None = "overall") -> pd.DataFrame:
        t = self.table if view is None else self.table[self.table["view"] == view]
        return t.head(n)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Hypotheses({m['n_concepts']} concepts, {m['n_topics']} topics, {m['n_significant']} significant at q<{m['config']['fdr']}, path={str(self.path)!r})"


def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def hypothesize(
    run_dir: str | Path | RunDir,
    config: HypothesizeConfig | None = None,
    *,
    store: FeatureStore | None = None,
    model: Any = None,
    sae: Any = None,
    explainer: Any = None,
) -> Hypotheses:
    """Cluster, test and label; write (or reuse) ``run_dir/hypotheses/<key>``.

    ``store`` defaults to the run's latest feature store. ``model``/``sae`` (LoadedModel /
    LoadedSAE) enable promoted-token labels; by default they are loaded by the names the store
    recorded, and the labels are skipped (and the manifest says why) when that fails.
    ``explainer`` (an ``explain.ExplainerBackend``) adds an LLM explanation and its fidelity on
    held-out responses to the ``explain_top`` strongest concepts.
    """
    cfg = config or HypothesizeConfig()
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    store = store or FeatureStore.from_run(run)
    key = content_hash(FORMAT, store.manifest["key"], asdict(cfg), _describe(explainer))
    out = run.artifact_dir(STAGE, key)
    if (out / "manifest.json").exists():
        run.record(STAGE, key)
        return Hypotheses(out)
    t0 = time.time()
    pf = PairFeatures.from_store(store)
    labels = cluster_features(sp.vstack([pf.fires_chosen, pf.fires_rejected]), cfg.concepts)
    # topics over distinct prompts
    first_pair = pd.Series(np.arange(pf.n_pairs)).groupby(pf.groups).first().to_numpy()
    prompt_feats = pf.prompt_features[first_pair] if pf.prompt_features is not None else None
    topics = cluster_prompts(prompt_feats, [pf.prompts[i] for i in first_pair], cfg.topics)
    table, features = score_concepts(pf, labels, cfg, topics.labels)
    # labels
    stats_c, stats_r = text_stats(pf.chosen), text_stats(pf.rejected)
    stat_label = _text_stat_labels(pf, labels, pd.concat([stats_c, stats_r], ignore_index=True))
    peaks, contexts = _context_labels(store, features, labels, cfg.label_features)
    promoted, promoted_note = [""] * len(stat_label), "not computed"
    if cfg.promoted_tokens > 0 and len(stat_label):
        try:
            from .models import load_model
            from .sae import load_sae

            lm = model or load_model(store.manifest["model"]["name"])
            sae_ = sae or load_sae(store.manifest["sae"]["name"], device="cpu")
            promoted, promoted_note = promoted_tokens(sae_, lm, labels, cfg.promoted_tokens), "ok"
        except Exception as exc:  # labels are optional; say why they are missing
            promoted_note = f"unavailable: {type(exc).__name__}: {exc}"
            log.warning("promoted tokens %s", promoted_note)
    lab = pd.DataFrame({"concept": np.arange(len(stat_label)), "peak_tokens": peaks, "promoted_tokens": promoted, "text_stats": stat_label, "example_contexts": [[{k: v for k, v in c.items()} for c in cs] for cs in contexts]})
    lab["label"] = [_short_label(p, s) for p, s in zip(peaks, stat_label)]
    table = table.merge(lab, on="concept", how="left")
    topic_words = dict(zip(topics.summary["topic"], topics.summary["top_words"]))
    table["topic_label"] = table["topic"].map(lambda t: "all prompts" if t < 0 else topic_words.get(t, ""))
    table = _rank(table).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    if explainer is not None:
        table = _add_explanations(table, pf, labels, explainer, cfg)
    base_text = text_stat_baseline(pf, cfg, stats_c, stats_r)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.linear_baseline and pf.n_pairs >= 10:
        lin, lin_info = linear_baseline(pf, labels, cfg)
        _write_parquet(out / "baseline_linear.parquet", lin)
    else:
        lin_info = {"skipped": "fewer than 10 pairs" if pf.n_pairs < 10 else "disabled"}
    _write_parquet(out / "hypotheses.parquet", table)
    _write_parquet(out / "features.parquet", features)
    _write_parquet(out / "topics.parquet", pd.DataFrame({"prompt_group": np.arange(len(topics.labels)), "topic": topics.labels, "prompt": [pf.prompts[i] for i in first_pair]}))
    _write_parquet(out / "topic_summary.parquet", topics.summary)
    _write_parquet(out / "baseline_text_stats.parquet", base_text)
    placebo_info = {"skipped": "length_placebo_draws = 0"}
    if cfg.length_placebo_draws > 0 and pf.n_pairs >= 8:
        views = [None, *(pf.edges if cfg.test_edges else ())]
        placebo = pd.concat([length_placebo(*concept_activity(pf, labels, v), pf.ntok, degrees=(0, cfg.length_control_degree), draws=cfg.length_placebo_draws, seed=cfg.seed).assign(view=v or "overall") for v in views], ignore_index=True)
        _write_parquet(out / "length_placebo.parquet", placebo)
        placebo_info = _placebo_summary(placebo, cfg.length_control_degree)
        if not placebo_info["calibrated"]:
            log.warning("the length control looks miscalibrated on this data: in placebo pairs that differ only in length, %.0f %% of concept tests have p < 0.05 (expected ~5 %%); length-controlled effects may still carry length", 100 * placebo_info["frac_p05_controlled"])
    overall = table[table["view"] == "overall"]
    manifest = {
        "format": FORMAT,
        "key": key,
        "features_key": store.manifest["key"],
        "config": asdict(cfg),
        "n_pairs": pf.n_pairs,
        "n_units": int(len(np.unique(pf.groups))) if cfg.group_by_prompt else pf.n_pairs,
        "n_concepts": int(len(overall)),
        "n_features_tested": int((labels >= 0).sum()),
        "n_topics": int(len(topics.summary)),
        "n_tests": int(len(table)),
        "n_significant": int(table["significant"].sum()),
        "n_significant_overall": int(overall["significant"].sum()),
        "promoted_tokens": promoted_note,
        "linear_baseline": lin_info,
        "length_placebo": placebo_info,
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(out / "manifest.json", manifest)
    run.record(STAGE, key)
    return Hypotheses(out)


def _placebo_summary(placebo: pd.DataFrame, degree: int, tolerance: float = 0.10) -> dict[str, Any]:
    """The manifest's verdict: calibrated when, on both sides and in every view, at most
    ``tolerance`` (twice the nominal 5 %) of placebo tests reach p < 0.05 under the configured
    control."""
    by = placebo.groupby(["side", "degree"])["frac_p05"].max()
    controlled = float(by.xs(degree, level="degree").max())
    return {"degree": degree, "frac_p05_controlled": round(controlled, 4), "frac_p05_uncontrolled": round(float(by.xs(0, level="degree").max()), 4), "calibrated": controlled <= tolerance}


def _short_label(peaks: str, stats: str) -> str:
    parts = []
    if peaks:
        parts.append(f"peaks on {peaks}")
    if stats:
        parts.append(f"tracks {stats}")
    return "; ".join(parts)


def _describe(explainer: Any) -> Any:
    if explainer is None:
        return None
    fields = {k: v for k, v in vars(explainer).items() if isinstance(v, (str, int, float))} if hasattr(explainer, "__dict__") else {}
    lm = getattr(explainer, "lm", None)
    if lm is not None:
        fields["model"] = getattr(lm, "fingerprint", repr(lm))
    return {"backend": type(explainer).__name__, **fields}


def _add_explanations(table: pd.DataFrame, pf: PairFeatures, labels: np.ndarray, explainer: Any, cfg: HypothesizeConfig) -> pd.DataFrame:
    """LLM explanation + fidelity for the strongest overall concepts.

    The explanation sees the concept's top contexts and a few non-firing responses; fidelity is
    scored on other responses, half where the concept fires and half where it does not."""
    from .explain import explain_concept, fidelity

    rng = np.random.default_rng(cfg.seed)
    U = np.vstack(concept_activity(pf, labels))
    texts = pf.chosen + pf.rejected
    table = table.copy()
    table["llm_explanation"], table["llm_fidelity_auroc"], table["llm_fidelity_accuracy"] = "", np.nan, np.nan
    top = table[table["view"] == "overall"].head(cfg.explain_top)
    for idx, row in top.iterrows():
        fired = U[:, int(row["concept"])] > 0
        on, off = rng.permutation(np.flatnonzero(fired)), rng.permutation(np.flatnonzero(~fired))
        half = cfg.fidelity_texts // 2
        shown_off = off[:3]
        held = np.concatenate([on[:half], off[3 : 3 + half]])
        expl = explain_concept(explainer, list(row["example_contexts"])[:6], [texts[i] for i in shown_off])
        score = fidelity(explainer, expl, [texts[i] for i in held], fired[held])
        table.loc[idx, ["llm_explanation", "llm_fidelity_auroc", "llm_fidelity_accuracy"]] = [expl, score["auroc"], score["accuracy"]]
    return table
