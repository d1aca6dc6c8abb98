"""Stage 1 of ingestion, run by each worker on one chunk: parse, check, flatten, spill.

Rows are spilled (Arrow IPC, ingest_spill) by subject bucket (so stage 2 sees each subject whole) and
resource keys by id bucket (so duplicate ids are found without holding every id in memory).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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
from odyssey.pipelines.fhir_scan import AVAILABLE as SCANNER_AVAILABLE
from odyssey.pipelines.fhir_scan import IMPORT_ERROR as SCANNER_IMPORT_ERROR
from odyssey.pipelines.fhir_scan import ColumnScanner
from odyssey.pipelines.fhir_sources import Chunk, read_lines, read_whole
from odyssey.pipelines.fhir_times import with_fhir_times
from odyssey.pipelines.ingest_spill import write_buckets, write_table
from odyssey.pipelines.schema import EventType

INVALID = "<invalid>"  # resource type under which unparseable lines are counted
_GZIP_GROUP = 8192  # lines of a .gz file handed to the compiled reader at once

log = logging.getLogger(__name__)

# The compiled reader's rows carry their times already read where they have the common form (null:
# not read there), so that only the other values go through fhir_times.
SCANNED_ROW_SCHEMA = ROW_SCHEMA.append(pa.field("time_us", pa.int64())).append(pa.field("issued_us", pa.int64()))
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
    compiled_reader: bool = True  # flatten common shapes in C when the extension is built (fhir_scan)
    # In sample mode, the process (pid) that validates the sampled lines of every process's chunks; the
    # others flatten theirs as if valid and hand them back (ChunkResult.unverified), so that only one
    # process loads fhir.resources (~0.1 s of CPU each). None: each process validates its own.
    validating_process: int | None = None


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
    # (line, entry, text) of the sampled resources flattened before their validation (validating_process):
    # if one fails, the chunk is read again by a process that validates as it reads
    unverified: list[tuple[int, int, bytes]] = field(default_factory=list)
    bucket_rows: list[int] = field(default_factory=list)  # rows spilled to each subject bucket


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
        self.defer_validation = settings.validate == "sample" and settings.validating_process not in (None, os.getpid())
        # a line is validated in full when its digest is a multiple of this (None: never)
        self.validate_every = None if self.validator is None else (
            1 if settings.validate == "full" else settings.sample_every)
        self.part = 0
        self.scanner = self._scanner()

    def _scanner(self) -> ColumnScanner | None:
        """The compiled reader, unless it is off, missing, or every line is to be validated in full."""
        settings = self.settings
        if not (settings.compiled_reader and settings.fast_path) or settings.validate == "full":
            return None
        if not SCANNER_AVAILABLE:
            if not _NOTED_MISSING_SCANNER:
                _NOTED_MISSING_SCANNER.append(True)
                log.info("compiled FHIR reader not available (%s): reading every line in Python",
                         SCANNER_IMPORT_ERROR)
            return None
        every = settings.sample_every if settings.validate == "sample" else 0
        return ColumnScanner(self.context, every, SCANNED_ROW_SCHEMA, KEY_SCHEMA, PATIENT_SCHEMA, MEDICATION_SCHEMA)

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
        if self.scanner is not None:
            self._read_ndjson_compiled()
            return
        line = self.chunk.first_line - 1
        batch = self.settings.batch_rows
        flattener = self.flattener
        python_line = self._python_line
        try:
            for line, raw in read_lines(self.chunk):
                if not raw or raw.isspace():
                    continue
                python_line(raw, line)
                if len(flattener.rows) >= batch:
                    self._flush()
        except (EOFError, OSError) as exc:
            self._problem(line + 1, 0, INVALID, None, f"file is truncated or unreadable after line {line}: {exc}",
                          None)
        finally:
            self.result.lines += line - self.chunk.first_line + 1

    def _python_line(self, raw: bytes, line: int) -> None:
        """One line in Python: plain resources of supported types take the fast (msgspec) or inlined
        general path; anything else (Bundles, unknown types, bad JSON, sampled validation) goes through
        `_line` / `_resource`."""
        digest = (len(raw) << 32) | zlib.crc32(raw)  # _digest(raw), inlined: this runs once per line
        every = self.validate_every
        sampled = every is not None and digest % every == 0
        if self.fast is not None and not sampled:
            found = self.fast.flatten(raw, line)
            if found is not None:
                self.result.read[found[0]] += 1
                self.keys.append((found[0], found[1], digest, line, 0))
                return
        try:
            resource = orjson.loads(raw)
            rtype = resource["resourceType"]
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            self._line(raw, line, flush=False)
            return
        if rtype.__class__ is not str or rtype not in SUPPORTED_RESOURCE_TYPES or sampled:
            self._line(raw, line, flush=False)
            return
        self.result.read[rtype] += 1
        self._flatten(resource, raw, rtype, digest, line, 0)

    def _read_ndjson_compiled(self) -> None:
        """The hot loop: the compiled reader flattens runs of lines and hands back each line it does not
        fully understand, which `_python_line` takes. Batches are flushed at the same lines as in Python."""
        first = self.chunk.first_line
        line = first  # the next line's number
        try:
            if self.chunk.compressed:
                for start, data in self._gzip_groups():
                    _, line = self._scan(data, start, True)
            else:
                with self._mapped() as data:
                    _, line = self._scan(data, line, True)
        except (EOFError, OSError) as exc:
            self._problem(line, 0, INVALID, None, f"file is truncated or unreadable after line {line - 1}: {exc}",
                          None)
        finally:
            self.result.lines += line - first

    def _scan(self, data: bytes | memoryview, line: int, final: bool) -> tuple[int, int]:
        """Every whole line of `data` (the last one too when `final`); (where the rest starts, next line)."""
        batch = self.settings.batch_rows
        flattener, scanner, read = self.flattener, self.scanner, self.result.read
        pos, validated_at, validated = 0, -1, None
        while True:
            pos, line, defer_start, defer_end, sampled = scanner.scan(
                data, pos, line, batch - len(flattener.rows), final, validated_at)
            for rtype, count in scanner.drain_counts():  # before the deferred line: counts keep line order
                read[rtype] += count
            if defer_start >= 0:
                raw = bytes(data[defer_start:defer_end])
                if sampled:
                    validated = self._validate_sampled(raw, line - 1)
                    if validated is not None:  # valid: the reader flattens it after all (no Python rows)
                        pos, line, validated_at = defer_start, line - 1, defer_start
                        continue
                elif defer_start == validated_at:  # validated, but a shape the reader leaves to Python
                    read[validated[1]] += 1
                    self._flatten(validated[0], raw, validated[1], (len(raw) << 32) | zlib.crc32(raw), line - 1, 0)
                else:
                    self._python_line(raw, line - 1)
            if scanner.rows + len(flattener.rows) >= batch:
                self._flush()
            elif defer_start < 0:
                return pos, line

    def _validate_sampled(self, raw: bytes, line: int) -> tuple[dict, str] | None:
        """A line sampled for full validation. A plain resource of a supported type that passes is returned
        (resource, type) for the reader to flatten; anything else is taken here as `_python_line` takes it."""
        try:
            resource = orjson.loads(raw)
        except orjson.JSONDecodeError:
            resource = None
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if rtype.__class__ is not str or rtype not in SUPPORTED_RESOURCE_TYPES:
            self._python_line(raw, line)
            return None
        self.result.validated += 1
        if self.defer_validation:
            self.result.unverified.append((line, 0, raw))
            return resource, rtype
        reason = self.validator.check(resource)
        if reason is not None:
            self.result.read[rtype] += 1
            self._problem(line, 0, rtype, _id_or_none(resource), reason, raw)
            return None
        return resource, rtype

    @contextlib.contextmanager
    def _mapped(self):
        """The bytes of a plain chunk, memory-mapped: no copy of the file's text (a read() copy costs
        ~0.1 us per resource in the kernel), pages mapped from the page cache up front."""
        chunk = self.chunk
        with open(chunk.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            end = size if chunk.end is None else min(chunk.end, size)
            if end <= chunk.start:
                yield b""
                return
            base = chunk.start - chunk.start % mmap.ALLOCATIONGRANULARITY
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            with mmap.mmap(handle.fileno(), end - base, flags=flags, prot=mmap.PROT_READ, offset=base) as mapped, \
                    memoryview(mapped) as whole, whole[chunk.start - base:] as data:
                yield data

    def _gzip_groups(self):
        """Lines of a .gz chunk, joined in groups; a truncated stream raises EOFError after the complete
        lines before it were handed out (as the Python path reads them)."""
        group: list[bytes] = []
        start = self.chunk.first_line
        try:
            for number, raw in read_lines(self.chunk):
                if not group:
                    start = number
                group.append(raw)
                if len(group) >= _GZIP_GROUP:
                    yield start, b"\n".join(group)
                    group = []
        except EOFError:
            if group:
                yield start, b"\n".join(group)
            raise
        if group:
            yield start, b"\n".join(group)

    def _read_json_file(self) -> None:
        try:
            raw = read_whole(self.chunk)
        except (EOFError, OSError) as exc:
            self._problem(1, 0, INVALID, None, f"file is truncated or unreadable: {exc}", None)
            return
        self.result.lines = raw.count(b"\n") + 1
        self._line(raw, 1)

    # -- one line: a resource or a Bundle -----------------------------------------------------------

    def _line(self, raw: bytes, line: int, flush: bool = True) -> None:
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
        if flush and len(self.flattener.rows) >= self.settings.batch_rows:
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
        if self.validate_every is not None and digest % self.validate_every == 0:
            self.result.validated += 1
            if self.defer_validation:
                self.result.unverified.append((line, entry, raw))
            else:
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
        """Parse the batch's times, reject resources with bad ones, spill the rest."""
        flat = self.flattener
        scanned = self.scanner.take() if self.scanner is not None and self.scanner.pending else None
        if not (flat.rows or flat.patients or flat.medications or self.keys or scanned is not None):
            return
        rows = _checked_rows(_merged(scanned and scanned.rows, flat.rows, SCANNED_ROW_SCHEMA))
        keys = _merged(scanned and scanned.keys, self.keys, KEY_SCHEMA)
        patients = _merged(scanned and scanned.patients, flat.patients, PATIENT_SCHEMA)
        medications = _merged(scanned and scanned.medications, flat.medications, MEDICATION_SCHEMA)
        flat.rows, flat.patients, flat.medications, self.keys = [], [], [], []
        if rows.get_column("reason").null_count() < rows.height:  # the usual batch has no bad time
            bad = self._rejected_for_times(rows)
            rows = rows.filter(pl.col("reason").is_null())
            keys = _without(keys, bad)
            patients = _without(patients, bad)
        self._spill(rows.drop("reason", "time_field", "birth"), keys, patients, medications)
        self.part += 1

    def _rejected_for_times(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Problems for the resources whose rows carry a reason; their (line, entry)."""
        failed = rows.filter(pl.col("reason").is_not_null()).group_by(KEY_COLUMNS).agg(
            pl.col("resource_type").first(), pl.col("reason").first()
        ).sort(KEY_COLUMNS)
        for line, entry, rtype, reason in failed.iter_rows():
            self.result.problems.append(Problem(self.chunk.index, line, entry, rtype, None, reason, None))
            if self.settings.strict:
                raise _StrictStop
        return failed.select(KEY_COLUMNS)

    def _spill(self, rows: pl.DataFrame, keys: pa.Table, patients: pa.Table, medications: pa.Table) -> None:
        spill = Path(self.settings.spill_dir)
        tag = f"{_spill_prefix(self.chunk.index)}{self.part:04d}.arrow"  # Arrow IPC, written once, read once
        chunk = pl.lit(self.chunk.index, pl.Int32).alias("chunk")
        if rows.height:
            spilled = write_buckets(rows.drop("encounter_end_us").with_columns(chunk), "subject_id",
                                    self.settings.subject_buckets, spill / "rows" / tag)
            sums = self.result.bucket_rows or [0] * len(spilled)
            self.result.bucket_rows = [a + b for a, b in zip(sums, spilled, strict=True)]
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
        if keys.num_rows:
            frame = pl.from_arrow(keys)
            # identity: every copy of one type/id meets in one bucket (polars' hash is stable within a run)
            identity = ((pl.col("fhir_id").hash(seed=0) ^ pl.col("resource_type").hash(seed=1)) // 2).cast(pl.Int64)
            frame = frame.with_columns(chunk, identity=identity)
            write_buckets(frame, "identity", self.settings.key_buckets, spill / "keys" / tag)
        for name, table in (("patients", patients), ("medications", medications)):
            if table.num_rows:
                table = table.append_column("chunk", pa.array([self.chunk.index] * len(table), pa.int32()))
                (spill / name).mkdir(parents=True, exist_ok=True)
                write_table(table, spill / name / tag)


_NOTED_MISSING_SCANNER: list[bool] = []  # the "compiled reader not available" note is logged once per process


def _merged(scanned: pa.Table | None, items: list[tuple], schema: pa.Schema) -> pa.Table:
    """The compiled reader's table and the Python paths' tuples as one table in line order (each part is
    in line order, and a line's items all come from one part)."""
    python = None
    if items:  # tuples of the schema's first fields; the others (times read in C) are null
        python = pa.Table.from_struct_array(pa.array(items, type=pa.struct(list(schema)[: len(items[0])])))
        for name in schema.names[python.num_columns:]:
            python = python.append_column(schema.field(name), pa.nulls(python.num_rows, schema.field(name).type))
    if python is None:
        return scanned if scanned is not None else schema.empty_table()
    if scanned is None or not scanned.num_rows:
        return python
    # python row i lands after the reader's rows of earlier lines, and after python rows 0..i-1
    landing = np.searchsorted(scanned.column("line").to_numpy(), python.column("line").to_numpy())
    landing += np.arange(python.num_rows)
    order = np.empty(scanned.num_rows + python.num_rows, dtype=np.int64)
    from_python = np.zeros(len(order), dtype=bool)
    from_python[landing] = True
    order[landing] = np.arange(scanned.num_rows, len(order))
    order[~from_python] = np.arange(scanned.num_rows)
    # one gather (~0.02 us per row); a table of slices instead costs ~0.17 us per row to convert to polars
    return pa.concat_tables([scanned, python]).take(order)


def _without(table: pa.Table, bad: pl.DataFrame) -> pa.Table:
    """`table` less the items of the resources (line, entry) in `bad`, order kept."""
    if not table.num_rows:
        return table
    kept = pl.from_arrow(table).join(bad, on=KEY_COLUMNS, how="anti", maintain_order="left")
    return kept.to_arrow().cast(table.schema)


KEY_COLUMNS = ["line", "entry"]


def _checked_rows(table: pa.Table) -> pl.DataFrame:
    """Rows (ROW_SCHEMA) with times parsed to microseconds and a `reason` where the resource must be
    rejected."""
    frame = pl.from_arrow(table)
    frame = _with_times(frame, "time", "time_us", birth="birth")
    frame = _with_times(frame, "issued", "issued_us")
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


def _with_times(frame: pl.DataFrame, raw: str, out: str, birth: str | None = None) -> pl.DataFrame:
    """`out` = fhir_times' reading of `raw` wherever the compiled reader left it null."""
    need = frame.get_column(raw).is_not_null() & frame.get_column(out).is_null()
    if not need.any():
        return frame
    if need.all():  # nothing read in C (the Python paths alone)
        return with_fhir_times(frame.drop(out), raw, out, birth=birth)
    rows = need.arg_true()
    subset = frame.select(raw, *([birth] if birth else []))[rows]
    parsed = with_fhir_times(subset, raw, out, birth=birth).get_column(out)
    return frame.with_columns(frame.get_column(out).clone().scatter(rows, parsed))


class _StrictStop(Exception):
    pass


def read_chunk(args: tuple[Chunk, ReadSettings]) -> ChunkResult:
    chunk, settings = args
    return ChunkReader(chunk, settings).run()


class SampleChecker:
    """The validating process's check of the sampled resources other processes flattened unvalidated."""

    def __init__(self):
        self._validator = _Validator()

    def all_pass(self, result: ChunkResult) -> bool:
        return all(self._validator.check(orjson.loads(raw)) is None for _, _, raw in result.unverified)


def _spill_prefix(chunk: int) -> str:
    """Start of the name of every file a chunk spills, in each kind's folder (rows, keys, ...)."""
    return f"c{chunk:06d}-"


def discard_spill(settings: ReadSettings, chunk: int) -> None:
    """Remove what a chunk spilled, of every kind (before it is read again)."""
    for path in Path(settings.spill_dir).glob(f"*/{_spill_prefix(chunk)}*.arrow"):
        path.unlink()


__all__ = ["ChunkResult", "Problem", "ReadSettings", "SampleChecker", "discard_spill", "read_chunk"]
