"""A patient's MEDS events and readable code descriptions, as the timeline plot takes them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl

from odyssey.pipelines import schema as S
from odyssey.pipelines.meds_io import data_files, infer_event_type, scan_shard

DESCRIPTION = "description"


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
