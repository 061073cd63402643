"""Figures and HTML shared by the notebooks.

Dataset text is untrusted: everything that puts it into HTML goes through :func:`escape_text`
(``html.escape`` with quotes), so a pair containing ``<script>`` is shown, never run.
Figures are plotly; :func:`setup_plotly` makes them self-contained so they survive HTML export
and open without a kernel or a network.
"""

from __future__ import annotations

import html
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

#: one colour per trained model, in model order (the base model is grey)
PALETTE = ["#1971c2", "#e8590c", "#2f9e44", "#9c36b5", "#f08c00", "#0c8599"]

__all__ = ["PALETTE", "escape_text", "html_table", "predicted_vs_actual_figure", "setup_notebook", "token_html"]


def setup_notebook() -> None:
    """What a stage notebook's first cell calls: plotly.js embedded in the output (once) so exported
    HTML works offline, and the libraries' deprecation chatter kept out of the rendered notebook
    (it says nothing about the data; the terminal still shows errors)."""
    pio.renderers.default = "notebook"
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*(TypedStorage|is_gradient_checkpointing|past_key_values).*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported


def escape_text(text: object, max_chars: int | None = None) -> str:
    s = "" if text is None else str(text)
    if max_chars is not None and len(s) > max_chars:
        s = s[: max_chars - 1] + "…"
    return html.escape(s, quote=True).replace("\n", "<br>")


def html_table(df: pd.DataFrame, max_chars: int = 400, columns: Sequence[str] | None = None) -> str:
    """An HTML table whose every cell is escaped text (no markup from the data survives)."""
    cols = list(columns or df.columns)
    head = "".join(f"<th style='text-align:left'>{escape_text(c)}</th>" for c in cols)
    rows = []
    for _, r in df.iterrows():
        cells = "".join(
            f"<td style='text-align:left;vertical-align:top;max-width:32em'>{escape_text(r[c], max_chars)}</td>"
            for c in cols
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table class='anatomy-nb'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def token_html(tokens: Iterable[str], values: Sequence[float] | None = None, peak: int | None = None) -> str:
    """Tokens as escaped spans, shaded by activation; the peak token outlined."""
    tokens = list(tokens)
    vmax = max(values) if values is not None and len(values) and max(values) > 0 else 1.0
    spans = []
    for i, t in enumerate(tokens):
        alpha = 0.0 if values is None else float(values[i]) / vmax
        style = f"background:rgba(255,140,0,{alpha:.2f});"
        if peak is not None and i == peak:
            style += "outline:2px solid #d9480f;background:rgba(255,140,0,0.6);"
        spans.append(f"<span style='{style}white-space:pre-wrap'>{escape_text(t)}</span>")
    return "".join(spans)


# --- stage 1 figures -------------------------------------------------------------------------------


def length_figure(lengths: pd.DataFrame):
    """Token lengths of chosen vs rejected responses (overlaid histograms + scatter)."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("response length (tokens)", "chosen vs rejected length per pair")
    )
    for side, color in (("chosen", "#2b8a3e"), ("rejected", "#c92a2a")):
        fig.add_trace(
            go.Histogram(x=lengths[side], name=side, opacity=0.6, marker_color=color, nbinsx=50), row=1, col=1
        )
    fig.add_trace(
        go.Scattergl(
            x=lengths["rejected"],
            y=lengths["chosen"],
            mode="markers",
            marker=dict(size=4, opacity=0.5),
            name="pairs",
            text=lengths["id"],
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    m = float(max(lengths["chosen"].max(), lengths["rejected"].max(), 1))
    fig.add_trace(
        go.Scatter(x=[0, m], y=[0, m], mode="lines", line=dict(dash="dot", color="grey"), showlegend=False),
        row=1,
        col=2,
    )
    fig.update_layout(barmode="overlay", height=360, margin=dict(t=40, b=40))
    fig.update_xaxes(title_text="tokens", row=1, col=1)
    fig.update_xaxes(title_text="rejected tokens", row=1, col=2)
    fig.update_yaxes(title_text="chosen tokens", row=1, col=2)
    return fig


def density_figure(fire_rate_all: np.ndarray):
    """How often each feature fires across responses (log scale): dead and dense features."""
    live = fire_rate_all[fire_rate_all > 0]
    fig = go.Figure(go.Histogram(x=np.log10(live), nbinsx=60, marker_color="#1971c2"))
    dead = int((fire_rate_all == 0).sum())
    fig.update_layout(
        title=f"feature density over responses ({len(live)} fire at least once, {dead} never)",
        xaxis_title="log10(fraction of responses where the feature fires)",
        yaxis_title="features",
        height=320,
        margin=dict(t=50, b=40),
    )
    return fig


def firing_rate_figure(rate_chosen: np.ndarray, rate_rejected: np.ndarray, labels: Sequence[str] | None = None):
    """Per-feature firing rate on chosen vs rejected responses (descriptive; stage 2 tests it)."""
    diff = rate_chosen - rate_rejected
    text = labels if labels is not None else [f"feature {i}" for i in range(len(diff))]
    fig = go.Figure(
        go.Scattergl(
            x=rate_rejected,
            y=rate_chosen,
            mode="markers",
            marker=dict(size=4, color=diff, colorscale="RdBu", cmid=0, colorbar=dict(title="chosen − rejected")),
            text=text,
            hovertemplate="%{text}<br>rejected %{x:.3f}<br>chosen %{y:.3f}<extra></extra>",
        )
    )
    m = float(max(rate_chosen.max(initial=0), rate_rejected.max(initial=0), 1e-3))
    fig.add_trace(go.Scatter(x=[0, m], y=[0, m], mode="lines", line=dict(dash="dot", color="grey"), showlegend=False))
    fig.update_layout(
        title="feature firing rate: chosen vs rejected responses",
        xaxis_title="fires on rejected (fraction of pairs)",
        yaxis_title="fires on chosen (fraction of pairs)",
        height=420,
        margin=dict(t=50, b=40),
    )
    return fig


def tradeoff_figure(h2h: pd.DataFrame):
    """The comparison's trade-off: per trained model, the fraction of plain DPO's increase of the
    concept to suppress that it removed (x) against the fraction of the concept to keep that it
    kept (y), with intervals, coloured by held-out preference accuracy; the ideal is the top-right
    corner. A sweep's points of one method (``reward_shaping@0.5``, ``@1``, …) are joined in the
    order of their strength. ``h2h``: ``EvalResult.head_to_head()`` of a run with one plant to
    suppress and one to keep. None when the table has no such pair."""
    removed = [c for c in h2h.columns if c.endswith(" removed")]
    kept = [c for c in h2h.columns if c.endswith(" kept")]
    if not removed or not kept:
        return None
    x, y = removed[0], kept[0]
    df = h2h[h2h["model"] != "plain"].copy()
    df["_method"] = df["model"].str.split("@").str[0].str.split("#").str[0]
    df["_strength"] = pd.to_numeric(df["model"].str.partition("@")[2], errors="coerce")
    accuracy = df["preference accuracy"] if "preference accuracy" in df else pd.Series(np.nan, index=df.index)

    def err(col):
        return dict(
            type="data",
            symmetric=False,
            array=(df[f"{col}_ci_high"] - df[col]).fillna(0),
            arrayminus=(df[col] - df[f"{col}_ci_low"]).fillna(0),
        )

    fig = go.Figure(
        go.Scatter(
            x=df[x],
            y=df[y],
            mode="markers+text",
            text=df["model"],
            textposition="top center",
            error_x=err(x),
            error_y=err(y),
            showlegend=False,
            marker=dict(
                size=11,
                color=accuracy,
                colorscale="Viridis",
                showscale=bool(accuracy.notna().any()),
                colorbar=dict(title="held-out<br>pref. acc."),
            ),
        )
    )
    for method, g in df[df["_strength"].notna()].groupby("_method", sort=False):
        if len(g) > 1:
            g = g.sort_values("_strength")
            fig.add_scatter(
                x=g[x],
                y=g[y],
                mode="lines",
                line=dict(width=1, color="#868e96"),
                name=f"{method} (by strength)",
                hoverinfo="skip",
            )
    fig.add_shape(type="rect", x0=0.8, x1=1.25, y0=0.9, y1=1.25, line=dict(width=0), fillcolor="rgba(47,158,68,0.12)")

    def span(col):  # an amplify run's "removed" lies below 0, a raised kept concept above 1: widen to show them
        v = df[col].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        return [
            min(-0.3, float(v.min()) - 0.15) if len(v) else -0.3,
            max(1.3, float(v.max()) + 0.15) if len(v) else 1.3,
        ]

    fig.update_layout(
        height=420,
        xaxis_title=f"{x.replace(' removed', '')}: fraction of plain DPO's increase removed",
        yaxis_title=f"{y.replace(' kept', '')}: fraction of plain DPO's increase kept",
        xaxis=dict(range=span(x)),
        yaxis=dict(range=span(y)),
    )
    return fig


def plan_shift_figure(plan_vs_actual: pd.DataFrame, plan_r2: pd.DataFrame | None = None):
    """Per intervention, a point per significant concept: the shift its plan predicted before
    training relative to plain DPO (x; stage 3, spill-over included) against the shift measured in
    the held-out generations (y). Targeted concepts are diamonds; the title carries the spill-over
    R² and sign agreement. ``EvalResult.plan_vs_actual()`` / ``plan_r2()``."""
    d = plan_vs_actual[plan_vs_actual["significant"].astype(bool)]
    r2 = (
        plan_r2[plan_r2["concepts"] == "spill-over"].set_index("model")
        if plan_r2 is not None and len(plan_r2)
        else None
    )
    fig = go.Figure()
    palette = ["#1971c2", "#e8590c", "#2f9e44", "#9c36b5", "#f08c00", "#0c8599", "#c2255c", "#5c940d"]
    for i, (model, g) in enumerate(d.groupby("model", sort=False)):
        name = model
        if r2 is not None and model in r2.index and np.isfinite(r2.at[model, "r2"]):
            name += f" (spill-over R² {r2.at[model, 'r2']:.2f}, sign {r2.at[model, 'sign_agreement']:.2f})"
        text = [escape_text(f"concept {c}: {lbl}", 120) for c, lbl in zip(g["concept"], g["label"].fillna(""))]
        fig.add_scatter(
            x=g["predicted_shift"],
            y=g["actual_shift"],
            mode="markers",
            name=name,
            text=text,
            marker=dict(
                color=palette[i % len(palette)],
                size=np.where(g["targeted"], 12, 7),
                symbol=np.where(g["targeted"], "diamond", "circle"),
                opacity=0.75,
            ),
            hovertemplate="%{text}<br>predicted %{x:.3f}<br>measured %{y:.3f}<extra>" + escape_text(model) + "</extra>",
        )
    fig.add_hline(y=0, line=dict(color="#adb5bd", width=1))
    fig.add_vline(x=0, line=dict(color="#adb5bd", width=1))
    fig.update_layout(
        title="The plan's prediction against what moved (relative to plain DPO)",
        height=440,
        xaxis_title="predicted shift under the plan (stage 3, before training)",
        yaxis_title="measured shift on generations (model − plain DPO)",
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def predicted_vs_actual_figure(pva: pd.DataFrame, r2: pd.DataFrame, models: Sequence[str], named: int = 6):
    """Stage 2's predicted change against the change measured on each model's generations, one panel
    per view (overall, topic), a colour per trained model; targeted concepts are diamonds, and the
    ``named`` concepts of largest |predicted| in each panel carry their name (escaped). None when
    there is nothing to draw."""
    r2 = r2.set_index(["model", "view"])
    trained = [m for m in models if m != "base"]
    views = [v for v in ("overall", "topic") if v in set(pva["view"])]
    if not views:
        return None
    palette = PALETTE
    titles = []
    for v in views:
        parts = [
            f"{m}: R²={r2.at[(m, v), 'r2']:.2f} [{r2.at[(m, v), 'ci_low']:.2f}, {r2.at[(m, v), 'ci_high']:.2f}]"
            for m in trained
            if (m, v) in r2.index and np.isfinite(r2.at[(m, v), "r2"])
        ]
        titles.append(f"{v} — " + ("; ".join(parts) if parts else "R² undefined (too few concepts)"))
    fig = make_subplots(rows=1, cols=len(views), subplot_titles=[escape_text(t) for t in titles])
    for j, v in enumerate(views, start=1):
        for i, name in enumerate(trained):
            d = pva[(pva["view"] == v) & (pva["model"] == name) & pva["in_fit"].astype(bool)]
            if d.empty:
                continue
            labels = [
                escape_text(f"concept {c}" + (f", topic {t}" if v == "topic" else "") + f": {lab}", 120)
                for c, t, lab in zip(d["concept"], d["topic"], d["label"].fillna(""))
            ]
            top = set(d["predicted"].abs().nlargest(named).index) if i == 0 else set()
            shown = [escape_text(lab, 40) if k in top else "" for k, lab in zip(d.index, d["label"].fillna(""))]
            fig.add_trace(
                go.Scatter(
                    x=d["predicted"],
                    y=d["actual_change"],
                    mode="markers+text",
                    text=shown,
                    textposition="top center",
                    textfont=dict(size=10, color="#495057"),
                    customdata=labels,
                    name=name,
                    legendgroup=name,
                    showlegend=j == 1,
                    marker=dict(
                        color=palette[i % len(palette)],
                        size=np.where(d["targeted"], 12, 7),
                        symbol=np.where(d["targeted"], "diamond", "circle"),
                        opacity=0.75,
                    ),
                    hovertemplate="%{customdata}<br>predicted %{x:.3f}<br>actual %{y:.3f}<extra>" + name + "</extra>",
                ),
                row=1,
                col=j,
            )
        fig.add_hline(y=0, line=dict(color="#adb5bd", width=1), row=1, col=j)
        fig.add_vline(x=0, line=dict(color="#adb5bd", width=1), row=1, col=j)
    fig.update_xaxes(title_text="predicted change (stage 2)")
    fig.update_yaxes(title_text="actual change on generations")
    fig.update_layout(title="Predicted vs actual", height=480, legend=dict(orientation="h", y=-0.2))
    return fig
