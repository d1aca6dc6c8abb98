"""Stage 1 of ingestion, run by each worker on one chunk: parse, check, flatten, spill to parquet.

Rows are spilled by subject bucket (so stage 2 sees each subject whole) and resource keys by id bucket
(so duplicate ids are found without holding every id in memory).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from odyssey.pipelines.fhir_flatten import (
    ROW_COLUMNS,
    SUPPORTED_RESOURCE_TYPES,
    Context,
    Flattener,
    Rejected,
)
from odyssey.pipelines.fhir_sources import Chunk, read_lines, read_whole

INVALID = "<invalid>"  # resource type under which unparseable lines are counted

ROW_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.int64()),
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
        ("text_value", pa.large_string()),
        ("encounter_id", pa.int64()),
        ("unit", pa.string()),
        ("comparator", pa.string()),
        ("event_type", pa.string()),
        ("issued", pa.int64()),
        ("medication_key", pa.string()),
        ("time_from_encounter", pa.bool_()),
        ("resource_type", pa.string()),
        ("line", pa.int64()),
        ("entry", pa.int32()),
    ]
)
KEY_SCHEMA = pa.schema(
    [
        ("resource_type", pa.string()),
        ("fhir_id", pa.string()),
        ("identity", pa.int64()),
        ("digest", pa.int64()),
        ("line", pa.int64()),
        ("entry", pa.int32()),
    ]
)
PATIENT_SCHEMA = pa.schema([("subject_id", pa.int64()), ("fhir_id", pa.string()), ("line", pa.int64()), ("entry", pa.int32())])
ENCOUNTER_SCHEMA = pa.schema(
    [
        ("encounter_id", pa.int64()),
        ("encounter_subject_id", pa.int64()),
        ("encounter_start", pa.int64()),
        ("encounter_end", pa.int64()),
        ("line", pa.int64()),
        ("entry", pa.int32()),
    ]
)
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


def _digest(raw: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


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
        self.keys: list[tuple] = []
        self.result = ChunkResult(chunk.index, bytes=chunk.size)
        self.validator = _Validator() if settings.validate != "off" else None

    # -- entry point ---------------------------------------------------------------------------------

    def run(self) -> ChunkResult:
        try:
            if self.chunk.kind == "json":
                self._read_json_file()
            else:
                self._read_ndjson()
        except _StrictStop:
            pass
        self.result.descriptions = self.context.descriptions
        self._spill()
        return self.result

    def _read_ndjson(self) -> None:
        line = self.chunk.first_line - 1
        try:
            for line, raw in read_lines(self.chunk):
                self.result.lines += 1
                if not raw.strip():
                    continue
                self._line(raw, line)
        except (EOFError, OSError) as exc:
            self._problem(line + 1, 0, INVALID, None, f"file is truncated or unreadable after line {line}: {exc}",
                          None)

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
            return
        self._resource(resource, raw, line, 0)

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
        rid = resource.get("id")
        digest = _digest(raw)
        if self.validator is not None and (self.settings.validate == "full" or digest % self.settings.sample_every == 0):
            self.result.validated += 1
            reason = self.validator.check(resource)
            if reason is not None:
                self._problem(line, entry, rtype, rid, reason, raw)
                return
        try:
            self.flattener.flatten(resource, line, entry)
        except Rejected as exc:
            self._problem(line, entry, rtype, rid if isinstance(rid, str) else None, str(exc), raw)
            return
        except (TypeError, AttributeError, ValueError) as exc:  # wrong JSON shapes deep inside a resource
            self._problem(line, entry, rtype, rid if isinstance(rid, str) else None,
                          f"unexpected structure: {exc}", raw)
            return
        self.keys.append((rtype, rid, self.context.stable_id(rtype, rid), digest, line, entry))

    def _problem(self, line, entry, rtype, fhir_id, reason, raw) -> None:
        if rtype == INVALID:  # not a resource of any type: counted here, as read and rejected
            self.result.read[INVALID] += 1
        self.result.problems.append(Problem(self.chunk.index, line, entry, rtype, fhir_id, reason, raw))
        if self.settings.strict:
            raise _StrictStop

    # -- spill ---------------------------------------------------------------------------------------

    def _spill(self) -> None:
        spill = Path(self.settings.spill_dir)
        tag = f"c{self.chunk.index:06d}.parquet"
        rows = self.flattener.rows
        if rows:
            table = pa.Table.from_arrays(
                [pa.array(col, type=ROW_SCHEMA.field(i).type) for i, col in enumerate(zip(*rows, strict=True))],
                schema=ROW_SCHEMA,
            )
            _write_buckets(table, "subject_id", self.settings.subject_buckets, spill / "rows", tag)
        if self.keys:
            cols = list(zip(*self.keys, strict=True))
            table = pa.Table.from_arrays([pa.array(c, type=KEY_SCHEMA.field(i).type) for i, c in enumerate(cols)],
                                         schema=KEY_SCHEMA)
            _write_buckets(table, "identity", self.settings.key_buckets, spill / "keys", tag)
        for name, schema_, items in (
            ("patients", PATIENT_SCHEMA, self.flattener.patients),
            ("encounters", ENCOUNTER_SCHEMA, self.flattener.encounters),
            ("medications", MEDICATION_SCHEMA, self.flattener.medications),
        ):
            if items:
                cols = list(zip(*items, strict=True))
                table = pa.Table.from_arrays([pa.array(c, type=schema_.field(i).type) for i, c in enumerate(cols)],
                                             schema=schema_)
                table = table.append_column("chunk", pa.array([self.chunk.index] * len(table), pa.int32()))
                (spill / name).mkdir(parents=True, exist_ok=True)
                pq.write_table(table, spill / name / tag, compression="lz4")


class _StrictStop(Exception):
    pass


def _write_buckets(table: pa.Table, column: str, buckets: int, folder: Path, tag: str) -> None:
    """Write the rows of each bucket (`column` modulo `buckets`) to folder/bNNNN/tag."""
    frame = pl.from_arrow(table).with_columns(
        chunk=pl.lit(int(tag[1:7]), pl.Int32),
        _bucket=(pl.col(column) & 0x7FFFFFFF) % buckets,
    )
    for (bucket,), part in frame.partition_by("_bucket", as_dict=True, maintain_order=True).items():
        target = folder / f"b{bucket:04d}"
        target.mkdir(parents=True, exist_ok=True)
        part.drop("_bucket").write_parquet(target / tag, compression="lz4")


def subject_bucket(subject_id: int, buckets: int) -> int:
    return (subject_id & 0x7FFFFFFF) % buckets


def read_chunk(args: tuple[Chunk, ReadSettings]) -> ChunkResult:
    chunk, settings = args
    return ChunkReader(chunk, settings).run()


__all__ = ["ROW_COLUMNS", "ChunkResult", "Problem", "ReadSettings", "read_chunk", "subject_bucket"]
