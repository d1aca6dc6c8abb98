"""Spill files between the two stages of ingestion: uncompressed Arrow IPC, written once and read once.

pyarrow reads and writes them: polars' `write_ipc` / `read_ipc` each run a query plan per call, ~1 ms
of CPU per file, which was most of the cost of spilling a batch and of reading a bucket back.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as pa_ipc


def write_table(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa_ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def write_frame(frame: pl.DataFrame, path: Path) -> None:
    write_table(frame.to_arrow(), path)


def write_buckets(frame: pl.DataFrame, column: str, buckets: int, folder: Path, tag: str) -> None:
    """Write the rows of each bucket (`column` modulo `buckets`) to folder/bNNNN/tag."""
    frame = frame.with_columns(_bucket=(pl.col(column) & 0x7FFFFFFF) % buckets)
    for (bucket,), part in frame.partition_by("_bucket", as_dict=True, maintain_order=True).items():
        target = folder / f"b{bucket:04d}"
        target.mkdir(parents=True, exist_ok=True)
        write_frame(part.drop("_bucket"), target / tag)


def _read_table(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as source:
        return pa_ipc.open_file(source).read_all()


def read_frame(path: Path) -> pl.DataFrame:
    return pl.from_arrow(_read_table(path))


def read_folder(folder: Path, consume: bool = False) -> pl.DataFrame | None:
    """All spill files of a folder, in name order, as one frame (None when there are none); `consume`
    deletes them once read (in the worker that read them, rather than all at once at the end: deleting
    gigabytes of spill takes seconds)."""
    files = sorted(folder.glob("*.arrow")) if folder.exists() else []
    if not files:
        return None
    frame = pl.from_arrow(pa.concat_tables([_read_table(f) for f in files], promote_options="default"),
                          rechunk=False)
    if consume:
        for f in files:
            f.unlink()
    return frame
