"""Stage 2 of ingestion: settle duplicates, resolve references, write sorted MEDS shards.

Works one bucket at a time, so memory depends on the largest bucket, not on the export. Only the
small lookup tables (patients, medications) are held whole; encounters are read per bucket.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from odyssey.pipelines import schema
from odyssey.pipelines.ingest_read import Problem
from odyssey.pipelines.ingest_spill import read_bucket, read_folder, read_frame, write_frame
from odyssey.pipelines.report import reason_category
from odyssey.pipelines.schema import EventType

KEY = ["chunk", "line", "entry"]
_EMPTY_DROPPED = pl.DataFrame(
    schema={"chunk": pl.Int32, "line": pl.Int64, "entry": pl.Int32, "resource_type": pl.String,
            "fhir_id": pl.String, "kind": pl.String, "reason": pl.String}
)


class StrictStop(Exception):
    """Strict mode met a problem after reading (a dangling or duplicate reference)."""

    def __init__(self, problem: Problem):
        super().__init__(problem.reason)
        self.problem = problem


@dataclass
class ResolveResult:
    shards: list[Path]
    written: dict[str, int]  # resource type -> resources written
    problems: list[Problem] = field(default_factory=list)
    skipped: dict[tuple[str, str], int] = field(default_factory=dict)
    subjects: pl.DataFrame | None = None  # subject_id (those with rows)
    subject_map: pl.DataFrame | None = None  # fhir_id, subject_id
    codes: pl.DataFrame | None = None  # code, count
    events: int = 0
    dangling_encounters: int = 0


def _bucket_duplicates(args: tuple[Path, int, dict[int, str], dict[int, int]]) -> pl.DataFrame | None:
    """Copies of one resource id within one key bucket (every copy of an id meets in one bucket)."""
    spill, bucket, chunk_paths, line_offsets = args
    keys = read_bucket(spill / "keys", bucket)
    if keys is None:
        return None
    dup = keys.filter(pl.col("identity").is_duplicated()).sort(["identity", *KEY])
    if dup.is_empty():
        return None
    dup = dup.with_columns(
        first_chunk=pl.col("chunk").first().over("identity"),
        first_line=pl.col("line").first().over("identity"),
        is_first=pl.int_range(pl.len()).over("identity") == 0,
        conflict=pl.col("digest").n_unique().over("identity") > 1,
    )
    rows = []
    for r in dup.iter_rows(named=True):
        ident = f"{r['resource_type']}/{r['fhir_id']}"
        if r["conflict"]:
            rows.append((r["chunk"], r["line"], r["entry"], r["resource_type"], r["fhir_id"], "rejected",
                         f"duplicate id with different content: {ident}"))
        elif not r["is_first"]:
            where = f"{chunk_paths[r['first_chunk']]}:{r['first_line'] + line_offsets.get(r['first_chunk'], 0)}"
            rows.append((r["chunk"], r["line"], r["entry"], r["resource_type"], r["fhir_id"], "skipped",
                         f"exact duplicate: {where}"))
    return pl.DataFrame(rows, schema=_EMPTY_DROPPED.schema, orient="row") if rows else None


def find_duplicates(spill: Path, key_buckets: int, chunk_paths: dict[int, str], mapper=map,
                    line_offsets: dict[int, int] | None = None) -> pl.DataFrame:
    """Identical copies of an id are skipped (all but the first), differing copies are all rejected.

    Problems keep chunk line numbers; messages name file lines (`line_offsets`: chunk -> lines before it).
    """
    jobs = [(spill, bucket, chunk_paths, line_offsets or {}) for bucket in range(key_buckets)]
    found = mapper(_bucket_duplicates, jobs)
    return pl.concat([_EMPTY_DROPPED, *(f for f in found if f is not None)])


def _lookup(spill: Path, name: str, dropped: pl.DataFrame) -> pl.DataFrame | None:
    table = read_folder(spill / name)
    if table is None:
        return None
    return table.join(dropped.select(KEY), on=KEY, how="anti")


_LOOKUPS = "lookups"  # spill folder of the tables every bucket joins against


@dataclass
class _BucketResult:
    """What resolving one subject bucket tells the parent (small: counts and short lists)."""

    written: dict[str, int]
    events: int
    dangling_encounters: int
    codes: pl.DataFrame  # code, len
    subjects: pl.DataFrame  # subject_id
    failed: pl.DataFrame | None  # chunk, line, entry, resource_type, reason
    strict_problem: Problem | None = None


# Few distinct values: dictionary-encoded. Ids, times and values are not (a dictionary overflows there and
# only costs time; without it the shards are ~30% smaller and written ~25% faster).
_DICTIONARY_COLUMNS = [schema.CODE, schema.TEXT_VALUE, schema.UNIT, schema.COMPARATOR, schema.EVENT_TYPE]
_ENCOUNTER_LOOKUP = {"encounter_id": pl.Int64, "encounter_subject_id": pl.Int64, "encounter_end": pl.Int64}


def _write_lookups(spill: Path, dropped: pl.DataFrame, patients, medications) -> None:
    """The small tables every bucket joins against, written once for the workers to read. (Encounters
    are not among them: the readers spill them by their subject's bucket, see `_join_encounters`.)"""
    folder = spill / _LOOKUPS
    folder.mkdir(parents=True, exist_ok=True)
    write_frame(dropped.select(KEY), folder / "dropped.arrow")
    known_subjects = (
        patients.select(schema.SUBJECT_ID).with_columns(has_patient=pl.lit(True))
        if patients is not None
        else pl.DataFrame(schema={schema.SUBJECT_ID: pl.Int64, "has_patient": pl.Boolean})
    )
    write_frame(known_subjects, folder / "subjects.arrow")
    write_frame(
        medications.select("medication_key", "medication_code")
        if medications is not None
        else pl.DataFrame(schema={"medication_key": pl.String, "medication_code": pl.String}),
        folder / "medications.arrow",
    )


def _encounter_table(table: pl.LazyFrame | None, dropped: pl.DataFrame) -> pl.LazyFrame:
    if table is None:
        return pl.LazyFrame(schema=_ENCOUNTER_LOOKUP)
    if dropped.height:
        table = table.join(dropped.lazy(), on=KEY, how="anti")
    return table.select(*_ENCOUNTER_LOOKUP)


def _join_encounters(rows: pl.DataFrame, spill: Path, bucket: int, dropped: pl.DataFrame) -> pl.DataFrame:
    """Rows with their encounter's subject and end. A bucket's rows almost only point to encounters of
    its own subjects, which the readers spilled to the same bucket; the few references that point
    elsewhere are looked up among all encounters. So no process ever holds every encounter, and each
    bucket's work does not grow with the export."""
    own = read_bucket(spill / "encounters", bucket)
    own = _encounter_table(own.lazy() if own is not None else None, dropped).collect()
    rows = rows.join(own, on="encounter_id", how="left")
    elsewhere = pl.col("encounter_id").is_not_null() & pl.col("encounter_subject_id").is_null()
    wanted = rows.filter(elsewhere).select("encounter_id").unique()
    if wanted.is_empty():
        return rows
    every = sorted((spill / "encounters").glob("*.arrow"))
    every = pl.concat([pl.scan_ipc(f) for f in every]) if every else None
    found = _encounter_table(every, dropped).join(wanted.lazy(), on="encounter_id", how="semi").collect()
    if found.is_empty():
        return rows
    return rows.join(found, on="encounter_id", how="left", suffix="_elsewhere").with_columns(
        encounter_subject_id=pl.coalesce("encounter_subject_id", "encounter_subject_id_elsewhere"),
        encounter_end=pl.when(pl.col("encounter_subject_id").is_null())
        .then(pl.col("encounter_end_elsewhere"))
        .otherwise(pl.col("encounter_end")),
    ).drop("encounter_subject_id_elsewhere", "encounter_end_elsewhere")


def resolve_bucket(args: tuple[Path, int, Path, bool]) -> _BucketResult | None:
    """Resolve one subject bucket's rows and write them as one sorted shard (None: the bucket is empty)."""
    spill, bucket, shard, strict = args
    lookups = spill / _LOOKUPS
    rows = read_bucket(spill / "rows", bucket)
    if rows is None:  # no subject fell in this bucket: no shard
        return None
    # a resource's rows are adjacent in the spill: its first row marks it (for counting resources cheaply)
    first_row = (pl.col("line") != pl.col("line").shift()) | (pl.col("entry") != pl.col("entry").shift()) | (
        pl.col("chunk") != pl.col("chunk").shift())
    rows = rows.with_row_index("_seq").with_columns(_first_row=first_row.fill_null(True))
    dropped = read_frame(lookups / "dropped.arrow")
    if dropped.height:
        rows = rows.join(dropped, on=KEY, how="anti")
    rows = (
        rows.join(read_frame(lookups / "subjects.arrow"), on=schema.SUBJECT_ID, how="left")
        .join(read_frame(lookups / "medications.arrow"), on="medication_key", how="left")
    )
    rows = _join_encounters(rows, spill, bucket, dropped)
    no_patient = pl.col("has_patient").is_null()
    no_medication = pl.col("medication_key").is_not_null() & pl.col("medication_code").is_null()
    other_patient = pl.col("encounter_subject_id").is_not_null() & (
        pl.col("encounter_subject_id") != pl.col(schema.SUBJECT_ID))
    no_time = pl.col("time_from_encounter") & pl.col("encounter_end").is_null()
    per_resource = None
    kept = rows
    if rows.select((no_patient | no_medication | other_patient | no_time).any()).item():  # else: no message to build
        reason = (
            pl.when(no_patient)
            .then(pl.lit("subject Patient not found or rejected"))
            .when(no_medication)
            .then(pl.lit("medicationReference not found or rejected: ") + pl.col("medication_key"))
            .when(other_patient)
            .then(pl.lit("encounter belongs to another patient"))
            .when(no_time)
            .then(pl.lit("no time of its own and its encounter is missing, rejected or has no end"))
        )
        # a row's reason spreads to its whole resource
        rows = rows.with_columns(reason=reason).with_columns(reason=pl.col("reason").drop_nulls().first().over(KEY))
        failed = rows.filter(pl.col("reason").is_not_null())
        kept = rows.filter(pl.col("reason").is_null()).drop("reason")
        per_resource = failed.group_by(KEY).agg(pl.col("resource_type").first(), pl.col("reason").first()).sort(KEY)
        if strict:
            first = per_resource.row(0, named=True)
            problem = Problem(first["chunk"], first["line"], first["entry"], first["resource_type"], None,
                              first["reason"], None)
            empty = pl.DataFrame()
            return _BucketResult({}, 0, 0, empty, empty, None, strict_problem=problem)
    dangling = kept.lazy().filter(pl.col("encounter_id").is_not_null() & pl.col("encounter_subject_id").is_null())
    dangling_resources = dangling.select(KEY).unique().collect().height
    written = dict(kept.lazy().filter("_first_row").group_by("resource_type").len().collect().iter_rows())
    kept = kept.select(
        "_seq",
        schema.SUBJECT_ID,
        pl.when(pl.col("time_from_encounter")).then(pl.col("encounter_end")).otherwise(pl.col(schema.TIME))
        .alias(schema.TIME),
        pl.coalesce(schema.CODE, "medication_code").alias(schema.CODE),
        schema.NUMERIC_VALUE,
        schema.TEXT_VALUE,
        pl.when(pl.col("encounter_subject_id").is_null() & (pl.col(schema.EVENT_TYPE) != "encounter_start")
                & (pl.col(schema.EVENT_TYPE) != "encounter_end"))
        .then(None)
        .otherwise(pl.col("encounter_id"))
        .alias(schema.ENCOUNTER_ID),
        schema.UNIT,
        schema.COMPARATOR,
        schema.EVENT_TYPE,
        schema.ISSUED,
    )
    # the bucket's peak memory comes next (sorting, then Arrow): hold only the columns written from here
    del rows, dangling
    frame = _to_meds(kept)
    del kept
    result = _BucketResult(
        written=written,
        events=frame.height,
        dangling_encounters=dangling_resources,
        codes=frame.group_by(schema.CODE).len(),
        subjects=frame.select(schema.SUBJECT_ID).unique(),
        failed=per_resource,
    )
    meds = frame.to_arrow().cast(schema.DATA_SCHEMA)
    del frame
    pq.write_table(meds, shard, compression="zstd", write_statistics=True, use_dictionary=_DICTIONARY_COLUMNS)
    return result


def resolve_and_write(
    spill: Path,
    out: Path,
    subject_buckets: int,
    key_buckets: int,
    chunk_paths: dict[int, str],
    strict: bool,
    progress=None,
    mapper=map,
    line_offsets: dict[int, int] | None = None,
    bucket_rows: list[int] | None = None,
    remove: Callable[[Path], object] = partial(shutil.rmtree, ignore_errors=True),
) -> ResolveResult:
    """Settle duplicates, then resolve every subject bucket into a shard; `mapper` may run buckets in a pool.

    Shards are numbered by bucket order (empty buckets write none), so the output does not depend on
    how many processes resolve them, nor on the order they are resolved in: the biggest buckets first
    (`bucket_rows`: rows spilled to each), so that the processes finish together. Each part of the spill
    is `remove`d once used.
    """
    dropped = find_duplicates(spill, key_buckets, chunk_paths, mapper, line_offsets)
    remove(spill / "keys")
    if strict and not dropped.filter(pl.col("kind") == "rejected").is_empty():
        first = dropped.filter(pl.col("kind") == "rejected").sort(KEY).row(0, named=True)
        raise StrictStop(Problem(first["chunk"], first["line"], first["entry"], first["resource_type"],
                                 first["fhir_id"], first["reason"], None))
    patients = _lookup(spill, "patients", dropped)
    medications = _lookup(spill, "medications", dropped)
    _write_lookups(spill, dropped, patients, medications)

    data_dir = out / schema.DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    result = ResolveResult(shards=[], written={})
    written: dict[str, int] = {}
    code_counts: list[pl.DataFrame] = []
    subject_frames: list[pl.DataFrame] = []
    cascades: list[pl.DataFrame] = []
    # each bucket writes a provisional shard, numbered here in bucket order once the empty ones are known
    provisional = [data_dir / f".bucket{bucket:04d}.parquet" for bucket in range(subject_buckets)]
    # strict mode resolves in bucket order, and stops where a serial run would
    order = list(range(subject_buckets))
    if bucket_rows is not None and not strict:
        order.sort(key=lambda bucket: -bucket_rows[bucket])
    jobs = [(spill, bucket, provisional[bucket], strict) for bucket in order]
    resolved: dict[int, _BucketResult | None] = {}
    for bucket, bucket_result in zip(order, mapper(resolve_bucket, jobs), strict=True):
        if progress is not None:
            progress.update(1)
        if bucket_result is not None and bucket_result.strict_problem is not None:
            raise StrictStop(bucket_result.strict_problem)
        resolved[bucket] = bucket_result
    for bucket, shard in enumerate(provisional):  # in bucket order
        bucket_result = resolved[bucket]
        if bucket_result is None:
            continue
        for rtype, n in bucket_result.written.items():
            written[rtype] = written.get(rtype, 0) + n
        result.events += bucket_result.events
        result.dangling_encounters += bucket_result.dangling_encounters
        code_counts.append(bucket_result.codes)
        subject_frames.append(bucket_result.subjects)
        if bucket_result.failed is not None:
            cascades.append(bucket_result.failed)
        result.shards.append(shard.rename(data_dir / f"{len(result.shards)}.parquet"))
    for name in ("rows", "encounters"):
        remove(spill / name)

    if patients is not None:
        written["Patient"] = patients.height
        result.subject_map = patients.select(pl.col("fhir_id"), pl.col(schema.SUBJECT_ID)).sort("fhir_id")
    if medications is not None:
        written["Medication"] = medications.height
    result.written = written
    result.codes = (
        pl.concat(code_counts).group_by(schema.CODE).agg(pl.col("len").sum().alias("count")).sort(schema.CODE)
        if code_counts else pl.DataFrame(schema={schema.CODE: pl.String, "count": pl.UInt32})
    )
    result.subjects = (
        pl.concat(subject_frames).unique().sort(schema.SUBJECT_ID)
        if subject_frames else pl.DataFrame(schema={schema.SUBJECT_ID: pl.Int64})
    )
    for r in dropped.iter_rows(named=True):
        if r["kind"] == "rejected":
            result.problems.append(Problem(r["chunk"], r["line"], r["entry"], r["resource_type"], r["fhir_id"],
                                           r["reason"], None))
        else:
            key = (r["resource_type"], reason_category(r["reason"]))
            result.skipped[key] = result.skipped.get(key, 0) + 1
    for frame in cascades:
        for r in frame.iter_rows(named=True):
            result.problems.append(Problem(r["chunk"], r["line"], r["entry"], r["resource_type"], None, r["reason"],
                                           None))
    return result


_START_CODE_PREFIX = f"{schema.ENCOUNTER_START_PREFIX}{schema.CODE_SEPARATOR}"
_END_CODE_PREFIX = f"{schema.ENCOUNTER_END_PREFIX}{schema.CODE_SEPARATOR}"


def _with_encounter_ends(rows: pl.DataFrame) -> pl.DataFrame:
    """An Encounter's single row -> its ENCOUNTER_START row and, when the period has an end, the
    ENCOUNTER_END row (at the end, with the disposition), ordered right after it (`_order`)."""
    start = pl.col(schema.EVENT_TYPE) == EventType.ENCOUNTER_START
    order = pl.col("_seq").cast(pl.Int64) * 2
    ends = rows.filter(start & pl.col(schema.ISSUED).is_not_null()).with_columns(
        _order=order + 1,
        time=pl.col(schema.ISSUED),
        code=pl.lit(_END_CODE_PREFIX) + pl.col(schema.CODE).str.strip_prefix(_START_CODE_PREFIX),
        event_type=pl.lit(EventType.ENCOUNTER_END.value),
        issued=pl.lit(None, pl.Int64),
    )
    rows = rows.with_columns(
        _order=order,
        text_value=pl.when(start).then(None).otherwise(pl.col(schema.TEXT_VALUE)),
        issued=pl.when(start).then(None).otherwise(pl.col(schema.ISSUED)),
    )
    return pl.concat([rows, ends.select(rows.columns)])


# Ties keep input order (`_order`: files in path order, then line, then Bundle entry, an Encounter's end
# right after its start), so the order is total and the same whatever the chunking or the workers.
_SORT = [schema.SUBJECT_ID, schema.TIME, "_order"]


def _to_meds(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows with Odyssey's MEDS columns, in a total order (so reruns write identical bytes)."""
    us = pl.Datetime("us")
    frame = _with_encounter_ends(rows).select(
        pl.col("_order"),
        pl.col(schema.SUBJECT_ID),
        pl.col(schema.TIME).cast(us),
        pl.col(schema.CODE),
        pl.col(schema.NUMERIC_VALUE),
        pl.col(schema.TEXT_VALUE),
        pl.col(schema.ENCOUNTER_ID),
        pl.col(schema.UNIT),
        pl.col(schema.COMPARATOR),
        pl.col(schema.EVENT_TYPE),
        pl.col(schema.ISSUED).cast(us),
    )
    return frame[_sorting_order(frame)].drop("_order")


_BEFORE_ANY_TIME = np.iinfo(np.int64).min  # static rows (time null) first; no FHIR time comes near it


def _sorting_order(frame: pl.DataFrame) -> np.ndarray:
    """Row positions in `_SORT` order. `_order` is unique, so the order is total and any correct sort gives
    the same rows; numpy's lexsort on three int64 keys costs about half of polars' multi-column sort."""
    keys = [frame.get_column(name) for name in reversed(_SORT)]  # lexsort: the last key is the primary one
    arrays = [k.dt.epoch("us").fill_null(_BEFORE_ANY_TIME) if k.dtype.is_temporal() else k for k in keys]
    return np.lexsort([a.to_numpy() for a in arrays])


__all__ = ["ResolveResult", "StrictStop", "resolve_and_write"]
