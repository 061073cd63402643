"""What the stage-3 viewer shows, computed in Python (no torch, no widgets): the two maps, the
ranked signals of every concept (re-scored inside a selection of pairs), one concept's drilldown,
and the static HTML views shown where there is no kernel (exported notebooks, the report).
Dataset text is escaped in every HTML view (``viz.escape_text``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD

from ..config import MapConfig
from ..core.files import atomic_write_json, content_hash, read_json
from ..results.extract import FeatureStore
from ..results.hypothesize import Hypotheses, rank_hypotheses, split_half_mark
from ..results.run import RunDir, RunLike
from ..stages.prediction import ConceptSpace
from .viz import escape_text, html_table

__all__ = ["MapConfig", "ViewerData", "compute_maps", "json_float", "static_drilldown_html", "static_signals_html"]

TEXT_CHARS = 1500  # longest response text sent to the browser per example pair
TOPIC_COLORS = [
    "#1971c2",
    "#e8590c",
    "#2f9e44",
    "#9c36b5",
    "#f08c00",
    "#0c8599",
    "#c2255c",
    "#5c940d",
    "#6741d9",
    "#495057",
    "#d6336c",
    "#087f5b",
]


# --- maps ----------------------------------------------------------------------------------------


def _embed(X, cfg: MapConfig, metric: str) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of X (dense or sparse), scaled to [0, 1]."""
    n = X.shape[0]
    if n == 0:
        return np.zeros((0, 2)), "empty"
    method = cfg.method
    if method == "auto":
        method = "umap" if n >= cfg.umap_min_points else "svd"
    if method == "umap" and n > 3:
        import umap  # numba compiles on first import (~30 s): only when a map needs it

        reducer = umap.UMAP(
            n_neighbors=min(cfg.n_neighbors, n - 1),
            min_dist=cfg.min_dist,
            metric=metric,
            random_state=cfg.seed,
            n_jobs=1,
        )
        xy = reducer.fit_transform(X.astype(np.float32) if sp.issparse(X) else np.asarray(X, np.float32))
    else:
        method = "svd"
        Xd = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
        Xd = Xd - Xd.mean(0)
        k = min(2, max(1, min(Xd.shape) - 1))
        if min(Xd.shape) >= 2 and np.abs(Xd).sum() > 0:
            xy = TruncatedSVD(n_components=k, random_state=cfg.seed).fit_transform(Xd)
        else:
            xy = np.zeros((n, 1))
        if xy.shape[1] < 2:
            xy = np.column_stack([xy[:, 0], np.random.default_rng(cfg.seed).normal(size=n) * 1e-3])
    xy = np.asarray(xy, np.float64)
    lo, hi = xy.min(0), xy.max(0)
    return (xy - lo) / np.where(hi > lo, hi - lo, 1.0), method


def compute_maps(
    run: RunLike, hyp: Hypotheses | None = None, store: FeatureStore | None = None, cfg: MapConfig | None = None
) -> dict[str, Any]:
    """The two map layouts, cached in ``run_dir/cache/maps/<key>/`` (keyed on the hypotheses and config).

    Data map: one point per pair, placed by its prompt's mean SAE features (or, without stored
    prompts, its responses' firing). Feature map: one point per tested feature, placed by its
    co-firing over all responses (cosine), so concepts appear as neighbourhoods."""
    cfg = MapConfig.from_dict(cfg)
    run = RunDir.of(run)
    hyp = hyp or run.hypotheses
    out = run.cache_dir / "maps" / content_hash("maps-1", hyp.manifest["key"], cfg.to_dict())
    if (out / "maps.json").exists():
        return read_json(out / "maps.json")
    store = store or run.store
    fc, fr = store.pooled("fires", "chosen").tocsr(), store.pooled("fires", "rejected").tocsr()
    if store.has_prompts:
        Xd = store.pooled("mean", prefix="prompt").tocsr()
    else:
        Xd = (fc + fr).tocsr()
    data_xy, data_method = _embed(Xd, cfg, "cosine")
    labels = hyp.feature_labels(store.d_sae)
    live = np.flatnonzero(labels >= 0)
    F = sp.vstack([fc, fr]).T.tocsr()[live]
    feat_xy, feat_method = _embed(F, cfg, "cosine")
    topic_of_group = dict(zip(hyp.topics["prompt_group"].astype(int), hyp.topics["topic"].astype(int)))
    groups = store.prompt_groups()
    maps = {
        "key": out.name,
        "data": {
            "x": data_xy[:, 0].round(5).tolist(),
            "y": data_xy[:, 1].round(5).tolist(),
            "topic": [int(topic_of_group.get(int(g), -1)) for g in groups],
            "method": data_method,
        },
        "features": {
            "x": feat_xy[:, 0].round(5).tolist(),
            "y": feat_xy[:, 1].round(5).tolist(),
            "feature": live.tolist(),
            "concept": labels[live].tolist(),
            "support": hyp.features["support"].to_numpy()[live].astype(float).tolist(),
            "method": feat_method,
        },
    }
    atomic_write_json(out / "maps.json", maps)
    return maps


# --- the data behind the views -------------------------------------------------------------------------


def json_float(v: Any, default: float = float("nan")) -> float | None:
    """A JSON-safe float (NaN/inf → None)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = default
    return x if np.isfinite(x) else None


class ViewerData:
    """Everything the viewer shows, loaded once from a run directory."""

    def __init__(
        self,
        run: RunLike,
        hyp: Hypotheses | None = None,
        store: FeatureStore | None = None,
        maps: MapConfig | dict | None = None,
    ):
        self.run = RunDir.of(run)
        self.run_dir = self.run.path
        self.hyp = hyp or self.run.hypotheses
        self.store = store or self.run.store
        self.space = ConceptSpace.from_run(self.run, self.hyp, self.store)
        self.maps = (
            maps if isinstance(maps, dict) and "data" in maps else compute_maps(self.run, self.hyp, self.store, maps)
        )
        self.pairs = self.store.pairs()
        self.prompts = [p.prompt_text for p in self.pairs]
        self.topic_of_pair = np.asarray(self.maps["data"]["topic"], dtype=int)

    # ranked signals ---------------------------------------------------------------------------------

    def concept_rows(self, pairs: np.ndarray | list[int] | None = None) -> list[dict]:
        """The ranked signals: every concept scored on ``pairs`` (None: all), strongest first."""
        sc = self.space.rescore(pairs)
        ov = self.space.concepts.set_index("concept")
        rows = []
        for r in sc.itertuples():
            o = ov.loc[r.concept]
            rows.append(
                {
                    "concept": int(r.concept),
                    "label": str(r.label),
                    "n_features": int(o["n_features"]),
                    "mean_diff": json_float(r.mean_diff),
                    "ci_low": json_float(r.ci_low),
                    "ci_high": json_float(r.ci_high),
                    "cohens_d": json_float(r.cohens_d),
                    "p": json_float(r.p),
                    "badge": r.badge,
                    "n_units": int(r.n_units),
                    "chosen_rate": json_float(r.chosen_rate),
                    "rejected_rate": json_float(r.rejected_rate),
                    "q": json_float(o["q"]) if pairs is None else None,
                    "significant": bool(o["significant"]) if pairs is None else bool(r.p < 0.05),
                    "z": json_float(r.z),
                    "split_half": json_float(o["split_half_agreement"]),
                    "split_mark": split_half_mark(json_float(o["split_half_agreement"])),
                    "length_controlled_d": json_float(r.length_controlled_cohens_d),
                    "predicted_direction": str(o["predicted_direction"])
                    if pairs is None
                    else ("up" if r.ci_low > 0 else "down" if r.ci_high < 0 else "none"),
                }
            )
        # stage 2's order: significant first, then the effect at equal lengths
        order = rank_hypotheses(
            pd.DataFrame(
                {
                    "significant": [r["significant"] for r in rows],
                    "length_controlled_cohens_d": [
                        np.nan if r["length_controlled_d"] is None else r["length_controlled_d"] for r in rows
                    ],
                    "cohens_d": [np.nan if r["cohens_d"] is None else r["cohens_d"] for r in rows],
                    "p": [np.nan if r["p"] is None else r["p"] for r in rows],
                }
            )
        ).index
        return [{**rows[i], "rank": k} for k, i in enumerate(order, start=1)]

    def view_rows(self, n: int = 300) -> dict[str, list[dict]]:
        """Stage 2's other views, ranked and not re-scored: the topic × concept signals and each
        concept on the responses' opening and ending tokens (``n`` strongest of each)."""
        views = {"topic": self.hyp.ranked_by_topic()}
        ranked = self.hyp.ranked()
        views.update({e: ranked[ranked["view"] == e] for e in ("opening", "ending")})
        out = {}
        for name, t in views.items():
            out[name] = [
                {
                    "rank": k,
                    "concept": int(r.concept),
                    "where": str(r.where),
                    "topic": int(getattr(r, "topic", -1)),
                    "label": str(r.label),
                    "mean_diff": json_float(r.mean_diff),
                    "ci_low": json_float(getattr(r, "ci_low", None)),
                    "ci_high": json_float(getattr(r, "ci_high", None)),
                    "z": json_float(getattr(r, "z", None)),
                    "q": json_float(r.q),
                    "significant": bool(r.significant),
                    "split_half": json_float(r.split_half_agreement),
                    "split_mark": split_half_mark(json_float(r.split_half_agreement)),
                    "chosen_rate": json_float(r.chosen_rate),
                    "rejected_rate": json_float(r.rejected_rate),
                }
                for k, r in enumerate(t.head(n).itertuples(), start=1)
            ]
        return out

    def topic_list(self) -> list[dict]:
        s = self.hyp.topic_summary
        counts = np.bincount(
            self.topic_of_pair[self.topic_of_pair >= 0], minlength=int(s["topic"].max()) + 1 if len(s) else 0
        )
        words = s["top_words"] if "top_words" in s else [""] * len(s)
        return [
            {
                "topic": int(t),
                "label": str(w),
                "n_pairs": int(counts[int(t)]) if int(t) < len(counts) else 0,
                "color": TOPIC_COLORS[int(t) % len(TOPIC_COLORS)],
            }
            for t, w in zip(s["topic"], words)
        ]

    # drilldown ------------------------------------------------------------------------------------------

    def pair_effect(self, concept: int) -> list[float]:
        j = self._col(concept)
        return (self.space.chosen[:, j] - self.space.rejected[:, j]).round(4).tolist()

    def _col(self, concept: int) -> int:
        hits = np.flatnonzero(self.space.concepts["concept"].to_numpy() == int(concept))
        if not len(hits):
            raise KeyError(f"concept {concept} is not in the hypotheses table")
        return int(hits[0])

    def drilldown(
        self, concept: int, pairs: np.ndarray | list[int] | None = None, n_contexts: int = 8, n_examples: int = 3
    ) -> dict:
        """One concept, in full: label and statistics (overall and in the current selection), top
        contexts with the peak token marked, activity histograms chosen vs rejected, promoted
        tokens, example pairs side by side, split-half and length-control, per-topic signals."""
        j = self._col(concept)
        o = self.space.concepts.iloc[j]
        scoped = self.space.rescore(pairs).iloc[j]
        overall = self.space.rescore(None).iloc[j]
        feats = [int(f) for f in o["features"]]
        support = self.hyp.features.set_index("feature")["support"]
        top_feats = sorted(feats, key=lambda f: -float(support.get(f, 0)))[:3]
        contexts = []
        for f in top_feats:
            for hit in self.store.top_contexts(f, n=max(1, n_contexts // max(1, len(top_feats))), window=10):
                contexts.append(
                    {
                        "feature": f,
                        "pair": int(hit["pair"]),
                        "side": hit["side"],
                        "value": json_float(hit["value"]),
                        "tokens": [str(t) for t in hit["tokens"]],
                        "peak": int(hit["peak"]),
                        "activations": [json_float(a) for a in hit.get("activations", [])],
                    }
                )
        edges = np.linspace(0, 1, 21)
        uc, ur = self.space.chosen[:, j], self.space.rejected[:, j]
        hist = {
            "edges": edges.round(3).tolist(),
            "chosen": np.histogram(uc, edges)[0].tolist(),
            "rejected": np.histogram(ur, edges)[0].tolist(),
        }
        d = uc - ur
        sign = 1.0 if (overall["mean_diff"] or 0) >= 0 else -1.0
        order = np.argsort(-sign * d, kind="stable")
        examples = []
        for i in order[:n_examples]:
            if d[i] == 0:
                break
            examples.append(
                {
                    "pair": int(i),
                    "id": self.pairs[i].id,
                    "prompt": self.prompts[i][:TEXT_CHARS],
                    "chosen": self.pairs[i].chosen[:TEXT_CHARS],
                    "rejected": self.pairs[i].rejected[:TEXT_CHARS],
                    "chosen_activity": json_float(uc[i]),
                    "rejected_activity": json_float(ur[i]),
                }
            )
        bt = self.hyp.by_topic()
        bt = bt[bt["concept"] == int(concept)]
        topics = [
            {
                "topic": int(r.topic),
                "label": str(r.topic_label),
                "inside_mean_diff": json_float(getattr(r, "inside_mean_diff", np.nan)),
                "mean_diff": json_float(r.mean_diff),
                "q": json_float(r.q),
                "significant": bool(r.significant),
            }
            for r in bt.itertuples()
        ]
        return {
            "concept": int(concept),
            "label": str(o["label"]),
            "n_features": int(o["n_features"]),
            "features": feats[:50],
            "peak_tokens": str(o.get("peak_tokens", "")),
            "promoted_tokens": str(o.get("promoted_tokens", "")),
            "text_stats": str(o.get("text_stats", "")),
            "overall": {
                "mean_diff": json_float(overall["mean_diff"]),
                "ci_low": json_float(overall["ci_low"]),
                "ci_high": json_float(overall["ci_high"]),
                "cohens_d": json_float(o["cohens_d"]),
                "p": json_float(o["p"]),
                "q": json_float(o["q"]),
                "badge": overall["badge"],
                "chosen_rate": json_float(o["chosen_rate"]),
                "rejected_rate": json_float(o["rejected_rate"]),
                "significant": bool(o["significant"]),
                "predicted_direction": str(o["predicted_direction"]),
                "predicted_change": json_float(o["predicted_change"]),
            },
            "selection": None
            if pairs is None
            else {
                "n_units": int(scoped["n_units"]),
                "mean_diff": json_float(scoped["mean_diff"]),
                "ci_low": json_float(scoped["ci_low"]),
                "ci_high": json_float(scoped["ci_high"]),
                "cohens_d": json_float(scoped["cohens_d"]),
                "p": json_float(scoped["p"]),
                "badge": scoped["badge"],
            },
            "split_half": json_float(o["split_half_agreement"]),
            "length_control": {
                "mean_diff": json_float(o["length_controlled_mean_diff"]),
                "cohens_d": json_float(o["length_controlled_cohens_d"]),
                "p": json_float(o["length_controlled_p"]),
                "survives": bool(o.get("effect_survives_length_control", False)),
            },
            "contexts": contexts,
            "histogram": hist,
            "examples": examples,
            "topics": topics,
        }


# --- static views (no kernel: exported HTML, the report) ------------------------------------------------


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _shaded(token: str, peak: bool, activations: list, i: int, peak_value: float | None) -> str:
    """A token, escaped, shaded by the feature's activation on it relative to the peak's."""
    if peak:
        return f"<mark>{escape_text(token)}</mark>"
    a = activations[i] if i < len(activations) else None
    if not a or not peak_value:
        return escape_text(token)
    return f"<span style='background:rgba(255,200,0,{min(1.0, a / peak_value):.2f})'>{escape_text(token)}</span>"


def static_drilldown_html(dd: dict) -> str:
    """A drilldown as escaped HTML (what the widget shows, minus the interaction)."""
    o = dd["overall"]
    parts = [
        f"<div class='anb-static anb-drill'><h4>concept {dd['concept']} — {escape_text(dd['label'])}</h4>",
        f"<p>fires on {escape_text(o['badge'])}: mean difference {_fmt(o['mean_diff'])} [95 % {_fmt(o['ci_low'])}, "
        f"{_fmt(o['ci_high'])}], d = {_fmt(o['cohens_d'], '.2f')}, q = {_fmt(o['q'], '.2g')}; "
        f"split-half agreement {_fmt(dd['split_half'], '.2f')}; at equal length d = "
        f"{_fmt(dd['length_control']['cohens_d'], '.2f')} (p = {_fmt(dd['length_control']['p'], '.2g')})</p>",
        f"<p>promoted tokens: <code>{escape_text(dd['promoted_tokens'])}</code> · text statistics: "
        f"{escape_text(dd['text_stats'])}</p><ul>",
    ]
    for c in dd["contexts"][:6]:
        toks = "".join(
            _shaded(t, i == c["peak"], c.get("activations") or [], i, c["value"]) for i, t in enumerate(c["tokens"])
        )
        parts.append(f"<li>feature {c['feature']}, pair {c['pair']} ({escape_text(c['side'])}): {toks}</li>")
    parts.append("</ul>")
    if dd["examples"]:
        ex = pd.DataFrame([{k: e[k] for k in ("id", "prompt", "chosen", "rejected")} for e in dd["examples"]])
        parts.append(html_table(ex, max_chars=600))
    parts.append("</div>")
    return "".join(parts)


def static_signals_html(rows: list[dict], n: int = 20) -> str:
    df = pd.DataFrame(rows[:n])
    if df.empty:
        return "<p>no concepts</p>"
    for c in ("mean_diff", "ci_low", "ci_high", "cohens_d"):
        df[c] = df[c].map(lambda v: _fmt(v))
    df["z"] = df["z"].map(lambda v: _fmt(v, ".1f"))
    df["p"] = df["p"].map(lambda v: _fmt(v, ".2g"))
    df["split-half"] = [f"{m} {_fmt(v, '.2f')}" for m, v in zip(df["split_mark"], df["split_half"])]
    return html_table(
        df[
            [
                "concept",
                "badge",
                "mean_diff",
                "ci_low",
                "ci_high",
                "z",
                "cohens_d",
                "p",
                "split-half",
                "n_features",
                "label",
            ]
        ],
        max_chars=160,
    )
