"""Forecast metrics on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from odyssey.forecast.metrics import ranked_codes, recall_precision_at, risk_auroc, share_with_outcome


def test_codes_rank_by_how_many_futures_hold_them():
    first_visits = [
        ["A", "B", "B", "C"],  # B twice in one future still counts once
        ["B", "D"],
        ["B", "A"],
        ["E"],
    ]
    assert ranked_codes(first_visits) == ["B", "A", "C", "D", "E"]  # B 3, A 2, then ties alphabetically
    assert ranked_codes([[], []]) == []


def test_recall_and_precision_at_k():
    ranked = ["B", "A", "C", "D", "E"]
    truth = {"A", "D", "X"}
    assert recall_precision_at(ranked, truth, 1) == (0.0, 0.0)
    assert recall_precision_at(ranked, truth, 2) == (1 / 3, 1 / 2)
    assert recall_precision_at(ranked, truth, 4) == (2 / 3, 2 / 4)
    assert recall_precision_at(ranked, truth, 10) == (2 / 3, 2 / 10)  # precision divides by k, not by 5
    with pytest.raises(ValueError, match="at least one real code"):
        recall_precision_at(ranked, set(), 5)


def test_share_of_futures_with_the_outcome_inside_the_horizon():
    death = 7
    tokens = [np.array([3, 7, 4]), np.array([3, 5, 4]), np.array([3, 7]), np.array([7])]
    times = [np.array([10.0, 10.0, 10.0]), np.array([11.0, 11.0, 11.0]), np.array([40.5, 40.5]), np.array([40.0])]
    # Starting at day 10 with a 30-day horizon: day 40 counts (inclusive), day 40.5 does not.
    assert share_with_outcome(tokens, times, 10.0, death, 30.0) == 0.5
    assert share_with_outcome(tokens, times, 10.0, death, 31.0) == 0.75
    assert share_with_outcome(tokens, times, 10.0, 99, 30.0) == 0.0


def test_risk_auroc_matches_scikit_learn_and_has_an_interval():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    risks = np.round(np.clip(labels * 0.3 + rng.random(200) * 0.8, 0, 1) * 8) / 8  # K = 8: shares, many ties
    subjects = np.arange(200) // 2
    result = risk_auroc(subjects, labels, risks, resamples=300, seed=0)
    assert result["value"] == pytest.approx(roc_auc_score(labels, risks), abs=1e-12)
    assert result["low"] < result["value"] < result["high"]
    assert result["n"] == 200 and result["positives"] == int(labels.sum())
    single = risk_auroc(subjects[:5], np.zeros(5, bool), risks[:5], resamples=10, seed=0)
    assert single["value"] is None and single["positives"] == 0
