"""The msgspec fast path writes exactly what the general path writes, and defers everything else to it;
the parallel resolve stage writes the same shards whatever the number of processes."""

from __future__ import annotations

import gzip
import hashlib
import tempfile
from pathlib import Path

import orjson
import polars as pl
import pytest
from fhir_builders import (
    condition,
    encounter,
    lab,
    med_request,
    medication,
    patient,
    write_ndjson,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ingest_properties import corrupted_small_cohort

from odyssey.pipelines.fhir_flatten import Context, Flattener, Rejected, stable_id
from odyssey.pipelines.ingest import StrictModeError, ingest_fhir, load_code_systems, subject_bucket_count

pytest.importorskip("msgspec")
from odyssey.pipelines.fhir_fast import FastFlattener  # noqa: E402 - needs msgspec

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture_lines() -> list[bytes]:
    lines = []
    for path in sorted(FIXTURES.rglob("*.ndjson*")):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines.extend(line for line in data.splitlines() if line.strip())
    return lines


def _general(line: bytes, number: int) -> Flattener | None:
    flat = Flattener(Context(systems=load_code_systems()))
    try:
        flat.flatten(orjson.loads(line), number, 0)
    except (Rejected, KeyError, TypeError, AttributeError, ValueError):
        return None
    return flat


def _fast(line: bytes, number: int) -> tuple[Flattener, tuple[str, str] | None]:
    flat = Flattener(Context(systems=load_code_systems()))
    return flat, FastFlattener(flat).flatten(line, number)


def test_fast_path_rows_equal_general_rows_on_every_fixture_line():
    handled = 0
    for number, line in enumerate(_fixture_lines(), start=1):
        fast, found = _fast(line, number)
        if found is None:
            assert not (fast.rows or fast.patients or fast.medications), line  # deferred: nothing appended
            continue
        handled += 1
        general = _general(line, number)
        assert general is not None, line  # the fast path never accepts what the general path rejects
        resource = orjson.loads(line)
        assert found == (resource["resourceType"], resource["id"])
        assert fast.rows == general.rows, line
        assert fast.patients == general.patients and fast.medications == general.medications
        assert fast.ctx.descriptions == general.ctx.descriptions
    assert handled >= 20  # the fixtures' plain resources of every type take the fast path


@pytest.mark.parametrize(
    "resource",
    [
        patient("a"),
        patient("b", gender="male", deceased="2150-06-01"),
        encounter("e", "a", "2150-01-01T00:00:00Z", "2150-01-05T00:00:00Z"),
        encounter("e", "a", "2150-01-01T00:00:00Z", None, klass="EMER"),
        condition("c", "a", "e"),
        condition("c", "a", None, onset="2150-01-02"),
        lab("o", "a", "e", "2150-01-02T10:00:00-05:00", 1.5, issued="2150-01-02T11:00:00Z"),
        lab("o", "a", None, "2150-01-02T10:00:00Z", 3),
        medication("m"),
        med_request("r", "a", "m", "2150-01-02T00:00:00Z"),
        # categories: none, an unknown one then vital signs, two codings of which the second is known
        {k: v for k, v in lab("o", "a", None, "2150-01-02T10:00:00Z").items() if k != "category"},
        lab("o", "a", None, "2150-01-02T10:00:00Z") | {"category": [
            {"coding": [{"code": "survey"}]}, {"coding": [{"code": "vital-signs"}]}]},
        lab("o", "a", None, "2150-01-02T10:00:00Z") | {"category": [
            {"coding": [{"code": "x"}, {"code": "laboratory"}]}, {"text": "no coding"}]},
        lab("o", "a", None, "2150-01-02T10:00:00Z") | {"category": []},
    ],
)
def test_fast_path_takes_common_shapes(resource):
    line = orjson.dumps(resource)
    fast, found = _fast(line, 7)
    assert found == (resource["resourceType"], resource["id"])
    general = _general(line, 7)
    assert fast.rows == general.rows and fast.patients == general.patients
    assert fast.medications == general.medications
    if resource["resourceType"] == "Observation":  # the event type the category gives
        categories = [c.get("code") for cat in resource.get("category", []) for c in cat.get("coding", [])]
        known = [c for c in categories if c in ("laboratory", "vital-signs")]
        expected = {"laboratory": "lab", "vital-signs": "vital"}[known[0]] if known else "observation"
        assert fast.rows[0][10] == expected


def _with(resource: dict, **changes) -> dict:
    return {**resource, **changes}


_LAB = lab("o", "a", "e", "2150-01-02T10:00:00Z")


@pytest.mark.parametrize(
    "line",
    [
        b'{"resourceType":"Bundle","type":"collection","entry":[]}',
        b'{"resourceType":"Basic","id":"x"}',
        b'{"resourceType":"Observation","id":"o",',  # truncated
        b'{"resourceType":"\x80bservation","id":"o"}',  # not UTF-8
        orjson.dumps(_with(_LAB, id="")),
        orjson.dumps(_with(_LAB, valueQuantity={"value": "high"})),  # wrong JSON type
        orjson.dumps(_with(_LAB, valueQuantity={"value": True})),
        orjson.dumps({k: v for k, v in _LAB.items() if k != "valueQuantity"} | {"valueInteger": 4}),
        orjson.dumps(_with(_LAB, component=[{"code": _LAB["code"], "valueQuantity": {"value": 1}}])),
        orjson.dumps(_with(_LAB, subject={"reference": "urn:uuid:1234"})),
        orjson.dumps(_with(_LAB, subject={"reference": "Group/1"})),
        orjson.dumps({k: v for k, v in _LAB.items() if k != "effectiveDateTime"}),
        orjson.dumps(_with(_LAB, code={"coding": [{"system": "http://unknown", "code": "1"}]})),
        orjson.dumps(_with(encounter("e", "a", "2150-01-01T00:00:00Z", None), **{"class": [{"coding": []}]})),
        orjson.dumps(_with(patient("a"), gender="")),
        orjson.dumps(_with(med_request("r", "a", "m", "2150-01-02T00:00:00Z"),
                           medicationReference={"reference": "#med1"})),
        orjson.dumps(_with(condition("c", "a", None), context={"reference": "Encounter/e"})),
    ],
)
def test_fast_path_defers_everything_else(line):
    fast, found = _fast(line, 3)
    assert found is None
    assert not (fast.rows or fast.patients or fast.medications)


def _outputs(out: Path) -> dict[str, bytes]:
    files = sorted((out / "data").glob("*.parquet")) + [
        out / "metadata" / "codes.parquet",
        out / "metadata" / "subject_map.parquet",
        out / "metadata" / "subject_splits.parquet",
        out / "rejects" / "rejects.ndjson",
    ]
    return {str(f.relative_to(out)): f.read_bytes() for f in files if f.exists()}


def _counts(report) -> dict:
    return {name: (c.read, c.written, c.rejected, c.skipped, c.rejected_reasons, c.skipped_reasons)
            for name, c in report.resource_types.items()}


def _same_with_and_without_fast_path(inputs: list[Path], tmp: Path, **options) -> None:
    fast = ingest_fhir(inputs, tmp / "fast", workers=1, fast_path=True, **options)
    general = ingest_fhir(inputs, tmp / "general", workers=1, fast_path=False, **options)
    assert _outputs(tmp / "fast") == _outputs(tmp / "general")
    assert _counts(fast) == _counts(general)
    assert fast.events == general.events and fast.dangling_encounter_references == general.dangling_encounter_references


@pytest.mark.parametrize("style", ["mimic_new", "mimic_old", "r4"])
def test_fixture_datasets_identical_with_and_without_fast_path(tmp_path, style):
    _same_with_and_without_fast_path([FIXTURES / style], tmp_path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_input_gives_identical_datasets_with_and_without_fast_path(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = corrupted_small_cohort(data, Path(tmp) / "in")
        _same_with_and_without_fast_path([folder], Path(tmp), validate="off")


def test_parallel_resolve_writes_the_same_shards_as_serial(tmp_path):
    """Several subject buckets resolved by two processes give the bytes one process writes."""
    folder = tmp_path / "in"
    patients = [patient(f"p{i}", deceased="2151-01-01" if i % 7 == 0 else None) for i in range(60)]
    encounters = [encounter(f"e{i}", f"p{i % 60}", "2150-01-01T00:00:00Z", "2150-01-03T00:00:00Z") for i in range(120)]
    labs = [lab(f"o{i}", f"p{i % 60}", f"e{i % 120}", f"2150-01-0{1 + i % 3}T0{i % 10}:00:00Z", float(i))
            for i in range(9000)]
    labs[100] = lab("o-ghost", "nobody", None, "2150-01-01T00:00:00Z")  # rejected in resolution
    write_ndjson(folder / "Patient.ndjson", patients)
    write_ndjson(folder / "Encounter.ndjson", encounters)
    write_ndjson(folder / "Observation.ndjson", labs)
    buckets = subject_bucket_count(sum(f.stat().st_size for f in folder.iterdir()), 2**20)
    assert buckets == 4  # several buckets (3 MB at 1 MB per shard, rounded up to a multiple of 4)

    def bucket(pid: str) -> int:
        return (stable_id("Patient", pid) & 0x7FFFFFFF) % buckets

    # a lab that points to another patient's encounter, whose subject lies in another bucket
    other = next(i for i in range(1, 60) if bucket(f"p{i}") != bucket("p0"))
    labs[200] = lab("o-cross", "p0", f"e{other}", "2150-01-01T00:00:00Z")
    # and one that points to its own patient's encounter: resolved from the bucket's own encounters
    labs[201] = lab("o-own", "p0", "e60", "2150-01-01T00:00:00Z", 12345.0)
    write_ndjson(folder / "Observation.ndjson", labs)
    one = ingest_fhir([folder], tmp_path / "one", workers=1, shard_mb=1, chunk_mb=1)
    two = ingest_fhir([folder], tmp_path / "two", workers=2, shard_mb=1, chunk_mb=1)
    assert one.shards == buckets
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")
    assert _counts(one) == _counts(two)
    assert one.resource_types["Observation"].rejected_reasons == {
        "subject Patient not found or rejected": 1, "encounter belongs to another patient": 1}
    data = pl.read_parquet(tmp_path / "one" / "data")
    own = data.filter(pl.col("numeric_value") == 12345.0)
    assert own["subject_id"].to_list() == [stable_id("Patient", "p0")]
    assert own["encounter_id"].to_list() == [stable_id("Encounter", "e60")]


@pytest.mark.parametrize(
    "line",
    [
        b'{"resourceType":"Patient","id":"a","\x80x":1}',  # invalid UTF-8 in a field Odyssey does not read
        b'{"resourceType":"Patient","id":"a","x":' + b"[" * 2000 + b"]" * 2000 + b"}",  # nested too deep
        orjson.dumps(_LAB).replace(b'"value":1.0', b'"value":1e999'),  # overflows a double
    ],
)
def test_fast_path_defers_what_orjson_calls_malformed(line):
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(line)
    fast, found = _fast(line, 1)
    assert found is None


def test_problems_in_later_chunks_name_their_file_line(tmp_path):
    """Readers number lines from their chunk's start; reports and rejects give the line of the file."""
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a")])
    labs: list = [lab(f"o{i}", "a", None, "2150-01-01T00:00:00Z", float(i)) for i in range(9000)]
    labs[4999] = lab("ghost", "nobody", None, "2150-01-01T00:00:00Z")  # rejected when references resolve
    labs[7999] = lab("o1", "a", None, "2150-01-01T00:00:00Z", 99.0)  # same id as line 2, other content
    labs[8499] = b"{broken"  # rejected while reading
    write_ndjson(folder / "Obs.ndjson", labs)
    report = ingest_fhir([folder], tmp_path / "out", workers=2, chunk_mb=1)
    assert report.workers == 2
    found = {(r["line"], r["reason"].split(":")[0]) for r in (
        orjson.loads(x) for x in (tmp_path / "out" / "rejects" / "rejects.ndjson").read_bytes().splitlines())}
    assert found == {(2, "duplicate id with different content"), (8000, "duplicate id with different content"),
                     (5000, "subject Patient not found or rejected"), (8500, "malformed JSON")}
    labs[4999] = lab("o4999", "a", None, "2150-01-01T00:00:00Z")
    labs[7999] = lab("o7999", "a", None, "2150-01-01T00:00:00Z")
    write_ndjson(folder / "Obs.ndjson", labs)  # only the broken line is left
    with pytest.raises(StrictModeError, match=r"Obs.ndjson:8500: malformed JSON"):
        ingest_fhir([folder], tmp_path / "strict", workers=2, chunk_mb=1, strict=True)


def test_stable_ids_are_blake2b_of_type_and_id():
    """Ids must not change between versions: BLAKE2b-64 of `Type/id`, little-endian, one bit dropped."""
    assert stable_id("Patient", "p-1") == 3181575670982426361
    for rtype, fhir_id in [("Encounter", "6d4987aa-92e4-44cd-af7b-4bdb812034c6"), ("Patient", "é/x"), ("Patient", "")]:
        digest = hashlib.blake2b(f"{rtype}/{fhir_id}".encode(), digest_size=8).digest()
        assert stable_id(rtype, fhir_id) == int.from_bytes(digest, "little") >> 1


def test_subject_bucket_count_is_one_or_a_multiple_of_four():
    mb = 2**20
    assert [subject_bucket_count(n * mb, 256 * mb) for n in (0, 1, 256, 257, 620, 1024, 1025, 3200)] == [
        1, 1, 1, 4, 4, 4, 8, 16]
