"""Two audits compared, as people read it (``stages.compare_audits``): one sentence per comparison
("no difference found" with the smallest effect the test could have found), a static plot of what
one side rewards that the other does not, and the side-by-side table. One renderer for notebook 07
and the report; escaped HTML and inline SVG, no script."""

from __future__ import annotations

import numpy as np

from ..results.compare_audits import CompareResult
from .viz import escape_text, html_table

__all__ = ["compare_html", "difference_svg"]


def difference_svg(result: CompareResult, comparison: str, top: int = 10, width: int = 720) -> str:
    """For the ``top`` concepts of one comparison: each side's effect (chosen − rejected activity at
    equal lengths) as two bars, A above B; significant differences are marked ★."""
    d = result.differences()
    d = d[d["comparison"] == comparison].head(top)
    if d.empty:
        return ""
    row_h, top_pad, label_w, right = 30, 30, 300, 20
    height = top_pad + row_h * len(d) + 24
    vals = np.r_[d["effect_a"].to_numpy(), d["effect_b"].to_numpy(), 0.0]
    span = max(float(np.abs(vals).max()), 1e-9)

    def X(v: float) -> float:
        return label_w + 10 + (v + span) / (2 * span) * (width - label_w - right - 10)

    a_name, b_name = ("A", "B") if result.mode == "data sets" else comparison.split(" vs ")
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='anb-differences' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='what each side rewards'>",
        f"<text x='{label_w}' y='14' font-size='11' fill='#495057'>chosen − rejected activity at equal lengths: "
        f"{escape_text(a_name)} (blue) vs {escape_text(b_name)} (orange); ★ q &lt; {result.fdr:g}</text>",
        f"<line x1='{X(0):.1f}' y1='{top_pad - 6}' x2='{X(0):.1f}' y2='{height - 20}' stroke='#868e96'/>",
    ]
    for i, r in enumerate(d.itertuples()):
        y = top_pad + i * row_h
        label = f"{'★ ' if r.significant else ''}{r.name or f'concept {r.concept}'}"
        out.append(
            f"<text x='{label_w - 6}' y='{y + 17}' font-size='12' text-anchor='end' fill='#212529'>"
            f"{escape_text(label, 42)}</text>"
        )
        for k, (v, colour) in enumerate(((r.effect_a, "#1971c2"), (r.effect_b, "#e8590c"))):
            x0, x1 = sorted((X(0), X(v)))
            out.append(
                f"<rect x='{x0:.1f}' y='{y + 4 + 11 * k}' width='{max(x1 - x0, 1):.1f}' height='10' "
                f"fill='{colour}' opacity='0.8'/>"
            )
    for v in (-span, 0.0, span):
        out.append(
            f"<text x='{X(v):.1f}' y='{height - 6}' font-size='10' text-anchor='middle' fill='#495057'>{v:+.3f}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def compare_html(result: CompareResult, top: int = 15) -> str:
    """The comparison's section: sentences, a plot and the table per comparison."""
    m = result.manifest
    sides = (
        f"A = {escape_text(m['a']['path'])} ({m['a']['n_pairs']} pairs), B = {escape_text(m['b']['path'])} "
        f"({m['b']['n_pairs']} pairs)"
        if result.mode == "data sets"
        else f"{escape_text(m['a']['path'])} ({m['a']['n_pairs']} pairs), each annotator's vote per pair"
    )
    parts = [
        "<section class='anb-compare' id='compare-audits'>",
        f"<h2>Two audits compared: {escape_text(result.mode)}</h2>",
        f"<p class='muted'>{sides}; one concept space of {m['n_concepts']} concepts, clustered once on every "
        "response of both sides.</p><ul>",
        *(f"<li>{escape_text(s)}</li>" for s in result.sentences()),
        "</ul>",
    ]
    for comparison in result.comparisons()["comparison"]:
        parts.append(f"<h3>{escape_text(comparison)}</h3>")
        parts.append(difference_svg(result, comparison))
        parts.append(html_table(result.table(comparison, top=top), max_chars=160))
    parts.append("</section>")
    return "".join(parts)
