"""What DPO on this data will teach (ui/summary.py): the words, the numbers behind them, the null
sentence with the smallest effect the test could have found, and escaping."""

import numpy as np
import pytest
from scipy import stats as sps

from anatomy_nb.ui.summary import Lesson, TeachingSummary, minimum_detectable_d, summary_html, teaching_summary


def test_the_minimum_detectable_effect_is_the_z_test_power_formula():
    d = minimum_detectable_d(400, 1000, 0.05)
    assert d == pytest.approx((sps.norm.ppf(1 - 0.05 / 1000 / 2) + sps.norm.ppf(0.8)) / 20)
    assert minimum_detectable_d(1600, 1000, 0.05) == pytest.approx(d / 2)  # four times the prompts: half the effect
    assert minimum_detectable_d(400, 1, 0.05) < d  # fewer tests: a lower bar


def test_nothing_significant_says_so_with_the_smallest_effect_it_could_find():
    s = TeachingSummary(
        n_pairs=120,
        n_units=100,
        n_tests=500,
        fdr=0.05,
        n_raise=0,
        n_lower=0,
        lessons=[],
        biases=["b"],
        baselines=["c"],
        minimum_d=minimum_detectable_d(100, 500, 0.05),
    )
    html = s.html()
    assert "Nothing separates chosen from rejected" in html and f"d ≈ {s.minimum_d:.2f}" in html
    assert "<svg" not in html  # no plot of nothing


def test_a_lesson_renders_its_numbers_and_escapes_the_data():
    lesson = Lesson(
        rank=1,
        concept=3,
        direction="raises",
        name="“<b>bold</b>”",
        where="opening",
        n_features=5,
        chosen_activity=0.5,
        rejected_activity=0.05,
        cohens_d=0.9,
        ci=(0.7, 1.1),
        q=1e-9,
        length_controlled_d=0.85,
        survives_length_control=True,
        points_at=["tracks +bold (r=0.9)"],
        example={"side": "chosen", "pair": 4, "tokens": ["<script>", "x"], "peak": 0},
    )
    s = TeachingSummary(
        n_pairs=10,
        n_units=10,
        n_tests=10,
        fdr=0.05,
        n_raise=1,
        n_lower=0,
        lessons=[lesson],
        biases=["<i>x</i>"],
        baselines=[],
        minimum_d=1.0,
    )
    html = s.html()
    assert "<script>" not in html and "<b>bold</b>" not in html and "&lt;script&gt;" in html and "&lt;i&gt;" in html
    assert "fire 50 % of the time in chosen openings vs 5 % in rejected; d = 0.90" in html
    assert "holds at equal lengths (d = 0.85)" in html and "<svg" in html and "would raise 1 concept " in html


def test_the_summary_of_a_tiny_run_lists_what_separates_the_sides(tiny_eval):
    """The tiny run's chosen responses open with a flattering phrase: something is significant, each
    lesson's numbers are the hypotheses table's, and lessons are the strongest in rank order."""
    s = teaching_summary(tiny_eval.run)
    assert s.n_raise + s.n_lower > 0 and s.lessons
    ranked = s.lessons[0]
    table = __import__("anatomy_nb").RunDir(tiny_eval.run).hypotheses.ranked()
    row = table[(table["concept"] == ranked.concept) & (table["view"] == ranked.where)].iloc[0]
    assert (
        ranked.rank == row["rank"]
        and ranked.cohens_d == pytest.approx(row["cohens_d"])
        and ranked.q == pytest.approx(row["q"])
    )
    for direction in ("raises", "lowers"):
        ranks = [x.rank for x in s.lessons if x.direction == direction]
        assert ranks == sorted(ranks) and len(ranks) <= 3
    assert all(np.isfinite(x.ci).all() and x.ci[0] <= x.cohens_d <= x.ci[1] for x in s.lessons)
    assert any("words" in b for b in s.biases)
    html = summary_html(tiny_eval.run)
    assert html.count("<li>") >= len(s.lessons) and "What DPO on this data will teach" in html
