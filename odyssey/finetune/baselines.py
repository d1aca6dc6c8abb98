"""Baselines on the same examples and splits as the finetuned model: scikit-learn on bag-of-codes features.

Features of an example (subject, prediction time): for each time window before the prediction time
(e.g. the last 30 days, the last year, all history), how often each clinical token occurred (log1p of
the count), from the same cut as the model's input (only facts available by then); plus the age at
the prediction time. Special, time-gap and task tokens are left out. Each task output gets its own
classifier, trained on the train split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from odyssey.tokenizer import TokenType

from .data import EVENT_TIMES, SequenceStore, TaskExamples, TaskSpec

NON_CLINICAL_TYPES = (TokenType.PAD, TokenType.SPECIAL, TokenType.TIME_GAP, TokenType.TASK)
DAY = np.timedelta64(86_400_000_000, "us")  # in microseconds, so windows of fractional days scale it
ALL_HISTORY = None
AGE_SCALE_YEARS = 100.0  # ages enter as years / 100, on the scale of log counts


@dataclass(frozen=True)
class BaselineSpec:
    """A named baseline: its estimator and the look-back windows (days; None = all history) of its counts."""

    name: str
    estimator: str  # "logistic_regression" or "gradient_boosting"
    windows: tuple[float | None, ...]


BASELINES: dict[str, BaselineSpec] = {
    "logistic_regression": BaselineSpec("logistic_regression", "logistic_regression", (30, 365, ALL_HISTORY)),
    "logistic_regression_recent": BaselineSpec("logistic_regression_recent", "logistic_regression", (30, 365)),
    "gradient_boosting": BaselineSpec("gradient_boosting", "gradient_boosting", (30, 365, ALL_HISTORY)),
}
GRADIENT_BOOSTING_FEATURES = 512  # most frequent training features kept (dense input)


def bag_of_codes(store: SequenceStore, examples: TaskExamples, vocab_size: int,
                 windows: Sequence[float | None]) -> sparse.csr_matrix:
    """(examples, len(windows) * vocab_size + 1) log1p counts per window and token, then age / 100."""
    rows, cols, ages = [], [], np.zeros(len(examples), dtype=np.float64)
    non_clinical = [int(t) for t in NON_CLINICAL_TYPES]
    by_time: dict[int, tuple[np.ndarray, ...]] = {}
    for i in range(len(examples)):
        row = int(examples.row[i])
        if row not in by_time:
            # Counts do not depend on token order, so a subject's tokens are sorted by time once and each of
            # its examples (thousands for a long history) takes time ranges by binary search.
            seq = store.rows[row]
            order = np.argsort(seq[EVENT_TIMES], kind="stable")
            clinical = ~np.isin(seq["token_type_ids"][order], non_clinical)
            by_time[row] = (seq[EVENT_TIMES][order], seq["input_ids"][order].astype(np.int64), clinical,
                            np.maximum.accumulate(order), seq["ages"])
        times, ids, clinical, last_position, row_ages = by_time[row]
        when = examples.prediction_time[i]
        known = int(np.searchsorted(times, when, side="right"))
        # the age of the last token in sequence order among those known (as the model's input ends)
        ages[i] = float(row_ages[last_position[known - 1]]) if known else 0.0
        for w, window in enumerate(windows):
            first = 0 if window is None else int(np.searchsorted(times, when - window * DAY, side="left"))
            chosen = ids[first:known][clinical[first:known]]
            cols.append(w * vocab_size + chosen)
            rows.append(np.full(len(chosen), i, dtype=np.int64))
    width = len(windows) * vocab_size
    row_index = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    col_index = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    counts = sparse.csr_matrix((np.ones(len(row_index)), (row_index, col_index)), shape=(len(examples), width))
    counts.sum_duplicates()
    counts.data = np.log1p(counts.data)
    return sparse.hstack([counts, sparse.csr_matrix(ages[:, None] / AGE_SCALE_YEARS)], format="csr")


def _estimator(kind: str, seed: int):
    if kind == "logistic_regression":
        return LogisticRegression(C=0.1, max_iter=2000, solver="liblinear", random_state=seed)
    if kind == "gradient_boosting":
        return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, early_stopping=True,
                                              validation_fraction=0.15, random_state=seed)
    raise ValueError(f"unknown baseline estimator {kind!r}")


def fit_predict(spec: BaselineSpec, store: SequenceStore, specs: Sequence[TaskSpec], vocab_size: int,
                train: TaskExamples, targets: dict[str, TaskExamples], seed: int = 0,
                cache: dict | None = None, workers: int | None = None) -> dict[str, np.ndarray]:
    """Train one classifier per task output on `train`; probabilities (n, max_outputs) for each target split.

    `cache` (a dict kept by the caller) shares the features of baselines with the same windows. Logistic
    regressions are fitted `workers` at a time (default: one per core; liblinear releases the GIL);
    gradient boosting already spreads each fit over the cores, so its fits run one after another.
    """
    cache = {} if cache is None else cache
    features = {}
    for split, examples in {"train": train, **targets}.items():
        key = (split, spec.windows)
        if key not in cache:
            cache[key] = bag_of_codes(store, examples, vocab_size, spec.windows)
        features[split] = cache[key]
    kept = None
    if spec.estimator == "gradient_boosting":
        frequency = np.asarray((features["train"] > 0).sum(axis=0)).ravel()
        kept = np.sort(np.argsort(-frequency, kind="stable")[:GRADIENT_BOOSTING_FEATURES])
    outputs = [(task_index, j) for task_index, task in enumerate(specs) for j in range(len(task.outputs))]
    fit_rows = {(task_index, j): (train.task_index == task_index) & train.label_mask[:, j] for task_index, j in outputs}
    for (task_index, j), rows in fit_rows.items():
        if len(np.unique(train.labels[rows, j])) < 2:
            raise ValueError(f"{specs[task_index].output_names()[j]}: the train split has one class; "
                             "no baseline can be fit")

    def fit(output: tuple[int, int]):
        rows = fit_rows[output]
        model = _estimator(spec.estimator, seed)
        return model.fit(_prepare(features["train"][rows], kept), train.labels[rows, output[1]].astype(int))

    parallel = 1 if spec.estimator == "gradient_boosting" else workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(outputs)))) as pool:
        models = list(pool.map(fit, outputs))
    width = max(len(s.outputs) for s in specs)
    out = {split: np.zeros((len(examples), width)) for split, examples in targets.items()}
    for (task_index, j), model in zip(outputs, models, strict=True):
        for split, examples in targets.items():
            members = examples.task_index == task_index
            if members.any():
                out[split][members, j] = model.predict_proba(_prepare(features[split][members], kept))[:, 1]
    return out


def _prepare(x: sparse.csr_matrix, kept: np.ndarray | None):
    return x if kept is None else x[:, kept].toarray()
