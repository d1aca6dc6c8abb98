"""`odyssey ingest`: FHIR R4 exports -> a MEDS v0.4 dataset, with quarantine and exact counts.

Two stages. Workers read chunks of the input in parallel, flatten each resource into rows and spill
them by subject (ingest_read). Then, bucket by bucket, duplicates are settled, references resolved and
sorted shards written (ingest_resolve). Everything is built in a temporary folder that replaces the
output only when the run succeeds.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from importlib import resources as package_resources
from pathlib import Path
from typing import Literal

import meds
import orjson
import polars as pl
import yaml
from pydantic import Field
from tqdm.auto import tqdm

import odyssey
from odyssey.config import ConfigError, StageConfig
from odyssey.io import atomic_output_dir, write_json
from odyssey.pipelines import schema
from odyssey.pipelines.fhir_scan import release_memory as release_reader_memory
from odyssey.pipelines.fhir_sources import Chunk, discover, fetch_lines, line_offsets, plan_chunks
from odyssey.pipelines.ingest_pool import Workers, worker_pool
from odyssey.pipelines.ingest_read import Problem, ReadSettings, SampleChecker, discard_spill, read_chunk
from odyssey.pipelines.ingest_resolve import StrictStop, resolve_and_write
from odyssey.pipelines.report import IngestReport, TypeCounts, reason_category
from odyssey.pipelines.splits import SplitRatios, assign_splits, write_parquet

ETL_NAME = "odyssey.ingest"


class IngestConfig(StageConfig):
    """Settings of `odyssey ingest` (configs/ingest.yaml)."""

    validate_mode: Literal["full", "sample", "off"] = Field("sample", alias="validate")
    sample_every: int = Field(1000, ge=1, description="in sample mode, 1 resource in N gets full R4B validation")
    strict: bool = False
    workers: int | None = Field(None, ge=1, description="default: number of CPU cores")
    chunk_mb: int = Field(32, ge=1)
    shard_mb: int = Field(256, ge=1, description="input megabytes (uncompressed estimate) per output shard")
    code_systems: str | None = Field(None, description="YAML file with extra system URI -> vocabulary entries")
    fast_path: bool = Field(True, description="decode common resource shapes with msgspec when installed")
    compiled_reader: bool = Field(True, description="flatten common shapes with the compiled reader when built "
                                                    "(needs fast_path)")
    splits: SplitRatios = SplitRatios()
    dataset_name: str = "odyssey"
    dataset_version: str = "1.0"

    model_config = StageConfig.model_config | {"populate_by_name": True}


class StrictModeError(ValueError):
    """`--strict` met a problem: the message is `file:line: reason`."""


def load_code_systems(extra: str | os.PathLike | None = None) -> dict[str, str]:
    """The system URI -> vocabulary map: the packaged defaults, then the user's additions."""
    text = package_resources.files("odyssey.pipelines").joinpath("code_systems.yaml").read_text()
    systems = dict(yaml.safe_load(text)["systems"])
    if extra is not None:
        path = Path(extra)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read code systems: {exc}") from exc
        entries = loaded.get("systems") if isinstance(loaded, dict) else None
        if not isinstance(entries, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
            raise ConfigError(f"{path}: expected a mapping `systems: {{uri: VOCAB}}`")
        systems.update(entries)
    return systems


def _peak_memory_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024 / 1024
    return max(own, children) * scale


_BUCKET_MULTIPLE = 4


def subject_bucket_count(input_bytes: int, shard_bytes: int) -> int:
    """Output shards (= stage-2 buckets): at most `shard_bytes` of input each, and when there are several,
    a multiple of 4, so that 2 or 4 workers finish stage 2 together. It must not depend on the number of
    workers: the shards, and so the bytes written, would."""
    count = max(1, math.ceil(input_bytes / shard_bytes))
    return count if count == 1 else math.ceil(count / _BUCKET_MULTIPLE) * _BUCKET_MULTIPLE


# Up to this much input (uncompressed estimate) the calling process reads and resolves beside workers-1
# helpers: it saves a helper's start (~0.3 CPU-s) and works while the helpers import. Beyond it, it only
# coordinates `workers` helpers: its polars pool, sized for every core when polars was imported, runs
# beside the helpers' and costs a little per bucket (2 workers, 2 cores, alternating pairs: 1M resources,
# 0.65 GB, caller working 1.61-1.63 s against 1.73-1.79; 5M, 3.4 GB, 7.12-7.33 against 6.76-7.05;
# crossover ~1.4 GB).
CALLER_WORKS_UP_TO = 1 << 30


def _uncompressed_size(chunk: Chunk) -> int:
    """Bytes of text in a chunk (gzip is counted at a typical 8x ratio)."""
    return chunk.size * (8 if chunk.compressed else 1)


def _estimated_bytes(chunks: list[Chunk]) -> int:
    return sum(_uncompressed_size(c) for c in chunks)


def _read_all(chunks, settings, workers: Workers, show_progress):
    """Stage 1 over all chunks, by this process and the helpers."""
    results = []
    bar = tqdm(total=sum(c.size for c in chunks), unit="B", unit_scale=True, desc="read", disable=not show_progress)
    if workers.helpers and not settings.strict:
        # biggest chunks first, so the small ones (the ends of files) fill the gaps and the processes finish
        # together; results are put back in chunk order below. (Strict mode keeps file order: it stops at
        # the first problem it meets.)
        chunks = sorted(chunks, key=lambda c: -_uncompressed_size(c))
    found = workers.unordered(read_chunk, [(c, settings) for c in chunks])
    checker = SampleChecker() if settings.validating_process is not None else None
    failed_samples = []  # chunks whose sample, flattened before validation, holds a resource that fails it
    try:
        for result in found:
            bar.update(result.bytes)
            if result.unverified and not checker.all_pass(result):
                failed_samples.append(result.chunk)
                continue
            results.append(result)
            if settings.strict and result.problems:
                break
    finally:
        found.close()
        bar.close()
    if failed_samples:  # rare: read those chunks again, each process validating its own sample as it reads
        by_index = {c.index: c for c in chunks}
        for index in failed_samples:
            discard_spill(settings, index)
        again = replace(settings, validating_process=None)
        results.extend(workers.unordered(read_chunk, [(by_index[i], again) for i in failed_samples]))
    return sorted(results, key=lambda r: r.chunk)


def _in_file_lines(problems: list[Problem], offsets: dict[int, int]) -> list[Problem]:
    """Problems numbered by line of their file (readers number lines from their chunk's start)."""
    for p in problems:
        p.line += offsets[p.chunk]
    return problems


def _where(problem: Problem, chunk_paths: dict[int, str]) -> str:
    where = f"{chunk_paths[problem.chunk]}:{problem.line}"
    return f"{where} (entry {problem.entry})" if problem.entry else where


def _write_rejects(folder: Path, problems: list[Problem], chunk_paths: dict[int, str]) -> None:
    """rejects/rejects.ndjson: one line per rejected resource, with its location, reason and text."""
    folder.mkdir(parents=True, exist_ok=True)
    need: dict[str, set[int]] = {}
    for p in problems:
        if p.raw is None:
            need.setdefault(chunk_paths[p.chunk], set()).add(p.line)
    fetched = {path: fetch_lines(path, lines) for path, lines in need.items()}
    with open(folder / "rejects.ndjson", "wb") as handle:
        for p in sorted(problems, key=lambda p: (p.chunk, p.line, p.entry)):
            path = chunk_paths[p.chunk]
            raw = p.raw if p.raw is not None else fetched.get(path, {}).get(p.line)
            fhir_id = p.fhir_id
            if p.raw is None and raw is not None and p.entry:
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                    raw = orjson.dumps(orjson.loads(raw)["entry"][p.entry - 1]["resource"])  # the Bundle's entry
            if fhir_id is None and raw is not None:
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    fhir_id = orjson.loads(raw).get("id")
            record = {
                "file": path,
                "line": p.line,
                "entry": p.entry or None,
                "resource_type": p.resource_type,
                "id": fhir_id,
                "reason": p.reason,
                "resource": raw.decode("utf-8", errors="replace") if raw is not None else None,
            }
            handle.write(orjson.dumps(record) + b"\n")


def _metadata(out: Path, result, config: IngestConfig, descriptions: dict[str, str]) -> dict[str, int]:
    meta = out / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    codes = result.codes.with_columns(
        description=pl.col(schema.CODE).replace_strict(descriptions, default=None, return_dtype=pl.String),
        parent_codes=pl.lit(None, dtype=pl.List(pl.String)),
    ).select(schema.CODE, "description", "parent_codes")
    write_parquet(codes, out / schema.CODES_FILE, meds.CodeMetadataSchema.schema())
    splits = assign_splits(result.subjects[schema.SUBJECT_ID].to_numpy(), config.splits)
    write_parquet(splits, out / schema.SPLITS_FILE, meds.SubjectSplitSchema.schema())
    if result.subject_map is not None:
        write_parquet(result.subject_map, out / schema.SUBJECT_MAP_FILE)
    write_json(
        out / schema.DATASET_FILE,
        {
            "dataset_name": config.dataset_name,
            "dataset_version": config.dataset_version,
            "etl_name": ETL_NAME,
            "etl_version": odyssey.__version__,
            "meds_version": "0.4.1",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "raw_source_id_columns": [schema.ENCOUNTER_ID],
            "code_modifier_columns": [schema.UNIT, schema.COMPARATOR],
            "other_extension_columns": [schema.EVENT_TYPE, schema.ISSUED],
        },
    )
    return {name: int(n) for name, n in splits.group_by("split").len().sort("split").iter_rows()}


def _descriptions(read_results) -> dict[str, str]:
    merged: dict[str, str] = {}
    for r in read_results:
        for code, text in r.descriptions.items():
            if code not in merged or text < merged[code]:
                merged[code] = text
    merged.update(
        {
            schema.BIRTH_CODE: "Birth",
            schema.DEATH_CODE: "Death",
        }
    )
    return merged


class _Background:
    """Waiting that needs no Python, done beside this process's own work at the end of a run: removing
    the spill (page-cache pages to free, ~0.02 s at 1M resources) and stopping the helpers (~0.02 s)."""

    def __init__(self):
        self._threads: list[threading.Thread] = []

    def run(self, fn: Callable[[], object]) -> None:
        thread = threading.Thread(target=fn, name="odyssey-ingest-background")
        thread.start()
        self._threads.append(thread)

    def remove(self, path: Path) -> None:
        self.run(partial(shutil.rmtree, path, ignore_errors=True))

    def wait(self) -> None:
        while self._threads:
            self._threads.pop().join()

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, *exc) -> None:
        self.wait()


def ingest_fhir(
    paths: list[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    config: IngestConfig | None = None,
    show_progress: bool = False,
    **overrides,
) -> IngestReport:
    """Ingest FHIR R4 files, folders or globs into a MEDS dataset at `out`; returns the report.

    Raises InputError (missing/unreadable input), StrictModeError (`strict` and a bad resource).
    """
    started = time.perf_counter()
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    base = (config or IngestConfig()).model_dump(by_alias=True)
    config = IngestConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})
    systems = load_code_systems(config.code_systems)
    files = discover(list(paths))
    chunks = plan_chunks(files, config.chunk_mb << 20)
    chunk_paths = {c.index: c.path for c in chunks}
    subject_buckets = subject_bucket_count(_estimated_bytes(chunks), config.shard_mb << 20)
    key_buckets = max(4, subject_buckets)
    workers = min(config.workers or os.cpu_count() or 1, max(len(chunks), subject_buckets))
    out = Path(out)
    with (
        atomic_output_dir(out) as tmp,
        tempfile.TemporaryDirectory(prefix="odyssey-spill-", dir=out.resolve().parent, ignore_cleanup_errors=True) as spill,
        worker_pool(workers, caller_works=_estimated_bytes(chunks) <= CALLER_WORKS_UP_TO) as pool,
        _Background() as background,
    ):
        settings = ReadSettings(
            systems=systems,
            subject_buckets=subject_buckets,
            key_buckets=key_buckets,
            validate=config.validate_mode,
            sample_every=config.sample_every,
            strict=config.strict,
            spill_dir=spill,
            fast_path=config.fast_path,
            compiled_reader=config.compiled_reader,
            # the helpers leave their sample's validation to this process (strict mode stops at the first
            # problem as it reads: there each process validates its own)
            validating_process=os.getpid() if pool.helpers and not config.strict else None,
        )
        try:
            read_results = _read_all(chunks, settings, pool, show_progress)
        finally:  # the compiled reader's kept buffers (this process read chunks too)
            release_reader_memory()
        offsets = line_offsets(chunks, {r.chunk: r.lines for r in read_results})
        problems = _in_file_lines([p for r in read_results for p in r.problems], offsets)
        if config.strict and problems:
            first = min(problems, key=lambda p: (p.chunk, p.line, p.entry))
            raise StrictModeError(f"{_where(first, chunk_paths)}: {first.reason}")
        bar = tqdm(total=subject_buckets, desc="write", unit="shard", disable=not show_progress)
        try:
            bucket_rows = [sum(r.bucket_rows[b] for r in read_results if r.bucket_rows) for b in range(subject_buckets)]
            result = resolve_and_write(Path(spill), tmp, subject_buckets, key_buckets, chunk_paths, config.strict, bar,
                                       mapper=pool.ordered, line_offsets=offsets, bucket_rows=bucket_rows,
                                       remove=background.remove)
        except StrictStop as stop:
            (problem,) = _in_file_lines([stop.problem], offsets)
            raise StrictModeError(f"{_where(problem, chunk_paths)}: {problem.reason}") from None
        finally:
            bar.close()
        problems += _in_file_lines(result.problems, offsets)
        background.run(pool.close)  # done with the helpers: reaped before the report, their peak memory counts
        splits = _metadata(tmp, result, config, _descriptions(read_results))
        counts = _count(read_results, result, problems)
        _write_rejects(tmp / "rejects", problems, chunk_paths)
        report = IngestReport(
            out=str(out),
            inputs=[str(f) for f in files],
            resource_types=counts,
            subjects=result.subjects.height,
            events=result.events,
            shards=len(result.shards),
            codes=result.codes.height,
            splits=splits,
            validation=config.validate_mode,
            validated_resources=sum(r.validated for r in read_results),
            dangling_encounter_references=result.dangling_encounters,
            seconds=0.0,
            peak_memory_mb=0.0,
            workers=workers,
        )
        if result.dangling_encounters:
            report.warnings.append(
                f"{result.dangling_encounters} resources reference an Encounter that is absent; "
                "their encounter_id was left empty"
            )
        broken = [name for name, c in counts.items() if not c.reconciles]
        if broken:  # a bug, never bad input: refuse to publish a dataset whose counts do not add up
            raise RuntimeError(f"ingest counts do not reconcile for {broken}: {counts}")
        background.wait()
        report.seconds = time.perf_counter() - started
        report.peak_memory_mb = _peak_memory_mb()
        write_json(tmp / "ingest_report.json", report.to_dict())
    return report


def _count(read_results, result, problems) -> dict[str, TypeCounts]:
    read: Counter = Counter()
    for r in read_results:
        read.update(r.read)
    counts = {name: TypeCounts(read=n) for name, n in read.items()}
    for p in problems:
        c = counts.setdefault(p.resource_type, TypeCounts())
        c.rejected += 1
        key = reason_category(p.reason)
        c.rejected_reasons[key] = c.rejected_reasons.get(key, 0) + 1
    for r in read_results:
        for (rtype, reason), n in r.skipped.items():
            c = counts.setdefault(rtype, TypeCounts())
            c.skipped += n
            c.skipped_reasons[reason] = c.skipped_reasons.get(reason, 0) + n
    for (rtype, reason), n in result.skipped.items():
        c = counts.setdefault(rtype, TypeCounts())
        c.skipped += n
        c.skipped_reasons[reason] = c.skipped_reasons.get(reason, 0) + n
    for rtype, n in result.written.items():
        counts.setdefault(rtype, TypeCounts()).written += n
    return counts
