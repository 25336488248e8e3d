"""Champion vs challenger on live rows, judged on given figures (no server)."""

from __future__ import annotations

import numpy as np

from monitoring.shadow import Pairs, summarise
from registry._compare import compare_live
from registry.policy import ComparisonPolicy

ROWS = 400


def pairs(challenger_wrong: int, champion_wrong: int = 0) -> Pairs:
    truth = np.array(["a", "b"] * (ROWS // 2), dtype=object)
    champion, challenger = truth.copy(), truth.copy()
    flip = {"a": "b", "b": "a"}
    champion[:champion_wrong] = [flip[t] for t in truth[:champion_wrong]]
    challenger[:challenger_wrong] = [flip[t] for t in truth[:challenger_wrong]]
    return Pairs("1", "2", "classification", truth, champion, challenger, shadow_rows=ROWS)


def test_a_challenger_as_good_on_the_live_rows_passes_the_live_comparison():
    verdict = compare_live(pairs(challenger_wrong=4, champion_wrong=4), ComparisonPolicy())
    assert verdict.passed
    assert verdict.figures["rows"] == ROWS
    assert "labelled live rows" in verdict.detail


def test_a_challenger_clearly_worse_on_the_live_rows_fails_it():
    verdict = compare_live(pairs(challenger_wrong=80), ComparisonPolicy())
    assert not verdict.passed
    assert verdict.figures["challenger_score"] == 1 - 80 / ROWS
    assert verdict.figures["champion_score"] == 1.0


def test_the_monitor_s_summary_gives_both_scores_the_interval_and_the_agreement():
    summary = summarise(pairs(challenger_wrong=40), min_rows=100)
    assert (summary.production_value, summary.shadow_value) == (1.0, 0.9)
    assert summary.low <= summary.improvement == -0.1 <= summary.high
    assert summary.agreement == 0.9


def test_too_few_pairs_give_the_counts_and_a_note_instead_of_figures():
    summary = summarise(pairs(challenger_wrong=0), min_rows=ROWS + 1)
    assert summary.improvement is None
    assert summary.rows == ROWS
    assert "not enough labelled shadow rows" in summary.note
