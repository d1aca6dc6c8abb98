"""Patient timelines (matplotlib, Agg): events over time with attribution, risk and forecast overlays."""

from __future__ import annotations

import os

from .events import (
    describe,
    event_types_of,
    load_code_descriptions,
    load_patient_events,
    token_scores_to_events,
)
from .timeline import PatientTimeline, Visit, plot_timeline, save_timeline, visits_of


def plot_patient(meds_root: str | os.PathLike, subject_id: int, **options) -> PatientTimeline:
    """`plot_timeline` of one subject of a MEDS dataset, with descriptions from its `codes.parquet`."""
    options.setdefault("descriptions", load_code_descriptions(meds_root))
    return plot_timeline(load_patient_events(meds_root, subject_id), **options)


__all__ = [
    "PatientTimeline",
    "Visit",
    "describe",
    "event_types_of",
    "load_code_descriptions",
    "load_patient_events",
    "plot_patient",
    "plot_timeline",
    "save_timeline",
    "token_scores_to_events",
    "visits_of",
]
