"""`odyssey synth`: a synthetic MIMIC-IV-on-FHIR cohort with planted, documented outcome laws.

`synthesize(n_patients, out, seed=0, format="mimic", gzip=False)` writes FHIR R4 NDJSON (or Bundles),
`truth.parquet` (the exact probability of every outcome at every inpatient admission, per the contracts),
`latent.parquet` (each patient's hidden traits, for analysis) and `synth_report.json`.
The generative model lives in `synth_model`, the FHIR layouts in `synth_fhir`, codes in `synth_catalog`;
docs/synthetic_cohort.md documents the planted signals and the measured oracle AUROCs.
"""

from __future__ import annotations

import gzip as gzip_module
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from odyssey.io import atomic_output_dir, write_json
from odyssey.pipelines import synth_catalog as cat
from odyssey.pipelines.synth_fhir import FORMATS, FhirRenderer
from odyssey.pipelines.synth_model import PatientRecord, simulate_patient

TRUTH_FILE = "truth.parquet"
LATENT_FILE = "latent.parquet"
REPORT_FILE = "synth_report.json"
LONG_HISTORY_TOKENS = 16_000
MEDIUM_HISTORY_TOKENS = 2_048  # histories longer than this and up to LONG_HISTORY_TOKENS count as medium
TASKS = ("mortality_30d", "los_7d", "readmission_30d")
CHUNK_PATIENTS = 64
GZIP_LEVEL = 6


@dataclass
class SynthReport:
    """What `synthesize` wrote; `to_dict()` is the JSON report."""

    patients: int
    seed: int
    format: str
    gzip: bool
    resources: dict[str, int]
    resources_total: int
    files: list[str]
    seconds: float
    admissions: int
    long_history_patients: int
    long_history_share: float
    medium_history_patients: int
    medium_history_share: float
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------- truth
def truth_schema() -> pa.Schema:
    ts = pa.timestamp("us")
    fields = [
        pa.field("patient_fhir_id", pa.string(), nullable=False),
        pa.field("encounter_fhir_id", pa.string(), nullable=False),
        pa.field("admit_time", ts, nullable=False),
        pa.field("discharge_time", ts, nullable=False),
    ]
    for task in TASKS:
        fields += [pa.field(f"{task}_probability", pa.float64()), pa.field(task, pa.bool_())]
    for group in cat.GROUPS:
        fields += [pa.field(f"condition_{group}_probability", pa.float64()), pa.field(f"condition_{group}", pa.bool_())]
    return pa.schema(fields)


LATENT_SCHEMA = pa.schema([
    pa.field("patient_fhir_id", pa.string(), nullable=False),
    pa.field("amyloidosis_marker", pa.bool_(), nullable=False),
    pa.field("prediabetes_marker", pa.bool_(), nullable=False),
    pa.field("long_history", pa.bool_(), nullable=False),
    pa.field("medium_history", pa.bool_(), nullable=False),
    pa.field("smoker", pa.bool_(), nullable=False),
    pa.field("frailty_baseline", pa.float64(), nullable=False),
    pa.field("history_tokens", pa.int64(), nullable=False),
    pa.field("encounters", pa.int64(), nullable=False),
])


def _truth_rows(rec: PatientRecord) -> list[tuple]:
    rows = []
    for row in rec.truth:
        values: list[Any] = [rec.id, row.encounter_id, row.admit_time * 1_000_000, row.discharge_time * 1_000_000,
                             row.mortality_30d_probability, row.mortality_30d, row.los_7d_probability, row.los_7d,
                             row.readmission_30d_probability, row.readmission_30d]
        for group in cat.GROUPS:
            p = None if row.condition_probabilities is None else row.condition_probabilities[group]
            outcome = None if row.conditions is None else row.conditions[group]
            values += [p, outcome]
        rows.append(tuple(values))
    return rows


def _latent_row(rec: PatientRecord) -> tuple:
    return (rec.id, rec.amyloidosis, rec.prediabetes, rec.long_history, rec.medium_history, rec.smoker,
            rec.frailty_baseline, rec.n_tokens(), len(rec.encounters))


def _table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in schema]
    return pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)],
                                schema=schema)


# ------------------------------------------------------------------------------------ generation
@dataclass
class _Chunk:
    streams: dict[str, bytes]  # serialized NDJSON per stream, or empty when written to `parts`
    parts: dict[str, str]  # stream -> part file written by a worker process
    counts: dict[str, int]
    truth: list[tuple]
    latent: list[tuple]


def _generate_chunk(args: tuple[int, str, bool, int, int, str | None]) -> _Chunk:
    """Simulate and serialize patients [start, stop); pure, so chunks can run in any process.

    With `compress`, each stream of the chunk is one gzip member; members concatenate into a valid
    .gz file (RFC 1952), so compression runs in the workers too. With `parts_dir`, the chunk's bytes go
    to part files there instead of back through the pool's pipe (the main process splices them in).
    """
    seed, fmt, compress, start, stop, parts_dir = args
    renderer = FhirRenderer(fmt)
    parts: dict[str, list[bytes]] = {}
    counts: dict[str, int] = {}
    truth: list[tuple] = []
    latent: list[tuple] = []
    for index in range(start, stop):
        rec = simulate_patient(seed, index)
        streams, n = renderer.serialize_patient(rec)
        for key, data in streams.items():
            parts.setdefault(key, []).append(data)
        for key, value in n.items():
            counts[key] = counts.get(key, 0) + value
        truth += _truth_rows(rec)
        latent.append(_latent_row(rec))
    streams = {k: _maybe_gzip(b"".join(v), compress) for k, v in parts.items()}
    part_files: dict[str, str] = {}
    if parts_dir is not None:
        for key, data in streams.items():
            part_files[key] = os.path.join(parts_dir, f"{start:010d}.{key}")
            with open(part_files[key], "wb") as handle:
                handle.write(data)
        streams = {}
    return _Chunk(streams, part_files, counts, truth, latent)


def _maybe_gzip(data: bytes, compress: bool) -> bytes:
    return gzip_module.compress(data, compresslevel=GZIP_LEVEL, mtime=0) if compress else data


def _file_name(fmt: str, stream: str) -> str:
    if fmt == "bundles":
        return "bundles.ndjson"
    return f"{cat.MIMIC_FILES[stream]}.ndjson" if fmt == "mimic" else f"{stream}.ndjson"


class _Sinks:
    """One output file per stream, opened on first write; data arrives already gzipped when compressing."""

    def __init__(self, folder: Path, fmt: str, compress: bool):
        self.folder, self.fmt, self.compress = folder, fmt, compress
        self.files: dict[str, BinaryIO] = {}
        self.names: list[str] = []

    def _handle(self, stream: str) -> BinaryIO:
        handle = self.files.get(stream)
        if handle is None:
            name = _file_name(self.fmt, stream) + (".gz" if self.compress else "")
            handle = self.files[stream] = open(self.folder / name, "wb", buffering=0)  # noqa: SIM115
            self.names.append(name)
        return handle

    def write(self, stream: str, data: bytes) -> None:
        handle = self._handle(stream)
        view = memoryview(data)
        while view:  # unbuffered writes may be partial
            view = view[handle.write(view):]

    def append_part(self, stream: str, path: str) -> None:
        """Append a worker's part file in the kernel (no copy through this process), then delete it."""
        handle = self._handle(stream)
        with open(path, "rb") as part:
            size = os.fstat(part.fileno()).st_size
            try:
                while size > 0:
                    copied = os.copy_file_range(part.fileno(), handle.fileno(), size)
                    if copied == 0:
                        raise OSError("copy_file_range copied nothing")
                    size -= copied
            except (AttributeError, OSError):  # not Linux, or a file system without it
                part.seek(os.fstat(part.fileno()).st_size - size)
                shutil.copyfileobj(part, handle, 1 << 20)
        os.remove(path)

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def synthesize(n_patients: int, out: str | os.PathLike, seed: int = 0, format: str = "mimic",  # noqa: A002
               gzip: bool = False, workers: int | None = None, progress: bool = False) -> SynthReport:
    """Write a synthetic cohort of `n_patients` to `out` (replaced atomically) and return its report."""
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    began = time.perf_counter()
    starts = range(0, n_patients, CHUNK_PATIENTS)
    parallel = workers > 1 and len(starts) > 1
    counts: dict[str, int] = dict.fromkeys(cat.RESOURCE_TYPES, 0)
    truth: list[tuple] = []
    latent: list[tuple] = []
    with atomic_output_dir(out) as tmp:
        sinks = _Sinks(tmp, format, gzip)
        parts_dir = tmp / ".parts"
        if parallel:
            parts_dir.mkdir()
        chunks = [(seed, format, gzip, s, min(s + CHUNK_PATIENTS, n_patients), str(parts_dir) if parallel else None)
                  for s in starts]
        try:
            if format != "bundles":  # the shared formulary: one Medication per drug
                renderer = FhirRenderer(format)
                meds = [renderer.medication(key) for key in cat.DRUG_KEYS]
                sinks.write("Medication", _maybe_gzip(b"".join(orjson.dumps(m) + b"\n" for m in meds), gzip))
                counts["Medication"] += len(meds)
            bar = _progress(n_patients, progress)
            for chunk in _run_chunks(chunks, workers if parallel else 1):
                for stream, data in chunk.streams.items():
                    sinks.write(stream, data)
                for stream, path in chunk.parts.items():
                    sinks.append_part(stream, path)
                for key, value in chunk.counts.items():
                    counts[key] += value
                truth += chunk.truth
                latent += chunk.latent
                bar.update(len(chunk.latent))
            bar.close()
        finally:
            sinks.close()
            shutil.rmtree(parts_dir, ignore_errors=True)
        truth_table = _table(truth, truth_schema())
        pq.write_table(truth_table, tmp / TRUTH_FILE, compression="zstd")
        pq.write_table(_table(latent, LATENT_SCHEMA), tmp / LATENT_FILE, compression="zstd")
        tokens = np.array([row[LATENT_SCHEMA.names.index("history_tokens")] for row in latent])
        n_long = int((tokens > LONG_HISTORY_TOKENS).sum())
        n_medium = int(((tokens > MEDIUM_HISTORY_TOKENS) & (tokens <= LONG_HISTORY_TOKENS)).sum())
        report = SynthReport(
            patients=n_patients, seed=seed, format=format, gzip=gzip,
            resources={k: v for k, v in counts.items() if v}, resources_total=sum(counts.values()),
            files=sorted([*sinks.names, TRUTH_FILE, LATENT_FILE, REPORT_FILE]),
            seconds=0.0, admissions=truth_table.num_rows, long_history_patients=n_long,
            long_history_share=n_long / n_patients, medium_history_patients=n_medium,
            medium_history_share=n_medium / n_patients, tasks=summarize_truth(truth_table),
        )
        report.seconds = round(time.perf_counter() - began, 3)
        write_json(tmp / REPORT_FILE, report.to_dict())
    return report


def _run_chunks(chunks: list[tuple[int, str, bool, int, int, str | None]], workers: int):
    if workers <= 1 or len(chunks) <= 1:
        yield from map(_generate_chunk, chunks)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(workers) as pool:
        yield from pool.imap(_generate_chunk, chunks)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="patient", desc="synth")


# ------------------------------------------------------------------------------------ evaluation
def summarize_truth(truth: pa.Table) -> dict[str, dict[str, float]]:
    """Per task: eligible admissions, prevalence and oracle AUROC (truth probability vs realized outcome)."""
    from sklearn.metrics import roc_auc_score

    names = [*TASKS, *(f"condition_{g}" for g in cat.GROUPS)]
    out: dict[str, dict[str, float]] = {}
    for name in names:
        p = truth.column(f"{name}_probability").to_numpy(zero_copy_only=False)
        y = truth.column(name).to_numpy(zero_copy_only=False)
        keep = np.array([v is not None for v in y]) & ~np.isnan(p.astype(float))
        y_kept = y[keep].astype(bool)
        p_kept = p[keep].astype(float)
        entry: dict[str, float] = {"admissions": int(keep.sum())}
        if keep.any():
            entry["prevalence"] = round(float(y_kept.mean()), 4)
            entry["mean_probability"] = round(float(p_kept.mean()), 4)
        if 0 < y_kept.sum() < len(y_kept):
            entry["oracle_auroc"] = round(float(roc_auc_score(y_kept, p_kept)), 4)
        out[name] = entry
    return out


def read_truth(path: str | os.PathLike) -> pa.Table:
    """Read a cohort's truth.parquet (path to the cohort folder or to the file)."""
    path = Path(path)
    return pq.read_table(path / TRUTH_FILE if path.is_dir() else path)


__all__ = ["SynthReport", "read_truth", "summarize_truth", "synthesize", "truth_schema"]
