"""Deterministic train / tuning / held_out assignment of subjects."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, model_validator

from odyssey.pipelines import schema


class SplitRatios(BaseModel):
    """Shares of subjects per split; a subject's split depends only on its id and the seed."""

    model_config = ConfigDict(extra="forbid")

    train: float = 0.8
    tuning: float = 0.1
    held_out: float = 0.1
    seed: int = 0

    @model_validator(mode="after")
    def _sum_to_one(self):
        shares = (self.train, self.tuning, self.held_out)
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must be >= 0 and sum to 1, got {shares}")
        return self


def _unit_interval(subject_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per subject, stable across runs and machines."""
    out = np.empty(len(subject_ids), dtype=np.float64)
    salt = seed.to_bytes(8, "little", signed=True)
    for i, sid in enumerate(subject_ids.tolist()):
        digest = hashlib.blake2b(int(sid).to_bytes(8, "little", signed=True), digest_size=8, key=salt).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


def assign_splits(subject_ids: np.ndarray | list[int], ratios: SplitRatios) -> pl.DataFrame:
    """A `subject_splits` table (subject_id, split) sorted by subject_id."""
    ids = np.unique(np.asarray(subject_ids, dtype=np.int64))
    u = _unit_interval(ids, ratios.seed)
    split = np.where(
        u < ratios.train,
        schema.TRAIN_SPLIT,
        np.where(u < ratios.train + ratios.tuning, schema.TUNING_SPLIT, schema.HELD_OUT_SPLIT),
    )
    return pl.DataFrame({schema.SUBJECT_ID: ids, "split": split}, schema={schema.SUBJECT_ID: pl.Int64, "split": pl.String})


def write_parquet(frame: pl.DataFrame, path: Path, arrow_schema: pa.Schema | None = None) -> None:
    """Write with plain (not large) Arrow string types, cast to `arrow_schema` when given (MEDS's own)."""
    table = frame.to_arrow()
    if arrow_schema is not None:
        table = table.select(arrow_schema.names).cast(arrow_schema)
    else:
        table = table.cast(pa.schema([
            pa.field(f.name, pa.string() if pa.types.is_large_string(f.type) else f.type) for f in table.schema
        ]))
    pq.write_table(table, path, compression="zstd")
