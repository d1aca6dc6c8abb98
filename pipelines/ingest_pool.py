"""The processes that run ingestion's stages: the calling process and `workers - 1` helpers, or `workers`
helpers that the calling process only coordinates (ingest.py chooses by the input's size).

Helpers are forked when no thread would be lost by it (the `odyssey ingest` command, see _forking_is_safe):
they start at once with everything imported. Otherwise they are spawned and start Python and import polars
and pyarrow (~0.3 s of wall and of CPU each), while the calling process, which has them loaded already,
starts on the first chunk; one process fewer pays that. Jobs are shared as they go: this process takes the
next job whenever it finishes one, each helper whenever one of its jobs comes back, so the cores stay busy
to the end whatever the jobs cost.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path


class Workers:
    """Runs a function over jobs in this process (unless it only coordinates) and the helpers (pool None:
    this process alone)."""

    def __init__(self, pool: multiprocessing.pool.Pool | None, helpers: int, caller_works: bool = True):
        self._pool = pool
        self._helpers = helpers if pool is not None else 0
        self._caller_works = caller_works or not self._helpers

    @property
    def helpers(self) -> int:
        return self._helpers

    def close(self) -> None:
        """Stop and reap the helpers. Terminated, not closed and joined: a spawned process that exits by
        itself finalizes the whole interpreter first (~0.2 s of wall at the end of every run); here they
        are idle, their files written and closed."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def unordered(self, fn: Callable, jobs: Iterable) -> Iterator:
        """fn(job) for every job, yielded as they finish. Jobs are taken in their order, so put the biggest
        first for the processes to finish together. Closing the iterator early stops handing out jobs."""
        for _, result in self._shared(fn, list(jobs)):
            yield result

    def ordered(self, fn: Callable, jobs: Iterable) -> Iterator:
        """fn(job) for every job, yielded in job order (each as soon as those before it are done)."""
        waiting: dict[int, object] = {}
        following = 0
        for index, result in self._shared(fn, list(jobs)):
            waiting[index] = result
            while following in waiting:
                yield waiting.pop(following)
                following += 1

    def _shared(self, fn: Callable, jobs: list) -> Iterator[tuple[int, object]]:
        if not self._helpers:
            yield from enumerate(map(fn, jobs))
            return
        pending = deque(enumerate(jobs))
        finished: queue.SimpleQueue = queue.SimpleQueue()
        lock = threading.Lock()
        stopped = threading.Event()
        held = 0  # jobs handed to the helpers and not back yet

        def hand_out() -> None:
            # A helper holds a second job while many are left, so that it never waits for this process to
            # hand it the next (that takes the GIL, which this process's work holds for milliseconds at a
            # time); near the end one, so that no job waits in a busy helper while this process is idle.
            # Runs in this process's threads, the pool's result thread included: it must never raise.
            nonlocal held
            while True:
                with lock:
                    per_helper = 2 if len(pending) > 2 * (self._helpers + self._caller_works) else 1
                    if stopped.is_set() or not pending or held >= self._helpers * per_helper:
                        return
                    index, job = pending.popleft()
                    held += 1
                try:
                    self._pool.apply_async(fn, (job,), callback=partial(returned, index),
                                           error_callback=partial(failed, index))
                except ValueError:  # the pool was terminated meanwhile (an error elsewhere)
                    stopped.set()
                    return

        def returned(index: int, result) -> None:
            nonlocal held
            with lock:
                held -= 1
            finished.put((index, result, None))
            hand_out()

        def failed(index: int, error: BaseException) -> None:
            nonlocal held
            with lock:
                held -= 1
            finished.put((index, None, error))

        hand_out()
        remaining = len(jobs)
        try:
            while remaining:
                while True:  # what the helpers finished meanwhile, first
                    try:
                        index, result, error = finished.get_nowait()
                    except queue.Empty:
                        break
                    if error is not None:
                        raise error
                    remaining -= 1
                    yield index, result
                if not remaining:
                    break
                with lock:
                    mine = pending.popleft() if pending and self._caller_works else None
                if mine is None:  # every job is handed out: wait for the helpers'
                    index, result, error = finished.get()
                    if error is not None:
                        raise error
                else:
                    index, result = mine[0], fn(mine[1])
                remaining -= 1
                yield index, result
        finally:
            stopped.set()


@contextlib.contextmanager
def worker_pool(workers: int, caller_works: bool = True) -> Iterator[Workers]:
    """This process and `workers - 1` helpers, started at once and shared by both stages (or `workers`
    helpers, when this process is only to coordinate them)."""
    helpers = workers - 1 if caller_works else workers
    if helpers < 1:
        yield Workers(None, 0)
        return
    # (Asking polars' allocator to return freed memory sooner, `_RJEM_MALLOC_CONF=dirty_decay_ms:100`, saved
    # ~200 MB at 5M resources but cost ~10% CPU; memory is well within bounds without it.)
    if _forking_is_safe():
        pool = multiprocessing.get_context("fork").Pool(helpers, initializer=_forked_helper_setup,
                                                        initargs=(workers,))
    else:
        with worker_environment(workers), _main_module_hidden():
            pool = multiprocessing.get_context("spawn").Pool(helpers)
    workers = Workers(pool, helpers, caller_works)
    try:
        yield workers
    finally:
        workers.close()


# Threads that may run while this process forks: allocators' background threads (jemalloc's fork handlers
# take their locks around the fork) and polars' out-of-core cleaner, which ingestion never wakes.
_FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd", "polars-ooc-clea"})


def _forking_is_safe() -> bool:
    """Whether helpers may be forked from this process rather than spawned (~0.01 s instead of ~0.3 s of wall
    and CPU each, and they need not import anything). Only when no thread but this one and those known to
    survive a fork runs: a thread pool started before the fork (polars', once a query has run) is missing
    in the child, which then waits for it forever."""
    if sys.platform != "linux" or threading.active_count() != 1:
        return False
    try:
        threads = os.listdir("/proc/self/task")
        names = [Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in threads
                 if int(tid) != threading.get_native_id()]
    except (OSError, ValueError):
        return False
    return all(name in _FORK_SAFE_THREADS for name in names)


def _forked_helper_setup(workers: int) -> None:
    """What a spawned helper gets from `worker_environment`, applied after the fork: polars' thread pool (not
    started yet, see _forking_is_safe) sized for a share of the cores, pyarrow on the system allocator, and
    glibc keeping big freed buffers. (OpenBLAS and polars' allocator keep the parent's settings: both were
    read when they loaded.)"""
    settings = _ingest_environment(workers, helpers=True)
    if "POLARS_MAX_THREADS" in settings:
        os.environ["POLARS_MAX_THREADS"] = settings["POLARS_MAX_THREADS"]
    if "ARROW_DEFAULT_MEMORY_POOL" in settings:
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())
    _set_malloc_options({name: int(settings[name]) for name in _MALLOPT_PARAMETERS if name in settings})


# glibc reads these variables at start; a forked helper sets them through mallopt (malloc.h's parameter numbers)
_MALLOPT_PARAMETERS = {"MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}


def _set_malloc_options(values: dict[str, int]) -> None:
    """Set glibc malloc options in this process (a forked helper), named by their environment variables."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for name, value in values.items():
        mallopt(_MALLOPT_PARAMETERS[name], value)


@contextlib.contextmanager
def _main_module_hidden():
    """Helpers spawned inside this block do not run the program's main module first, as spawned processes
    otherwise do: they only run functions of odyssey.pipelines, and the main module can be costly (the
    `odyssey` command imports typer and every command, ~0.1 s of CPU per helper; a user's script may
    import much more)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


# polars' jemalloc (read when polars loads): never give freed pages back to the system during the run
ALLOCATOR_OPTIONS = "_RJEM_MALLOC_CONF"
ALLOCATOR_KEEPS_PAGES = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# What polars writes in front of ALLOCATOR_OPTIONS when it loads (later options win). Processes started after
# that inherit it, so finding it there does not mean a user chose it.
_POLARS_OWN_OPTIONS = ("dirty_decay_ms:500,muzzy_decay_ms:1000", "thp:always,metadata_thp:always")


def users_allocator_options(value: str | None) -> str:
    """The options of an ALLOCATOR_OPTIONS value that a user set: what follows polars' own."""
    rest = value or ""
    while own := next((o for o in _POLARS_OWN_OPTIONS if rest == o or rest.startswith(o + ",")), None):
        rest = rest[len(own) + 1:]
    return rest


def _ingest_environment(workers: int, helpers: bool) -> dict[str, str]:
    """The settings a process that ingests should start with (see worker_environment), less those the user
    set."""
    wanted = {"POLARS_MAX_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, workers))),
              "OPENBLAS_NUM_THREADS": "1"}
    if helpers:
        wanted |= {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                   "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    settings = {name: value for name, value in wanted.items() if name not in os.environ}
    if not users_allocator_options(os.environ.get(ALLOCATOR_OPTIONS)):
        settings[ALLOCATOR_OPTIONS] = ALLOCATOR_KEEPS_PAGES
    return settings


@contextlib.contextmanager
def worker_environment(workers: int):
    """Helpers spawned inside this block start with thread pools sized for them. The processes together
    fill the cores, so polars gets cores/workers threads (more only spin and contend: ~3% of the CPU at
    2 workers on 2 cores), and OpenBLAS, which ingestion never calls, one (its threads cost ~0.1 s of
    CPU at import, per process). pyarrow allocates from the system allocator: its default jemalloc pool
    kept ~100 MB more of freed spill buffers at 5M resources, for the same CPU. glibc's malloc keeps big
    freed buffers (up to 32 MB) in the heap instead of unmapping them: every batch allocates the same
    buffers again, and fresh pages cost a page fault and a clearing each (~7-11% of a process's CPU;
    peak memory +2-6%). Polars' allocator keeps its freed pages too (ALLOCATOR_KEEPS_PAGES): a
    stage-2 bucket needs ~150 MB more than a batch, and pages given back are faulted in again by the next
    bucket (1M resources, 6 alternating pairs: -2% CPU and wall; peak memory +75 MB at 5M). Values the
    user set are kept."""
    settings = _ingest_environment(workers, helpers=True)
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def size_for_ingest_only(workers: int | None) -> bool:
    """For a process whose only job is to ingest (the `odyssey ingest` command): its polars thread pool
    sized for its share of the cores, as the helpers' are (see `worker_environment`), polars' allocator
    keeping its freed pages, and OpenBLAS, which ingestion never calls, on one thread. All are read once,
    when polars and numpy are imported, so this must run before: it does nothing (and returns False) once
    either is loaded. Values the user set are kept (polars' own allocator defaults, inherited from a parent
    process that loaded polars, are not the user's). A program that calls `ingest_fhir` keeps its own
    pools: polars sized for every core costs a little beside the helpers (~3% of wall at 1M resources),
    which is not worth changing a process behind its owner's back."""
    if "polars" in sys.modules or "numpy" in sys.modules:
        return False
    cores = os.cpu_count() or 1
    os.environ.update(_ingest_environment(workers or cores, helpers=False))
    return True


__all__ = ["ALLOCATOR_KEEPS_PAGES", "ALLOCATOR_OPTIONS", "Workers", "size_for_ingest_only", "users_allocator_options",
           "worker_environment", "worker_pool"]
