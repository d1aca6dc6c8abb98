"""The calling process and its spawned helpers share ingestion's jobs (pipelines/ingest_pool.py)."""

from __future__ import annotations

import math
import os
import time

import pytest

from odyssey.pipelines.ingest_pool import Workers, worker_pool


def _pid_after(seconds: float) -> tuple[float, int]:
    """A job for the helpers (importable by spawned processes): who ran it."""
    time.sleep(seconds)
    return seconds, os.getpid()


def _touch_after(job: tuple[str, float]) -> None:
    path, seconds = job
    time.sleep(seconds)
    open(path, "w").close()


def test_without_helpers_this_process_runs_every_job_in_order():
    workers = Workers(None, 0)
    assert workers.helpers == 0
    assert list(workers.unordered(math.sqrt, [9.0, 4.0, 1.0])) == [3.0, 2.0, 1.0]
    assert list(workers.ordered(math.sqrt, [16.0, 25.0])) == [4.0, 5.0]
    workers.close()  # nothing to stop


@pytest.fixture(scope="module")
def two():
    with worker_pool(2) as workers:
        yield workers


def test_both_processes_take_jobs_and_every_result_comes_back(two):
    assert two.helpers == 1
    jobs = [0.05 + i / 1000 for i in range(12)]
    found = list(two.unordered(_pid_after, jobs))
    assert sorted(seconds for seconds, _ in found) == jobs
    pids = {pid for _, pid in found}
    assert os.getpid() in pids and len(pids) == 2  # this process worked, and so did the helper


def test_ordered_yields_results_in_job_order_whoever_ran_them(two):
    # the first job is slow: whichever process took it, the quick ones after it wait for it
    jobs = [0.3, 0.01, 0.02, 0.03, 0.04]
    found = list(two.ordered(_pid_after, jobs))
    assert [seconds for seconds, _ in found] == jobs
    assert len({pid for _, pid in found}) == 2


def test_a_failing_job_raises_in_the_caller_wherever_it_ran(two):
    jobs = [4.0] * 6 + [-1.0] + [9.0] * 6  # math.sqrt(-1.0) raises ValueError
    with pytest.raises(ValueError, match="math domain error"):
        list(two.unordered(math.sqrt, jobs))
    with pytest.raises(ValueError, match="math domain error"):
        list(two.ordered(math.sqrt, jobs))
    assert list(two.ordered(math.sqrt, [4.0, 9.0])) == [2.0, 3.0]  # the helpers still work afterwards


def test_closing_early_stops_handing_out_jobs(two, tmp_path):
    found = two.unordered(_touch_after, [(str(tmp_path / f"{i}"), 0.02) for i in range(50)])
    next(found)
    found.close()
    time.sleep(0.4)  # the helper would have run ~20 more by now
    # the one yielded, the two the helper held, and at most one more in flight: never the 46 others
    assert len(list(tmp_path.iterdir())) <= 4


def test_a_coordinating_process_leaves_every_job_to_the_helpers():
    with worker_pool(2, caller_works=False) as workers:
        assert workers.helpers == 2
        found = list(workers.ordered(_pid_after, [0.05, 0.01, 0.02, 0.03, 0.04, 0.05]))
    assert [seconds for seconds, _ in found] == [0.05, 0.01, 0.02, 0.03, 0.04, 0.05]
    pids = {pid for _, pid in found}
    assert os.getpid() not in pids and len(pids) == 2


def test_close_reaps_the_helpers():
    with worker_pool(2) as workers:
        list(workers.unordered(math.sqrt, [1.0, 4.0]))
        pool = workers._pool
        processes = list(pool._pool)
        workers.close()
        assert all(not p.is_alive() for p in processes)


class _RecordingLibc:
    """Records the allocator calls (glibc's thresholds cannot be read back)."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_heap_kept_for_reuse_sets_then_restores_glibcs_thresholds(monkeypatch):
    from odyssey.pipelines import ingest_pool

    libc = _RecordingLibc()
    monkeypatch.setattr(ingest_pool, "_glibc", lambda: libc)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with ingest_pool.heap_kept_for_reuse():
        assert libc.calls == [("mallopt", -3, 32 << 20), ("mallopt", -1, 1 << 30)]
    assert libc.calls[2:] == [("mallopt", -3, 128 * 1024), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]


def test_heap_kept_for_reuse_leaves_the_users_thresholds_alone(monkeypatch):
    from odyssey.pipelines import ingest_pool

    libc = _RecordingLibc()
    monkeypatch.setattr(ingest_pool, "_glibc", lambda: libc)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    with ingest_pool.heap_kept_for_reuse():
        pass
    assert libc.calls == []


def test_heap_kept_for_reuse_with_the_real_allocator():
    from odyssey.pipelines import ingest_pool

    with ingest_pool.heap_kept_for_reuse():
        buffers = [bytearray(8 << 20) for _ in range(4)]  # above glibc's default threshold, below ours
        del buffers
    assert bytearray(1 << 20)  # the allocator still works after the thresholds are put back
