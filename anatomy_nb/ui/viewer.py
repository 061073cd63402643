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
  valid change is written to ``run_dir/plan/plan.json`` at once, and the predicted change and
  spill-over (``stages.prediction.ConceptSpace.predict``) are shown next to it.

Python computes, the browser draws. Dataset text reaches the front-end as plain strings that are
put into the page with ``textContent`` only; the static views (shown where there is no kernel,
e.g. exported HTML) escape everything through :func:`anatomy_nb.ui.viz.escape_text`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anywidget
import numpy as np
import pandas as pd
import traitlets

from ..config import MapConfig
from ..core.paths import widgets_dir
from ..methods import METHODS
from ..results.hypothesize import Hypotheses
from ..results.plan import ACTIONS, InterventionPlan, PlanError, concept_ref
from ..results.run import RunDir, RunLike
from ..stages.plan import overlay_plan, set_choice
from ..stages.prediction import ConceptSpace
from .summary import summary_html
from .viewer_data import ViewerData, json_float, static_drilldown_html, static_signals_html
from .viz import escape_text, html_table

__all__ = ["AuditViewer", "ConceptToggles", "ViewerData", "workbench"]


def _front_end(module: str) -> tuple[str, str]:
    """The widget's ES module (``common.js`` prepended) and the shared CSS."""
    d = widgets_dir()
    if not (d / f"{module}.js").exists():
        raise FileNotFoundError(
            f"{d / (module + '.js')}: the widget front-end is missing (set $ANATOMY_NB_WIDGETS to the repository's "
            "widgets/ folder)"
        )
    return (d / "common.js").read_text(encoding="utf-8") + "\n" + (d / f"{module}.js").read_text(encoding="utf-8"), (
        d / "anatomy.css"
    ).read_text(encoding="utf-8")


def _static_bundle(widget, html: str):
    """The live widget where there is a kernel, the static HTML where there is not (HTML export
    drops the widget view and keeps ``text/html``; see ui.notebooks.render_html)."""
    data = anywidget.AnyWidget._repr_mimebundle_(widget)
    if isinstance(data, tuple):
        data, meta = data
    else:
        meta = {}
    data = dict(data or {})
    data["text/html"] = html
    return data, meta


class AuditViewer(anywidget.AnyWidget):
    """The linked maps, ranked signals and drilldown for a run directory."""

    _esm, _css = _front_end("viewer")
    concepts = traitlets.List([]).tag(sync=True)
    view_rows = traitlets.Dict({}).tag(sync=True)  # stage 2's topic × concept, opening and ending rows, ranked
    topics = traitlets.List([]).tag(sync=True)
    data_map = traitlets.Dict({}).tag(sync=True)
    feature_map = traitlets.Dict({}).tag(sync=True)
    pair_effect = traitlets.List([]).tag(sync=True)
    selected_concept = traitlets.Int(-1).tag(sync=True)
    selected_topic = traitlets.Int(-1).tag(sync=True)
    selected_pairs = traitlets.List([]).tag(sync=True)  # lasso / topic selection; [] = all pairs
    scope = traitlets.Unicode("all pairs").tag(sync=True)
    drilldown = traitlets.Dict({}).tag(sync=True)
    height = traitlets.Int(360).tag(sync=True)
    render_ms = traitlets.Dict({}).tag(sync=True)  # the front-end reports its draw times here
    # what DPO on this data will teach (ui.summary, the report's first section): escaped HTML and
    # inline SVG, shown by the front-end in a sandboxed iframe (no script runs there)
    summary = traitlets.Unicode("").tag(sync=True)

    def __init__(
        self,
        run_dir: RunLike | None = None,
        data: ViewerData | None = None,
        maps: MapConfig | dict | None = None,
        height: int = 360,
    ):
        if data is None and run_dir is None:
            raise ValueError("AuditViewer needs a run directory (or its ViewerData)")
        data = data or ViewerData(run_dir, maps=maps)
        self._data = data
        m = data.maps
        super().__init__(
            concepts=data.concept_rows(),
            view_rows=data.view_rows(),
            topics=data.topic_list(),
            data_map={**m["data"], "text": [p[:160] for p in data.prompts]},
            feature_map=m["features"],
            height=height,
            summary=summary_html(data.run),
        )

    @property
    def data(self) -> ViewerData:
        return self._data

    @traitlets.observe("selected_concept")
    def _on_concept(self, change):
        c = change["new"]
        if c is None or c < 0:
            self.drilldown, self.pair_effect = {}, []
            return
        pairs = self.selected_pairs or None
        self.drilldown = self._data.drilldown(c, pairs)
        self.pair_effect = self._data.pair_effect(c)

    @traitlets.observe("selected_topic")
    def _on_topic(self, change):
        k = change["new"]
        self.selected_pairs = [] if k < 0 else np.flatnonzero(self._data.topic_of_pair == k).tolist()

    @traitlets.observe("selected_pairs")
    def _on_pairs(self, change):
        pairs = change["new"] or None
        self.concepts = self._data.concept_rows(pairs)
        if pairs is None:
            self.scope = "all pairs"
        elif (
            self.selected_topic >= 0
            and sorted(pairs) == np.flatnonzero(self._data.topic_of_pair == self.selected_topic).tolist()
        ):
            self.scope = f"topic {self.selected_topic} ({len(pairs)} pairs)"
        else:
            self.scope = f"selection ({len(pairs)} pairs)"
        if self.selected_concept >= 0:
            self.drilldown = self._data.drilldown(self.selected_concept, pairs)

    def static_html(self) -> str:
        parts = [
            "<div class='anb-static'>",
            self.summary,
            "<h4>Ranked signals (",
            escape_text(self.scope),
            ")</h4>",
            static_signals_html(self.concepts),
        ]
        if self.drilldown:
            parts.append(static_drilldown_html(self.drilldown))
        parts.append("<p><i>Static view: open the notebook with a kernel for the linked maps.</i></p></div>")
        return "".join(parts)

    def _repr_mimebundle_(self, **kwargs):
        return _static_bundle(self, self.static_html())


class ConceptToggles(anywidget.AnyWidget):
    """Allow / suppress / amplify per concept; writes ``run_dir/plan/plan.json`` on every valid change."""

    _esm, _css = _front_end("toggles")
    rows = traitlets.List([]).tag(sync=True)  # per concept: id, label, signal, badge (read-only)
    choices = traitlets.Dict({}).tag(sync=True)  # "sae:<id>" → {action, method, strength, instruction}
    preview = traitlets.List([]).tag(sync=True)  # predicted change per concept under the plan
    spill = traitlets.List([]).tag(sync=True)  # strongest spill-over edges
    actions = traitlets.List(list(ACTIONS)).tag(sync=True)
    methods = traitlets.List(list(METHODS)).tag(sync=True)
    default_strength = traitlets.Dict({name: how.default_strength for name, how in METHODS.items()}).tag(sync=True)
    selected_concept = traitlets.Int(-1).tag(sync=True)
    plan_path = traitlets.Unicode("").tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(
        self,
        run_dir: RunLike,
        plan: Any = None,
        data: ViewerData | None = None,
        hyp: Hypotheses | None = None,
        space: ConceptSpace | None = None,
        autosave: bool = True,
    ):
        self.run = RunDir.of(run_dir)
        self.run_dir = self.run.path
        self.autosave = autosave
        self._hyp = data.hyp if data is not None else (hyp or self.run.hypotheses)
        self._space = data.space if data is not None else (space or ConceptSpace.from_run(self.run, self._hyp))
        if plan is None and self.run.plan_path.exists():
            plan = self.run.plan_path
        self.plan = overlay_plan(self._hyp, plan, layer=self._space.layer)
        overall = self._space.rescore(None)
        rows = []
        for r in overall.itertuples():
            rows.append(
                {
                    "concept": concept_ref(int(r.concept)),
                    "id": int(r.concept),
                    "label": str(r.label),
                    "mean_diff": json_float(r.mean_diff),
                    "ci_low": json_float(r.ci_low),
                    "ci_high": json_float(r.ci_high),
                    "badge": r.badge,
                }
            )
        rows.sort(key=lambda r: -abs(r["mean_diff"] or 0))
        super().__init__(rows=rows, choices=self._choices_of(self.plan), plan_path=str(self.run.plan_path))
        self._refresh(write=autosave)

    @staticmethod
    def _choices_of(plan: InterventionPlan) -> dict:
        return {
            c.concept: {
                "action": c.action,
                "method": c.method or "",
                "strength": c.strength,
                "instruction": c.instruction or "",
                "filter_mode": c.filter_mode,
                "ablation": c.ablation,
            }
            for c in plan.concepts
        }

    def set(
        self, concept, action: str, method: str | None = None, strength: float | None = None, **fields
    ) -> InterventionPlan:
        """Headless twin of the front-end controls (also what the tests drive)."""
        set_choice(self.plan, concept, action, method, strength, **fields)
        self.choices = self._choices_of(self.plan)
        return self.plan

    @traitlets.observe("choices")
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
                same = (
                    cur.action == action
                    and (cur.method or None) == method
                    and (strength is None or float(cur.strength) == strength)
                    and (cur.instruction or "") == (ch.get("instruction") or "")
                    and cur.filter_mode == ch.get("filter_mode", cur.filter_mode)
                    and cur.ablation == ch.get("ablation", cur.ablation)
                )
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
        self.preview = [
            {
                "concept": concept_ref(int(r.concept)),
                "before": json_float(r.before),
                "direct": json_float(r.direct),
                "spillover": json_float(r.spillover),
                "after": json_float(r.after),
                "basis": str(r.basis),
                "pairs_removed": int(r.pairs_removed),
            }
            for r in table.itertuples()
        ]
        self.spill = [
            {
                "source": concept_ref(int(e.source)),
                "target": concept_ref(int(e.target)),
                "target_label": str(e.target_label),
                "correlation": json_float(e.correlation),
                "shift": json_float(e.shift),
            }
            for e in edges.head(12).itertuples()
        ]
        n = len(self.plan.active)
        if write:
            path = self.plan.save(self.run.plan_path)
            self.status = f"plan written: {path.name} · {n} concept{'s' if n != 1 else ''} changed"
        else:
            self.status = f"{n} concept{'s' if n != 1 else ''} changed (not written)"

    def save(self, path: str | Path | None = None) -> Path:
        return self.plan.save(path or self.run.plan_path)

    def predicted(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self._space.predict(self.plan)

    def static_html(self) -> str:
        table, edges = self.predicted()
        t = table[
            ["concept", "action", "method", "strength", "before", "direct", "spillover", "after", "basis", "label"]
        ].copy()
        for c in ("before", "direct", "spillover", "after"):
            t[c] = t[c].map(lambda v: f"{v:+.3f}")
        parts = [
            "<div class='anb-static'><h4>Intervention plan: ",
            escape_text(self.status),
            "</h4>",
            html_table(t, max_chars=120),
        ]
        if len(edges):
            parts += ["<h5>Strongest predicted spill-over</h5>", html_table(edges.head(10).round(4), max_chars=120)]
        parts.append("</div>")
        return "".join(parts)

    def _repr_mimebundle_(self, **kwargs):
        return _static_bundle(self, self.static_html())


def workbench(run_dir: str | Path, plan: Any = None, maps: MapConfig | None = None):
    """Viewer and toggles over the same data, their concept selection linked."""
    data = ViewerData(run_dir, maps=maps)
    v = AuditViewer(run_dir, data=data)
    t = ConceptToggles(run_dir, plan=plan, data=data)
    traitlets.link((v, "selected_concept"), (t, "selected_concept"))
    return v, t
