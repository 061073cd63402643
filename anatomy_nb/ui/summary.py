"""What DPO on this data will teach, in words: the first section of the report, of notebook 02 and
of the viewer — one renderer for all three (``summary_html``).

Everything in it comes from stage 2's artifacts and the feature store's pairs; nothing is written by
a model unless stage 2 stored an LLM explanation (``HypothesizeConfig.explain``), which is then
quoted with its fidelity. The parts:

- a headline sentence: how many concepts DPO would raise and lower (significant at the FDR level), or,
  when nothing is significant, that sentence and the smallest effect the test could have found;
- a static plot of the listed concepts' effects (Cohen's d of the paired difference, 95 % interval,
  and the effect at equal lengths) as inline SVG — the report's content-security policy blocks
  scripts and ``data:`` images, and an SVG needs neither, nor a kernel;
- the strongest concepts DPO would raise and lower: each by its name, how often its features fire
  in chosen vs rejected responses, d, q, whether it survives the length control, what it points at
  (its name, the text statistics it tracks, the LLM explanation if any) and one short example with
  the concept's peak token outlined;
- the data's length and formatting biases, one sentence each, and what the text statistics and the
  linear baseline already explain.

Dataset text is untrusted: every string from the data goes through ``viz.escape_text``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..core.contrast import minimum_detectable_d
from ..results.hypothesize import Hypotheses
from ..results.run import RunDir, RunLike
from .viz import escape_text, token_html

__all__ = ["Lesson", "TeachingSummary", "minimum_detectable_d", "summary_html", "teaching_summary"]

#: formatting statistics of ``data.textstats`` described to people, in the order sentences are written
FORMATTING = {
    "bold": "bold markdown",
    "headers": "markdown headers",
    "list_items": "list items",
    "emoji": "emoji",
    "code": "code blocks",
    "exclamations": "exclamation marks",
    "questions": "question marks",
}
OTHER_STATS = {
    "apology": "apologies",
    "refusal_phrase": "refusal phrases",
    "agreement_opener": "openers that agree",
    "flattery_opener": "flattering openers",
    "second_person": "second-person address",
    "numbers": "numbers",
    "urls": "links",
    "ends_with_question": "a closing question",
}
WHERE = {"overall": "responses", "opening": "openings", "ending": "endings"}
_STYLE = """<style>
.anb-summary{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:14px;color:#212529;max-width:1060px}
.anb-summary h2{font-size:19px;margin:4px 0 6px}.anb-summary h3{font-size:15px;margin:14px 0 4px}
.anb-summary .anb-lead{font-size:15px;margin:4px 0 8px}.anb-summary ol,.anb-summary ul{margin:2px 0;padding-left:22px}
.anb-summary li{margin:3px 0 7px}.anb-summary .anb-muted{color:#6c757d;font-size:12.5px}
.anb-summary .anb-example{font-family:ui-monospace,monospace;font-size:12px;background:#f8f9fa;padding:1px 4px}
.anb-summary .anb-cols{display:grid;grid-template-columns:1fr 1fr;gap:18px}
</style>"""


@dataclass
class Lesson:
    """One concept DPO on this data would raise or lower."""

    rank: int  # in the ranked table (``Hypotheses.ranked``), from 1
    concept: int
    direction: str  # "raises" or "lowers"
    name: str
    where: str  # overall | opening | ending
    n_features: int
    chosen_activity: float  # mean share of its features firing on the chosen side
    rejected_activity: float
    cohens_d: float
    ci: tuple[float, float]
    q: float
    length_controlled_d: float
    survives_length_control: bool
    points_at: list[str] = field(default_factory=list)
    example: dict | None = None  # a top context: tokens, peak, side, pair


@dataclass
class TeachingSummary:
    """What stage 2 says DPO on this data will teach (``teaching_summary``); ``html()`` renders it."""

    n_pairs: int
    n_units: int
    n_tests: int
    fdr: float
    n_raise: int
    n_lower: int
    lessons: list[Lesson]
    biases: list[str]
    baselines: list[str]
    minimum_d: float

    @property
    def headline(self) -> str:
        if not self.n_raise and not self.n_lower:
            return (
                f"Nothing separates chosen from rejected responses at q < {self.fdr:g}: no concept among "
                f"{self.n_tests:,} tests over {self.n_units:,} prompts. The smallest effect this test could have "
                f"found is d ≈ {self.minimum_d:.2f} (80 % power); DPO on this data may still learn smaller ones."
            )
        return (
            f"DPO on these {self.n_pairs:,} pairs would raise {self.n_raise} concept{'s' * (self.n_raise != 1)} "
            f"and lower {self.n_lower} (significant at q < {self.fdr:g} among {self.n_tests:,} tests over "
            f"{self.n_units:,} prompts). The strongest:"
        )

    def html(self) -> str:
        parts = [
            _STYLE,
            "<section class='anb-summary' id='what-it-teaches'>",
            "<h2>What DPO on this data will teach</h2>",
        ]
        parts.append(f"<p class='anb-lead'>{escape_text(self.headline)}</p>")
        if self.lessons:
            parts.append(effect_svg(self.lessons))
            columns = []
            for direction, title in (("raises", "DPO would raise"), ("lowers", "DPO would lower")):
                items = [lesson_html(x) for x in self.lessons if x.direction == direction]
                body = f"<ol>{''.join(items)}</ol>" if items else "<p class='anb-muted'>none significant</p>"
                columns.append(f"<div><h3>{title}</h3>{body}</div>")
            parts.append(f"<div class='anb-cols'>{''.join(columns)}</div>")
        parts.append("<h3>Biases of the data</h3><ul>")
        parts += [f"<li>{escape_text(b)}</li>" for b in self.biases]
        parts.append("</ul><h3>What simpler baselines already explain</h3><ul>")
        parts += [f"<li>{escape_text(b)}</li>" for b in self.baselines]
        parts.append("</ul></section>")
        return "".join(parts)


def _d_interval(d: float, n: int) -> tuple[float, float]:
    """95 % interval of a paired Cohen's d (normal approximation of its standard error)."""
    se = np.sqrt(1 / max(n, 1) + d * d / (2 * max(n, 1)))
    return float(d - 1.96 * se), float(d + 1.96 * se)


def _lesson(row: pd.Series, direction: str) -> Lesson:
    points = []
    if row.get("text_stats"):
        points.append(f"tracks {row['text_stats']}")
    explanation = str(row.get("llm_explanation") or "")
    if explanation:
        fidelity = row.get("llm_fidelity_auroc")
        score = f" (fidelity AUROC {fidelity:.2f})" if fidelity is not None and np.isfinite(fidelity) else ""
        points.append(f"an LLM reads it as “{explanation}”{score}")
    if row.get("peak_tokens"):
        points.append(f"peaks on {row['peak_tokens']}")
    want = "chosen" if direction == "raises" else "rejected"
    contexts = list(row.get("example_contexts") if row.get("example_contexts") is not None else [])
    example = next((c for c in contexts if c.get("side") == want), contexts[0] if contexts else None)
    lc_d = float(row.get("length_controlled_cohens_d", np.nan))
    return Lesson(
        rank=int(row["rank"]),
        concept=int(row["concept"]),
        direction=direction,
        name=str(row.get("name") or row.get("label") or f"concept {int(row['concept'])}"),
        where=str(row["view"]),
        n_features=int(row["n_features"]),
        chosen_activity=float(row["chosen_activity"]),
        rejected_activity=float(row["rejected_activity"]),
        cohens_d=float(row["cohens_d"]),
        ci=_d_interval(float(row["cohens_d"]), int(row["n_units"])),
        q=float(row["q"]),
        length_controlled_d=lc_d,
        survives_length_control=bool(row.get("effect_survives_length_control", False)),
        points_at=points,
        example=dict(example) if example is not None else None,
    )


def _length_sentence(stats: pd.DataFrame, chosen_words: np.ndarray, rejected_words: np.ndarray, fdr: float) -> str:
    row = stats.set_index("statistic").loc["log_length"] if "log_length" in set(stats["statistic"]) else None
    mc, mr = float(np.median(chosen_words)), float(np.median(rejected_words))
    if row is None or not row["q"] < fdr:
        q = "" if row is None else f"; q = {row['q']:.2g}"
        return f"Chosen and rejected responses are about as long (median {mc:.0f} vs {mr:.0f} words{q})."
    shorter = row["mean_diff"] < 0
    return (
        f"Chosen responses are {'shorter' if shorter else 'longer'} than rejected ones (median {mc:.0f} vs {mr:.0f} "
        f"words; d = {row['cohens_d']:.2f}, q = {row['q']:.2g}): DPO on this data rewards "
        f"{'brevity' if shorter else 'length'}."
    )


def _stat_sentences(stats: pd.DataFrame, fdr: float) -> tuple[list[str], list[str]]:
    """(one sentence per formatting statistic that separates the sides, or one saying none does;
    the other text statistics that separate them)."""
    by = stats.set_index("statistic")
    out, quiet = [], []
    for key, words in FORMATTING.items():
        if key not in by.index:
            continue
        r = by.loc[key]
        if r["q"] < fdr:
            more = r["mean_diff"] > 0
            counts = f"{r['chosen_mean']:.2f} vs {r['rejected_mean']:.2f} per response; q = {r['q']:.2g}"
            out.append(
                f"Chosen responses carry {'more' if more else 'fewer'} {words} than rejected ones ({counts}): "
                f"DPO would {'raise' if more else 'lower'} them."
            )
        else:
            quiet.append(words)
    if quiet:
        out.append(
            f"No {'other ' * bool(out)}formatting statistic separates the sides at q < {fdr:g} ({', '.join(quiet)})."
        )
    others = [
        f"{words} ({by.at[key, 'chosen_mean']:.2f} vs {by.at[key, 'rejected_mean']:.2f}, q = {by.at[key, 'q']:.2g})"
        for key, words in OTHER_STATS.items()
        if key in by.index and by.at[key, "q"] < fdr
    ]
    return out, others


def teaching_summary(run: RunLike, n: int = 3) -> TeachingSummary:
    """The summary of a run directory's latest stage-2 result: the ``n`` strongest concepts DPO
    would raise and the ``n`` it would lower (each concept once, at its best-ranked view)."""
    run = RunDir.of(run)
    hyp: Hypotheses = run.hypotheses
    m = hyp.manifest
    fdr = float(m.get("config", {}).get("fdr", 0.05))
    ranked = hyp.ranked()
    sig = ranked[ranked["significant"].astype(bool) & (ranked["source"] == "sae")]
    firsts = sig.drop_duplicates("concept")
    ups, downs = firsts[firsts["mean_diff"] > 0], firsts[firsts["mean_diff"] < 0]
    lessons = [_lesson(r, "raises") for _, r in ups.head(n).iterrows()]
    lessons += [_lesson(r, "lowers") for _, r in downs.head(n).iterrows()]
    pairs = run.store.pairs()
    chosen_words = np.asarray([len(p.chosen.split()) for p in pairs])
    rejected_words = np.asarray([len(p.rejected.split()) for p in pairs])
    stats = hyp.baseline_text_stats
    formatting, others = _stat_sentences(stats, fdr)
    biases = [_length_sentence(stats, chosen_words, rejected_words, fdr), *formatting]
    baselines = []
    cv = (m.get("linear_baseline") or {}).get("cv_accuracy")
    if cv is not None and np.isfinite(cv):
        baselines.append(
            f"A linear classifier on the SAE features tells chosen from rejected with {100 * cv:.0f} % cross-validated "
            f"accuracy (50 % is chance): how much of the preference the features carry at all."
        )
    n_stats = int((stats["q"] < fdr).sum())
    baselines.append(
        f"{n_stats} of {len(stats)} plain text statistics separate the sides at q < {fdr:g}"
        + (f"; besides length and formatting: {'; '.join(others)}." if others else ".")
    )
    tracked = [x for x in lessons if any(p.startswith("tracks") for p in x.points_at)]
    if lessons:
        baselines.append(
            f"{len(tracked)} of the {len(lessons)} concepts listed track a text statistic (|r| ≥ 0.1), "
            "so part of what they say a statistic could say too; the audit's own predictions are scored against "
            "length, text statistics and a linear classifier after training (stage 5)."
        )
    overall = sig[sig["view"] != "topic"].drop_duplicates("concept")
    return TeachingSummary(
        n_pairs=int(m.get("n_pairs", len(pairs))),
        n_units=int(m.get("n_units", len(pairs))),
        n_tests=int(m.get("n_tests", len(hyp.table))),
        fdr=fdr,
        n_raise=int((overall["mean_diff"] > 0).sum()),
        n_lower=int((overall["mean_diff"] < 0).sum()),
        lessons=lessons,
        biases=biases,
        baselines=baselines,
        minimum_d=minimum_detectable_d(int(m.get("n_units", len(pairs))), int(m.get("n_tests", 1)), fdr),
    )


def lesson_html(x: Lesson) -> str:
    """One listed concept: name, how often it fires on each side, effect, length control, what it
    points at, an example (every string escaped)."""
    where = WHERE.get(x.where, x.where)
    survives = (
        f"holds at equal lengths (d = {x.length_controlled_d:.2f})"
        if x.survives_length_control
        else f"<b>not</b> at equal lengths (d = {x.length_controlled_d:.2f}): partly length"
    )
    parts = [
        f"<b>{escape_text(x.name, 90)}</b> <span class='anb-muted'>(rank {x.rank}, concept {x.concept}, "
        f"{escape_text(x.where if x.where != 'overall' else 'whole response')})</span><br>",
        (f"its {x.n_features} features fire " if x.n_features != 1 else "its one feature fires ")
        + f"{100 * x.chosen_activity:.0f} % of the time in chosen {escape_text(where)} "
        f"vs {100 * x.rejected_activity:.0f} % in rejected; d = {x.cohens_d:.2f}, q = {x.q:.2g}; {survives}.",
    ]
    if x.points_at:
        parts.append(f"<br><span class='anb-muted'>Points at: {escape_text('; '.join(x.points_at), 300)}</span>")
    if x.example is not None and len(x.example.get("tokens", [])):
        ex = x.example
        tokens = token_html(list(ex["tokens"]), peak=int(ex.get("peak", -1)))
        parts.append(
            f"<br><span class='anb-muted'>e.g. {escape_text(ex.get('side', ''))} response, pair "
            f"{int(ex.get('pair', -1))}:</span> <span class='anb-example'>{tokens}</span>"
        )
    return f"<li>{''.join(parts)}</li>"


def effect_svg(lessons: list[Lesson], width: int = 720) -> str:
    """The listed concepts' effects as an inline SVG: Cohen's d (bar) with its 95 % interval and the
    effect at equal lengths (hollow diamond), one row each; no script, no external resource. The axis
    spans the intervals; an effect at equal lengths far beyond them (a degenerate length fit on tiny
    data) sits at the axis's end, drawn filled."""
    row_h, top, label_w, right = 24, 26, 300, 20
    height = top + row_h * len(lessons) + 30
    lo = min([-0.25] + [x.ci[0] for x in lessons])
    hi = max([0.25] + [x.ci[1] for x in lessons])
    reach = 1.5 * max(abs(lo), abs(hi))
    controlled = [float(np.clip(x.length_controlled_d, -reach, reach)) for x in lessons]
    lo, hi = (
        min([lo, *(c for c in controlled if np.isfinite(c))]),
        max([hi, *(c for c in controlled if np.isfinite(c))]),
    )
    span = hi - lo

    def X(v: float) -> float:
        return label_w + 10 + (v - lo) / span * (width - label_w - right - 10)

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='anb-effects' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='effect of each listed concept'>",
        "<title>Effect of each listed concept: Cohen's d of chosen − rejected with its 95 % interval; "
        "diamond: the effect at equal lengths</title>",
        f"<text x='{label_w}' y='14' font-size='11' fill='#495057'>Cohen's d, chosen − rejected "
        "(bar, 95 % interval; ◇ at equal lengths)</text>",
        f"<line x1='{X(0):.1f}' y1='{top - 4}' x2='{X(0):.1f}' y2='{height - 24}' stroke='#868e96'/>",
    ]
    for i, x in enumerate(lessons):
        y = top + i * row_h
        colour = "#1971c2" if x.direction == "raises" else "#e8590c"
        x0, x1 = sorted((X(0), X(x.cohens_d)))
        out.append(
            f"<text x='{label_w - 6}' y='{y + 15}' font-size='12' text-anchor='end' fill='#212529'>"
            f"{escape_text(f'{x.rank}. {x.name}', 42)}</text>"
        )
        out.append(
            f"<rect x='{x0:.1f}' y='{y + 5}' width='{max(x1 - x0, 1):.1f}' height='13' fill='{colour}' opacity='0.75'/>"
        )
        out.append(
            f"<line x1='{X(x.ci[0]):.1f}' y1='{y + 11.5}' x2='{X(x.ci[1]):.1f}' y2='{y + 11.5}' "
            "stroke='#212529' stroke-width='1.5'/>"
        )
        if np.isfinite(controlled[i]):
            cx = X(controlled[i])
            fill = "white" if controlled[i] == x.length_controlled_d else "#212529"
            out.append(
                f"<polygon points='{cx:.1f},{y + 5} {cx + 5:.1f},{y + 11.5} {cx:.1f},{y + 18} {cx - 5:.1f},{y + 11.5}' "
                f"fill='{fill}' stroke='#212529'/>"
            )
    magnitude = 10.0 ** np.floor(np.log10(span / 5))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if span / (m * magnitude) <= 6)
    for v in np.arange(np.ceil(lo / step) * step, hi + 1e-9, step):
        out.append(
            f"<text x='{X(v):.1f}' y='{height - 8}' font-size='10' text-anchor='middle' fill='#495057'>"
            f"{v + 0.0:.2f}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def summary_html(run: RunLike, n: int = 3) -> str:
    """The summary section as self-contained HTML (its own scoped style, inline SVG, no script):
    what the report, notebook 02 and the viewer show first."""
    return teaching_summary(run, n).html()
