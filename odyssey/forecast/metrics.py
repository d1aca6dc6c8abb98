"""Forecast metrics: next-visit codes ranked over K futures, and zero-shot risks from the futures.

- Next-visit codes: in each of the K futures, the codes of its first generated visit; a code's score is
  how many futures hold it (ties: alphabetical). The top k against the codes of the real next visit:
  recall@k = hits / real codes, precision@k = hits / k, averaged over prediction times that have a
  next visit.
- Zero-shot risk of an outcome token (death, an inpatient admission): the share of the K futures that
  hold it within `horizon_days` of where the future starts. AUROC against the labels, with the
  subject-level bootstrap interval of `odyssey.finetune.metrics`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from odyssey.finetune.metrics import auroc, bootstrap_weights, with_interval


def ranked_codes(first_visits: Sequence[Iterable[str]]) -> list[str]:
    """Codes of the futures' first visits, most futures first (a code counts once per future)."""
    counts = Counter(code for visit in first_visits for code in set(visit))
    return sorted(counts, key=lambda code: (-counts[code], code))


def recall_precision_at(ranked: Sequence[str], truth: set[str], k: int) -> tuple[float, float]:
    """(recall@k, precision@k) of the top `k` ranked codes against the real codes `truth` (non-empty)."""
    if not truth:
        raise ValueError("recall needs at least one real code")
    hits = len(set(ranked[:k]) & truth)
    return hits / len(truth), hits / k


def share_with_outcome(futures_tokens: Sequence[np.ndarray], futures_times: Sequence[np.ndarray],
                       reference_time: float, outcome_id: int, horizon_days: float) -> float:
    """Share of futures holding `outcome_id` at most `horizon_days` after `reference_time` (days)."""
    if not futures_tokens:
        raise ValueError("no futures")
    hits = [
        bool(np.any((tokens == outcome_id) & (times - reference_time <= horizon_days)))
        for tokens, times in zip(futures_tokens, futures_times, strict=True)
    ]
    return float(np.mean(hits))


def risk_auroc(subject_ids: np.ndarray, labels: np.ndarray, risks: np.ndarray, resamples: int, seed: int
               ) -> dict[str, float | int | None]:
    """AUROC of `risks` against boolean `labels`, with a 95% bootstrap interval over subjects."""
    labels = np.asarray(labels, dtype=np.float64)
    out: dict[str, float | int | None] = {"n": int(labels.size), "positives": int(labels.sum())}
    if labels.size == 0 or labels.min() == labels.max():
        return {**out, "value": None, "low": None, "high": None}
    weights = bootstrap_weights(np.asarray(subject_ids), resamples, seed)
    return {**out, **with_interval(auroc, labels, np.asarray(risks, dtype=np.float64), weights)}
