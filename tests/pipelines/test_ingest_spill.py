"""Spill files between the ingestion stages: one file per flush, one record batch per bucket."""

from __future__ import annotations

import polars as pl
from fhir_builders import lab, patient, write_ndjson
from hypothesis import given, settings
from hypothesis import strategies as st

from odyssey.pipelines.fhir_flatten import stable_id
from odyssey.pipelines.ingest import ingest_fhir, subject_bucket_count
from odyssey.pipelines.ingest_spill import read_bucket, read_folder, write_buckets


def _frame(keys: list[int], offset: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "key": keys,
            "position": [offset + i for i in range(len(keys))],
            "text": [None if k % 5 == 0 else f"row-{offset + i}" for i, k in enumerate(keys)],
        },
        schema={"key": pl.Int64, "position": pl.Int64, "text": pl.String},
    )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.lists(st.integers(-(2**62), 2**62), max_size=60), min_size=1, max_size=4),
    st.integers(1, 9),
)
def test_each_bucket_reads_back_its_rows_in_file_then_row_order(tmp_path_factory, parts, buckets):
    folder = tmp_path_factory.mktemp("spill")
    frames, offset = [], 0
    for number, keys in enumerate(parts):
        frame = _frame(keys, offset)
        offset += len(keys)
        write_buckets(frame, "key", buckets, folder / f"c{number:06d}-0000.arrow")
        frames.append(frame)
    everything = pl.concat(frames).with_columns(bucket=(pl.col("key") & 0x7FFFFFFF) % buckets)
    for bucket in range(buckets):
        expected = everything.filter(pl.col("bucket") == bucket).drop("bucket")
        got = read_bucket(folder, bucket)
        if expected.is_empty():
            assert got is None
        else:
            assert got.equals(expected)
    every = read_folder(folder)
    assert (every is None) == (offset == 0)
    if every is not None:  # whole files, bucket by bucket within each
        assert sorted(every["position"].to_list()) == list(range(offset))


def test_empty_buckets_leave_no_gap_in_shard_numbers(tmp_path):
    """Two patients among four subject buckets: the filled buckets become shards 0..n-1, nothing else."""
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a"), patient("b")])
    labs = [lab(f"o{i}", "ab"[i % 2], None, "2150-01-01T00:00:00Z", float(i)) for i in range(4000)]
    write_ndjson(folder / "Observation.ndjson", labs)
    buckets = subject_bucket_count(sum(f.stat().st_size for f in folder.iterdir()), 2**20)
    assert buckets == 4
    filled = {(stable_id("Patient", pid) & 0x7FFFFFFF) % buckets for pid in "ab"}
    report = ingest_fhir([folder], tmp_path / "out", workers=2, shard_mb=1, chunk_mb=1)
    shards = sorted(p.name for p in (tmp_path / "out" / "data").iterdir())
    assert report.shards == len(filled) < buckets
    assert shards == [f"{i}.parquet" for i in range(len(filled))]
    data = pl.read_parquet(tmp_path / "out" / "data")
    assert data.height == 4000 + 2 * 2  # labs, plus each patient's birth and gender
