"""Stage 2 resolves the biggest subject buckets first (so the processes finish together) and still numbers
the shards in bucket order: the output does not depend on the order buckets are resolved in."""

from __future__ import annotations

import shutil
from pathlib import Path

from fhir_builders import lab, patient, small_cohort, write_ndjson

from odyssey.pipelines.fhir_sources import discover, plan_chunks
from odyssey.pipelines.ingest import load_code_systems
from odyssey.pipelines.ingest_read import ReadSettings, read_chunk
from odyssey.pipelines.ingest_resolve import resolve_and_write
from odyssey.pipelines.ingest_spill import read_bucket

BUCKETS = 4


def test_biggest_buckets_first_shards_in_bucket_order(tmp_path):
    cohort = small_cohort(tmp_path / "in")
    # one subject with many rows: its bucket is the biggest
    write_ndjson(cohort / "Busy.ndjson", [patient("busy")] + [
        lab(f"busy{i}", "busy", None, f"2150-01-0{1 + i % 9}T00:00:00Z", float(i)) for i in range(300)])
    spill = tmp_path / "spill"
    settings = ReadSettings(systems=load_code_systems(), subject_buckets=BUCKETS, key_buckets=BUCKETS,
                            validate="off", sample_every=1000, strict=False, spill_dir=str(spill))
    chunks = plan_chunks(discover([cohort]), 32 << 20)
    results = [read_chunk((chunk, settings)) for chunk in chunks]
    bucket_rows = [sum(r.bucket_rows[b] for r in results if r.bucket_rows) for b in range(BUCKETS)]
    assert bucket_rows == [_height(read_bucket(spill / "rows", b)) for b in range(BUCKETS)]
    biggest_first = sorted(range(BUCKETS), key=lambda b: -bucket_rows[b])
    assert biggest_first != list(range(BUCKETS))  # else this test would not tell the orders apart
    shutil.copytree(spill, tmp_path / "spill_copy")
    chunk_paths = {c.index: c.path for c in chunks}
    ran: list[int] = []

    def recording_map(fn, jobs):
        jobs = list(jobs)
        if fn.__name__ == "resolve_bucket":  # (duplicates are settled first, per key bucket)
            ran.extend(job[1] for job in jobs)
        return map(fn, jobs)

    first = resolve_and_write(spill, tmp_path / "a", BUCKETS, BUCKETS, chunk_paths, False, mapper=recording_map,
                              bucket_rows=bucket_rows)
    assert ran == biggest_first
    in_order = resolve_and_write(tmp_path / "spill_copy", tmp_path / "b", BUCKETS, BUCKETS, chunk_paths, False)
    assert [p.name for p in first.shards] == [p.name for p in in_order.shards]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert (first.written, first.events) == (in_order.written, in_order.events)
    assert first.codes.equals(in_order.codes) and first.subjects.equals(in_order.subjects)


def _height(frame) -> int:
    return 0 if frame is None else frame.height


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}
