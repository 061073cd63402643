"""``anatomy-nb report RUN_DIR``: the executed notebooks and a summary page as standalone HTML.

Everything opens from disk without a kernel or a network: plotly figures are embedded by the
notebooks (``viz.setup_plotly``), widgets fall back to the static views they also emit
(``notebooks.static_widgets``), and the summary page is plain escaped HTML with no script at all.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..core.files import atomic_path, atomic_write_text, read_json
from ..core.run import Run, RunLike
from ..results.hypotheses import split_half_mark
from .notebooks import render_html
from .viz import escape_text, html_table

__all__ = ["report"]

_STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;
margin:24px auto;padding:0 16px;color:#212529}
table{border-collapse:collapse;font-size:13px}th,td{border-top:1px solid #e9ecef;padding:3px 6px}th{background:#f1f3f5}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}.muted{color:#868e96}code{background:#f1f3f5;padding:0 3px}"""


def _facts(run: Run) -> pd.DataFrame:
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


def _pipeline_sections(run: Run) -> list[str]:
    """What ``anatomy-nb run`` adds: the audit's target (and, for a poisoned run, whether it is the
    planted concept), the evaluation's comparison table, and the time each step took."""
    parts: list[str] = []
    target_path = run.path / "plan" / "target.json"
    if target_path.exists():
        t = read_json(target_path)
        parts += [
            "<h2>The audit's target</h2>",
            html_table(
                pd.DataFrame([{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in t.items()}]), max_chars=200
            ),
        ]
    if run.has("evaluate"):
        ev = run.evaluation
        parts += [
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
                "better. The ceiling is the split-half reliability of the audit times that of the measured change."
                "</p>",
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
                "‘removed’ below 0 is a rise above plain DPO (an amplify run).</p>",
                html_table(ev.head_to_head_table(), max_chars=200),
            ]
        wide = ev.comparison_table().reset_index()
        order = {"poisoning": 0, "target": 1, "preference": 2}
        wide = wide.sort_values("group", key=lambda g: g.map(lambda x: order.get(x, 9)), kind="stable")
        parts += [
            "<h2>Evaluation: base vs plain DPO vs each intervention</h2>",
            "<p class='muted'>value [95 % interval]; details in 05_evaluate.</p>",
            html_table(wide, max_chars=200),
        ]
        parts.append(
            f"<h2>Refusal judge</h2><p>The refusal rows were scored by <b>{escape_text(ev.refusal_judge)}</b>."
        )
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
    state_path = run.path / "pipeline.json"
    if state_path.exists():
        steps = read_json(state_path).get("steps", {})
        df = pd.DataFrame(
            [{"step": k, "status": v.get("status"), "seconds": v.get("seconds")} for k, v in steps.items()]
        )
        if not df.empty:
            parts += ["<h2>Pipeline steps</h2>", html_table(df)]
    return parts


def _signal_table(t: pd.DataFrame) -> pd.DataFrame:
    """Ranked rows as people read them: where, effect, z, q, split-half ✓/✗, the label."""
    out = t[
        [
            "where",
            "concept",
            "n_features",
            "chosen_rate",
            "rejected_rate",
            "mean_diff",
            "z",
            "cohens_d",
            "q",
            "split_half_agreement",
            "predicted_direction",
            "label",
        ]
    ].copy()
    for c in ("chosen_rate", "rejected_rate", "mean_diff", "cohens_d"):
        out[c] = out[c].map(lambda v: f"{v:.3f}")
    out["z"] = out["z"].map(lambda v: f"{v:.1f}")
    out["q"] = out["q"].map(lambda v: f"{v:.2g}")
    out["split_half_agreement"] = out["split_half_agreement"].map(lambda v: f"{split_half_mark(v)} {v:.2f}")
    return out.rename(columns={"split_half_agreement": "split-half"})


def report(run_dir: RunLike, out: str | os.PathLike | None = None, render: bool = True) -> Path:
    """Render ``run_dir/notebooks/*.ipynb`` to HTML and write ``index.html`` beside them.
    Returns the summary page's path (``out`` defaults to ``run_dir/report``)."""
    run = Run.of(run_dir)
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
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
        "<h2>Notebooks</h2><ul>",
    ]
    parts += [f"<li><a href='{escape_text(p)}.html'>{escape_text(p)}</a></li>" for p in pages] or [
        "<li>none executed yet (run <code>anatomy-nb run</code>)</li>"
    ]
    parts.append("</ul><h2>Run</h2>")
    parts.append(html_table(_facts(run)))
    if run.has("hypothesize"):
        hyp = run.hypotheses
        parts += [
            "<h2>Strongest concepts (whole response, opening, ending)</h2>",
            html_table(_signal_table(hyp.ranked().head(15)), max_chars=200),
        ]
        parts += [
            "<h2>Strongest topic × concept signals (inside one kind of prompt)</h2>",
            html_table(_signal_table(hyp.ranked_by_topic().head(10)), max_chars=200),
        ]
    parts += _pipeline_sections(run)
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
    parts.append("</body></html>")
    index = out_dir / "index.html"
    atomic_write_text(index, "".join(parts))
    return index
