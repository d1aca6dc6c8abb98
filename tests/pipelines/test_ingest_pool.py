"""The calling process and its spawned helpers share ingestion's jobs (pipelines/ingest_pool.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fhir_builders import dataset_digests, lab, patient, write_ndjson

from odyssey.pipelines.ingest import ingest_fhir
from odyssey.pipelines.ingest_pool import Workers, users_allocator_options, worker_pool


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


_ALLOCATOR_AFTER_INGEST = """
import resource, sys
from odyssey.pipelines.ingest import ingest_fhir
ingest_fhir([sys.argv[1]], sys.argv[2], workers=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    block = bytearray(1 << 20)  # above glibc's initial mmap threshold: reused once the threshold adapts
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_ingest_leaves_the_callers_allocator_adaptive(tmp_path):
    """Setting glibc's malloc thresholds, even back to their defaults, turns off its adaptive mmap
    threshold for the rest of the process: every later buffer over 128 KB is mapped and faulted in
    afresh (`odyssey demo` finetuned 3.8x slower after ingest in the same process). So after an
    in-process ingest, 200 MB of 1 MB buffers allocated and freed one by one must reuse the heap."""
    fixtures = Path(__file__).parent / "fixtures" / "r4"
    result = subprocess.run([sys.executable, "-c", _ALLOCATOR_AFTER_INGEST, str(fixtures), str(tmp_path / "out")],
                            capture_output=True, text=True, check=True)
    faults = int(result.stdout.strip().splitlines()[-1])
    assert faults < 200 * 256 // 4, faults  # mapped afresh each time: 256 page faults per buffer


_POOL_SIZE = """
import os, sys
{before}
from odyssey.pipelines.ingest_pool import size_for_ingest_only
sized = size_for_ingest_only({workers})
import polars
print(sized, polars.thread_pool_size(), os.environ.get("OPENBLAS_NUM_THREADS"), os.environ.get("_RJEM_MALLOC_CONF") or "-")
"""


_SIZED = ("POLARS_MAX_THREADS", "OPENBLAS_NUM_THREADS", "_RJEM_MALLOC_CONF")


def _pool_size(before: str, workers: int | None, **env: str) -> list[str]:
    """(sized?, polars threads, OpenBLAS threads, the allocator option that wins) in a fresh process."""
    clean = {k: v for k, v in os.environ.items() if k not in _SIZED}
    result = subprocess.run([sys.executable, "-c", _POOL_SIZE.format(before=before, workers=workers)],
                            env={**clean, **env}, capture_output=True, text=True, check=True)
    sized, threads, blas, allocator = result.stdout.split()
    # polars puts its own defaults in front when it loads: jemalloc reads left to right, the last one wins
    keeps = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    winner = keeps if allocator.endswith(keeps) else allocator.rsplit(",", 1)[-1]
    return [sized, threads, blas, winner]


def test_a_process_that_only_ingests_sizes_polars_before_loading_it():
    cores = os.cpu_count() or 1
    keeps = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert _pool_size("", 2) == ["True", str(max(1, cores // 2)), "1", keeps]
    assert _pool_size("", None) == ["True", "1", "1", keeps]  # one worker per core
    assert _pool_size("", 1) == ["True", str(cores), "1", keeps]  # working alone: every core
    # the user's values are kept
    assert _pool_size("", 2, POLARS_MAX_THREADS="3", _RJEM_MALLOC_CONF="narenas:1") == ["True", "3", "1", "narenas:1"]
    # inherited from a parent process that loaded polars: polars' own defaults are not the user's
    polars_own = "dirty_decay_ms:500,muzzy_decay_ms:1000"
    assert _pool_size("", 2, _RJEM_MALLOC_CONF=polars_own)[3] == keeps
    assert _pool_size("", 2, _RJEM_MALLOC_CONF=f"{polars_own},narenas:1")[3] == "narenas:1"
    assert _pool_size("import polars", 2)[:3] == ["False", str(cores), "None"]  # too late: left as it is
    assert _pool_size("import polars", 2)[3] != keeps


_COMMAND = """
import sys
from odyssey.cli.ingest import ingest
from pathlib import Path
workers = None if sys.argv[3] == "-" else int(sys.argv[3])
config = Path(sys.argv[4]) if len(sys.argv) > 4 else None
ingest(fhir=[sys.argv[1]], out=Path(sys.argv[2]), workers=workers, config=config, meds=None, strict=None, validate=None,
       code_systems=None, fast_path=None, compiled_reader=None, extra=None)
import polars
print(polars.thread_pool_size())
"""


@pytest.mark.parametrize(("flag", "in_config", "expected_workers"), [(1, None, 1), (2, None, 2), (None, 1, 1)])
def test_the_ingest_command_sizes_its_polars_pool_for_its_share(tmp_path, flag, in_config, expected_workers):
    fixtures = Path(__file__).parent / "fixtures" / "r4"
    config = tmp_path / "ingest.yaml"
    config.write_text(f"workers: {in_config if in_config is not None else 'null'}\n")
    clean = {k: v for k, v in os.environ.items() if k not in _SIZED}
    result = subprocess.run([sys.executable, "-c", _COMMAND, str(fixtures), str(tmp_path / "out"),
                             "-" if flag is None else str(flag), str(config)],
                            env=clean, capture_output=True, text=True, check=True)
    cores = os.cpu_count() or 1
    assert result.stdout.split()[-1] == str(max(1, cores // expected_workers))
    assert (tmp_path / "out" / "metadata" / "dataset.json").exists()


_FORK_SAFETY = """
import threading, time
import polars
from odyssey.pipelines import ingest_pool
import odyssey.pipelines.ingest
print(ingest_pool._forking_is_safe())  # imported, nothing run: only allocator threads
sleeper = threading.Thread(target=time.sleep, args=(0.5,))
sleeper.start()
print(ingest_pool._forking_is_safe())  # a thread of this program's own
sleeper.join()
print(ingest_pool._forking_is_safe())
polars.DataFrame({"a": [3, 1, 2]}).sort("a")  # polars' thread pool is up now
print(ingest_pool._forking_is_safe())
"""


def test_helpers_are_forked_only_while_no_thread_would_be_lost():
    """As in the `odyssey ingest` command, OpenBLAS on one thread (size_for_ingest_only): its threads would be
    threads to lose."""
    clean = {k: v for k, v in os.environ.items() if k not in _SIZED}
    result = subprocess.run([sys.executable, "-c", _FORK_SAFETY], env={**clean, "OPENBLAS_NUM_THREADS": "1"},
                            capture_output=True, text=True,
                            check=True, timeout=120)
    expected = ["True", "False", "True", "False"] if sys.platform == "linux" else ["False"] * 4
    assert result.stdout.split() == expected


_FORKED_HELPER = """
import os, sys
from odyssey.pipelines.ingest_pool import worker_pool

def settings(_):
    import polars, pyarrow
    ordered = polars.DataFrame({"a": [3, 1, 2]}).sort("a")["a"].to_list()  # its own thread pool works
    return os.getpid(), pyarrow.default_memory_pool().backend_name, polars.thread_pool_size(), ordered

with worker_pool(2, caller_works=False) as pool:
    method = pool._pool._ctx.get_start_method()
    pid, arrow_pool, polars_threads, ordered = next(pool.unordered(settings, [None]))
print(method, pid != os.getpid(), arrow_pool, polars_threads, ordered == [1, 2, 3])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="helpers are forked on Linux only")
def test_a_forked_helper_gets_the_spawned_helpers_settings():
    clean = {k: v for k, v in os.environ.items() if k not in _SIZED and k != "ARROW_DEFAULT_MEMORY_POOL"}
    result = subprocess.run([sys.executable, "-c", _FORKED_HELPER], env={**clean, "OPENBLAS_NUM_THREADS": "1"}, capture_output=True, text=True,
                            check=True, timeout=120)
    cores = os.cpu_count() or 1
    assert result.stdout.split() == ["fork", "True", "system", str(max(1, cores // 2)), "True"]


_FORKED_INGEST = """
import sys
from odyssey.pipelines import ingest_pool
from odyssey.pipelines.ingest import ingest_fhir

def forking_is_safe(check=ingest_pool._forking_is_safe):
    safe = check()
    print("forked" if safe else "spawned")
    return safe

ingest_pool._forking_is_safe = forking_is_safe
ingest_fhir([sys.argv[1]], sys.argv[2], workers=2, chunk_mb=1)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="helpers are forked on Linux only")
def test_forked_helpers_write_the_dataset_a_single_process_writes(tmp_path):
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient(p) for p in "abcd"])
    write_ndjson(tmp_path / "in" / "Observation.ndjson",
                 [lab(f"o{i}", "abcd"[i % 4], None, f"2150-01-0{1 + i % 9}T00:00:00Z", float(i)) for i in range(8000)])
    ingest_fhir([tmp_path / "in"], tmp_path / "alone", workers=1, chunk_mb=1)
    clean = {k: v for k, v in os.environ.items() if k not in _SIZED}
    result = subprocess.run([sys.executable, "-c", _FORKED_INGEST, str(tmp_path / "in"), str(tmp_path / "forked")],
                            env={**clean, "OPENBLAS_NUM_THREADS": "1"}, capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split() == ["forked"]
    assert dataset_digests(tmp_path / "forked") == dataset_digests(tmp_path / "alone")



def test_the_users_allocator_options_are_what_follows_polars_own():
    own = "dirty_decay_ms:500,muzzy_decay_ms:1000"
    assert users_allocator_options(None) == users_allocator_options("") == ""
    assert users_allocator_options(own) == ""
    assert users_allocator_options(f"{own},thp:always,metadata_thp:always") == ""  # POLARS_THP=1
    assert users_allocator_options(f"{own},{own},narenas:1") == "narenas:1"  # a grandchild of polars' importers
    assert users_allocator_options("narenas:1") == "narenas:1"
    assert users_allocator_options("dirty_decay_ms:500") == "dirty_decay_ms:500"  # not polars' whole default
