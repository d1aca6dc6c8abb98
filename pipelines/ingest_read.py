"""Stage 1 of ingestion, run by each worker on one chunk: parse, check, flatten, spill.

Rows are spilled (Arrow IPC, ingest_spill) by subject bucket (so stage 2 sees each subject whole) and
resource keys by id bucket (so duplicate ids are found without holding every id in memory).
"""

from __future__ import annotations

import gc
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import polars as pl
import pyarrow as pa

from odyssey.pipelines.fhir_fast import AVAILABLE as FAST_PATH_AVAILABLE
from odyssey.pipelines.fhir_fast import FastFlattener
from odyssey.pipelines.fhir_flatten import (
    ROW_SCHEMA,
    SUPPORTED_RESOURCE_TYPES,
    Context,
    Flattener,
    Rejected,
)
from odyssey.pipelines.fhir_sources import Chunk, read_lines, read_whole
from odyssey.pipelines.fhir_times import with_fhir_times
from odyssey.pipelines.ingest_spill import write_buckets, write_table
from odyssey.pipelines.schema import EventType

INVALID = "<invalid>"  # resource type under which unparseable lines are counted

_RAW_ROW_STRUCT = pa.struct(list(ROW_SCHEMA))
KEY_SCHEMA = pa.schema(
    [
        ("resource_type", pa.string()),
        ("fhir_id", pa.string()),
        ("digest", pa.int64()),
        ("line", pa.int64()),
        ("entry", pa.int32()),
    ]
)
PATIENT_SCHEMA = pa.schema([("subject_id", pa.int64()), ("fhir_id", pa.string()), ("line", pa.int64()), ("entry", pa.int32())])
MEDICATION_SCHEMA = pa.schema(
    [("medication_key", pa.string()), ("medication_code", pa.string()), ("line", pa.int64()), ("entry", pa.int32())]
)
# tuples -> Arrow in one C++ pass each (no Python transposition)
_KEY_STRUCT = pa.struct(list(KEY_SCHEMA))
_PATIENT_STRUCT = pa.struct(list(PATIENT_SCHEMA))
_MEDICATION_STRUCT = pa.struct(list(MEDICATION_SCHEMA))


@dataclass
class ReadSettings:
    systems: dict[str, str]
    subject_buckets: int
    key_buckets: int
    validate: str  # "full" | "sample" | "off"
    sample_every: int
    strict: bool
    spill_dir: str
    batch_rows: int = 100_000  # rows held before they are checked and spilled (bounds memory)
    fast_path: bool = True  # decode common shapes with msgspec when it is installed (fhir_fast)


@dataclass
class Problem:
    """A resource (or line) that goes to rejects/, or a strict-mode stop."""

    chunk: int
    line: int
    entry: int
    resource_type: str
    fhir_id: str | None
    reason: str
    raw: bytes | None


@dataclass
class ChunkResult:
    chunk: int
    read: Counter = field(default_factory=Counter)  # resource type -> resources read
    skipped: Counter = field(default_factory=Counter)  # (type, reason) -> count
    problems: list[Problem] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)
    validated: int = 0
    lines: int = 0
    bytes: int = 0


def _id_or_none(resource: dict) -> str | None:
    rid = resource.get("id")
    return rid if isinstance(rid, str) else None


def _digest(raw: bytes) -> int:
    """A fingerprint of a resource's text (length and CRC-32): tells identical duplicates from conflicting
    ones, and picks the sample validated in full."""
    return (len(raw) << 32) | zlib.crc32(raw)


class _Validator:
    """Full fhir.resources R4B validation, imported only when a resource is to be validated."""

    def __init__(self):
        self._classes: dict[str, type] = {}

    def check(self, resource: dict) -> str | None:
        from fhir.resources.R4B import get_fhir_model_class
        from pydantic import ValidationError

        rtype = resource["resourceType"]
        cls = self._classes.get(rtype)
        if cls is None:
            cls = self._classes[rtype] = get_fhir_model_class(rtype)
        try:
            cls.model_validate(resource)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            return f"fails FHIR R4B validation: {where}: {first.get('msg')} ({exc.error_count()} errors)"
        except Exception as exc:  # noqa: BLE001 - the validator raises assorted types on odd input
            return f"fails FHIR R4B validation: {exc}"
        return None


class ChunkReader:
    def __init__(self, chunk: Chunk, settings: ReadSettings):
        self.chunk = chunk
        self.settings = settings
        self.context = Context(systems=settings.systems)
        self.flattener = Flattener(self.context)
        self.fast = FastFlattener(self.flattener) if settings.fast_path and FAST_PATH_AVAILABLE else None
        self.keys: list[tuple] = []
        self.result = ChunkResult(chunk.index, bytes=chunk.size)
        self.validator = _Validator() if settings.validate != "off" else None
        self.part = 0

    # -- entry point ---------------------------------------------------------------------------------

    def run(self) -> ChunkResult:
        # millions of short-lived tuples and dicts, no cycles: the cyclic collector only costs time here
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if self.chunk.kind == "json":
                self._read_json_file()
            else:
                self._read_ndjson()
            self._flush()
        except _StrictStop:
            pass
        finally:
            if gc_was_enabled:
                gc.enable()
        self.result.descriptions = self.context.descriptions
        return self.result

    def _read_ndjson(self) -> None:
        """The hot loop. Plain resources of supported types take the inlined path; anything else
        (Bundles, unknown types, bad JSON, sampled validation) goes through `_line` / `_resource`."""
        line = self.chunk.first_line - 1
        batch = self.settings.batch_rows
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        read = self.result.read
        flattener = self.flattener
        supported = SUPPORTED_RESOURCE_TYPES
        validating = self.validator is not None
        every = 1 if self.settings.validate == "full" else self.settings.sample_every
        fast = self.fast.flatten if self.fast is not None else None
        crc32 = zlib.crc32
        try:
            for line, raw in read_lines(self.chunk):
                if not raw or raw.isspace():
                    continue
                digest = (len(raw) << 32) | crc32(raw)  # _digest(raw), inlined: this runs once per line
                if fast is not None and not (validating and digest % every == 0):
                    found = fast(raw, line)
                    if found is not None:
                        read[found[0]] += 1
                        self.keys.append((found[0], found[1], digest, line, 0))
                        if len(flattener.rows) >= batch:
                            self._flush()
                        continue
                try:
                    resource = loads(raw)
                    rtype = resource["resourceType"]
                except (decode_error, KeyError, TypeError, IndexError):
                    self._line(raw, line)
                    continue
                if rtype.__class__ is not str or rtype not in supported or (validating and digest % every == 0):
                    self._line(raw, line)
                    continue
                read[rtype] += 1
                self._flatten(resource, raw, rtype, digest, line, 0)
                if len(flattener.rows) >= batch:
                    self._flush()
        except (EOFError, OSError) as exc:
            self._problem(line + 1, 0, INVALID, None, f"file is truncated or unreadable after line {line}: {exc}",
                          None)
        finally:
            self.result.lines += line - self.chunk.first_line + 1

    def _read_json_file(self) -> None:
        try:
            raw = read_whole(self.chunk)
        except (EOFError, OSError) as exc:
            self._problem(1, 0, INVALID, None, f"file is truncated or unreadable: {exc}", None)
            return
        self.result.lines = raw.count(b"\n") + 1
        self._line(raw, 1)

    # -- one line: a resource or a Bundle -----------------------------------------------------------

    def _line(self, raw: bytes, line: int) -> None:
        try:
            resource = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self._problem(line, 0, INVALID, None, f"malformed JSON: {exc}", raw)
            return
        if not isinstance(resource, dict):
            self._problem(line, 0, INVALID, None, "not a JSON object", raw)
            return
        rtype = resource.get("resourceType")
        if rtype == "Bundle":
            self._bundle(resource, raw, line)
        else:
            self._resource(resource, raw, line, 0)
        if len(self.flattener.rows) >= self.settings.batch_rows:
            self._flush()

    def _bundle(self, bundle: dict, raw: bytes, line: int) -> None:
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            self._problem(line, 0, INVALID, bundle.get("id"), "Bundle.entry is not a list", raw)
            return
        urls: dict[str, tuple[str, str]] = {}
        for item in entries:
            res = item.get("resource") if isinstance(item, dict) else None
            url = item.get("fullUrl") if isinstance(item, dict) else None
            if isinstance(res, dict) and isinstance(url, str):
                rid = res.get("id") or url.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
                urls[url] = (str(res.get("resourceType")), str(rid))
        self.context.bundle_urls = urls
        try:
            for number, item in enumerate(entries, start=1):
                res = item.get("resource") if isinstance(item, dict) else None
                if not isinstance(res, dict):
                    self._problem(line, number, INVALID, None, "Bundle entry has no resource", orjson.dumps(item))
                    continue
                if not res.get("id") and isinstance(item.get("fullUrl"), str):
                    res = {**res, "id": urls[item["fullUrl"]][1]}
                self._resource(res, orjson.dumps(res), line, number)
        finally:
            self.context.bundle_urls = None

    def _resource(self, resource: dict, raw: bytes, line: int, entry: int) -> None:
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            self._problem(line, entry, INVALID, None, "no resourceType", raw)
            return
        self.result.read[rtype] += 1
        if rtype not in SUPPORTED_RESOURCE_TYPES:
            self.result.skipped[(rtype, "resource type not used by Odyssey")] += 1
            return
        digest = _digest(raw)
        if self.validator is not None and (self.settings.validate == "full" or digest % self.settings.sample_every == 0):
            self.result.validated += 1
            reason = self.validator.check(resource)
            if reason is not None:
                self._problem(line, entry, rtype, _id_or_none(resource), reason, raw)
                return
        self._flatten(resource, raw, rtype, digest, line, entry)

    def _flatten(self, resource: dict, raw: bytes, rtype: str, digest: int, line: int, entry: int) -> None:
        """Flatten one resource of a supported type, or quarantine it with the reason."""
        try:
            self.flattener.flatten(resource, line, entry)
        except Rejected as exc:
            self._problem(line, entry, rtype, _id_or_none(resource), str(exc), raw)
            return
        except (TypeError, AttributeError, ValueError) as exc:  # wrong JSON shapes deep inside a resource
            self._problem(line, entry, rtype, _id_or_none(resource), f"unexpected structure: {exc}", raw)
            return
        self.keys.append((rtype, resource["id"], digest, line, entry))

    def _problem(self, line, entry, rtype, fhir_id, reason, raw) -> None:
        if rtype == INVALID:  # not a resource of any type: counted here, as read and rejected
            self.result.read[INVALID] += 1
        self.result.problems.append(Problem(self.chunk.index, line, entry, rtype, fhir_id, reason, raw))
        if self.settings.strict:
            raise _StrictStop

    # -- flush: check times, then spill ---------------------------------------------------------------

    def _flush(self) -> None:
        """Parse the batch's times, reject resources with bad ones, spill the rest to parquet."""
        flat = self.flattener
        if not (flat.rows or flat.patients or flat.medications or self.keys):
            return
        rows = _checked_rows(flat.rows)
        failed = rows.filter(pl.col("reason").is_not_null()).group_by(KEY_COLUMNS).agg(
            pl.col("resource_type").first(), pl.col("reason").first()
        ).sort(KEY_COLUMNS)
        if failed.height:
            for line, entry, rtype, reason in failed.iter_rows():
                self.result.problems.append(Problem(self.chunk.index, line, entry, rtype, None, reason, None))
                if self.settings.strict:
                    raise _StrictStop
            bad = set(failed.select(KEY_COLUMNS).iter_rows())
            rows = rows.filter(pl.col("reason").is_null())
            self.keys = [k for k in self.keys if (k[3], k[4]) not in bad]
            flat.patients = [p for p in flat.patients if (p[2], p[3]) not in bad]
        self._spill(rows.drop("reason", "time_field", "birth"))
        flat.rows, flat.patients, flat.medications, self.keys = [], [], [], []
        self.part += 1

    def _spill(self, rows: pl.DataFrame) -> None:
        spill = Path(self.settings.spill_dir)
        tag = f"c{self.chunk.index:06d}-{self.part:04d}.arrow"  # Arrow IPC: spills are written once, read once
        chunk = pl.lit(self.chunk.index, pl.Int32).alias("chunk")
        if rows.height:
            write_buckets(rows.drop("encounter_end_us").with_columns(chunk), "subject_id",
                          self.settings.subject_buckets, spill / "rows" / tag)
            encounters = rows.filter(pl.col("event_type") == EventType.ENCOUNTER_START).select(
                "encounter_id",
                pl.col("subject_id").alias("encounter_subject_id"),
                pl.col("time").alias("encounter_start"),
                pl.col("encounter_end_us").alias("encounter_end"),
                *KEY_COLUMNS,
                chunk,
            )
            if encounters.height:  # by their subject's bucket, the bucket that will join them
                write_buckets(encounters, "encounter_subject_id", self.settings.subject_buckets,
                              spill / "encounters" / tag)
        if self.keys:
            keys = pl.from_arrow(pa.Table.from_struct_array(pa.array(self.keys, type=_KEY_STRUCT)))
            # identity: every copy of one type/id meets in one bucket (polars' hash is stable within a run)
            identity = ((pl.col("fhir_id").hash(seed=0) ^ pl.col("resource_type").hash(seed=1)) // 2).cast(pl.Int64)
            keys = keys.with_columns(chunk, identity=identity)
            write_buckets(keys, "identity", self.settings.key_buckets, spill / "keys" / tag)
        for name, struct, items in (
            ("patients", _PATIENT_STRUCT, self.flattener.patients),
            ("medications", _MEDICATION_STRUCT, self.flattener.medications),
        ):
            if items:
                table = pa.Table.from_struct_array(pa.array(items, type=struct))
                table = table.append_column("chunk", pa.array([self.chunk.index] * len(table), pa.int32()))
                (spill / name).mkdir(parents=True, exist_ok=True)
                write_table(table, spill / name / tag)


KEY_COLUMNS = ["line", "entry"]


def _checked_rows(rows: list[tuple]) -> pl.DataFrame:
    """Rows with times parsed to microseconds and a `reason` where the resource must be rejected."""
    if rows:  # one C++ pass over the tuples (no Python transposition)
        table = pa.Table.from_struct_array(pa.array(rows, type=_RAW_ROW_STRUCT))
        frame = pl.from_arrow(table)
    else:
        frame = pl.from_arrow(ROW_SCHEMA.empty_table())
    frame = with_fhir_times(frame, "time", "time_us", birth="birth")
    frame = with_fhir_times(frame, "issued", "issued_us")
    # an Encounter's row carries its period's end in `issued` (see ROW_SCHEMA)
    is_encounter = pl.col("event_type") == EventType.ENCOUNTER_START
    frame = frame.with_columns(encounter_end_us=pl.when(is_encounter).then(pl.col("issued_us")))
    bad_time = pl.col("time").is_not_null() & pl.col("time_us").is_null()
    bad_issued = pl.col("issued").is_not_null() & pl.col("issued_us").is_null()
    ends_before = pl.col("encounter_end_us") < pl.col("time_us")
    if not frame.select((bad_time | bad_issued | ends_before).any()).item():  # the usual batch: no message to build
        frame = frame.with_columns(pl.lit(None, pl.String).alias("reason"), time=pl.col("time_us"),
                                   issued=pl.col("issued_us"))
        return frame.drop("time_us", "issued_us")
    issued_field = (
        pl.when(pl.col("resource_type") == "Condition").then(pl.lit("recordedDate"))
        .when(pl.col("resource_type") == "Encounter").then(pl.lit("period.end"))
        .otherwise(pl.lit("issued"))
    )
    reason = (
        pl.when(bad_time)
        .then(pl.format("{}: not a FHIR date/time: {}", pl.col("time_field"), pl.col("time")))
        .when(bad_issued)
        .then(pl.format("{}.{}: not a FHIR date/time: {}", pl.col("resource_type"), issued_field, pl.col("issued")))
        .when(ends_before)
        .then(pl.lit("period ends before it starts"))
    )
    frame = frame.with_columns(reason=reason, time=pl.col("time_us"), issued=pl.col("issued_us"))
    if frame["reason"].null_count() < frame.height:  # spread a row's reason to its whole resource
        frame = frame.with_columns(reason=pl.col("reason").drop_nulls().first().over(KEY_COLUMNS))
    return frame.drop("time_us", "issued_us")


class _StrictStop(Exception):
    pass


def read_chunk(args: tuple[Chunk, ReadSettings]) -> ChunkResult:
    chunk, settings = args
    return ChunkReader(chunk, settings).run()


__all__ = ["ChunkResult", "Problem", "ReadSettings", "read_chunk"]
