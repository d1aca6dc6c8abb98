"""Metrics against scikit-learn, bootstrap intervals over subjects, and threshold choice on tuning."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from odyssey.finetune import metrics as M


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(float)
    p = np.clip(np.round(0.35 + 0.25 * y + rng.normal(0, 0.2, 400), 2), 0, 1)  # rounding makes ties
    return y, p


def test_point_metrics_equal_sklearn(scored):
    y, p = scored
    ones = np.ones((1, len(y)))
    assert M.auroc(y, p, ones)[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert M.auprc(y, p, ones)[0] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert M.brier(y, p, ones)[0] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert M.f1_at(0.5)(y, p, ones)[0] == pytest.approx(f1_score(y, p >= 0.5), abs=1e-12)


def test_weighted_metrics_equal_sklearn_sample_weights(scored):
    y, p = scored
    weights = np.random.default_rng(1).integers(0, 4, size=(3, len(y))).astype(float)
    for r in range(3):
        w = weights[r]
        assert M.auroc(y, p, weights)[r] == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
        assert M.auprc(y, p, weights)[r] == pytest.approx(average_precision_score(y, p, sample_weight=w), abs=1e-12)
        assert M.brier(y, p, weights)[r] == pytest.approx(brier_score_loss(y, p, sample_weight=w), abs=1e-12)
        assert M.f1_at(0.4)(y, p, weights)[r] == pytest.approx(f1_score(y, p >= 0.4, sample_weight=w), abs=1e-12)


def test_ece_against_a_direct_computation(scored):
    y, p = scored
    bins = np.minimum((p * M.CALIBRATION_BINS).astype(int), M.CALIBRATION_BINS - 1)
    expected = sum(abs((p[bins == b] - y[bins == b]).sum()) for b in range(M.CALIBRATION_BINS)) / len(y)
    assert M.ece(y, p, np.ones((1, len(y))))[0] == pytest.approx(expected, abs=1e-12)
    assert M.ece(y, y * 0.999, np.ones((1, len(y))))[0] < 1e-3  # calibrated and sharp


def test_auroc_without_both_classes_is_nan():
    assert np.isnan(M.auroc(np.zeros(5), np.linspace(0, 1, 5), np.ones((1, 5)))[0])


def test_bootstrap_resamples_subjects_not_examples():
    subjects = np.repeat(np.arange(50), 3)  # three examples per subject
    weights = M.bootstrap_weights(subjects, 1000, seed=0)
    assert weights.shape == (1000, 150)
    assert (weights.sum(1) == 150).all()  # 50 subjects drawn, 3 examples each
    assert (weights[:, 0::3] == weights[:, 1::3]).all() and (weights[:, 0::3] == weights[:, 2::3]).all()
    # Each subject is drawn Binomial(50, 1/50) times: mean 1, variance 0.98.
    assert weights[:, ::3].mean() == pytest.approx(1.0, abs=0.01)
    assert weights[:, ::3].var() == pytest.approx(0.98, abs=0.03)


def test_interval_matches_a_loop_of_sklearn_resamples(scored):
    y, p = scored
    subjects = np.arange(len(y)) // 2
    weights = M.bootstrap_weights(subjects, 300, seed=3)
    interval = M.with_interval(M.auroc, y, p, weights)
    looped = [roc_auc_score(y, p, sample_weight=w) for w in weights]
    assert interval["value"] == pytest.approx(roc_auc_score(y, p))
    assert interval["low"] == pytest.approx(np.percentile(looped, 2.5), abs=1e-12)
    assert interval["high"] == pytest.approx(np.percentile(looped, 97.5), abs=1e-12)
    assert interval["low"] < interval["value"] < interval["high"]
    # The interval's width follows the standard error of AUROC (Hanley-McNeil, about 0.03 here).
    assert 0.06 < interval["high"] - interval["low"] < 0.18


def test_threshold_maximises_f1_on_tuning_and_is_then_fixed(scored):
    y, p = scored
    threshold = M.best_f1_threshold(y, p)
    brute = max(f1_score(y, p >= t) for t in np.unique(p))
    assert f1_score(y, p >= threshold) == pytest.approx(brute)
    # Applied unchanged to other data, not re-optimised there.
    other_y = 1 - y
    assert M.f1_at(threshold)(other_y, p, np.ones((1, len(y))))[0] == pytest.approx(f1_score(other_y, p >= threshold))


def test_reliability_curve_bins():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.08, 0.91, 0.95, 0.99])
    curve = M.reliability_curve(y, p)
    assert curve["count"] == [2, 3]
    assert curve["observed"] == pytest.approx([0.5, 2 / 3])
    assert curve["predicted"] == pytest.approx([0.065, (0.91 + 0.95 + 0.99) / 3])
