"""``anatomy-nb report RUN_DIR``: the executed notebooks and a summary page as standalone HTML.

The summary page opens on the answer — what DPO on this data will teach, in words
(``ui.summary``) — then the evidence: whether the audit predicted what DPO changed (and better than
simpler predictors), the experiment's head-to-head table, the ranked concepts, the evaluation; long
tables fold away (``<details>``) and every column is named for a reader or explained above it.

Everything opens from disk without a kernel or a network: plotly figures are embedded by the
notebooks (``viz.setup_plotly``), widgets fall back to the static views they also emit
(``notebooks.static_widgets``), and the summary page is plain escaped HTML and inline SVG with no
script at all (its content-security policy allows none).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..core.files import atomic_path, atomic_write_text, read_json
from ..results.compare_audits import CompareResult
from ..results.hypothesize import split_half_mark
from ..results.run import RunDir, RunLike
from .compare_view import compare_html
from .notebooks import render_html
from .summary import summary_html
from .viz import escape_text, html_table

__all__ = ["report"]

_STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;
margin:16px auto;padding:0 16px;color:#212529}
table{border-collapse:collapse;font-size:13px}th,td{border-top:1px solid #e9ecef;padding:3px 6px}th{background:#f1f3f5}
h1{font-size:21px;margin:4px 0}h2{font-size:17px;margin-top:26px}.muted{color:#868e96}
code{background:#f1f3f5;padding:0 3px}
details{margin:10px 0}summary{cursor:pointer;font-weight:600;font-size:15px}"""

#: the ranked-signal columns as a reader names them (``_signal_table``); the legend explains them
SIGNAL_COLUMNS = {
    "rank": "#",
    "where": "where",
    "concept": "concept",
    "n_features": "features",
    "chosen_activity": "fires in chosen",
    "rejected_activity": "fires in rejected",
    "cohens_d": "d",
    "length_controlled_cohens_d": "d at equal lengths",
    "q": "q",
    "split_half_agreement": "split-half",
    "predicted_direction": "DPO would",
    "label": "name · peaks on · tracks",
}
SIGNAL_LEGEND = (
    "#: rank in this table. fires in chosen / rejected: the share of the concept's features that fire, averaged "
    "over chosen and over rejected responses (in the part of the response ‘where’ names). d: Cohen's d of the "
    "paired chosen − rejected difference; d at equal lengths: the same with response length regressed out. q: "
    "Benjamini–Hochberg adjusted p over every test. split-half: share of random half/half splits of the prompts "
    "that agree on the sign (✓ ≥ 0.9). DPO would: the predicted direction of change (up / down) where q < FDR."
)


def _facts(run: RunDir) -> pd.DataFrame:
    rows: list[tuple[str, str]] = []
    if run.has("extract"):
        m = run.store.manifest
        rows += [
            ("pairs", m.get("n_pairs")),
            ("model", (m.get("model") or {}).get("name")),
            ("SAE", (m.get("sae") or {}).get("name")),
            ("layer", m.get("layer")),
            ("SAE features", m.get("d_sae")),
        ]
    if run.has("hypothesize"):
        h = read_json(run.latest("hypothesize") / "manifest.json")
        rows += [
            ("concepts", h.get("n_concepts")),
            ("topics", h.get("n_topics")),
            ("tests (one BH family)", h.get("n_tests")),
            (f"significant at q < {h.get('config', {}).get('fdr')}", h.get("n_significant")),
            ("  of which overall", h.get("n_significant_overall")),
        ]
    return pd.DataFrame(rows, columns=["", "value"])


def _folded(title: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{escape_text(title)}</summary>{body}</details>"


def _evaluation_sections(run: RunDir) -> list[str]:
    """What stage 5 measured: the audit's prediction against what moved (and simpler predictors),
    the head-to-head table and its spread over training orders, the full comparison, the judge."""
    ev = run.evaluation
    parts = [
        "<h2>Did the audit predict what DPO changed?</h2>",
        "<p class='muted'>Each concept's predicted change (stage 2) against the change of its activity on the "
        "model's own held-out generations: R² [95 % interval over concepts], Spearman, the share of concepts "
        "whose direction was predicted, and R² without the 1 / 3 / 10 concepts of largest predicted change.</p>",
        html_table(ev.prediction_report()),
    ]
    predictors = ev.predictor_table()
    if predictors is not None:
        parts += [
            "<p>The same fit for simpler predictors made from the preference data alone (plain DPO's changes); "
            "ΔR² = R²(audit) − R²(predictor) with a paired bootstrap interval: above 0, the audit predicts "
            "better. The ceiling is the split-half reliability of the audit times that of the measured change.</p>",
            html_table(predictors),
        ]
    if len(ev.models) > 2:
        parts += [
            "<h2>Head to head: each intervention against plain DPO</h2>",
            "<p class='muted'>Per planted concept the fraction of plain DPO's increase removed (to suppress) or "
            "kept (to keep); held-out preference accuracy; concepts that moved off target (BH); "
            "predicted-vs-actual R² of the whole response; R² and sign agreement of the spill-over each plan "
            "predicted before training (shift relative to plain DPO of the concepts it did not target) against "
            "the shift measured; median training step time over plain DPO's. value [95 % interval]. A concept's "
            "‘removed’ below 0 is a rise above plain DPO (an amplify run). Runs trained in another order of the "
            "pairs are named run-order&lt;seed&gt; and read against plain DPO of the same order.</p>",
            html_table(ev.head_to_head_table(), max_chars=200),
        ]
    spread = ev.order_spread()
    if spread is not None:
        body = (
            "<p class='muted'>Each figure of a run trained in several orders of the training pairs: per order, "
            "mean, lowest, highest and range.</p>" + html_table(spread.round(3), max_chars=200)
        )
        parts.append(_folded(f"Spread over training orders ({spread['run'].nunique()} runs)", body, open_=True))
    wide = ev.comparison_table().reset_index()
    order = {"poisoning": 0, "target": 1, "preference": 2}
    wide = wide.sort_values("group", key=lambda g: g.map(lambda x: order.get(x, 9)), kind="stable")
    body = "<p class='muted'>value [95 % interval]; details in 05_evaluate.</p>" + html_table(wide, max_chars=200)
    parts.append(_folded(f"Evaluation: base vs plain DPO vs each intervention ({len(wide)} metrics)", body))
    parts.append(f"<h2>Refusal judge</h2><p>The refusal rows were scored by <b>{escape_text(ev.refusal_judge)}</b>.")
    judges = ev.judge_table()
    if judges is None:
        parts.append(" Its agreement with people was not measured in this run.</p>")
    else:
        parts += [
            " Its agreement with people, on human-labelled XSTest v2 completions of two model families, as "
            "written and with the sentences holding stock refusal phrases removed (a judge of meaning keeps its "
            "numbers in both readings):</p>",
            html_table(judges, max_chars=200),
        ]
    return parts


def _signal_table(t: pd.DataFrame) -> pd.DataFrame:
    """Ranked rows as people read them (``SIGNAL_COLUMNS``; ``SIGNAL_LEGEND`` explains them)."""
    out = t[[c for c in SIGNAL_COLUMNS if c in t.columns]].copy()
    for c in ("chosen_activity", "rejected_activity"):
        out[c] = out[c].map(lambda v: f"{100 * v:.0f} %")
    for c in ("cohens_d", "length_controlled_cohens_d"):
        out[c] = out[c].map(lambda v: f"{v:.2f}")
    out["q"] = out["q"].map(lambda v: f"{v:.2g}")
    out["split_half_agreement"] = out["split_half_agreement"].map(lambda v: f"{split_half_mark(v)} {v:.2f}")
    return out.rename(columns=SIGNAL_COLUMNS)


def report(run_dir: RunLike, out: str | os.PathLike | None = None, render: bool = True) -> Path:
    """Render ``run_dir/notebooks/*.ipynb`` to HTML and write ``index.html`` beside them.
    Returns the summary page's path (``out`` defaults to ``run_dir/report``)."""
    run = RunDir.of(run_dir)
    out_dir = Path(out) if out else run.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    pages = []
    for nb in sorted((run.path / "notebooks").glob("*.ipynb")):
        if render:
            done = nb.with_suffix(".html")  # written by the pipeline right after the notebook ran
            html = done if done.exists() and done.stat().st_mtime >= nb.stat().st_mtime else render_html(nb)
            target = out_dir / html.name
            with atomic_path(target) as tmp:
                tmp.write_bytes(html.read_bytes())
        pages.append(nb.stem)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>anatomy_nb report — {escape_text(run.path.name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>anatomy_nb report: {escape_text(run.path.name)}</h1>",
        f"<p class='muted'>{escape_text(str(run.path.resolve()))} · generated "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · notebooks and run details at the end</p>",
    ]
    if run.has("hypothesize") and run.has("extract"):
        parts.append(summary_html(run))
    target_path = run.path / "plan" / "target.json"
    if target_path.exists():
        t = read_json(target_path)
        cells = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in t.items()}
        parts += ["<h2>The audit's target</h2>", html_table(pd.DataFrame([cells]), max_chars=200)]
    if run.has("evaluate"):
        parts += _evaluation_sections(run)
    if run.has("compare_audits"):
        parts.append(compare_html(CompareResult.from_run(run)))
    if run.has("hypothesize"):
        hyp = run.hypotheses
        legend = f"<p class='muted'>{escape_text(SIGNAL_LEGEND)}</p>"
        ranked, by_topic = hyp.ranked().head(15), hyp.ranked_by_topic().head(10)
        parts.append(
            _folded(
                "Strongest concepts (whole response, opening, ending)",
                legend + html_table(_signal_table(ranked), max_chars=200),
            )
        )
        parts.append(
            _folded(
                "Strongest topic × concept signals (inside one kind of prompt)",
                legend + html_table(_signal_table(by_topic), max_chars=200),
            )
        )
    plan_path = run.plan_path
    if plan_path.exists():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        active = [c for c in plan.get("concepts", []) if c.get("action") != "allow"]
        parts.append(
            f"<h2>Intervention plan</h2><p>{len(active)} of {len(plan.get('concepts', []))} concepts changed "
            f"(<code>plan/{escape_text(plan_path.name)}</code>).</p>"
        )
        if active:
            df = pd.DataFrame(active)[["concept", "action", "method", "strength", "label"]]
            parts.append(html_table(df, max_chars=200))
    parts.append("<h2>Notebooks</h2><ul>")
    parts += [f"<li><a href='{escape_text(p)}.html'>{escape_text(p)}</a></li>" for p in pages] or [
        "<li>none executed yet (run <code>anatomy-nb run</code>)</li>"
    ]
    parts.append("</ul>")
    parts.append(_folded("Run: data, model, SAE, concepts, tests", html_table(_facts(run))))
    state_path = run.path / "pipeline.json"
    if state_path.exists():
        steps = read_json(state_path).get("steps", {})
        df = pd.DataFrame(
            [{"step": k, "status": v.get("status"), "seconds": v.get("seconds")} for k, v in steps.items()]
        )
        if not df.empty:
            parts.append(_folded("Pipeline steps", html_table(df)))
    parts.append("</body></html>")
    index = out_dir / "index.html"
    atomic_write_text(index, "".join(parts))
    return index
