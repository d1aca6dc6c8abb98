"""Speed and memory of `odyssey tokenize` on a generated MEDS dataset.

    .venv/bin/python benchmarks/tokenize_speed.py --events 50000000 --work /tmp/tokbench [--write-results]

Generates a MEDS dataset (Odyssey's schema, sorted, whole subjects per shard) with numpy, then runs the
tokenize stage in a child process and reports its wall time, events per second and peak resident memory
(`ru_maxrss` of the child). Targets: >= 1M events/s and <= 4 GB peak at 50M events.

Each subject: a gender row, a birth row, and visits (inpatient encounters) holding ENCOUNTER_START,
labs with values (issued a few hours after they are drawn), medications, procedures, ENCOUNTER_END and
discharge diagnoses; a tenth of the subjects die. Codes come from vocabularies of realistic sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from odyssey.pipelines import schema as S

EPOCH_US = int(datetime(2010, 1, 1).timestamp() * 1e6)
HOUR_US = 3_600 * 10**6
DAY_US = 24 * HOUR_US
SPLITS = np.array([S.TRAIN_SPLIT, S.TUNING_SPLIT, S.HELD_OUT_SPLIT])
SPLIT_SHARES = [0.8, 0.1, 0.1]
VISITS_PER_SUBJECT = 12
EVENTS_PER_VISIT = 40  # inside a visit, besides start, end and diagnoses
DIAGNOSES_PER_VISIT = 4
LAB_CODES, DRUG_CODES, PROCEDURE_CODES, DIAGNOSIS_CODES = 1_500, 3_000, 2_000, 8_000
ROWS_PER_SHARD = 5_000_000
RESULTS_FILE = Path(__file__).with_name("RESULTS.md")


def _codes(prefix: str, n: int) -> list[str]:
    return [f"{prefix}//{k:06d}" for k in range(n)]


def _dictionary() -> tuple[list[str], dict[str, tuple[int, int]]]:
    """All codes in one list, with each kind's [start, stop) range in it."""
    kinds = {
        "static": ["GENDER//female", "GENDER//male"],
        "special": [S.BIRTH_CODE, S.DEATH_CODE, "ENCOUNTER_START//IMP", "ENCOUNTER_END//IMP"],
        "lab": _codes("LOINC", LAB_CODES),
        "drug": _codes("NDC", DRUG_CODES),
        "procedure": _codes("ICD10PCS", PROCEDURE_CODES),
        "diagnosis": _codes("ICD10CM", DIAGNOSIS_CODES),
    }
    codes, ranges = [], {}
    for kind, values in kinds.items():
        ranges[kind] = (len(codes), len(codes) + len(values))
        codes += values
    return codes, ranges


def _shard(rng: np.random.Generator, first_subject: int, n_subjects: int, codes, ranges) -> pa.Table:
    """Rows of `n_subjects` subjects, sorted by (subject, time) with static rows first."""
    lo = ranges
    special = {code: lo["special"][0] + i for i, code in enumerate(
        [S.BIRTH_CODE, S.DEATH_CODE, "ENCOUNTER_START//IMP", "ENCOUNTER_END//IMP"])}
    n_visits = n_subjects * VISITS_PER_SUBJECT
    subject_of_visit = np.repeat(np.arange(n_subjects), VISITS_PER_SUBJECT)
    gaps = rng.exponential(60 * DAY_US, n_visits).astype(np.int64) + DAY_US
    lengths = (rng.exponential(4 * DAY_US, n_visits) + 6 * HOUR_US).astype(np.int64)
    step = (gaps + lengths).reshape(n_subjects, VISITS_PER_SUBJECT)
    starts = (EPOCH_US + np.cumsum(step, axis=1) - lengths.reshape(n_subjects, -1)).ravel()
    ends = starts + lengths
    encounter_ids = (first_subject * VISITS_PER_SUBJECT + np.arange(n_visits)).astype(np.int64)

    # Inside each visit: labs, drugs, procedures at sorted random times.
    inner_visit = np.repeat(np.arange(n_visits), EVENTS_PER_VISIT)
    fraction = np.sort(rng.random((n_visits, EVENTS_PER_VISIT)), axis=1).ravel()
    inner_time = starts[inner_visit] + (fraction * lengths[inner_visit]).astype(np.int64)
    kind = rng.choice(3, size=inner_visit.size, p=[0.6, 0.3, 0.1])
    lab_lo, lab_hi = lo["lab"]
    inner_code = np.where(
        kind == 0,
        lab_lo + np.minimum(rng.zipf(1.3, inner_visit.size), lab_hi - lab_lo) - 1,
        np.where(kind == 1, rng.integers(*lo["drug"], inner_visit.size), rng.integers(*lo["procedure"], inner_visit.size)),
    )
    inner_value = np.where(kind == 0, rng.normal(100, 20, inner_visit.size), np.nan).astype(np.float32)
    inner_issued = np.where(kind == 0, inner_time + rng.integers(HOUR_US, 8 * HOUR_US, inner_visit.size), -1)
    inner_type = np.array(["lab", "medication", "procedure"])[kind]

    diag_visit = np.repeat(np.arange(n_visits), DIAGNOSES_PER_VISIT)
    parts = {
        # order key, visit (or -1 for subject rows), time, code index, value, issued, event type
        "start": (1, np.arange(n_visits), starts, np.full(n_visits, special["ENCOUNTER_START//IMP"]), None, None, "encounter_start"),
        "inner": (2, inner_visit, inner_time, inner_code, inner_value, inner_issued, inner_type),
        "end": (3, np.arange(n_visits), ends, np.full(n_visits, special["ENCOUNTER_END//IMP"]), None, None, "encounter_end"),
        "diagnosis": (4, diag_visit, ends[diag_visit], rng.integers(*lo["diagnosis"], diag_visit.size), None, None, "condition"),
    }
    subject_col, time_col, code_col, value_col, issued_col, type_col, enc_col, order_col = ([] for _ in range(8))
    for order, visit, when, code, value, issued, event_type in parts.values():
        n = len(visit)
        subject_col.append(subject_of_visit[visit])
        time_col.append(when)
        code_col.append(code)
        value_col.append(value if value is not None else np.full(n, np.nan, np.float32))
        issued_col.append(issued if issued is not None else np.full(n, -1))
        type_col.append(np.broadcast_to(np.asarray(event_type), n))
        enc_col.append(encounter_ids[visit])
        order_col.append(np.full(n, order))
    subjects = np.arange(n_subjects)
    dies = rng.random(n_subjects) < 0.1
    birth = starts.reshape(n_subjects, -1)[:, 0] - (rng.uniform(20, 90, n_subjects) * 365 * DAY_US).astype(np.int64)
    death_time = ends.reshape(n_subjects, -1)[:, -1] + 5 * DAY_US
    static_rows = [
        (0, subjects, np.full(n_subjects, -1), rng.integers(*lo["static"], n_subjects), "demographic"),
        (0, subjects, birth, np.full(n_subjects, special[S.BIRTH_CODE]), "birth"),
        (5, subjects[dies], death_time[dies], np.full(int(dies.sum()), special[S.DEATH_CODE]), "death"),
    ]
    for order, who, when, code, event_type in static_rows:
        n = len(who)
        subject_col.append(who)
        time_col.append(when)
        code_col.append(code)
        value_col.append(np.full(n, np.nan, np.float32))
        issued_col.append(np.full(n, -1))
        type_col.append(np.broadcast_to(np.asarray(event_type), n))
        enc_col.append(np.full(n, -1))
        order_col.append(np.full(n, order))
    subject = np.concatenate(subject_col)
    when = np.concatenate(time_col)
    order = np.concatenate(order_col)
    # Static rows (time null) first, then by time; ties by the part order above.
    sort_time = np.where(when < 0, np.iinfo(np.int64).min, when)
    index = np.lexsort((order, sort_time, subject))
    when, issued, encounter = when[index], np.concatenate(issued_col)[index], np.concatenate(enc_col)[index]
    value = np.concatenate(value_col)[index]
    dictionary = pa.array(codes, pa.string())
    code = pa.DictionaryArray.from_arrays(pa.array(np.concatenate(code_col)[index].astype(np.int32)), dictionary)
    columns = {
        S.SUBJECT_ID: pa.array(first_subject + subject[index], pa.int64()),
        S.TIME: pa.array(when, pa.timestamp("us"), mask=when < 0),
        S.CODE: code.cast(pa.string()),
        S.NUMERIC_VALUE: pa.array(value, pa.float32(), mask=np.isnan(value)),
        S.TEXT_VALUE: pa.nulls(len(index), pa.large_string()),
        S.ENCOUNTER_ID: pa.array(encounter, pa.int64(), mask=encounter < 0),
        S.UNIT: pa.nulls(len(index), pa.string()),
        S.COMPARATOR: pa.nulls(len(index), pa.string()),
        S.EVENT_TYPE: pa.array(np.concatenate(type_col)[index], pa.string()),
        S.ISSUED: pa.array(issued, pa.timestamp("us"), mask=issued < 0),
    }
    return pa.table(columns, schema=S.DATA_SCHEMA)


def generate(root: Path, events: int, seed: int = 0) -> int:
    """Write a MEDS dataset of about `events` rows at `root`; returns the exact row count."""
    if root.exists():
        shutil.rmtree(root)
    (root / S.DATA_DIR).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    codes, ranges = _dictionary()
    per_subject = VISITS_PER_SUBJECT * (EVENTS_PER_VISIT + DIAGNOSES_PER_VISIT + 2) + 2
    n_subjects = max(1, events // per_subject)
    per_shard = max(1, ROWS_PER_SHARD // per_subject)
    rows = 0
    for shard, first in enumerate(range(0, n_subjects, per_shard)):
        table = _shard(rng, first, min(per_shard, n_subjects - first), codes, ranges)
        pq.write_table(table, root / S.DATA_DIR / f"{shard}.parquet")
        rows += table.num_rows
    splits = pa.table(
        {S.SUBJECT_ID: pa.array(np.arange(n_subjects), pa.int64()),
         "split": pa.array(rng.choice(SPLITS, n_subjects, p=SPLIT_SHARES))}
    )
    (root / S.SPLITS_FILE).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(splits, root / S.SPLITS_FILE)
    return rows


CHILD = """
import json, os, resource, sys, threading, time
from odyssey.tokenizer import TokenizeConfig, tokenize

def tree_rss_kb(pid):
    # Resident memory of a process and all its descendants (worker processes included).
    total = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                total += sum(tree_rss_kb(int(child)) for child in children.read().split())
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        pass
    return total

peak = [0]
done = threading.Event()
def sample():
    while not done.wait(0.05):
        peak[0] = max(peak[0], tree_rss_kb(os.getpid()))
threading.Thread(target=sample, daemon=True).start()
config = TokenizeConfig(max_rows_per_chunk=int(sys.argv[3]), workers=int(sys.argv[4]))
started = time.perf_counter()
report = tokenize(sys.argv[1], sys.argv[2], config, progress=False)
seconds = time.perf_counter() - started
done.set()
own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": seconds,
                  "cpu_seconds": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
                  "phases": report.phase_seconds, "events": report.events,
                  "tokens": report.tokens, "subjects": report.subjects, "vocab_size": report.vocab_size,
                  "parts": report.parts, "peak_rss_mb": max(peak[0], own.ru_maxrss) / 1024,
                  "largest_process_rss_mb": max(own.ru_maxrss, children.ru_maxrss) / 1024}))
"""


def run(data: Path, out: Path, max_rows_per_chunk: int, workers: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(out), str(max_rows_per_chunk), str(workers)],
        check=True, capture_output=True, text=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


def _machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {cpus} CPU cores, {memory_gb:.0f} GB RAM, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/odyssey-tokenize-bench"))
    parser.add_argument("--max-rows-per-chunk", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=1, help="TokenizeConfig.workers")
    parser.add_argument("--write-results", action="store_true", help=f"append a section to {RESULTS_FILE.name}")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and output")
    parser.add_argument("--reuse", action="store_true", help="reuse data kept by an earlier --keep run")
    args = parser.parse_args()
    data, out = args.work / "meds", args.work / "seq"
    began = time.perf_counter()
    if args.reuse and (data / S.DATA_DIR).is_dir():
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (data / S.DATA_DIR).glob("*.parquet"))
    else:
        rows = generate(data, args.events)
    generated = time.perf_counter() - began
    load_before = os.getloadavg()[0]
    measured = run(data, out, args.max_rows_per_chunk, args.workers)
    load_after = os.getloadavg()[0]
    rate = measured["events"] / measured["seconds"]
    peak_gb = measured["peak_rss_mb"] / 1024
    verdict = (
        f"{'PASS' if rate >= 1e6 else 'FAIL'} speed (>= 1M events/s), "
        f"{'PASS' if peak_gb <= 4 else 'FAIL'} memory (<= 4 GB)"
    )
    summary = {**measured, "load_average_1min": [round(load_before, 1), round(load_after, 1)],
               "events_per_cpu_second": round(measured["events"] / measured["cpu_seconds"]), "rows_generated": rows, "generate_seconds": round(generated, 1),
               "events_per_second": round(rate), "peak_rss_gb": round(peak_gb, 2), "verdict": verdict}
    print(json.dumps(summary, indent=2))
    if args.write_results:
        command = f"{Path(sys.executable).name} benchmarks/tokenize_speed.py --events {args.events} " \
                  f"--max-rows-per-chunk {args.max_rows_per_chunk} --workers {args.workers}"
        section = "\n".join([
            f"## odyssey tokenize, {args.events:,} events ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
            "",
            f"- machine: {_machine()}",
            f"- command: `{command}`",
            f"- input: {rows:,} MEDS rows, {measured['subjects']:,} subjects, "
            f"{len(list((data / S.DATA_DIR).glob('*.parquet')))} shards "
            + ("(the previous run's data)" if args.reuse else f"(generated in {generated:.0f} s)"),
            f"- result: {measured['seconds']:.1f} s for the whole stage (check, fit on train, build, write) = "
            f"**{rate:,.0f} events/s**, peak RSS **{peak_gb:.2f} GB** (all processes, sampled every 50 ms), {measured['tokens']:,} tokens, "
            f"vocabulary {measured['vocab_size']:,}, {measured['parts']} parts",
            f"- CPU time of the stage (all threads and worker processes, imports included): {measured['cpu_seconds']:.1f} s = "
            f"{measured['events'] / measured['cpu_seconds']:,.0f} events per CPU-second; phases (wall): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in measured["phases"].items()),
            f"- machine load (1-min load average, other sessions' jobs) before/after: {load_before:.1f} / {load_after:.1f} "
            f"on {os.cpu_count()} cores",
            f"- verdict: {verdict}",
            "",
        ])
        previous = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else "# Benchmark results\n\n"
        RESULTS_FILE.write_text(previous + "\n" + section.replace("## odyssey tokenize", "### odyssey tokenize") + "\n")
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
