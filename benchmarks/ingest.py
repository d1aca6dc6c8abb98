"""Ingest speed and memory against the parse floor and full R4B validation, in one run.

    python benchmarks/ingest.py --patients 4000 --scale 5 --out /tmp/ingest_bench.json

1. makes (or reuses) synthetic MIMIC-IV-on-FHIR cohorts with `odyssey synth`;
2. parse floor: `orjson.loads` of every line, one core;
3. R4B baseline: fhir.resources R4B validation of each resource, then flattening, one core (on a sample);
4. `odyssey ingest` end to end with the default config: resources/s and peak memory (main + workers,
   sampled from /proc), at the base size and at `--scale` times it (memory must stay flat);
5. `odyssey ingest` with one worker at the base size: the same single core as the parse floor, which
   keeps its meaning when other processes share the machine (wall numbers do not).
Each ingest run is a fresh Python process that imports `odyssey.pipelines.ingest` and times `ingest_fhir`
(wall, and CPU of it and its helpers); peak memory is sampled over the whole process tree. By default that
process first does what the `odyssey ingest` command does before it loads polars (sizes its thread pools
for the run: `ingest_pool.size_for_ingest_only`, absent from trees before 2026-11-27 17:50 UTC);
`--library-caller` skips it, as a program that calls `ingest_fhir` among other work would.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import orjson

# The environment this script was started with. Each ingest run gets it, as it would from a shell: polars,
# once this process loads it (for the R4B baseline), writes its allocator defaults into os.environ, and
# a run that inherited them measured the ingest with another allocator setting than the command gets.
SHELL_ENVIRONMENT = dict(os.environ)


class PeakRss:
    """Peak resident memory of this process plus its children, sampled every 50 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[int]:
        """This process and its descendants (the ingest runs in a child, its helpers in grandchildren)."""
        parents: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parent = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                parents.setdefault(parent, []).append(int(entry))
        pids, frontier = [], [os.getpid()]
        while frontier:
            pid = frontier.pop()
            pids.append(pid)
            frontier.extend(parents.get(pid, ()))
        return pids

    def _rss(self, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(self._rss(p) for p in self._tree()))
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cohort(cache: Path, patients: int, seed: int = 0) -> Path:
    from odyssey.pipelines.synth import synthesize

    folder = cache / f"synth-{patients}-{seed}"
    if not (folder / "synth_report.json").exists():
        synthesize(patients, folder, seed=seed)
    return folder


def ndjson_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.ndjson"))


def read_into_page_cache(folder: Path) -> None:
    """Read a cohort's files once, untimed, so that its ingest run reads them from memory as the parse floor
    does. This virtual machine gives idle page cache back to its host within minutes: a 5M run after a few
    idle minutes read part of its 3.2 GB from disk (0.92x the floor against 1.08-1.21x in the runs after)."""
    for path in ndjson_files(folder):
        with open(path, "rb") as handle:
            while handle.read(16 << 20):
                pass


def parse_floor(files: list[Path]) -> dict:
    n = 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    for path in files:
        with open(path, "rb") as handle:
            for line in handle:
                orjson.loads(line)
                n += 1
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {"resources": n, "seconds": seconds, "resources_per_second": n / seconds, "cpu_seconds": cpu,
            "resources_per_cpu_second": n / cpu}


def r4b_baseline(files: list[Path], sample: int) -> dict:
    """Full R4B validation and flattening per resource, on a round-robin sample of the files."""
    from fhir.resources.R4B import get_fhir_model_class

    from odyssey.pipelines.fhir_flatten import Context, Flattener, Rejected
    from odyssey.pipelines.ingest import load_code_systems

    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(p, "rb")) for p in files]
        mixed = (ln for group in itertools.zip_longest(*handles) for ln in group if ln)
        lines = list(itertools.islice(mixed, sample))
    flattener = Flattener(Context(systems=load_code_systems()))
    classes: dict[str, type] = {}
    start = time.perf_counter()
    for i, line in enumerate(lines):
        resource = orjson.loads(line)
        rtype = resource["resourceType"]
        cls = classes.get(rtype) or classes.setdefault(rtype, get_fhir_model_class(rtype))
        cls.model_validate(resource)
        with contextlib.suppress(Rejected):
            flattener.flatten(resource, i, 0)
    seconds = time.perf_counter() - start
    return {"resources": len(lines), "seconds": seconds, "resources_per_second": len(lines) / seconds}


# One ingest run in a fresh interpreter: this process has loaded fhir.resources R4B (the baseline) and
# warmed other caches that a user's `odyssey ingest` would pay for; the child times `ingest_fhir` only, as
# a program that calls it does, after importing it.
_ONE_RUN = """
import json, os, sys, time
folder, out, workers = sys.argv[1], sys.argv[2], None if sys.argv[3] == "None" else int(sys.argv[3])
if sys.argv[4] == "command":  # as `odyssey ingest` does before it loads polars
    try:
        from odyssey.pipelines.ingest_pool import size_for_ingest_only
    except ImportError:  # a tree from before it
        pass
    else:
        size_for_ingest_only(workers)
from odyssey.pipelines.ingest import ingest_fhir
start, before = time.perf_counter(), os.times()
report = ingest_fhir([folder], out, workers=workers)
seconds, after = time.perf_counter() - start, os.times()
cpu = sum(after[i] - before[i] for i in range(4))  # user and system, this process and its reaped helpers
print(json.dumps({"resources": report.resources_read, "events": report.events, "rejected": report.resources_rejected,
                  "seconds": seconds, "cpu_seconds": cpu, "workers": report.workers, "validation": report.validation}))
"""


def ours(folder: Path, workers: int | None, polars_threads: int | None = None, as_command: bool = True) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ingest-bench-")) / "meds"
    load_before = os.getloadavg()[0]
    env = dict(SHELL_ENVIRONMENT)
    if polars_threads:  # as a program that only ingests may size polars before importing it
        env["POLARS_MAX_THREADS"] = str(polars_threads)
    with PeakRss() as rss:
        done = subprocess.run([sys.executable, "-c", _ONE_RUN, str(folder), str(out), str(workers),
                               "command" if as_command else "library"],
                              capture_output=True, text=True, check=False, env=env)
    shutil.rmtree(out.parent)
    if done.returncode:
        raise RuntimeError(f"ingest run failed:\n{done.stderr}")
    run = json.loads(done.stdout.splitlines()[-1])
    return {
        **run,
        "resources_per_second": run["resources"] / run["seconds"],
        "peak_memory_mb": rss.peak / 2**20,
        "resources_per_cpu_second": run["resources"] / run["cpu_seconds"],
        "cpu_us_per_resource": run["cpu_seconds"] / run["resources"] * 1e6,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for name in ("orjson", "msgspec", "polars", "pyarrow"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # msgspec is optional: without it the fast path is off
            found[name] = None
    return found


def _reader() -> str:
    """Which stage-1 path the ingest runs took: the compiled reader, or the Python paths alone."""
    from odyssey.pipelines import ingest_read

    available = getattr(ingest_read, "SCANNER_AVAILABLE", None)
    if available is None:  # a tree from before the compiled reader
        return "python (no compiled reader in this tree)"
    return "compiled" if available else "python (compiled reader not built)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=4000, help="base cohort size (about 1M resources)")
    parser.add_argument("--scale", type=int, default=5, help="also run at this many times the base size (0: skip)")
    parser.add_argument("--r4b-sample", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "odyssey-bench")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    parser.add_argument("--polars-threads", type=int, default=None,
                        help="POLARS_MAX_THREADS for the calling process of the ingest runs (default: polars' own)")
    parser.add_argument("--library-caller", action="store_true",
                        help="ingest runs as a program calling ingest_fhir (thread pools left as they are), "
                             "not as the `odyssey ingest` command")
    args = parser.parse_args()
    as_command = not args.library_caller

    base = cohort(args.cache, args.patients)
    files = ndjson_files(base)
    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "versions": _versions(),
        "reader": _reader(),
        "polars_threads_of_the_calling_process": args.polars_threads,
        "ingest_process": "command" if as_command else "library caller",
        "load_average_at_start": os.getloadavg(),
        "parse_floor": parse_floor(files),
        "r4b_validate_and_flatten": r4b_baseline(files, args.r4b_sample),
        "ours": ours(base, args.workers, args.polars_threads, as_command),
    }
    if args.scale:
        big = cohort(args.cache, args.patients * args.scale)
        read_into_page_cache(big)
        results["ours_scaled"] = ours(big, args.workers, args.polars_threads, as_command)
    read_into_page_cache(base)
    results["ours_one_worker"] = ours(base, 1, as_command=as_command)
    floor = results["parse_floor"]["resources_per_second"]
    rows = [("parse floor (orjson.loads, 1 core)", results["parse_floor"]),
            ("R4B validate + flatten (1 core)", results["r4b_validate_and_flatten"]),
            ("odyssey ingest", results["ours"])]
    if "ours_scaled" in results:
        rows.append((f"odyssey ingest x{args.scale}", results["ours_scaled"]))
    rows.append(("odyssey ingest, 1 worker", results["ours_one_worker"]))
    print(f"{'':40}{'resources':>12}{'seconds':>9}{'res/s':>11}{'x floor':>9}{'res/cpu-s':>11}{'peak MB':>9}")
    for name, r in rows:
        print(f"{name:40}{r['resources']:>12,}{r['seconds']:>9.1f}{r['resources_per_second']:>11,.0f}"
              f"{r['resources_per_second'] / floor:>9.2f}{r.get('resources_per_cpu_second', float('nan')):>11,.0f}"
              f"{r.get('peak_memory_mb', float('nan')):>9.0f}")
    print(f"stage 1 reader: {results['reader']}; ingest runs as {results['ingest_process']}; "
          f"load average at start {results['load_average_at_start'][0]:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
