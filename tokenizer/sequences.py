"""Stored sequences: schema, loading, and the pure functions datasets apply at load time.

A row is one subject at full length (see `build`). Datasets turn it into a model input with:

1. `cut_at(row, prediction_time)`: keep the tokens whose `event_times` <= prediction_time (the time each
   fact became available, so a lab drawn before but reported after the cut is dropped, and so are the
   index visit's diagnoses coded at discharge when predicting 24 h after admission). When the cut falls
   inside a visit, the visit is closed with `[VE] [REG]` stamped at the prediction time, so every cut
   sequence ends like a complete history: `... [VS] events [VE] [REG]`. Returns None when nothing is
   known by then (no usable input: the caller counts it).
2. `truncate(row, max_length)`: keep the header (`[CLS]` and static tokens) and the most recent
   tokens, starting at a visit boundary (a `[VS]`; the gap token before it is dropped). When even the
   last visit is too long, the newest tokens of that visit are kept after a copy of its `[VS]`.
3. `append_task_token(row, token_id)`: the multitask prompt, appended after the final `[REG]`
   (type TASK, segment 0, time and visit of the last token); a classification head reads it.

`prepare_input` chains the three, reserving one position for the task token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from odyssey.pipelines import schema as S
from odyssey.tokenizer.build import (
    AGES,
    EVENT_TIMES,
    INPUT_IDS,
    LIST_COLUMNS,
    SPLIT,
    TIMES,
    TOKEN_TYPE_IDS,
    VISIT_ORDERS,
    VISIT_SEGMENTS,
)
from odyssey.tokenizer.vocab import SpecialTokens, TokenType

SEQUENCES_DIR = "sequences"
TOKENIZER_DIR = "tokenizer"
REPORT_FILE = "tokenize_report.json"
PART_PATTERN = "part-*.parquet"

SEQUENCE_SCHEMA = pa.schema(
    [
        pa.field(S.SUBJECT_ID, pa.int64(), nullable=False),
        pa.field(SPLIT, pa.string()),
        pa.field(INPUT_IDS, pa.list_(pa.int32())),
        pa.field(TOKEN_TYPE_IDS, pa.list_(pa.int8())),
        pa.field(AGES, pa.list_(pa.float32())),
        pa.field(TIMES, pa.list_(pa.float32())),
        pa.field(VISIT_ORDERS, pa.list_(pa.int32())),
        pa.field(VISIT_SEGMENTS, pa.list_(pa.int8())),
        pa.field(EVENT_TIMES, pa.list_(pa.timestamp("us"))),
    ]
)
_DTYPES = {
    INPUT_IDS: np.int32,
    TOKEN_TYPE_IDS: np.int8,
    AGES: np.float32,
    TIMES: np.float32,
    VISIT_ORDERS: np.int32,
    VISIT_SEGMENTS: np.int8,
    EVENT_TIMES: "datetime64[us]",
}
_MICROSECONDS_PER_DAY = 86_400 * 1_000_000
_DAYS_PER_YEAR = 365.25
_SEGMENT_SPECIAL = 0

Row = dict[str, Any]


def load_sequences(seq_dir: str | os.PathLike, split: str | None = None) -> pl.DataFrame:
    """All sequences of `seq_dir` (one row per subject), optionally only one split."""
    parts = sorted((Path(seq_dir) / SEQUENCES_DIR).glob(PART_PATTERN))
    if not parts:
        raise FileNotFoundError(
            f"{seq_dir}: no {SEQUENCES_DIR}/{PART_PATTERN} (run `odyssey tokenize` first)"
        )
    frame = pl.scan_parquet(parts)
    if split is not None:
        frame = frame.filter(pl.col(SPLIT) == split)
    return frame.collect()


def as_row(row: Mapping[str, Any]) -> Row:
    """A sequence row (e.g. `frame.row(i, named=True)`) with numpy arrays for the list columns."""
    out: Row = {k: v for k, v in row.items() if k not in LIST_COLUMNS}
    for column in LIST_COLUMNS:
        out[column] = np.asarray(row[column], dtype=_DTYPES[column])
    return out


def _to_datetime64(value: datetime | np.datetime64 | str) -> np.datetime64:
    if isinstance(value, datetime) and value.tzinfo is not None:
        raise ValueError("prediction times are UTC and tz-naive; got a tz-aware datetime")
    return np.datetime64(value, "us")


def _take(row: Row, index: np.ndarray) -> Row:
    out = {k: v for k, v in row.items() if k not in LIST_COLUMNS}
    for column in LIST_COLUMNS:
        out[column] = row[column][index]
    return out


def _append(row: Row, tokens: list[dict[str, Any]]) -> Row:
    out = dict(row)
    for column in LIST_COLUMNS:
        extra = np.asarray([t[column] for t in tokens], dtype=_DTYPES[column])
        out[column] = np.concatenate([row[column], extra])
    return out


def cut_at(row: Mapping[str, Any], prediction_time: datetime | np.datetime64 | str) -> Row | None:
    """Tokens known at `prediction_time` (inclusive); an open visit is closed with `[VE] [REG]`."""
    full = as_row(row)
    cutoff = _to_datetime64(prediction_time)
    known = full[EVENT_TIMES] <= cutoff
    if not known.any():
        return None
    cut = _take(full, np.flatnonzero(known))
    ids = cut[INPUT_IDS]
    starts = np.flatnonzero(ids == SpecialTokens.VS)
    ends = np.flatnonzero(ids == SpecialTokens.VE)
    if starts.size and (not ends.size or ends[-1] < starts[-1]):
        opened = starts[-1]
        elapsed_days = (cutoff - cut[EVENT_TIMES][opened]) / np.timedelta64(1, "D")
        closing = {
            TOKEN_TYPE_IDS: int(TokenType.SPECIAL),
            AGES: cut[AGES][opened] + elapsed_days / _DAYS_PER_YEAR,
            TIMES: cut[TIMES][opened] + elapsed_days,
            VISIT_ORDERS: cut[VISIT_ORDERS][opened],
            VISIT_SEGMENTS: _SEGMENT_SPECIAL,
            EVENT_TIMES: cutoff,
        }
        cut = _append(
            cut,
            [{**closing, INPUT_IDS: int(SpecialTokens.VE)}, {**closing, INPUT_IDS: int(SpecialTokens.REG)}],
        )
    return cut


def _header_length(row: Row) -> int:
    """[CLS] and static tokens: the leading tokens outside any visit."""
    in_visit = np.flatnonzero(row[VISIT_ORDERS] > 0)
    return int(in_visit[0]) if in_visit.size else len(row[INPUT_IDS])


def truncate(row: Mapping[str, Any], max_length: int) -> Row:
    """At most `max_length` tokens: the header plus the most recent tokens from a visit boundary."""
    full = as_row(row)
    length = len(full[INPUT_IDS])
    if length <= max_length:
        return full
    header = min(_header_length(full), max_length - 1)
    budget = max_length - header
    if budget <= 0:
        raise ValueError(f"max_length {max_length} leaves no room after the {header} header tokens")
    ids = full[INPUT_IDS]
    first = length - budget
    boundaries = first + np.flatnonzero(ids[first:] == SpecialTokens.VS)
    if boundaries.size:
        body = np.arange(boundaries[0], length)
    else:
        # One visit longer than the budget: its [VS] and its newest tokens.
        opener = np.flatnonzero(ids[:first] == SpecialTokens.VS)
        if opener.size and budget > 1:
            body = np.concatenate([[opener[-1]], np.arange(length - budget + 1, length)])
        else:
            body = np.arange(first, length)
    return _take(full, np.concatenate([np.arange(header), body]).astype(np.int64))


def append_task_token(row: Mapping[str, Any], token_id: int) -> Row:
    """The row with a task token after its last token (time, age and visit of that last token)."""
    full = as_row(row)
    if not len(full[INPUT_IDS]):
        raise ValueError("cannot prompt an empty sequence")
    last = len(full[INPUT_IDS]) - 1
    return _append(
        full,
        [
            {
                INPUT_IDS: int(token_id),
                TOKEN_TYPE_IDS: int(TokenType.TASK),
                AGES: full[AGES][last],
                TIMES: full[TIMES][last],
                VISIT_ORDERS: full[VISIT_ORDERS][last],
                VISIT_SEGMENTS: _SEGMENT_SPECIAL,
                EVENT_TIMES: full[EVENT_TIMES][last],
            }
        ],
    )


def prepare_input(
    row: Mapping[str, Any],
    prediction_time: datetime | np.datetime64 | str | None,
    max_length: int,
    task_token_id: int | None = None,
) -> Row | None:
    """cut_at → truncate → append_task_token; None when nothing is known at `prediction_time`."""
    cut = as_row(row) if prediction_time is None else cut_at(row, prediction_time)
    if cut is None:
        return None
    if task_token_id is None:
        return truncate(cut, max_length)
    return append_task_token(truncate(cut, max_length - 1), task_token_id)
