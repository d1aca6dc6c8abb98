"""Spill files between the two stages of ingestion: uncompressed Arrow IPC, written once and read once.

A bucketed spill (rows by subject bucket, resource keys by id bucket) is ONE file per flush whose
record batch number b holds bucket b's rows, so a flush writes a few files whatever the number of
buckets, and a bucket is read back as one batch from each file. (One file per bucket and flush made
the cost of a flush grow with the bucket count, which grows with the export: ~0.6 us per row at 64
buckets against ~0.15 now.)

pyarrow reads and writes them: polars' `write_ipc` / `read_ipc` each run a query plan per call, ~1 ms
of CPU per file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as pa_ipc


def write_table(table: pa.Table | pa.RecordBatch, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa_ipc.new_file(sink, table.schema) as writer:
        writer.write(table)


def _arrow(frame: pl.DataFrame) -> pa.Table:
    # plain strings, not polars' string views: a view takes 16 bytes per value, null or short, so view
    # spills were about twice the bytes, and at 5M resources the kernel's cost of writing them (page cache,
    # writeback) was ~0.7 us per resource more than the views save in user time on reading back. With
    # 32-bit offsets (polars gives 64-bit ones): every spilled byte is a page-cache page to fill, which on
    # a virtual machine often costs a fresh page each (spills ~15% smaller).
    table = frame.to_arrow(compat_level=pl.CompatLevel.oldest())
    narrow = pa.schema([f.with_type(pa.string()) if f.type == pa.large_string() else f for f in table.schema])
    if narrow == table.schema:
        return table
    try:
        return table.cast(narrow)
    except pa.ArrowInvalid:  # over 2 GB of text in one column (never in a batch): keep 64-bit offsets
        return table


def write_frame(frame: pl.DataFrame, path: Path) -> None:
    write_table(_arrow(frame), path)


def write_buckets(frame: pl.DataFrame, column: str, buckets: int, path: Path) -> list[int]:
    """Write `frame` to `path` as `buckets` record batches, batch b holding the rows whose `column`
    modulo `buckets` is b, in their order in `frame`; returns the rows of each batch."""
    if frame.is_empty():
        return [0] * buckets
    bucket = ((pl.col(column) & 0x7FFFFFFF) % buckets).cast(pl.Int64).alias("_bucket")
    ordered = frame.with_columns(bucket).sort("_bucket", maintain_order=True)
    counts = np.bincount(ordered.get_column("_bucket").to_numpy(), minlength=buckets)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    (batch,) = _arrow(ordered.drop("_bucket")).combine_chunks().to_batches()  # one chunk: one batch
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa_ipc.new_file(sink, batch.schema) as writer:
        for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
            writer.write_batch(batch.slice(start, count))
    return counts.tolist()


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.arrow")) if folder.exists() else []


def _read_table(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as source:
        return pa_ipc.open_file(source).read_all()


def _frame(tables: list[pa.Table]) -> pl.DataFrame | None:
    if not tables:
        return None
    return pl.from_arrow(pa.concat_tables(tables, promote_options="permissive"), rechunk=False)


def read_frame(path: Path) -> pl.DataFrame:
    return pl.from_arrow(_read_table(path))


def read_folder(folder: Path) -> pl.DataFrame | None:
    """Every row of every spill file of a folder, in file-name order (None when there are none)."""
    return _frame([_read_table(f) for f in _files(folder)])


def read_bucket(folder: Path, bucket: int) -> pl.DataFrame | None:
    """Bucket `bucket` of every bucketed spill file of a folder, in file-name order (None when empty).
    Memory-mapped: a bucket reads a slice of each file, and its buffers stay in the page cache."""
    tables = []
    for path in _files(folder):
        with pa.memory_map(str(path)) as source:
            batch = pa_ipc.open_file(source).get_batch(bucket)
        if batch.num_rows:
            tables.append(pa.Table.from_batches([batch]))
    return _frame(tables)
