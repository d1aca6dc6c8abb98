"""Binary classification metrics with example weights, vectorised over bootstrap resamples.

Every metric takes labels `y` (n,), probabilities `p` (n,) and weights `w` (resamples, n) and returns one
value per resample. Resampling subjects with replacement is the same as weighting each example by how
often its subject was drawn, so 1,000 resamples are a few array operations, not a Python loop.
With `w` all ones the metrics equal scikit-learn's `roc_auc_score`, `average_precision_score`,
`brier_score_loss` and `f1_score`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CALIBRATION_BINS = 10  # equal-width probability bins for ECE and the reliability plot
CONFIDENCE = 0.95
Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _by_score(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per distinct score (ascending): two (resamples, scores) arrays."""
    _, inverse = np.unique(p, return_inverse=True)
    scores = int(inverse.max()) + 1 if inverse.size else 0
    resamples = w.shape[0]
    cell = np.arange(resamples)[:, None] * scores + inverse[None, :]
    y = y.astype(bool)
    size = resamples * scores
    positive = np.bincount(cell[:, y].ravel(), weights=w[:, y].ravel(), minlength=size).reshape(resamples, scores)
    negative = np.bincount(cell[:, ~y].ravel(), weights=w[:, ~y].ravel(), minlength=size).reshape(resamples, scores)
    return positive, negative


def auroc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Area under the ROC curve (ties count one half); NaN where a resample lacks a class."""
    positive, negative = _by_score(y, p, w)
    negatives_below = np.cumsum(negative, axis=1) - negative
    pairs = positive.sum(1) * negative.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (positive * (negatives_below + 0.5 * negative)).sum(1) / pairs, np.nan)


def auprc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (sum over thresholds of recall gained times precision), as scikit-learn's."""
    positive, negative = _by_score(y, p, w)
    positive, negative = positive[:, ::-1], negative[:, ::-1]  # descending thresholds
    true_pos, false_pos = np.cumsum(positive, axis=1), np.cumsum(negative, axis=1)
    total = positive.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(true_pos + false_pos > 0, true_pos / (true_pos + false_pos), 0.0)
        value = (positive / total * precision).sum(1)
    return np.where(total[:, 0] > 0, value, np.nan)


def brier(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * (p - y) ** 2).sum(1) / w.sum(1)


def ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Expected calibration error: weighted mean over equal-width bins of |mean probability - frequency|."""
    bin_of = np.minimum((p * bins).astype(np.int64), bins - 1)
    resamples = w.shape[0]
    cell = (np.arange(resamples)[:, None] * bins + bin_of[None, :]).ravel()
    gap = np.bincount(cell, weights=(w * (p - y)).ravel(), minlength=resamples * bins).reshape(resamples, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(gap).sum(1) / w.sum(1)


def f1_at(threshold: float) -> Metric:
    """F1 of predicting positive where p >= threshold."""

    def f1(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
        predicted, actual = p >= threshold, y.astype(bool)
        true_pos = (w * (predicted & actual)).sum(1)
        errors = (w * (predicted ^ actual)).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(2 * true_pos + errors > 0, 2 * true_pos / (2 * true_pos + errors), 0.0)

    return f1


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold (predict positive at p >= it) that maximises F1 on these labels."""
    positive, negative = _by_score(y, p, np.ones((1, len(y))))
    thresholds = np.unique(p)[::-1]
    true_pos, false_pos = np.cumsum(positive[0, ::-1]), np.cumsum(negative[0, ::-1])
    total = positive.sum()
    if total == 0:
        raise ValueError("cannot choose a threshold without positive labels")
    f1 = 2 * true_pos / (total + true_pos + false_pos)
    return float(thresholds[int(np.argmax(f1))])


def bootstrap_weights(subject_ids: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) example weights: how often each example's subject was drawn in each resample."""
    _, subject_of = np.unique(subject_ids, return_inverse=True)
    subjects = int(subject_of.max()) + 1 if subject_of.size else 0
    draws = np.random.default_rng(seed).integers(0, subjects, size=(resamples, subjects))
    cell = (np.arange(resamples)[:, None] * subjects + draws).ravel()
    counts = np.bincount(cell, minlength=resamples * subjects).reshape(resamples, subjects)
    return counts[:, subject_of].astype(np.float64)


def with_interval(metric: Metric, y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> dict[str, float | None]:
    """The metric on the data and its percentile bootstrap interval over `weights` (resamples)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    point = float(metric(y, p, np.ones((1, len(y))))[0])
    values = metric(y, p, weights)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"value": _finite(point), "low": None, "high": None}
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"value": _finite(point), "low": float(low), "high": float(high)}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def reliability_curve(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, list[float]]:
    """Per non-empty bin: mean predicted probability, observed frequency and count."""
    bin_of = np.minimum((np.asarray(p) * bins).astype(np.int64), bins - 1)
    counts = np.bincount(bin_of, minlength=bins)
    predicted = np.bincount(bin_of, weights=p, minlength=bins)
    observed = np.bincount(bin_of, weights=np.asarray(y, dtype=np.float64), minlength=bins)
    used = counts > 0
    return {"predicted": (predicted[used] / counts[used]).tolist(),
            "observed": (observed[used] / counts[used]).tolist(), "count": counts[used].tolist()}
