"""Hand-built MEDS events for tokenizer and label tests."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from odyssey.pipelines import schema as S
from odyssey.pipelines.meds_io import write_meds_dataset

BASE = datetime(2020, 1, 1, 8, 0)


def at(days: float = 0.0, hours: float = 0.0) -> datetime:
    return BASE + timedelta(days=days, hours=hours)


def event(
    subject: int,
    time: datetime | None,
    code: str,
    value: float | None = None,
    encounter: int | None = None,
    event_type: str | None = None,
    issued: datetime | None = None,
    text: str | None = None,
) -> dict:
    return {
        S.SUBJECT_ID: subject,
        S.TIME: time,
        S.CODE: code,
        S.NUMERIC_VALUE: value,
        S.ENCOUNTER_ID: encounter,
        S.EVENT_TYPE: event_type,
        S.ISSUED: issued,
        S.TEXT_VALUE: text,
    }


def admission(subject: int, encounter: int, start: datetime, end: datetime, cls: str = "IMP", disposition=None):
    """ENCOUNTER_START and ENCOUNTER_END rows of one encounter."""
    return [
        event(subject, start, f"{S.ENCOUNTER_START_PREFIX}//{cls}", encounter=encounter),
        event(subject, end, f"{S.ENCOUNTER_END_PREFIX}//{cls}", encounter=encounter, text=disposition),
    ]


def frame(rows: list[dict]) -> pl.DataFrame:
    schema = {
        S.SUBJECT_ID: pl.Int64,
        S.TIME: pl.Datetime("us"),
        S.CODE: pl.String,
        S.NUMERIC_VALUE: pl.Float32,
        S.ENCOUNTER_ID: pl.Int64,
        S.EVENT_TYPE: pl.String,
        S.ISSUED: pl.Datetime("us"),
        S.TEXT_VALUE: pl.String,
    }
    data = pl.DataFrame(rows, schema=schema)
    from odyssey.pipelines.meds_io import infer_event_type

    return data.with_columns(pl.coalesce(pl.col(S.EVENT_TYPE), infer_event_type(pl.col(S.CODE))).alias(S.EVENT_TYPE))


def write_dataset(root: Path, rows: list[dict], splits: dict[int, str] | None = None, shards: int = 1) -> Path:
    split_frame = None
    if splits is not None:
        split_frame = pl.DataFrame({S.SUBJECT_ID: list(splits), "split": list(splits.values())})
    return write_meds_dataset(root, frame(rows), split_frame, shards=shards)
