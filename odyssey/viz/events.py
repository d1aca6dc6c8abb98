"""A patient's MEDS events and readable code descriptions, as the timeline plot takes them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from odyssey.pipelines import schema as S
from odyssey.pipelines.meds_io import data_files, infer_event_type, scan_shard

DESCRIPTION = "description"
# Token types that stand for no MEDS event (values of odyssey.tokenizer.TokenType: PAD, SPECIAL, TIME_GAP, TASK).
_NOT_EVENTS = ("PAD", "SPECIAL", "TIME_GAP", "TASK")


def load_patient_events(meds_root: str | os.PathLike, subject_id: int) -> pl.DataFrame:
    """All MEDS rows of one subject (static rows first, then by time), with Odyssey's columns filled in."""
    for path in data_files(meds_root):
        rows = scan_shard(path).filter(pl.col(S.SUBJECT_ID) == subject_id).collect()
        if rows.height:
            return rows.sort(S.TIME, nulls_last=False, maintain_order=True)
    raise KeyError(f"{meds_root}: subject {subject_id} has no rows in {S.DATA_DIR}/")


def load_code_descriptions(meds_root: str | os.PathLike) -> dict[str, str]:
    """code -> description from `metadata/codes.parquet` (codes without one are left out; {} without the file)."""
    path = Path(meds_root) / S.CODES_FILE
    if not path.is_file():
        return {}
    table = pl.read_parquet(path, columns=[S.CODE, DESCRIPTION]).drop_nulls()
    return dict(zip(table[S.CODE].to_list(), table[DESCRIPTION].to_list(), strict=True))


def describe(code: str, descriptions: Mapping[str, str] | None = None, max_chars: int = 48) -> str:
    """A code's description (shortened to `max_chars`), or the code itself when none is known."""
    text = (descriptions or {}).get(code) or code
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def event_types_of(codes: Iterable[str]) -> list[str]:
    """Event types of bare codes by their vocabulary prefix (as for datasets written without `event_type`)."""
    frame = pl.DataFrame({S.CODE: list(codes)}, schema={S.CODE: pl.String})
    return frame.select(infer_event_type(pl.col(S.CODE)).alias(S.EVENT_TYPE))[S.EVENT_TYPE].to_list()


def _as_datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else np.datetime64(value, "us").astype(datetime)


def token_scores_to_events(
    row: Mapping[str, Any], scores: Sequence[float] | np.ndarray, tokenizer
) -> dict[tuple[datetime, str], float]:
    """Per-token scores (e.g. integrated gradients over a sequence row) summed per event (time, code).

    Specials, time gaps, task tokens and padding carry no event and are left out; a binned lab token
    (`CODE_k`) counts for `CODE`; the time is the token's `event_times` entry (when the fact became
    known: for labs the `issued` time, which `plot_timeline` also matches). `[UNK]` tokens stay `[UNK]`.
    """
    from odyssey.tokenizer import TokenType
    from odyssey.tokenizer.binning import BIN_SEPARATOR
    from odyssey.tokenizer.build import word_of

    ids, types, times = row["input_ids"], row["token_type_ids"], row["event_times"]
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(ids) == len(types) == len(times) == scores.size:
        raise ValueError(f"{scores.size} scores for a row of {len(ids)} tokens")
    skipped = {int(TokenType[name]) for name in _NOT_EVENTS}
    binned = {word_of(code): code for code in tokenizer.bins}
    events: dict[tuple[datetime, str], float] = {}
    for token_id, token_type, time, score in zip(ids, types, times, scores, strict=True):
        if int(token_type) in skipped:
            continue
        word = tokenizer.id_to_token(int(token_id))
        base, separator, index = word.rpartition(BIN_SEPARATOR)
        code = binned[base] if separator and index.isdigit() and base in binned else word
        key = (_as_datetime(time), code)
        events[key] = events.get(key, 0.0) + float(score)
    return events
