"""The compiled reader (pipelines/_fhir_scan.c) writes exactly what the msgspec fast path writes, defers
every other line to the Python paths, never loses a line, and ingest gives the same dataset with it or
without it."""

from __future__ import annotations

import gzip
import hashlib
import logging
import tempfile
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from fhir_builders import (
    condition,
    encounter,
    lab,
    med_request,
    medication,
    patient,
    small_cohort,
    write_ndjson,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ingest_properties import corrupted_small_cohort, corruption

from odyssey.pipelines import ingest_read
from odyssey.pipelines.fhir_flatten import ROW_SCHEMA, Context, Flattener, stable_id
from odyssey.pipelines.fhir_times import parse_fhir_times
from odyssey.pipelines.ingest import ingest_fhir, load_code_systems
from odyssey.pipelines.ingest_read import KEY_SCHEMA, MEDICATION_SCHEMA, PATIENT_SCHEMA, SCANNED_ROW_SCHEMA

pytest.importorskip("msgspec")
scan_module = pytest.importorskip("odyssey.pipelines._fhir_scan")
from odyssey.pipelines.fhir_fast import FastFlattener  # noqa: E402 - needs msgspec
from odyssey.pipelines.fhir_scan import ColumnScanner  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
SYSTEMS = load_code_systems()
NO_LIMIT = 1 << 40


def _scanner(context: Context, sample_every: int = 0) -> ColumnScanner:
    return ColumnScanner(context, sample_every, SCANNED_ROW_SCHEMA, KEY_SCHEMA, PATIENT_SCHEMA, MEDICATION_SCHEMA)


def _scan_one(line: bytes, number: int = 1, sample_every: int = 0):
    """(deferred?, batch, context) for one line scanned alone."""
    context = Context(systems=SYSTEMS)
    scanner = _scanner(context, sample_every)
    _, next_line, defer_start, defer_end, _ = scanner.scan(line, 0, number, NO_LIMIT, True)
    assert next_line == number + 1
    if defer_start >= 0:
        assert line[defer_start:defer_end] == line.rstrip(b"\r")
    return defer_start >= 0, scanner.take(), context


def _fast_tables(flat: Flattener) -> tuple[pa.Table, list, list]:
    rows = (pa.Table.from_struct_array(pa.array(flat.rows, type=pa.struct(list(ROW_SCHEMA)))) if flat.rows
            else ROW_SCHEMA.empty_table())
    patients = [dict(zip(PATIENT_SCHEMA.names, p, strict=True)) for p in flat.patients]
    medications = [dict(zip(MEDICATION_SCHEMA.names, m, strict=True)) for m in flat.medications]
    return rows, patients, medications


def _assert_same_as_fast_path(lines: list[bytes]) -> tuple[int, int]:
    """Scan the lines one by one beside the msgspec fast path (each with its own shared state, as in a
    chunk): a line the reader takes must give the fast path's rows, key, patient, medication and
    descriptions; a line it defers must leave nothing behind. Returns (taken, deferred)."""
    reader_context, fast_context = Context(systems=SYSTEMS), Context(systems=SYSTEMS)
    scanner = _scanner(reader_context)
    flat = Flattener(fast_context)
    fast = FastFlattener(flat)
    taken = deferred = 0
    for number, line in enumerate(lines, start=1):
        _, _, defer_start, _, _ = scanner.scan(line, 0, number, NO_LIMIT, True)
        found = fast.flatten(line, number)
        batch = scanner.take()
        counts = scanner.drain_counts()
        if defer_start >= 0:
            deferred += 1
            assert batch.rows.num_rows == batch.keys.num_rows == batch.patients.num_rows == 0, line
            assert batch.medications.num_rows == 0 and counts == []
            # the fast path takes the line itself (its own cache and descriptions state stay in step)
            flat.rows, flat.patients, flat.medications = [], [], []
            continue
        taken += 1
        assert found is not None, line  # never takes what the fast path defers
        rows, patients, medications = _fast_tables(flat)
        assert batch.rows.select(ROW_SCHEMA.names).equals(rows), (line, batch.rows.to_pylist(), rows.to_pylist())
        digest = (len(line) << 32) | zlib.crc32(line)
        assert batch.keys.to_pylist() == [
            {"resource_type": found[0], "fhir_id": found[1], "digest": digest, "line": number, "entry": 0}]
        assert batch.patients.to_pylist() == patients and batch.medications.to_pylist() == medications
        assert counts == [(found[0], 1)]
        flat.rows, flat.patients, flat.medications = [], [], []
        assert reader_context.descriptions == fast_context.descriptions, line
    return taken, deferred


def _fixture_lines() -> list[bytes]:
    lines = []
    for path in sorted(FIXTURES.rglob("*.ndjson*")):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines.extend(line for line in data.splitlines() if line.strip())
    return lines


def test_reader_equals_fast_path_on_every_fixture_line():
    taken, deferred = _assert_same_as_fast_path(_fixture_lines())
    assert taken >= 20 and deferred >= 1  # plain resources of every type are taken; Bundles are not


@pytest.mark.parametrize("style", ["mimic", "r4"])
def test_reader_equals_fast_path_on_a_synthetic_cohort(tmp_path, style):
    from odyssey.pipelines.synth import synthesize

    synthesize(12, tmp_path / style, seed=3, format=style, workers=1)
    lines = [line for path in sorted((tmp_path / style).glob("*.ndjson")) for line in path.read_bytes().splitlines()]
    taken, _ = _assert_same_as_fast_path(lines)
    assert taken >= 0.95 * len(lines)


def test_crc32_and_stable_id_match_python():
    for size in (0, 1, 15, 16, 63, 64, 65, 127, 128, 129, 300, 1000, 4099):
        data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
        assert scan_module.crc32(data[:size]) == zlib.crc32(data[:size])
    for fhir_id in ("", "a", "x" * 118, "y" * 119, "z" * 120, "w" * 250, "é-ü"):
        assert scan_module.stable_id("Patient/", fhir_id) == stable_id("Patient", fhir_id)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_crc32_matches_zlib(data):
    assert scan_module.crc32(data) == zlib.crc32(data)


def _lab_line(when: str) -> bytes:
    return orjson.dumps(lab("o", "a", None, when, issued=when))


@settings(max_examples=300, deadline=None)
@given(
    year=st.integers(0, 9999), month=st.integers(0, 13), day=st.integers(0, 32), hour=st.integers(0, 25),
    minute=st.integers(0, 61), second=st.integers(0, 61),
    zone=st.sampled_from(["Z", "+00:00", "-05:00", "+05:30", "+14:00", "-18:00", "+18:59", "+19:00", "+23:59"]),
)
def test_times_read_in_c_equal_fhir_times(year, month, day, hour, minute, second, zone):
    """Where the reader reads a time itself, it gives what fhir_times gives; elsewhere it leaves it null."""
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}{zone}"
    deferred, batch, _ = _scan_one(_lab_line(text))
    assert not deferred
    (row,) = batch.rows.to_pylist()
    if row["time_us"] is not None:
        assert row["time_us"] == row["issued_us"] == parse_fhir_times([text])[0]


def test_common_times_are_read_in_c():
    deferred, batch, _ = _scan_one(_lab_line("2150-03-01T10:00:00-05:00"))
    expected = datetime(2150, 3, 1, 15, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    assert batch.rows.column("time_us").to_pylist() == [expected // timedelta(microseconds=1)]
    for other in ("2150-03-01", "2150-03-01T10:00:00.5Z", "2150-02-30T10:00:00Z", "2150-03-01T10:00:60Z"):
        assert _scan_one(_lab_line(other))[1].rows.column("time_us").to_pylist() == [None]


_LAB = lab("o", "a", "e", "2150-01-02T10:00:00Z")
_LAB_LINE = orjson.dumps(_LAB)


def _with(resource: dict, **changes) -> bytes:
    return orjson.dumps({**resource, **changes})


def _without(resource: dict, name: str) -> dict:
    return {k: v for k, v in resource.items() if k != name}


# One line per kind of input the reader does not take: it must defer each (the Python paths decide).
DEFERRED = {
    "bundle": b'{"resourceType":"Bundle","type":"collection","entry":[]}',
    "other resource type": b'{"resourceType":"Basic","id":"x"}',
    "not an object": b'[1,2]',
    "no resourceType": b'{"id":"x"}',
    "truncated": _LAB_LINE[:-7],
    "trailing garbage": _LAB_LINE + b" x",
    "not UTF-8": _LAB_LINE.replace(b'"final"', b'"fin\xc3\x28l"'),
    "escape in a string read": _LAB_LINE.replace(b'"Patient/a"', b'"Patient\\/a"'),
    "escape in a key": _LAB_LINE.replace(b'"subject"', b'"subj\\u0065ct"'),
    "control byte in a string": _LAB_LINE.replace(b'"final"', b'"fi\x01nal"'),
    "lone surrogate escape": _LAB_LINE.replace(b'"final"', b'"\\ud800"'),
    "duplicate key": _LAB_LINE[:-1] + b',"subject":{"reference":"Patient/b"}}',
    "nesting too deep": _LAB_LINE[:-1] + b',"extension":' + b"[" * 100 + b"]" * 100 + b"}",
    "empty id": _with(_LAB, id=""),
    "id not a string": _with(_LAB, id=7),
    "null in a field read": _with(_LAB, subject=None),
    "wrong JSON type": _with(_LAB, valueQuantity={"value": "high"}),
    "boolean value": _with(_LAB, valueQuantity={"value": True}),
    "integer beyond float32": _with(_LAB, valueQuantity={"value": 16777217}),
    "number too large": _LAB_LINE.replace(b'"value":1.0', b'"value":1e999'),
    "valueInteger": orjson.dumps(_without(_LAB, "valueQuantity") | {"valueInteger": 4}),
    "valueCodeableConcept": orjson.dumps(_without(_LAB, "valueQuantity") | {"valueCodeableConcept": {"text": "x"}}),
    "component": _with(_LAB, component=[{"code": _LAB["code"], "valueQuantity": {"value": 1}}]),
    "urn:uuid reference": _with(_LAB, subject={"reference": "urn:uuid:1234"}),
    "reference to another type": _with(_LAB, subject={"reference": "Group/1"}),
    "no effective time": orjson.dumps(_without(_LAB, "effectiveDateTime")),
    "unknown code system": _with(_LAB, code={"coding": [{"system": "http://unknown", "code": "1"}]}),
    "R5 Encounter.class": _with(encounter("e", "a", "2150-01-01T00:00:00Z", None), **{"class": [{"coding": []}]}),
    "empty gender": _with(patient("a"), gender=""),
    "contained medication": _with(med_request("r", "a", "m", "2150-01-02T00:00:00Z"),
                                  medicationReference={"reference": "#med1"}),
    "R5 medication": orjson.dumps(_without(med_request("r", "a", "m", "2150-01-02T00:00:00Z"), "medicationReference")
                                  | {"medication": {"reference": {"reference": "Medication/m"}}}),
    "context without encounter": _with(condition("c", "a", None), context={"reference": "Encounter/e"}),
    "condition without time or encounter": orjson.dumps(condition("c", "a", None)),
    "period without start": _with(condition("c", "a", "e"), onsetPeriod={"end": "2150-01-01"}),
    "admission (R5)": _with(encounter("e", "a", "2150-01-01T00:00:00Z", None), admission={}),
}


@pytest.mark.parametrize("kind", sorted(DEFERRED))
def test_reader_defers_each_kind_of_unusual_line(kind):
    line = DEFERRED[kind]
    deferred, batch, context = _scan_one(line, number=5)
    assert deferred, kind
    assert batch.rows.num_rows == batch.keys.num_rows == batch.patients.num_rows == batch.medications.num_rows == 0


def test_sampled_lines_are_deferred_for_validation_then_taken():
    digest = (len(_LAB_LINE) << 32) | zlib.crc32(_LAB_LINE)
    assert _scan_one(_LAB_LINE, sample_every=digest)[0]  # digest % every == 0: Python validates it
    assert not _scan_one(_LAB_LINE, sample_every=digest + 1)[0]
    scanner = _scanner(Context(systems=SYSTEMS), digest)
    data = _LAB_LINE + b"\n" + _LAB_LINE + b"\n"
    assert scanner.scan(data, 0, 1, NO_LIMIT, True) == (len(_LAB_LINE) + 1, 2, 0, len(_LAB_LINE), 1)
    # validated: the reader takes that line, and defers the next copy (sampled too)
    second = len(_LAB_LINE) + 1
    assert scanner.scan(data, 0, 1, NO_LIMIT, True, 0) == (len(data), 3, second, len(data) - 1, 1)
    assert scanner.rows == 1
    # a line deferred for its shape is not "sampled", validated or not
    unusual = DEFERRED["component"]
    scanner = _scanner(Context(systems=SYSTEMS), 1)
    assert scanner.scan(unusual, 0, 1, NO_LIMIT, True, 0)[4] == 0


def test_scan_stops_at_row_limit_and_keeps_line_numbers():
    lines = [orjson.dumps(lab(f"o{i}", "a", None, "2150-01-02T10:00:00Z")) for i in range(10)]
    data = b"\n".join(lines[:4]) + b"\n\n  \r\n" + b"\r\n".join(lines[4:]) + b"\n"
    scanner = _scanner(Context(systems=SYSTEMS))
    pos, line, defer_start, _, _ = scanner.scan(data, 0, 1, 3, False)
    assert (line, defer_start, scanner.rows) == (4, -1, 3)
    pos, line, defer_start, _, _ = scanner.scan(data, pos, line, NO_LIMIT, False)
    assert (pos, line, defer_start, scanner.rows) == (len(data), 13, -1, 10)  # two blank lines counted
    assert scanner.take().rows.column("line").to_pylist() == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12]


def test_unterminated_last_line_only_when_final():
    data = _LAB_LINE + b"\n" + _LAB_LINE
    scanner = _scanner(Context(systems=SYSTEMS))
    assert scanner.scan(data, 0, 1, NO_LIMIT, False)[:2] == (len(_LAB_LINE) + 1, 2)
    assert scanner.scan(data, len(_LAB_LINE) + 1, 2, NO_LIMIT, True)[:2] == (len(data), 3)
    assert scanner.rows == 2


_VALID_LINES = [orjson.dumps(r) for r in (
    patient("a", deceased="2150-06-01"), encounter("e", "a", "2150-01-01T00:00:00Z", "2150-01-05T00:00:00Z"),
    condition("c", "a", "e"), _LAB, medication("m"), med_request("r", "a", "m", "2150-01-02T00:00:00Z"),
    lab("o2", "a", None, "2150-01-02T10:00:00-05:00", 2.5, issued="2150-01-02T11:00:00Z"),
)]


@st.composite
def _damaged_lines(draw):
    line = draw(st.sampled_from(_VALID_LINES))
    kind = draw(st.sampled_from(["corrupt", "random", "splice", "keep"]))
    if kind == "corrupt":
        return draw(corruption(line)).replace(b"\n", b" ")
    if kind == "random":
        return draw(st.binary(max_size=200)).replace(b"\n", b" ")
    if kind == "splice":  # a piece of another line pasted in
        other = draw(st.sampled_from(_VALID_LINES))
        i, j = draw(st.integers(0, len(line))), draw(st.integers(0, len(other)))
        return (line[:i] + other[j:]).replace(b"\n", b" ")
    return line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_damaged_lines(), min_size=1, max_size=12), final_newline=st.booleans())
def test_fuzz_never_crashes_nor_loses_a_line(lines, final_newline):
    """Random, truncated and mutated lines in one buffer: every non-blank line is either taken (once, with
    the fast path's rows) or deferred, line numbers stay exact, and nothing is read out of bounds (this
    test also runs under AddressSanitizer, see docs/ingest.md)."""
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    scanner = _scanner(Context(systems=SYSTEMS))
    taken, deferred = [], []
    pos, line = 0, 1
    while True:
        pos, line, defer_start, defer_end, _ = scanner.scan(data, pos, line, NO_LIMIT, True)
        if defer_start < 0:
            break
        deferred.append(line - 1)
        assert data[defer_start:defer_end] == lines[line - 2].rstrip(b"\r")
    taken = scanner.take().keys.column("line").to_pylist()
    pieces = data.split(b"\n")
    if not pieces[-1]:  # the empty piece after a final newline is no line (as fhir_sources.read_lines)
        pieces.pop()
    expected = [n for n, raw in enumerate(pieces, start=1) if raw.strip()]
    assert sorted(taken + deferred) == expected
    assert line == len(pieces) + 1
    taken_set = set(taken)
    # the lines taken give exactly the fast path's rows (checked line by line with fresh state)
    _assert_same_as_fast_path([raw for n, raw in enumerate(lines, start=1) if n in taken_set])


def _dataset(out: Path) -> dict[str, bytes]:
    files = sorted((out / "data").glob("*.parquet")) + [
        out / "metadata" / name for name in ("codes.parquet", "subject_map.parquet", "subject_splits.parquet")
    ] + [out / "rejects" / "rejects.ndjson"]
    return {str(f.relative_to(out)): f.read_bytes() for f in files if f.exists()}


def _counts(report) -> dict:
    return {name: (c.read, c.written, c.rejected, c.skipped, c.rejected_reasons, c.skipped_reasons)
            for name, c in report.resource_types.items()}


def _same_with_and_without_reader(inputs: list[Path], tmp: Path, **options) -> None:
    compiled = ingest_fhir(inputs, tmp / "compiled", workers=1, **options)
    python = ingest_fhir(inputs, tmp / "python", workers=1, compiled_reader=False, **options)
    assert _dataset(tmp / "compiled") == _dataset(tmp / "python")
    assert _counts(compiled) == _counts(python)
    assert list(compiled.resource_types) == list(python.resource_types)  # same order in the report
    assert compiled.validated_resources == python.validated_resources


@pytest.mark.parametrize("style", ["mimic_new", "mimic_old", "r4"])
def test_fixture_datasets_identical_with_and_without_reader(tmp_path, style):
    _same_with_and_without_reader([FIXTURES / style], tmp_path)


def test_small_batches_gzip_and_sampling_identical_with_and_without_reader(tmp_path, monkeypatch):
    """Deferred lines inside batches (validation samples, Bundles, bad lines), batch limits met inside
    runs of lines, and .gz input in groups: the same dataset as the Python paths."""
    folder = small_cohort(tmp_path / "in")
    # shapes the reader takes, which R4B refuses (an unknown element)
    invalid = [_with(lab(f"v{i}", "a", None, "2150-01-02T10:00:00Z"), foo=i) for i in range(6)]
    extra = [DEFERRED["bundle"], DEFERRED["component"], b"not json", DEFERRED["duplicate key"], b"",
             orjson.dumps(lab("bad-time", "a", None, "2150-13-01T00:00:00Z")), *invalid]
    labs = folder / "MimicObservationLabevents.ndjson"
    labs.write_bytes(labs.read_bytes() + b"\n".join(extra) + b"\n")
    (folder / "more.ndjson.gz").write_bytes(gzip.compress(labs.read_bytes().replace(b'"id":"o', b'"id":"g')))
    monkeypatch.setattr(ingest_read.ReadSettings, "batch_rows", 7)
    _same_with_and_without_reader([folder], tmp_path / "every3", sample_every=3)
    _same_with_and_without_reader([folder], tmp_path / "every1", sample_every=1)  # every line validated
    rejects = [orjson.loads(r) for r in (tmp_path / "every1" / "compiled" / "rejects" / "rejects.ndjson").read_bytes()
               .splitlines()]
    refused = [r["id"] for r in rejects if r["reason"].startswith("fails FHIR R4B validation: foo")]
    assert sorted(refused) == sorted(f"v{i}" for i in range(len(invalid)) for _ in range(2))  # in both files


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_input_identical_with_and_without_reader(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = corrupted_small_cohort(data, Path(tmp) / "in")
        _same_with_and_without_reader([folder], Path(tmp), validate="off")


def test_missing_extension_falls_back_with_a_note(tmp_path, monkeypatch, caplog):
    folder = small_cohort(tmp_path / "in")
    monkeypatch.setattr(ingest_read, "SCANNER_AVAILABLE", False)
    monkeypatch.setattr(ingest_read, "_NOTED_MISSING_SCANNER", [])
    with caplog.at_level(logging.INFO, logger=ingest_read.__name__):
        fallback = ingest_fhir([folder], tmp_path / "fallback", workers=1)
    assert sum("compiled FHIR reader not available" in r.message for r in caplog.records) == 1
    compiled = ingest_fhir([folder], tmp_path / "compiled", workers=1)
    assert _dataset(tmp_path / "fallback") == _dataset(tmp_path / "compiled")
    assert _counts(fallback) == _counts(compiled)


def test_big_file_in_chunks_identical_with_and_without_reader(tmp_path):
    """Lines of one file cut into several chunks and read in blocks keep their file line numbers."""
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a"), patient("b")])
    labs = [lab(f"o{i}", "ab"[i % 2], None, f"2150-01-0{1 + i % 9}T00:00:00Z", float(i)) for i in range(3000)]
    labs[1234] = lab("late", "a", None, "2150-99-01T00:00:00Z")  # a bad time, reported with its file line
    write_ndjson(folder / "Observation.ndjson", labs)
    _same_with_and_without_reader([folder], tmp_path, chunk_mb=1)
    rejects = (tmp_path / "compiled" / "rejects" / "rejects.ndjson").read_bytes().splitlines()
    assert [orjson.loads(r)["line"] for r in rejects] == [1235]


def test_taken_batches_stay_intact_while_the_reader_reuses_their_memory(tmp_path):
    """Batches reach Arrow without a copy, and the reader reuses a batch's memory once Python frees it (in
    later batches and chunks): a batch still held keeps its values whatever is scanned after it, and
    ingestion hands the kept memory back when it is done."""
    def lines(prefix: str, value: float) -> bytes:
        return b"".join(orjson.dumps(lab(f"{prefix}{i}", f"p{i % 7}", None, "2150-01-02T10:00:00Z", value + i))
                        + b"\n" for i in range(3000))

    scanner = _scanner(Context(systems=SYSTEMS))
    scanner.scan(lines("first", 1.0), 0, 1, NO_LIMIT, True)
    first = scanner.take()
    expected = first.rows.to_pylist(), first.keys.to_pylist()
    for round_ in range(3):  # each later batch is freed at once: its buffers go back to be reused
        other = _scanner(Context(systems=SYSTEMS)) if round_ == 2 else scanner  # a new chunk's reader too
        other.scan(lines(f"later{round_}-", 500.0 + round_), 0, 1, NO_LIMIT, True)
        later = other.take()
        assert later.rows.num_rows == first.rows.num_rows
        assert later.keys.column("fhir_id")[0].as_py() == f"later{round_}-0"
        del later
    assert (first.rows.to_pylist(), first.keys.to_pylist()) == expected
    assert scan_module.pooled_bytes() > 0
    del first, scanner, other
    ingest_fhir([write_ndjson(tmp_path / "in.ndjson", [patient("p1"), lab("o1", "p1", None, "2150-01-02T10:00:00Z")])],
                tmp_path / "out", workers=1)
    assert scan_module.pooled_bytes() == 0
