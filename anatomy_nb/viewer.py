"""Stage 3, interactive: linked cluster maps, concept drilldowns, a ranked signals table, and the
concept toggles that write the intervention plan.

Two anywidget widgets (front-end in the repository's ``widgets/``, ES modules + CSS, no build
step, nothing fetched from a network):

- :class:`AuditViewer` — a map of the data (pairs placed by UMAP of their prompts' SAE features,
  coloured by topic or by the selected concept's per-pair effect) linked to a map of the features
  (UMAP of their co-firing, coloured by their concept's effect); the ranked signals table; and the
  drilldown of the selected concept. Clicking a point or a row selects a concept; a lasso on the
  data map (or choosing a topic) re-scores every concept inside that subset of pairs.
- :class:`ConceptToggles` — allow / suppress / amplify, method and strength per concept; every
  valid change is written to ``run_dir/plan.json`` at once, and the predicted change and
  spill-over (``intervene.ConceptSpace.predict``) are shown next to it.

Python computes, the browser draws. Dataset text reaches the front-end as plain strings that are
put into the page with ``textContent`` only; the static views (shown where there is no kernel,
e.g. exported HTML) escape everything through :func:`anatomy_nb.viz.escape_text`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .artifacts import RunDir, atomic_write_json, content_hash, read_json
from .intervene import DEFAULT_STRENGTH, ConceptSpace, concept_name, resolve_plan, set_choice
from .plan import ACTIONS, METHODS, PLAN_FILE, InterventionPlan, PlanError
from .viz import escape_text, html_table

__all__ = ["AuditViewer", "ConceptToggles", "MapConfig", "ViewerData", "compute_maps", "widgets_dir", "workbench"]

MAPS_STAGE = "maps"
TEXT_CHARS = 1500  # longest response text sent to the browser per example pair
TOPIC_COLORS = ["#1971c2", "#e8590c", "#2f9e44", "#9c36b5", "#f08c00", "#0c8599", "#c2255c", "#5c940d", "#6741d9", "#495057", "#d6336c", "#087f5b"]


def widgets_dir() -> Path:
    """The repository's ``widgets/`` folder (``$ANATOMY_NB_WIDGETS`` overrides)."""
    env = os.environ.get("ANATOMY_NB_WIDGETS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "widgets"


def _front_end(module: str) -> tuple[str, str]:
    d = widgets_dir()
    if not (d / f"{module}.js").exists():
        raise FileNotFoundError(f"{d / (module + '.js')}: the widget front-end is missing (set $ANATOMY_NB_WIDGETS to the repository's widgets/ folder)")
    return (d / "common.js").read_text(encoding="utf-8") + "\n" + (d / f"{module}.js").read_text(encoding="utf-8"), (d / "anatomy.css").read_text(encoding="utf-8")


# --- maps ----------------------------------------------------------------------------------------


@dataclass
class MapConfig:
    method: str = "auto"  # "umap", "svd" (TruncatedSVD to 2-D), or "auto": UMAP from umap_min_points up
    umap_min_points: int = 200  # below this UMAP's numba compile (~30 s) buys little; SVD instead
    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0


def _embed(X, cfg: MapConfig, metric: str) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of X (dense or sparse), scaled to [0, 1]."""
    import scipy.sparse as sp

    n = X.shape[0]
    if n == 0:
        return np.zeros((0, 2)), "empty"
    method = cfg.method
    if method == "auto":
        method = "umap" if n >= cfg.umap_min_points else "svd"
    if method == "umap" and n > 3:
        import umap

        reducer = umap.UMAP(n_neighbors=min(cfg.n_neighbors, n - 1), min_dist=cfg.min_dist, metric=metric, random_state=cfg.seed, n_jobs=1)
        xy = reducer.fit_transform(X.astype(np.float32) if sp.issparse(X) else np.asarray(X, np.float32))
    else:
        method = "svd"
        from sklearn.decomposition import TruncatedSVD

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


def compute_maps(run_dir: str | Path | RunDir, hyp=None, store=None, cfg: MapConfig | None = None) -> dict[str, Any]:
    """The two map layouts, cached in ``run_dir/maps/<key>/`` (keyed on the hypotheses and config).

    Data map: one point per pair, placed by its prompt's mean SAE features (or, without stored
    prompts, its responses' firing). Feature map: one point per tested feature, placed by its
    co-firing over all responses (cosine), so concepts appear as neighbourhoods."""
    from .extract import FeatureStore
    from .hypothesize import Hypotheses

    cfg = cfg or MapConfig()
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    hyp = hyp or Hypotheses.from_run(run)
    key = content_hash("maps-1", hyp.manifest["key"], asdict(cfg))
    out = run.artifact_dir(MAPS_STAGE, key)
    if (out / "maps.json").exists():
        return read_json(out / "maps.json")
    store = store or FeatureStore.from_run(run)
    fc, fr = store.pooled("fires", "chosen").tocsr(), store.pooled("fires", "rejected").tocsr()
    if (store.path / "prompt_indptr.npy").exists():
        Xd = store.pooled("mean", prefix="prompt").tocsr()
    else:
        Xd = (fc + fr).tocsr()
    data_xy, data_method = _embed(Xd, cfg, "cosine")
    labels = hyp.features["concept"].to_numpy().astype(int)
    live = np.flatnonzero(labels >= 0)
    import scipy.sparse as sp

    F = sp.vstack([fc, fr]).T.tocsr()[live]
    feat_xy, feat_method = _embed(F, cfg, "cosine")
    topic_of_group = dict(zip(hyp.topics["prompt_group"].astype(int), hyp.topics["topic"].astype(int)))
    groups = store.prompt_groups()
    maps = {
        "key": key,
        "data": {"x": data_xy[:, 0].round(5).tolist(), "y": data_xy[:, 1].round(5).tolist(), "topic": [int(topic_of_group.get(int(g), -1)) for g in groups], "method": data_method},
        "features": {"x": feat_xy[:, 0].round(5).tolist(), "y": feat_xy[:, 1].round(5).tolist(), "feature": live.tolist(), "concept": labels[live].tolist(), "support": hyp.features["support"].to_numpy()[live].astype(float).tolist(), "method": feat_method},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "maps.json", maps)
    run.record(MAPS_STAGE, key)
    return maps


# --- the data behind the views -------------------------------------------------------------------------


def _f(v: Any, default: float = float("nan")) -> float | None:
    """A JSON-safe float (NaN/inf → None)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = default
    return x if np.isfinite(x) else None


class ViewerData:
    """Everything the viewer shows, loaded once from a run directory."""

    def __init__(self, run_dir: str | Path, hyp=None, store=None, maps: MapConfig | dict | None = None):
        from .extract import FeatureStore
        from .hypothesize import Hypotheses

        self.run_dir = Path(run_dir)
        self.hyp = hyp or Hypotheses.from_run(run_dir)
        self.store = store or FeatureStore.from_run(run_dir)
        self.space = ConceptSpace.from_run(run_dir, self.hyp, self.store)
        self.maps = maps if isinstance(maps, dict) else compute_maps(run_dir, self.hyp, self.store, maps)
        self.pairs = self.store.pairs()
        self.prompts = []
        for p in self.pairs:
            users = [m["content"] for m in p["prompt"] if m["role"] == "user"]
            self.prompts.append(users[-1] if users else (p["prompt"][-1]["content"] if p["prompt"] else ""))
        self.topic_of_pair = np.asarray(self.maps["data"]["topic"], dtype=int)

    # ranked signals ---------------------------------------------------------------------------------

    def concept_rows(self, pairs: np.ndarray | list[int] | None = None) -> list[dict]:
        """The ranked signals: every concept scored on ``pairs`` (None: all), strongest first."""
        sc = self.space.rescore(pairs)
        ov = self.space.concepts.set_index("concept")
        rows = []
        for r in sc.itertuples():
            o = ov.loc[r.concept]
            rows.append({
                "concept": int(r.concept),
                "label": str(r.label),
                "n_features": int(o["n_features"]),
                "mean_diff": _f(r.mean_diff), "ci_low": _f(r.ci_low), "ci_high": _f(r.ci_high),
                "cohens_d": _f(r.cohens_d), "p": _f(r.p), "badge": r.badge, "n_units": int(r.n_units),
                "chosen_rate": _f(r.chosen_rate), "rejected_rate": _f(r.rejected_rate),
                "q": _f(o["q"]) if pairs is None else None,
                "significant": bool(o["significant"]) if pairs is None else bool(r.p < 0.05),
                "split_half": _f(o["split_half_agreement"]), "length_controlled_d": _f(r.length_controlled_cohens_d),
                "predicted_direction": str(o["predicted_direction"]) if pairs is None else ("up" if r.ci_low > 0 else "down" if r.ci_high < 0 else "none"),
            })
        # stage 2's order: significant first, then the effect at equal lengths (hypothesize._rank)
        rows.sort(key=lambda r: (not r["significant"], -abs(r["length_controlled_d"] if r["length_controlled_d"] is not None else (r["cohens_d"] or 0.0)), r["p"] if r["p"] is not None else 1.0))
        return rows

    def topic_list(self) -> list[dict]:
        s = self.hyp.topic_summary
        counts = np.bincount(self.topic_of_pair[self.topic_of_pair >= 0], minlength=int(s["topic"].max()) + 1 if len(s) else 0)
        words = s["top_words"] if "top_words" in s else [""] * len(s)
        return [{"topic": int(t), "label": str(w), "n_pairs": int(counts[int(t)]) if int(t) < len(counts) else 0, "color": TOPIC_COLORS[int(t) % len(TOPIC_COLORS)]} for t, w in zip(s["topic"], words)]

    # drilldown ------------------------------------------------------------------------------------------

    def pair_effect(self, concept: int) -> list[float]:
        j = self._col(concept)
        return (self.space.chosen[:, j] - self.space.rejected[:, j]).round(4).tolist()

    def _col(self, concept: int) -> int:
        hits = np.flatnonzero(self.space.concepts["concept"].to_numpy() == int(concept))
        if not len(hits):
            raise KeyError(f"concept {concept} is not in the hypotheses table")
        return int(hits[0])

    def drilldown(self, concept: int, pairs: np.ndarray | list[int] | None = None, n_contexts: int = 8, n_examples: int = 3) -> dict:
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
                contexts.append({"feature": f, "pair": int(hit["pair"]), "side": hit["side"], "value": _f(hit["value"]), "tokens": [str(t) for t in hit["tokens"]], "peak": int(hit["peak"])})
        edges = np.linspace(0, 1, 21)
        uc, ur = self.space.chosen[:, j], self.space.rejected[:, j]
        hist = {"edges": edges.round(3).tolist(), "chosen": np.histogram(uc, edges)[0].tolist(), "rejected": np.histogram(ur, edges)[0].tolist()}
        d = uc - ur
        sign = 1.0 if (overall["mean_diff"] or 0) >= 0 else -1.0
        order = np.argsort(-sign * d, kind="stable")
        examples = []
        for i in order[:n_examples]:
            if d[i] == 0:
                break
            examples.append({
                "pair": int(i), "id": str(self.pairs[i].get("id", i)), "prompt": self.prompts[i][:TEXT_CHARS],
                "chosen": str(self.pairs[i]["chosen"])[:TEXT_CHARS], "rejected": str(self.pairs[i]["rejected"])[:TEXT_CHARS],
                "chosen_activity": _f(uc[i]), "rejected_activity": _f(ur[i]),
            })
        bt = self.hyp.by_topic()
        bt = bt[bt["concept"] == int(concept)]
        topics = [{"topic": int(r.topic), "label": str(r.topic_label), "inside_mean_diff": _f(getattr(r, "inside_mean_diff", np.nan)), "mean_diff": _f(r.mean_diff), "q": _f(r.q), "significant": bool(r.significant)} for r in bt.itertuples()]
        return {
            "concept": int(concept),
            "label": str(o["label"]),
            "n_features": int(o["n_features"]),
            "features": feats[:50],
            "peak_tokens": str(o.get("peak_tokens", "")),
            "promoted_tokens": str(o.get("promoted_tokens", "")),
            "text_stats": str(o.get("text_stats", "")),
            "overall": {"mean_diff": _f(overall["mean_diff"]), "ci_low": _f(overall["ci_low"]), "ci_high": _f(overall["ci_high"]), "cohens_d": _f(o["cohens_d"]), "p": _f(o["p"]), "q": _f(o["q"]), "badge": overall["badge"], "chosen_rate": _f(o["chosen_rate"]), "rejected_rate": _f(o["rejected_rate"]), "significant": bool(o["significant"]), "predicted_direction": str(o["predicted_direction"]), "predicted_change": _f(o["predicted_change"])},
            "selection": None if pairs is None else {"n_units": int(scoped["n_units"]), "mean_diff": _f(scoped["mean_diff"]), "ci_low": _f(scoped["ci_low"]), "ci_high": _f(scoped["ci_high"]), "cohens_d": _f(scoped["cohens_d"]), "p": _f(scoped["p"]), "badge": scoped["badge"]},
            "split_half": _f(o["split_half_agreement"]),
            "length_control": {"mean_diff": _f(o["length_controlled_mean_diff"]), "cohens_d": _f(o["length_controlled_cohens_d"]), "p": _f(o["length_controlled_p"]), "survives": bool(o.get("effect_survives_length_control", False))},
            "contexts": contexts,
            "histogram": hist,
            "examples": examples,
            "topics": topics,
        }


# --- static views (no kernel: exported HTML, the report) ------------------------------------------------


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def static_drilldown_html(dd: dict) -> str:
    """A drilldown as escaped HTML (what the widget shows, minus the interaction)."""
    o = dd["overall"]
    parts = [
        f"<div class='anb-static anb-drill'><h4>concept {dd['concept']} — {escape_text(dd['label'])}</h4>",
        f"<p>fires on {escape_text(o['badge'])}: mean difference {_fmt(o['mean_diff'])} [95 % {_fmt(o['ci_low'])}, {_fmt(o['ci_high'])}], d = {_fmt(o['cohens_d'], '.2f')}, q = {_fmt(o['q'], '.2g')}; "
        f"split-half agreement {_fmt(dd['split_half'], '.2f')}; at equal length d = {_fmt(dd['length_control']['cohens_d'], '.2f')} (p = {_fmt(dd['length_control']['p'], '.2g')})</p>",
        f"<p>promoted tokens: <code>{escape_text(dd['promoted_tokens'])}</code> · text statistics: {escape_text(dd['text_stats'])}</p><ul>",
    ]
    for c in dd["contexts"][:6]:
        toks = "".join(f"<mark>{escape_text(t)}</mark>" if i == c["peak"] else escape_text(t) for i, t in enumerate(c["tokens"]))
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
    df["p"] = df["p"].map(lambda v: _fmt(v, ".2g"))
    return html_table(df[["concept", "badge", "mean_diff", "ci_low", "ci_high", "cohens_d", "p", "n_features", "label"]], max_chars=160)


# --- widgets -----------------------------------------------------------------------------------------------


def _anywidget():
    import anywidget
    import traitlets

    return anywidget, traitlets


def _static_bundle(widget, html: str):
    """The live widget where there is a kernel, the static HTML where there is not (HTML export
    drops the widget view and keeps ``text/html``; see notebooks.render_html)."""
    import anywidget

    data = anywidget.AnyWidget._repr_mimebundle_(widget)
    if isinstance(data, tuple):
        data, meta = data
    else:
        meta = {}
    data = dict(data or {})
    data["text/html"] = html
    return data, meta


def AuditViewer(run_dir: str | Path, data: ViewerData | None = None, maps: MapConfig | None = None, height: int = 360):
    """The linked maps, ranked signals and drilldown for a run directory."""
    data = data or ViewerData(run_dir, maps=maps)
    return _viewer_class()(data, height=height)


def ConceptToggles(run_dir: str | Path, plan: Any = None, data: ViewerData | None = None, hyp=None, space: ConceptSpace | None = None, autosave: bool = True):
    """Allow / suppress / amplify per concept; writes ``run_dir/plan.json`` on every valid change."""
    return _toggles_class()(run_dir, plan=plan, data=data, hyp=hyp, space=space, autosave=autosave)


def workbench(run_dir: str | Path, plan: Any = None, maps: MapConfig | None = None):
    """Viewer and toggles over the same data, their concept selection linked."""
    import traitlets

    data = ViewerData(run_dir, maps=maps)
    v = AuditViewer(run_dir, data=data)
    t = ConceptToggles(run_dir, plan=plan, data=data)
    traitlets.link((v, "selected_concept"), (t, "selected_concept"))
    return v, t


_CLASSES: dict[str, type] = {}


def _viewer_class():
    if "viewer" in _CLASSES:
        return _CLASSES["viewer"]
    anywidget, T = _anywidget()
    esm, css = _front_end("viewer")

    class _AuditViewer(anywidget.AnyWidget):
        _esm = esm
        _css = css
        concepts = T.List([]).tag(sync=True)
        topics = T.List([]).tag(sync=True)
        data_map = T.Dict({}).tag(sync=True)
        feature_map = T.Dict({}).tag(sync=True)
        pair_effect = T.List([]).tag(sync=True)
        selected_concept = T.Int(-1).tag(sync=True)
        selected_topic = T.Int(-1).tag(sync=True)
        selected_pairs = T.List([]).tag(sync=True)  # lasso / topic selection; [] = all pairs
        scope = T.Unicode("all pairs").tag(sync=True)
        drilldown = T.Dict({}).tag(sync=True)
        height = T.Int(360).tag(sync=True)
        render_ms = T.Dict({}).tag(sync=True)  # the front-end reports its draw times here

        def __init__(self, data: ViewerData, height: int = 360):
            self._data = data
            m = data.maps
            super().__init__(
                concepts=data.concept_rows(),
                topics=data.topic_list(),
                data_map={**m["data"], "text": [p[:160] for p in data.prompts]},
                feature_map=m["features"],
                height=height,
            )

        @property
        def data(self) -> ViewerData:
            return self._data

        @T.observe("selected_concept")
        def _on_concept(self, change):
            c = change["new"]
            if c is None or c < 0:
                self.drilldown, self.pair_effect = {}, []
                return
            pairs = self.selected_pairs or None
            self.drilldown = self._data.drilldown(c, pairs)
            self.pair_effect = self._data.pair_effect(c)

        @T.observe("selected_topic")
        def _on_topic(self, change):
            k = change["new"]
            self.selected_pairs = [] if k < 0 else np.flatnonzero(self._data.topic_of_pair == k).tolist()

        @T.observe("selected_pairs")
        def _on_pairs(self, change):
            pairs = change["new"] or None
            self.concepts = self._data.concept_rows(pairs)
            if pairs is None:
                self.scope = "all pairs"
            elif self.selected_topic >= 0 and sorted(pairs) == np.flatnonzero(self._data.topic_of_pair == self.selected_topic).tolist():
                self.scope = f"topic {self.selected_topic} ({len(pairs)} pairs)"
            else:
                self.scope = f"selection ({len(pairs)} pairs)"
            if self.selected_concept >= 0:
                self.drilldown = self._data.drilldown(self.selected_concept, pairs)

        def static_html(self) -> str:
            parts = ["<div class='anb-static'><h4>Ranked signals (", escape_text(self.scope), ")</h4>", static_signals_html(self.concepts)]
            if self.drilldown:
                parts.append(static_drilldown_html(self.drilldown))
            parts.append("<p><i>Static view: open the notebook with a kernel for the linked maps.</i></p></div>")
            return "".join(parts)

        def _repr_mimebundle_(self, **kwargs):
            return _static_bundle(self, self.static_html())

    _CLASSES["viewer"] = _AuditViewer
    return _AuditViewer


def _toggles_class():
    if "toggles" in _CLASSES:
        return _CLASSES["toggles"]
    anywidget, T = _anywidget()
    esm, css = _front_end("toggles")

    class _ConceptToggles(anywidget.AnyWidget):
        _esm = esm
        _css = css
        rows = T.List([]).tag(sync=True)  # per concept: id, label, signal, badge (read-only)
        choices = T.Dict({}).tag(sync=True)  # "sae:<id>" → {action, method, strength, instruction}
        preview = T.List([]).tag(sync=True)  # predicted change per concept under the plan
        spill = T.List([]).tag(sync=True)  # strongest spill-over edges
        actions = T.List(list(ACTIONS)).tag(sync=True)
        methods = T.List(list(METHODS)).tag(sync=True)
        default_strength = T.Dict(dict(DEFAULT_STRENGTH)).tag(sync=True)
        selected_concept = T.Int(-1).tag(sync=True)
        plan_path = T.Unicode("").tag(sync=True)
        status = T.Unicode("").tag(sync=True)
        error = T.Unicode("").tag(sync=True)

        def __init__(self, run_dir, plan=None, data: ViewerData | None = None, hyp=None, space: ConceptSpace | None = None, autosave: bool = True):
            from .hypothesize import Hypotheses

            self.run_dir = Path(run_dir)
            self.autosave = autosave
            self._hyp = data.hyp if data is not None else (hyp or Hypotheses.from_run(run_dir))
            self._space = data.space if data is not None else (space or ConceptSpace.from_run(run_dir, self._hyp))
            self.plan = resolve_plan(run_dir, plan, self._hyp, layer=self._space.layer)
            overall = self._space.rescore(None)
            rows = []
            for r in overall.itertuples():
                rows.append({"concept": concept_name(int(r.concept)), "id": int(r.concept), "label": str(r.label), "mean_diff": _f(r.mean_diff), "ci_low": _f(r.ci_low), "ci_high": _f(r.ci_high), "badge": r.badge})
            rows.sort(key=lambda r: -abs(r["mean_diff"] or 0))
            super().__init__(rows=rows, choices=self._choices_of(self.plan), plan_path=str(self.run_dir / PLAN_FILE))
            self._refresh(write=autosave)

        @staticmethod
        def _choices_of(plan: InterventionPlan) -> dict:
            return {c.concept: {"action": c.action, "method": c.method or "", "strength": c.strength, "instruction": c.instruction or "", "filter_mode": c.filter_mode, "ablation": c.ablation} for c in plan.concepts}

        def set(self, concept, action: str, method: str | None = None, strength: float | None = None, **fields) -> "InterventionPlan":
            """Headless twin of the front-end controls (also what the tests drive)."""
            set_choice(self.plan, concept, action, method, strength, **fields)
            self.choices = self._choices_of(self.plan)
            return self.plan

        @T.observe("choices")
        def _on_choices(self, change):
            if getattr(self, "_restoring", False):
                return
            new = change["new"] or {}
            try:
                plan = InterventionPlan(concepts=list(self.plan.concepts), hypotheses=self.plan.hypotheses)
                for name, ch in new.items():
                    cur = next((c for c in plan.concepts if c.concept == name), None)
                    if cur is None:
                        raise PlanError(None, name, "concept", "not in the plan")
                    action = ch.get("action", "allow")
                    method = ch.get("method") or None
                    strength = ch.get("strength")
                    strength = None if strength in (None, "") else float(strength)
                    same = cur.action == action and (cur.method or None) == method and (strength is None or float(cur.strength) == strength) and (cur.instruction or "") == (ch.get("instruction") or "") and cur.filter_mode == ch.get("filter_mode", cur.filter_mode) and cur.ablation == ch.get("ablation", cur.ablation)
                    if same:
                        continue
                    extra = {k: ch[k] for k in ("instruction", "filter_mode", "ablation") if ch.get(k)}
                    set_choice(plan, name, action, method, strength, **extra)
            except (PlanError, ValueError, TypeError) as exc:
                # refuse: the controls snap back to the plan as it is, the reason stays shown
                self._restoring = True
                try:
                    self.choices = self._choices_of(self.plan)
                finally:
                    self._restoring = False
                self.error = str(exc)
                return
            self.error = ""
            self.plan = plan
            normalised = self._choices_of(plan)
            if normalised != new:
                self.choices = normalised  # show the defaults the plan filled in
                return
            self._refresh(write=self.autosave)

        def _refresh(self, write: bool) -> None:
            table, edges = self._space.predict(self.plan)
            self.preview = [{"concept": concept_name(int(r.concept)), "before": _f(r.before), "direct": _f(r.direct), "spillover": _f(r.spillover), "after": _f(r.after), "basis": str(r.basis), "pairs_removed": int(r.pairs_removed)} for r in table.itertuples()]
            self.spill = [{"source": concept_name(int(e.source)), "target": concept_name(int(e.target)), "target_label": str(e.target_label), "correlation": _f(e.correlation), "shift": _f(e.shift)} for e in edges.head(12).itertuples()]
            n = len(self.plan.active)
            if write:
                path = self.plan.save(self.run_dir / PLAN_FILE)
                self.status = f"plan written: {path.name} · {n} concept{'s' if n != 1 else ''} changed"
            else:
                self.status = f"{n} concept{'s' if n != 1 else ''} changed (not written)"

        def save(self, path: str | Path | None = None) -> Path:
            return self.plan.save(path or self.run_dir / PLAN_FILE)

        def predicted(self) -> tuple[pd.DataFrame, pd.DataFrame]:
            return self._space.predict(self.plan)

        def static_html(self) -> str:
            table, edges = self.predicted()
            t = table[["concept", "action", "method", "strength", "before", "direct", "spillover", "after", "basis", "label"]].copy()
            for c in ("before", "direct", "spillover", "after"):
                t[c] = t[c].map(lambda v: f"{v:+.3f}")
            parts = ["<div class='anb-static'><h4>Intervention plan: ", escape_text(self.status), "</h4>", html_table(t, max_chars=120)]
            if len(edges):
                parts += ["<h5>Strongest predicted spill-over</h5>", html_table(edges.head(10).round(4), max_chars=120)]
            parts.append("</div>")
            return "".join(parts)

        def _repr_mimebundle_(self, **kwargs):
            return _static_bundle(self, self.static_html())

    _CLASSES["toggles"] = _ConceptToggles
    return _ConceptToggles
