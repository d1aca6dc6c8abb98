"""The `odyssey tokenize` stage: MEDS dataset → tokenizer folder + sequences parquet + report.

1. Check the MEDS dataset (`check_meds_dataset`).
2. Fit the vocabulary and value bins on train subjects only (`EHRTokenizer.fit`).
3. Per shard, in chunks of whole subjects (`max_rows_per_chunk` events), build sequences
   (`build.build_sequences`) and write `sequences/part-NNNNN.parquet`; with `workers` > 1, chunks run in
   spawned worker processes (each holds one chunk: peak memory grows with the number of workers).
4. Write `tokenize_report.json`. Everything lands in a temp folder moved into place at the end.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from tqdm import tqdm

from odyssey.io import atomic_output_dir, write_json
from odyssey.pipelines import schema as S
from odyssey.pipelines.meds_io import check_meds_dataset, data_files, read_splits, scan_shard
from odyssey.tokenizer.build import SPLIT, ChunkCounts, build_sequences
from odyssey.tokenizer.config import TokenizeConfig
from odyssey.tokenizer.ehr_tokenizer import EHRTokenizer
from odyssey.tokenizer.sequences import REPORT_FILE, SEQUENCE_SCHEMA, SEQUENCES_DIR, TOKENIZER_DIR

# Fast to write and read back; dictionaries and statistics buy little on list columns of ids.
_PARQUET_OPTIONS = {"compression": "lz4", "use_dictionary": False, "write_statistics": False}


@dataclass
class TokenizeReport:
    """Summary of one `odyssey tokenize` run (also written as JSON)."""

    data_dir: str
    out: str
    shards: int = 0
    parts: int = 0
    events: int = 0
    tokens: int = 0
    subjects: int = 0
    subjects_without_events: int = 0
    subjects_without_birth: int = 0
    subjects_without_split: int = 0
    unknown_tokens: int = 0
    visits: int = 0
    vocab_size: int = 0
    binned_codes: int = 0
    has_splits: bool = False
    subjects_per_split: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    events_per_second: float = 0.0
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"tokenized {self.events:,} events of {self.subjects:,} subjects into {self.tokens:,} tokens "
            f"({self.vocab_size:,} words, {self.unknown_tokens:,} [UNK]) in {self.seconds:.1f} s "
            f"({self.events_per_second:,.0f} events/s); {self.subjects_without_events:,} subjects without "
            f"usable events"
        )


def _chunks(path: Path, max_rows: int) -> list[tuple[int, int]]:
    """Row ranges of whole subjects with at most `max_rows` rows each (one subject may exceed it)."""
    rows = pq.ParquetFile(path).metadata.num_rows
    if rows <= max_rows:
        return [(0, rows)]
    starts = (
        pl.scan_parquet(path)
        .select(S.SUBJECT_ID)
        .with_row_index("_row")
        .filter(pl.col(S.SUBJECT_ID) != pl.col(S.SUBJECT_ID).shift(1).fill_null(pl.col(S.SUBJECT_ID) - 1))
        .select("_row")
        .collect()["_row"]
        .to_list()
    )
    ranges: list[tuple[int, int]] = []
    begin = last = 0
    for boundary in [*starts[1:], rows]:
        if boundary - begin > max_rows and last > begin:
            ranges.append((begin, last))
            begin = last
        last = boundary
    ranges.append((begin, rows))
    return ranges


@dataclass(frozen=True)
class _Chunk:
    """Whole subjects of one shard (rows [begin, end)) and where their part file goes."""

    part: int
    path: str
    begin: int
    end: int
    tokenizer_dir: str
    sequences_dir: str


_LOADED: dict[str, EHRTokenizer] = {}  # per process: the tokenizer of the run, loaded once


def tokenize_chunk(
    chunk: _Chunk, splits: pl.DataFrame | None, config: TokenizeConfig
) -> tuple[ChunkCounts, dict[str | None, int]]:
    """Build and write one part file; returns its counts and subjects per split (runs in workers too)."""
    tokenizer = _LOADED.get(chunk.tokenizer_dir)
    if tokenizer is None:
        tokenizer = _LOADED.setdefault(chunk.tokenizer_dir, EHRTokenizer.from_pretrained(chunk.tokenizer_dir))
    events = scan_shard(chunk.path).slice(chunk.begin, chunk.end - chunk.begin).collect().lazy()
    codes = tokenizer.code_table(events.select(pl.col(S.CODE).unique()).collect()[S.CODE])
    sequences, counts = build_sequences(events, codes, splits, config)
    split_counts = dict(sequences.group_by(SPLIT).len().iter_rows())
    table = sequences.to_arrow().cast(SEQUENCE_SCHEMA)
    pq.write_table(table, Path(chunk.sequences_dir) / f"part-{chunk.part:05d}.parquet", **_PARQUET_OPTIONS)
    return counts, split_counts


def _run_chunks(work: list[_Chunk], splits: pl.DataFrame | None, config: TokenizeConfig, progress: bool):
    """Counts of every chunk, in `config.workers` processes (spawned: polars is not fork-safe)."""
    bar = tqdm(total=len(work), desc="tokenize", unit="chunk", disable=not progress)
    try:
        if config.workers <= 1 or len(work) <= 1:
            for chunk in work:
                yield tokenize_chunk(chunk, splits, config)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
            futures = [pool.submit(tokenize_chunk, chunk, splits, config) for chunk in work]
            for future in as_completed(futures):
                yield future.result()
                bar.update()
    finally:
        bar.close()


def tokenize(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: TokenizeConfig | None = None,
    progress: bool = True,
) -> TokenizeReport:
    """Tokenize the MEDS dataset at `data_dir` into `out` (see module docstring)."""
    config = config or TokenizeConfig()
    started = time.perf_counter()
    info = check_meds_dataset(data_dir)
    checked = time.perf_counter()
    files = data_files(data_dir)
    splits = read_splits(data_dir)
    report = TokenizeReport(
        data_dir=str(data_dir),
        out=str(out),
        shards=len(files),
        has_splits=splits is not None,
        config=config.model_dump(),
    )
    if splits is None:
        report.notes.append(f"no {S.SPLITS_FILE}: every subject counts as {config.train_split!r}")
        train_ids = None
    else:
        train_ids = splits.filter(pl.col(SPLIT) == config.train_split).select(S.SUBJECT_ID)
        if not train_ids.height:
            raise ValueError(f"{Path(data_dir) / S.SPLITS_FILE}: no subject in split {config.train_split!r}")

    def train_shards():
        for path in files:
            frame = scan_shard(path)
            yield frame if train_ids is None else frame.join(train_ids.lazy(), on=S.SUBJECT_ID, how="semi")

    tokenizer = EHRTokenizer.fit(train_shards, config)
    fitted = time.perf_counter()
    report.vocab_size, report.binned_codes = tokenizer.vocab_size, len(tokenizer.bins)
    totals = ChunkCounts()
    per_split: dict[str | None, int] = {}
    with atomic_output_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        (tmp / SEQUENCES_DIR).mkdir()
        work = [
            _Chunk(part, str(path), begin, end, str(tmp / TOKENIZER_DIR), str(tmp / SEQUENCES_DIR))
            for part, (path, (begin, end)) in enumerate(
                (path, span) for path in files for span in _chunks(path, config.max_rows_per_chunk)
            )
        ]
        for counts, split_counts in _run_chunks(work, splits, config, progress):
            for name in vars(totals):
                setattr(totals, name, getattr(totals, name) + getattr(counts, name))
            for split, n in split_counts.items():
                per_split[split] = per_split.get(split, 0) + n
            report.parts += 1
        for name, value in vars(totals).items():
            setattr(report, name, value)
        report.subjects_without_split = per_split.pop(None, 0)
        report.subjects_per_split = {k: per_split[k] for k in sorted(per_split)}
        report.seconds = round(time.perf_counter() - started, 3)
        report.phase_seconds = {
            "check": round(checked - started, 3),
            "fit": round(fitted - checked, 3),
            "build_and_write": round(time.perf_counter() - fitted, 3),
        }
        report.events_per_second = round(info.rows / report.seconds, 1) if report.seconds else 0.0
        write_json(tmp / REPORT_FILE, report.to_dict())
    return report
