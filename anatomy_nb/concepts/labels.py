"""Names for concepts a person can read: the tokens their features peak on, the text statistics
their activity tracks, a few contexts, and optionally an LLM explanation scored for fidelity.
(Promoted tokens through the unembedding need the model: ``lm.ops.promoted_tokens``.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..config import HypothesizeConfig
from ..results.extract import FeatureStore
from .explain import (
    ExplainerBackend,
    complete_all,
    explanation_prompt,
    fidelity_prompts,
    fidelity_scores,
    parse_explanation,
)

__all__ = ["add_explanations", "context_labels", "describe_explainer", "short_label", "text_stat_labels"]


def text_stat_labels(U: np.ndarray | sp.spmatrix, stats_df: pd.DataFrame) -> list[str]:
    """Per concept, the text statistics its activity correlates with most (Pearson over responses).
    ``U``: responses × concepts activity (dense or sparse: only column sums and one sparse
    product are taken); ``stats_df``: the same responses' text statistics."""
    S = stats_df.to_numpy(dtype=np.float64)
    n = S.shape[0]
    mean_u = np.asarray(U.sum(0)).ravel() / n
    if sp.issparse(U):
        sq_u = np.asarray(U.multiply(U).sum(0)).ravel() / n
        var_u = np.maximum(sq_u - mean_u**2, 0.0)
        sd_u = np.sqrt(np.where(var_u <= 1e-12 * sq_u, 0.0, var_u))
    else:
        sd_u = U.std(0)
    mean_s, sd_s = S.mean(0), S.std(0)
    cross = np.asarray(U.T @ S) / n  # E[u s]
    R = (cross - np.outer(mean_u, mean_s)) / np.outer(np.where(sd_u > 0, sd_u, 1), np.where(sd_s > 0, sd_s, 1))
    R[sd_u == 0] = 0.0
    names = list(stats_df.columns)
    out = []
    for c in range(R.shape[0]):
        top = [j for j in np.argsort(-np.abs(R[c]))[:2] if abs(R[c, j]) >= 0.1]
        out.append(", ".join(f"{'+' if R[c, j] > 0 else '−'}{names[j]} (r={R[c, j]:.2f})" for j in top))
    return out


def context_labels(
    store: FeatureStore | None, features: pd.DataFrame, labels: np.ndarray, n_features: int
) -> tuple[list[str], list[list[dict]]]:
    """Per concept: the tokens its most frequent members peak on, and a few top contexts."""
    n_concepts = int(labels.max()) + 1 if (labels >= 0).any() else 0
    if store is None:
        return [""] * n_concepts, [[] for _ in range(n_concepts)]
    support = features["support"].to_numpy()
    feats = np.flatnonzero(labels >= 0)
    feats = feats[np.lexsort((-support[feats], labels[feats]))]  # by concept, most frequent first
    starts = np.searchsorted(labels[feats], np.arange(n_concepts + 1))
    peaks, contexts = [], []
    for c in range(n_concepts):
        top = feats[starts[c] : starts[c + 1]][:n_features]
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


def short_label(peaks: str, stats: str, name: str = "") -> str:
    """The concept's label: its distinctive phrases first (``concepts.phrases``), then the tokens
    it peaks on and the text statistics it tracks."""
    parts = [name] if name else []
    if peaks:
        parts.append(f"peaks on {peaks}")
    if stats:
        parts.append(f"tracks {stats}")
    return "; ".join(parts)


def describe_explainer(explainer: ExplainerBackend | None) -> dict | None:
    """What identifies an explainer in stage 2's key (backend, model, endpoint; never a key)."""
    if explainer is None:
        return None
    fields = (
        {k: v for k, v in vars(explainer).items() if isinstance(v, (str, int, float))}
        if hasattr(explainer, "__dict__")
        else {}
    )
    lm = getattr(explainer, "lm", None)
    if lm is not None:
        fields["model"] = getattr(lm, "fingerprint", repr(lm))
    return {"backend": type(explainer).__name__, **fields}


def add_explanations(
    table: pd.DataFrame, U: np.ndarray, texts: Sequence[str], explainer: ExplainerBackend, cfg: HypothesizeConfig
) -> pd.DataFrame:
    """LLM explanation + fidelity for the strongest overall concepts (``U``: responses × concepts
    activity of the responses ``texts``).

    The explanation sees the concept's top contexts and a few non-firing responses; fidelity is
    scored on other responses, half where the concept fires and half where it does not. All the
    explanations go out as one batch, then all the fidelity questions as another."""
    rng = np.random.default_rng(cfg.seed)
    table = table.copy()
    table["llm_explanation"], table["llm_fidelity_auroc"], table["llm_fidelity_accuracy"] = "", np.nan, np.nan
    top = table[table["view"] == "overall"].head(cfg.explain_top)
    U = sp.csc_matrix(U) if sp.issparse(U) else U
    plans = []
    for idx, row in top.iterrows():
        column = U[:, int(row["concept"])]
        fired = np.asarray(column.todense() if sp.issparse(column) else column).ravel() > 0
        on, off = rng.permutation(np.flatnonzero(fired)), rng.permutation(np.flatnonzero(~fired))
        half = cfg.fidelity_texts // 2
        held = np.concatenate([on[:half], off[3 : 3 + half]])
        plans.append(
            (idx, explanation_prompt(list(row["example_contexts"])[:6], [texts[i] for i in off[:3]]), held, fired[held])
        )
    explanations = [parse_explanation(a) for a in complete_all(explainer, [p for _, p, _, _ in plans], 32)]
    questions = [fidelity_prompts(e, [texts[i] for i in held]) for e, (_, _, held, _) in zip(explanations, plans)]
    answers = iter(complete_all(explainer, [q for qs in questions for q in qs], 3))
    for (idx, _, _, truth), expl, qs in zip(plans, explanations, questions):
        score = fidelity_scores(expl, [next(answers) for _ in qs], truth)
        table.loc[idx, ["llm_explanation", "llm_fidelity_auroc", "llm_fidelity_accuracy"]] = [
            expl,
            score["auroc"],
            score["accuracy"],
        ]
    return table
