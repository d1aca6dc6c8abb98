"""`odyssey ingest`: FHIR R4 in both MIMIC styles and plain R4 -> MEDS, quarantine, determinism."""

from __future__ import annotations

import gzip
import hashlib
import os
from datetime import datetime
from pathlib import Path

import meds
import orjson
import polars as pl
import pyarrow.parquet as pq
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

from odyssey.pipelines import schema
from odyssey.pipelines.fhir_flatten import stable_id
from odyssey.pipelines.fhir_sources import InputError
from odyssey.pipelines.ingest import StrictModeError, ingest_fhir

FIXTURES = Path(__file__).parent / "fixtures"


def events(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "data" / "*.parquet")


def subject_rows(frame: pl.DataFrame, fhir_id: str) -> pl.DataFrame:
    return frame.filter(pl.col("subject_id") == stable_id("Patient", fhir_id))


def rejects(out: Path) -> list[dict]:
    path = out / "rejects" / "rejects.ndjson"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def assert_reconciles(report) -> None:
    for name, c in report.resource_types.items():
        assert c.read == c.written + c.rejected + c.skipped, name


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# -- hand-written fixtures ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["mimic_new", "mimic_old"])
def test_mimic_fixture_rows(tmp_path, style):
    report = ingest_fhir([FIXTURES / style], tmp_path / "out", workers=1)
    frame = events(tmp_path / "out")
    p1 = subject_rows(frame, "p-1")
    by_code = {r["code"]: r for r in p1.iter_rows(named=True)}
    # times normalised to UTC
    assert by_code["ENCOUNTER_START//IMP"]["time"] == at("2150-03-01 15:00:00")
    end = by_code["ENCOUNTER_END//IMP"]
    assert end["time"] == at("2150-03-09 17:30:00") and end["text_value"] == "HOME"
    # an encounter diagnosis without a time of its own sits at the encounter's end, never its start
    assert by_code["ICD10CM//I509"]["time"] == end["time"]
    # medicationReference resolved through the Medication file; codeable concept accepted too
    assert "MIMIC_MED_NAME//Heparin" in by_code
    creat = by_code["MIMIC_LAB//50912"]
    assert creat["numeric_value"] == pytest.approx(1.4) and creat["unit"] == "mg/dL"
    assert creat["issued"] == at("2150-03-01 20:10:00") and creat["event_type"] == "lab"
    assert by_code["MIMIC_LAB//51003"]["comparator"] == "<"
    assert by_code["MEDS_DEATH"]["time"] == at("2150-04-20 12:00:00")
    assert by_code["GENDER//female"]["time"] is None
    assert by_code["ICD10PCS//0DTJ4ZZ"]["encounter_id"] == stable_id("Encounter", "e-1")
    # MedicationAdministration (reference, and a codeable concept with a period) and MedicationDispense
    ndc = p1.filter(pl.col("code") == "NDC//00338004904").sort("time")
    assert ndc["time"].to_list() == [at("2150-03-01 16:00:00"), at("2150-03-02 11:00:00")]
    icu = by_code["MIMIC_ICU_MED//225158"]
    assert icu["time"] == at("2150-03-03 11:00:00") and icu["encounter_id"] == stable_id("Encounter", "e-1")
    dispensed = subject_rows(frame, "p-2").filter(pl.col("code") == "NDC//00338004904")
    assert dispensed["time"].to_list() == [at("2151-01-01 05:00:00")]
    p2 = subject_rows(frame, "p-2")
    assert p2.filter(pl.col("code") == "ICD9CM//4280").height == 1
    assert p2.filter(pl.col("code") == "MIMIC_LAB//51266")["text_value"].to_list() == ["NEGATIVE"]
    assert report.resources_rejected == 0
    assert_reconciles(report)
    codes = pl.read_parquet(tmp_path / "out" / schema.CODES_FILE)
    assert dict(codes.select("code", "description").iter_rows())["ICD10CM//I509"] == "Heart failure, unspecified"


def test_both_mimic_styles_give_identical_data(tmp_path):
    ingest_fhir([FIXTURES / "mimic_new"], tmp_path / "new", workers=1)
    ingest_fhir([FIXTURES / "mimic_old"], tmp_path / "old", workers=1)
    assert events(tmp_path / "new").equals(events(tmp_path / "old"))


def test_plain_r4_with_bundles_and_gzip(tmp_path):
    report = ingest_fhir([FIXTURES / "r4"], tmp_path / "out", workers=2)
    frame = events(tmp_path / "out")
    assert report.subjects == 4
    p1 = {r["code"]: r for r in subject_rows(frame, "p-1").iter_rows(named=True)}
    # first coding with a known system: SNOMED precedes ICD-10-CM in c-1
    assert "SNOMED//84114007" in p1 and "ICD10CM//I50.9" not in p1
    assert p1["SNOMED//84114007"]["time"] == at("2150-03-05 09:00:00")  # onset +01:00 -> UTC
    # the gzip file's blood-pressure panel becomes its two components, as vitals
    assert p1["LOINC//8480-6"]["numeric_value"] == 120 and p1["LOINC//8480-6"]["event_type"] == "vital"
    assert "LOINC//85354-9" not in p1
    # the Bundle file: urn:uuid references and a contained Medication
    p3 = {r["code"]: r for r in subject_rows(frame, "p-3").iter_rows(named=True)}
    assert p3["RXNORM//197361"]["encounter_id"] == stable_id("Encounter", "e-3")
    assert p3["CPT//99213"]["time"] == p3["ENCOUNTER_END//AMB"]["time"]
    assert p3["MEDS_BIRTH"]["time"] == at("2080-02-15 00:00:00")  # partial birth date: middle of the month
    # NDJSON of Bundles
    assert subject_rows(frame, "p-4").filter(pl.col("code") == "LOINC//718-7").height == 1
    # unknown coding systems are skipped in favour of the first known one
    assert subject_rows(frame, "p-2").filter(pl.col("code") == "ICD9CM//428.0").height == 1
    assert report.resource_types["Organization"].skipped == 1
    assert_reconciles(report)


def test_outputs_valid_against_meds_schemas(tmp_path):
    ingest_fhir([FIXTURES / "r4"], tmp_path / "out", workers=1)
    out = tmp_path / "out"
    for shard in (out / "data").glob("*.parquet"):
        meds.DataSchema.validate(pq.read_table(shard))
    meds.CodeMetadataSchema.validate(pq.read_table(out / schema.CODES_FILE))
    meds.SubjectSplitSchema.validate(pq.read_table(out / schema.SPLITS_FILE))
    meds.DatasetMetadataSchema.validate(orjson.loads((out / schema.DATASET_FILE).read_bytes()))
    assert (out / "ingest_report.json").exists() and (out / schema.SUBJECT_MAP_FILE).exists()


def test_subjects_whole_in_one_shard_and_sorted(tmp_path):
    cohort = small_cohort(tmp_path / "in")
    ingest_fhir([cohort], tmp_path / "out", workers=2, shard_mb=1, chunk_mb=1)
    seen: dict[int, str] = {}
    for shard in sorted((tmp_path / "out" / "data").glob("*.parquet")):
        frame = pl.read_parquet(shard)
        for sid in frame["subject_id"].unique():
            assert sid not in seen, "subject split across shards"
            seen[sid] = shard.name
        assert frame.equals(frame.sort(["subject_id", "time"], nulls_last=False, maintain_order=True))
        # static rows (null time) come first within each subject
        for _, part in frame.group_by("subject_id"):
            times = part["time"].to_list()
            assert times == sorted(times, key=lambda t: (t is not None, t))


def test_splits_cover_subjects_and_follow_ratios(tmp_path):
    resources = [patient(f"p{i}") for i in range(400)]
    write_ndjson(tmp_path / "in" / "Patient.ndjson", resources)
    report = ingest_fhir([tmp_path / "in"], tmp_path / "out", workers=1)
    splits = pl.read_parquet(tmp_path / "out" / schema.SPLITS_FILE)
    assert splits.height == 400 == report.subjects
    shares = dict(splits.group_by("split").len().iter_rows())
    assert 280 <= shares["train"] <= 360 and shares["tuning"] > 15 and shares["held_out"] > 15


# -- bad input: one fixture per kind, with its reason ---------------------------------------------------


BAD_CASES = {
    "malformed JSON": (b'{"resourceType": "Patient", "id": "x"', "<invalid>", "malformed JSON"),
    "truncated line": (b'{"resourceType":"Observation","id":"t1","status":"fin', "<invalid>", "malformed JSON"),
    "not an object": (b"[1, 2, 3]", "<invalid>", "not a JSON object"),
    "no resourceType": (orjson.dumps({"id": "x"}), "<invalid>", "no resourceType"),
    "missing patient": (orjson.dumps(lab("ol", "ghost", None, "2150-01-01T00:00:00Z")), "Observation",
                        "subject Patient not found or rejected"),
    "period ends before start": (orjson.dumps(encounter("bad", "a", "2150-02-01T00:00:00Z", "2150-01-01T00:00:00Z")),
                                 "Encounter", "period ends before it starts"),
    "bad date": (orjson.dumps(lab("od", "a", None, "2150-13-45")), "Observation", "Observation.effectiveDateTime: not a FHIR date"),
    "unknown code system": (orjson.dumps({**condition("cx", "a", "ea"), "code": {"coding": [{"system": "urn:x", "code": "1"}]}}),
                            "Condition", "Condition.code has no coding with a known system"),
    "missing medication": (orjson.dumps(med_request("rx", "a", "nope", "2150-01-02T00:00:00Z")), "MedicationRequest",
                           "medicationReference not found or rejected"),
    "condition without time or encounter": (orjson.dumps(condition("cz", "a", None)), "Condition",
                                            "Condition has no time of its own and no encounter to take it from"),
    "non-numeric quantity": (orjson.dumps(lab("oq", "a", None, "2150-01-01T00:00:00Z", value="high")), "Observation",
                             "Observation.valueQuantity.value is not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_input_is_quarantined_with_its_reason(tmp_path, case):
    line, rtype, reason = BAD_CASES[case]
    cohort = small_cohort(tmp_path / "in")
    bad = write_ndjson(tmp_path / "in" / "Extra.ndjson", [patient("z"), line])
    report = ingest_fhir([cohort], tmp_path / "out", workers=1)
    assert_reconciles(report)
    assert report.resource_types[rtype].rejected == 1
    (record,) = rejects(tmp_path / "out")
    assert record["file"] == str(bad.resolve()) and record["line"] == 2
    assert record["reason"].startswith(reason), record["reason"]
    assert record["resource"] is not None  # nothing is lost: the text is kept
    # the good resources are all there
    assert report.resource_types["Patient"].written == 3


def test_duplicate_ids(tmp_path):
    cohort = small_cohort(tmp_path / "in")
    write_ndjson(tmp_path / "in" / "Dupes.ndjson", [
        lab("o1", "a", None, "2150-01-02T01:00:00Z", 1.0),  # identical to the cohort's o1 except value
        medication("m1"),  # byte-identical to the cohort's Medication m1
    ])
    report = ingest_fhir([cohort], tmp_path / "out", workers=1)
    assert_reconciles(report)
    obs = report.resource_types["Observation"]
    assert obs.rejected == 2  # both differing copies quarantined, neither guessed
    assert report.resource_types["Medication"].skipped == 1
    reasons = {r["reason"] for r in rejects(tmp_path / "out")}
    assert reasons == {"duplicate id with different content: Observation/o1"}
    # the medication request still resolves through the kept copy
    assert events(tmp_path / "out").filter(pl.col("code") == "NDC//00338004904").height == 1


def test_rejected_patient_cascades_to_its_events(tmp_path):
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a"), {**patient("b"), "birthDate": "not-a-date"}])
    write_ndjson(folder / "Obs.ndjson", [lab("o1", "a", None, "2150-01-01T00:00:00Z"),
                                         lab("o2", "b", None, "2150-01-01T00:00:00Z")])
    report = ingest_fhir([folder], tmp_path / "out", workers=1)
    assert_reconciles(report)
    assert report.resource_types["Patient"].rejected == 1
    assert report.resource_types["Observation"].rejected == 1
    ids = {r["id"] for r in rejects(tmp_path / "out")}
    assert ids == {"b", "o2"}


def test_truncated_gzip_keeps_complete_lines(tmp_path):
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a")])
    payload = b"\n".join(orjson.dumps(lab(f"o{i}", "a", None, "2150-01-01T00:00:00Z")) for i in range(200)) + b"\n"
    blob = gzip.compress(payload)
    (folder / "Obs.ndjson.gz").write_bytes(blob[: len(blob) // 2])
    report = ingest_fhir([folder], tmp_path / "out", workers=1)
    assert_reconciles(report)
    assert any("truncated" in r["reason"] for r in rejects(tmp_path / "out"))
    assert 0 < report.resource_types["Observation"].written < 200


def test_strict_stops_at_first_problem_and_writes_nothing(tmp_path):
    cohort = small_cohort(tmp_path / "in")
    bad = write_ndjson(tmp_path / "in" / "Zbad.ndjson", [patient("z"), b"{oops", b"{again"])
    with pytest.raises(StrictModeError, match=rf"^{bad.resolve()}:2: malformed JSON"):
        ingest_fhir([cohort], tmp_path / "out", strict=True, workers=2)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary leftovers


def test_strict_catches_dangling_references_after_reading(tmp_path):
    cohort = small_cohort(tmp_path / "in")
    write_ndjson(tmp_path / "in" / "Zbad.ndjson", [lab("ox", "ghost", None, "2150-01-01T00:00:00Z")])
    with pytest.raises(StrictModeError, match="Zbad.ndjson:1: subject Patient not found"):
        ingest_fhir([cohort], tmp_path / "out", strict=True, workers=1)


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        ingest_fhir([tmp_path / "nope.ndjson"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .ndjson"):
        ingest_fhir([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(InputError, match="no file matches"):
        ingest_fhir([str(tmp_path / "*.ndjson")], tmp_path / "out")


def test_interrupted_run_keeps_previous_output(tmp_path, monkeypatch):
    cohort = small_cohort(tmp_path / "in")
    ingest_fhir([cohort], tmp_path / "out", workers=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "data").iterdir()}

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("odyssey.pipelines.ingest.resolve_and_write", boom)
    with pytest.raises(KeyboardInterrupt):
        ingest_fhir([cohort], tmp_path / "out", workers=1)
    after = {p.name: p.read_bytes() for p in (tmp_path / "out" / "data").iterdir()}
    assert before == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.parquet"))
    }


def test_rerun_is_byte_identical_whatever_the_worker_count(tmp_path, monkeypatch):
    cohort = small_cohort(tmp_path / "in")
    write_ndjson(tmp_path / "in" / "Bad.ndjson", [b"{nope", lab("q", "ghost", None, "2150-01-01T00:00:00Z")])
    ingest_fhir([cohort], tmp_path / "a", workers=1, chunk_mb=1)
    ingest_fhir([cohort], tmp_path / "b", workers=2, chunk_mb=1)
    ingest_fhir([cohort], tmp_path / "c", workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") == _digest(tmp_path / "c")
    # a big export: this process only coordinates, the helpers do all the work
    monkeypatch.setattr("odyssey.pipelines.ingest.CALLER_WORKS_UP_TO", 0)
    ingest_fhir([cohort], tmp_path / "d", workers=2, chunk_mb=1)
    assert _digest(tmp_path / "d") == _digest(tmp_path / "a")
    assert (tmp_path / "d" / "rejects" / "rejects.ndjson").read_bytes() == (
        tmp_path / "a" / "rejects" / "rejects.ndjson"
    ).read_bytes()
    assert (tmp_path / "a" / "rejects" / "rejects.ndjson").read_bytes() == (
        tmp_path / "b" / "rejects" / "rejects.ndjson"
    ).read_bytes()


def test_large_file_split_into_chunks_keeps_line_numbers(tmp_path):
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a")])
    lines: list = [lab(f"o{i}", "a", None, "2150-01-01T00:00:00Z", float(i)) for i in range(3000)]
    lines[2500] = b"{broken"
    write_ndjson(folder / "Obs.ndjson", lines)
    report = ingest_fhir([folder], tmp_path / "out", workers=2, chunk_mb=1)
    (record,) = rejects(tmp_path / "out")
    assert record["line"] == 2501
    assert report.resource_types["Observation"].written == 2999
    assert_reconciles(report)


def test_full_validation_rejects_what_structural_checks_accept(tmp_path):
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a")])
    write_ndjson(folder / "Obs.ndjson", [{**lab("o1", "a", None, "2150-01-01T00:00:00Z"), "status": 7}])
    off = ingest_fhir([folder], tmp_path / "off", validate="off", workers=1)
    full = ingest_fhir([folder], tmp_path / "full", validate="full", workers=1)
    assert off.resource_types["Observation"].written == 1
    assert full.resource_types["Observation"].rejected == 1
    (record,) = rejects(tmp_path / "full")
    assert record["reason"].startswith("fails FHIR R4B validation: status")


def test_extra_code_systems_from_user_config(tmp_path):
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a")])
    cond = {**condition("c", "a", None, onset="2150-01-01"), "code": {"coding": [{"system": "urn:local", "code": "Z1"}]}}
    write_ndjson(folder / "Cond.ndjson", [cond])
    systems = tmp_path / "systems.yaml"
    systems.write_text("systems:\n  urn:local: LOCAL\n")
    ingest_fhir([folder], tmp_path / "out", code_systems=str(systems), workers=1)
    assert "LOCAL//Z1" in events(tmp_path / "out")["code"].to_list()


def test_partial_dates_go_to_the_end_of_their_period(tmp_path):
    folder = tmp_path / "in"
    write_ndjson(folder / "Patient.ndjson", [patient("a", birth="2090")])
    write_ndjson(folder / "Cond.ndjson", [condition("c1", "a", None, onset="2150-03"),
                                          condition("c2", "a", None, code="E119", onset="2151")])
    ingest_fhir([folder], tmp_path / "out", workers=1)
    times = dict(events(tmp_path / "out").select("code", "time").iter_rows())
    assert times["ICD10CM//I509"] == at("2150-03-31 23:59:59.999999")
    assert times["ICD10CM//E119"] == at("2151-12-31 23:59:59.999999")
    assert times["MEDS_BIRTH"] == at("2090-07-02 00:00:00")


def test_folder_ignores_json_files_that_are_not_fhir(tmp_path):
    cohort = small_cohort(tmp_path / "in")
    (cohort / "export_report.json").write_text('{"patients": 2, "seconds": 1.5}')
    report = ingest_fhir([cohort], tmp_path / "out", workers=1)
    assert report.resources_rejected == 0
    assert not any("export_report" in name for name in report.inputs)


def test_worker_environment_sizes_thread_pools_and_keeps_the_users_values(monkeypatch):
    from odyssey.pipelines.ingest_pool import worker_environment

    monkeypatch.delenv("POLARS_MAX_THREADS", raising=False)
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    monkeypatch.delenv("_RJEM_MALLOC_CONF", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    with worker_environment(2):
        assert os.environ["POLARS_MAX_THREADS"] == "4"
        assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
        assert os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system"
        assert os.environ["_RJEM_MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # polars keeps its pages
    assert "POLARS_MAX_THREADS" not in os.environ and "ARROW_DEFAULT_MEMORY_POOL" not in os.environ
    assert "_RJEM_MALLOC_CONF" not in os.environ
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
    # what polars wrote when this process (or its parent) loaded it is not the user's: replaced, then restored
    monkeypatch.setenv("_RJEM_MALLOC_CONF", "dirty_decay_ms:500,muzzy_decay_ms:1000")
    with worker_environment(2):
        assert os.environ["_RJEM_MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert os.environ["_RJEM_MALLOC_CONF"] == "dirty_decay_ms:500,muzzy_decay_ms:1000"
    monkeypatch.setenv("_RJEM_MALLOC_CONF", "dirty_decay_ms:500,muzzy_decay_ms:1000,narenas:2")  # the user's
    with worker_environment(2):
        assert os.environ["_RJEM_MALLOC_CONF"] == "dirty_decay_ms:500,muzzy_decay_ms:1000,narenas:2"
