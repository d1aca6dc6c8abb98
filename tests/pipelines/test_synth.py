"""Tests of `odyssey synth`: layouts, FHIR R4B validity, determinism, and truth that matches the FHIR it ships with."""

from __future__ import annotations

import gzip
import math
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from fhir.resources.R4B import get_fhir_model_class
from typer.testing import CliRunner

from odyssey.pipelines import synth_catalog as cat
from odyssey.pipelines.synth import (
    CHUNK_PATIENTS,
    LATENT_FILE,
    REPORT_FILE,
    TRUTH_FILE,
    synthesize,
    truth_schema,
)
from odyssey.pipelines.synth_model import simulate_patient

DAY = 86400.0
MIMIC_FILES = {f"{name}.ndjson" for name in cat.MIMIC_FILES.values()}
R4_FILES = {f"{rtype}.ndjson" for rtype in cat.RESOURCE_TYPES}


def read_ndjson(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [orjson.loads(line) for line in data.splitlines()]


def utc_seconds(text: str) -> float:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, f"{text} has no timezone offset"
    return moment.astimezone(UTC).timestamp()


def truth_seconds(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    synthesize(400, out, seed=11, format="mimic", workers=1)
    return out


@pytest.fixture(scope="module")
def parsed(cohort) -> dict:
    """The cohort read back from its MIMIC-style FHIR files, independently of the generator's objects."""
    by_type = {rtype: read_ndjson(cohort / f"{cat.MIMIC_FILES[rtype]}.ndjson") for rtype in cat.RESOURCE_TYPES}
    encounters = {e["id"]: e for e in by_type["Encounter"]}
    patient_encounters = defaultdict(list)
    for e in by_type["Encounter"]:
        patient_encounters[e["subject"]["reference"].removeprefix("Patient/")].append(e)
    dx_by_encounter = defaultdict(list)
    for c in by_type["Condition"]:
        dx_by_encounter[c["encounter"]["reference"].removeprefix("Encounter/")].append(c)
    return {"by_type": by_type, "encounters": encounters, "patient_encounters": patient_encounters,
            "dx_by_encounter": dx_by_encounter, "patients": {p["id"]: p for p in by_type["Patient"]}}


def groups_of_encounter(conditions: list[dict]) -> set[str]:
    groups = set()
    for c in conditions:
        coding = c["code"]["coding"][0]
        groups.update(cat.groups_of_code(coding["code"], coding["system"].endswith("icd10")))
    return groups


# ------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize(("fmt", "compress", "expected"), [
    ("mimic", False, MIMIC_FILES),
    ("r4", False, R4_FILES),
    ("r4", True, {f + ".gz" for f in R4_FILES}),
    ("bundles", False, {"bundles.ndjson"}),
])
def test_layout_and_report(tmp_path, fmt, compress, expected):
    out = tmp_path / "out"
    report = synthesize(20, out, seed=1, format=fmt, gzip=compress, workers=1)
    names = {p.name for p in out.iterdir()}
    assert names == expected | {TRUTH_FILE, LATENT_FILE, REPORT_FILE}
    assert sorted(names) == report.files
    saved = orjson.loads((out / REPORT_FILE).read_bytes())
    assert saved["patients"] == 20 and saved["format"] == fmt and saved["gzip"] == compress
    assert set(saved["resources"]) == set(cat.RESOURCE_TYPES)
    counted: dict[str, int] = defaultdict(int)
    for name in expected:
        for res in read_ndjson(out / name):
            if res["resourceType"] == "Bundle":
                assert res["type"] == "transaction"
                for entry in res["entry"]:
                    counted[entry["resource"]["resourceType"]] += 1
            else:
                counted[res["resourceType"]] += 1
    assert dict(counted) == saved["resources"]
    assert saved["resources_total"] == sum(counted.values())
    assert saved["seconds"] >= 0 and saved["admissions"] == pq.read_metadata(out / TRUTH_FILE).num_rows


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        synthesize(5, tmp_path / "x", format="csv")
    with pytest.raises(ValueError, match="at least 1"):
        synthesize(0, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------- validity
@pytest.mark.parametrize("fmt", ["mimic", "r4", "bundles"])
def test_resources_validate_with_r4b(tmp_path, fmt):
    synthesize(12, tmp_path / "out", seed=5, format=fmt, workers=1)
    seen: dict[str, int] = defaultdict(int)
    for path in sorted((tmp_path / "out").glob("*.ndjson")):
        for res in read_ndjson(path):
            resources = [e["resource"] for e in res["entry"]] if res["resourceType"] == "Bundle" else [res]
            if res["resourceType"] == "Bundle":
                get_fhir_model_class("Bundle").model_validate(res)
            for r in resources:
                if seen[r["resourceType"]] < 60:  # a sample of each type
                    get_fhir_model_class(r["resourceType"]).model_validate(r)
                    seen[r["resourceType"]] += 1
    assert set(seen) == set(cat.RESOURCE_TYPES)


def test_mimic_style_codes_and_fields(cohort, parsed):
    by_type = parsed["by_type"]
    for rtype, resources in by_type.items():
        assert all(r["meta"]["profile"] == [cat.MIMIC_PROFILES[rtype]] for r in resources)
    systems = {c["code"]["coding"][0]["system"] for c in by_type["Condition"]}
    assert systems == {cat.MIMIC_DIAGNOSIS_ICD9, cat.MIMIC_DIAGNOSIS_ICD10}  # both ICD eras occur
    assert all("." not in c["code"]["coding"][0]["code"] for c in by_type["Condition"])
    assert all("onsetDateTime" not in c and "recordedDate" not in c for c in by_type["Condition"])
    assert {c["category"][0]["coding"][0]["code"] for c in by_type["Condition"]} == {"encounter-diagnosis"}
    assert {p["code"]["coding"][0]["system"] for p in by_type["Procedure"]} == {
        cat.MIMIC_PROCEDURE_ICD9, cat.MIMIC_PROCEDURE_ICD10}
    assert {e["class"]["code"] for e in by_type["Encounter"]} == {"IMP", "EMER", "AMB"}
    for obs in by_type["Observation"][:2000]:
        assert obs["code"]["coding"][0]["system"] == cat.MIMIC_LABITEMS
        q = obs["valueQuantity"]
        assert q["system"] == cat.MIMIC_UNITS and q["unit"] == q["code"]
        assert utc_seconds(obs["issued"]) > utc_seconds(obs["effectiveDateTime"])
    med_ids = {m["id"] for m in by_type["Medication"]}
    assert {m["code"]["coding"][0]["system"] for m in by_type["Medication"]} == {cat.MIMIC_MEDICATION_NDC}
    requests = by_type["MedicationRequest"]
    with_reference = [r for r in requests if "medicationReference" in r]
    assert all(r["medicationReference"]["reference"].removeprefix("Medication/") in med_ids for r in with_reference)
    concept_share = 1 - len(with_reference) / len(requests)
    assert 0.07 < concept_share < 0.13
    deaths = [p for p in by_type["Patient"] if "deceasedDateTime" in p]
    assert deaths and all(p["deceasedDateTime"][-6:] in ("-05:00", "-04:00") for p in deaths)


def test_r4_style_codes(tmp_path):
    synthesize(40, tmp_path / "out", seed=2, format="r4", workers=1)
    conditions = read_ndjson(tmp_path / "out" / "Condition.ndjson")
    icd10 = [c["code"]["coding"][0]["code"] for c in conditions if c["code"]["coding"][0]["system"] == cat.ICD10CM]
    assert icd10 and any("." in code for code in icd10)
    assert all(code[3] == "." for code in icd10 if len(code) > 3)
    labs = read_ndjson(tmp_path / "out" / "Observation.ndjson")
    loinc = {lab.loinc for lab in cat.LABS.values()}
    assert all(o["code"]["coding"][0]["system"] == cat.LOINC and o["code"]["coding"][0]["code"] in loinc for o in labs)
    assert {o["valueQuantity"]["system"] for o in labs} == {cat.UCUM}
    procs = read_ndjson(tmp_path / "out" / "Procedure.ndjson")
    assert {p["code"]["coding"][0]["system"] for p in procs} <= {cat.ICD10PCS, cat.ICD9CM}


def test_bundle_references_resolve_inside_the_bundle(tmp_path):
    synthesize(15, tmp_path / "out", seed=4, format="bundles", workers=1)
    for bundle in read_ndjson(tmp_path / "out" / "bundles.ndjson"):
        urls = {e["fullUrl"] for e in bundle["entry"]}
        assert all(e["fullUrl"] == f"urn:uuid:{e['resource']['id']}" for e in bundle["entry"])
        assert all(e["request"] == {"method": "PUT", "url": f"{e['resource']['resourceType']}/{e['resource']['id']}"}
                   for e in bundle["entry"])
        patients = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
        assert len(patients) == 1
        refs = orjson.dumps(bundle).decode().split('"reference":"')[1:]
        for ref in refs:
            assert ref.split('"')[0] in urls


# ------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("compress", [False, True])
def test_same_seed_gives_identical_bytes(tmp_path, compress):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    n = 2 * CHUNK_PATIENTS + 5  # several chunks, so the two-process run really splits the work
    synthesize(n, a, seed=9, gzip=compress, workers=1)
    synthesize(n, b, seed=9, gzip=compress, workers=2)
    synthesize(n, c, seed=10, gzip=compress, workers=1)
    for path in sorted(a.iterdir()):
        if path.name == REPORT_FILE:
            continue
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    assert (a / TRUTH_FILE).read_bytes() != (c / TRUTH_FILE).read_bytes()


def test_same_cohort_across_formats(tmp_path):
    synthesize(10, tmp_path / "m", seed=3, format="mimic", workers=1)
    synthesize(10, tmp_path / "r", seed=3, format="r4", workers=1)
    ids_m = [p["id"] for p in read_ndjson(tmp_path / "m" / "MimicPatient.ndjson")]
    ids_r = [p["id"] for p in read_ndjson(tmp_path / "r" / "Patient.ndjson")]
    assert ids_m == ids_r
    assert (tmp_path / "m" / TRUTH_FILE).read_bytes() == (tmp_path / "r" / TRUTH_FILE).read_bytes()


# ------------------------------------------------------------------------------------------ truth
def test_truth_columns_and_ranges(cohort):
    truth = pq.read_table(cohort / TRUTH_FILE)
    assert truth.schema.equals(truth_schema())
    rows = truth.to_pylist()
    assert rows
    for row in rows:
        for name, value in row.items():
            if name.endswith("_probability") and value is not None:
                assert 0.0 <= value <= 1.0
        # an outcome is present exactly when its task is defined
        assert (row["mortality_30d"] is None) == (row["mortality_30d_probability"] is None)
        assert (row["readmission_30d"] is None) == (row["mortality_30d"] is None)
        assert (row["los_7d"] is None) == (row["los_7d_probability"] is None)


def test_truth_matches_the_fhir(cohort, parsed):
    """Realized outcomes recomputed from the FHIR files with the contract's task definitions."""
    truth = pq.read_table(cohort / TRUTH_FILE).to_pylist()
    encounters, patients = parsed["encounters"], parsed["patients"]
    inpatient = {
        pid: sorted((e for e in encs if e["class"]["code"] == "IMP"), key=lambda e: utc_seconds(e["period"]["start"]))
        for pid, encs in parsed["patient_encounters"].items()
    }
    assert len(truth) == sum(len(v) for v in inpatient.values())
    checked = defaultdict(int)
    for row in truth:
        enc = encounters[row["encounter_fhir_id"]]
        pid = row["patient_fhir_id"]
        start, end = utc_seconds(enc["period"]["start"]), utc_seconds(enc["period"]["end"])
        assert truth_seconds(row["admit_time"]) == start and truth_seconds(row["discharge_time"]) == end
        stays = inpatient[pid]
        position = [e["id"] for e in stays].index(enc["id"])
        nxt = stays[position + 1] if position + 1 < len(stays) else None
        death = patients[pid].get("deceasedDateTime")
        death_s = utc_seconds(death) if death else None
        died_here = enc["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "DIED"
        assert died_here == (death_s == end)
        # los_7d: excluded under 24 h, else discharge - admission >= 7 days
        if end - start < DAY:
            assert row["los_7d"] is None
        else:
            assert row["los_7d"] == (end - start >= 7 * DAY)
            checked["los"] += 1
        if died_here:
            assert row["mortality_30d"] is None and row["readmission_30d"] is None and nxt is None
            continue
        assert row["mortality_30d"] == (death_s is not None and end < death_s <= end + 30 * DAY)
        next_start = utc_seconds(nxt["period"]["start"]) if nxt else None
        assert row["readmission_30d"] == (next_start is not None and next_start - end <= 30 * DAY)
        if nxt is None:
            assert all(row[f"condition_{g}"] is None for g in cat.GROUPS)
        else:
            groups = groups_of_encounter(parsed["dx_by_encounter"][nxt["id"]])
            assert {g for g in cat.GROUPS if row[f"condition_{g}"]} == groups
            checked["conditions"] += 1
        checked["survivors"] += 1
    assert min(checked.values()) > 100


def test_no_care_after_death(parsed):
    for pid, encs in parsed["patient_encounters"].items():
        death = parsed["patients"][pid].get("deceasedDateTime")
        if death:
            assert max(utc_seconds(e["period"]["end"]) for e in encs) <= utc_seconds(death)
        ordered = sorted(encs, key=lambda e: utc_seconds(e["period"]["start"]))
        for a, b in zip(ordered, ordered[1:], strict=False):  # visits never overlap
            assert utc_seconds(a["period"]["end"]) <= utc_seconds(b["period"]["start"])


def test_events_fall_inside_their_encounter(parsed):
    encounters = parsed["encounters"]
    stamps = (("Procedure", "performedDateTime"), ("MedicationRequest", "authoredOn"),
              ("Observation", "effectiveDateTime"))
    for rtype, key in stamps:
        for res in parsed["by_type"][rtype]:
            enc = encounters[res["encounter"]["reference"].removeprefix("Encounter/")]
            when = utc_seconds(res[key])
            assert utc_seconds(enc["period"]["start"]) <= when <= utc_seconds(enc["period"]["end"]), (rtype, res["id"])
    for obs in parsed["by_type"]["Observation"]:
        enc = encounters[obs["encounter"]["reference"].removeprefix("Encounter/")]
        if enc["class"]["code"] == "IMP":
            assert utc_seconds(obs["issued"]) <= utc_seconds(enc["period"]["end"])


def test_outcomes_are_calibrated_to_the_truth_probabilities(cohort):
    """Outcomes are drawn from the written probabilities: prevalence matches the mean within 4 standard errors."""
    truth = pq.read_table(cohort / TRUTH_FILE).to_pylist()
    for name in ("mortality_30d", "los_7d", "readmission_30d", *(f"condition_{g}" for g in cat.GROUPS)):
        pairs = [(r[f"{name}_probability"], r[name]) for r in truth if r[name] is not None]
        expected = sum(p for p, _ in pairs)
        observed = sum(y for _, y in pairs)
        sd = math.sqrt(sum(p * (1 - p) for p, _ in pairs))
        assert abs(observed - expected) < 4 * sd + 1, name


def test_prevalences_in_target_ranges(cohort):
    summary = orjson.loads((cohort / REPORT_FILE).read_bytes())["tasks"]
    assert 0.04 <= summary["mortality_30d"]["prevalence"] <= 0.16
    assert 0.22 <= summary["los_7d"]["prevalence"] <= 0.42
    assert 0.09 <= summary["readmission_30d"]["prevalence"] <= 0.27
    for task in ("mortality_30d", "los_7d", "readmission_30d"):
        assert 0.7 <= summary[task]["oracle_auroc"] <= 0.97


# --------------------------------------------------------------------------------- planted signals
def test_long_range_marker_shifts_outcomes(cohort, parsed):
    """The amyloidosis code sits only on the first visit, years before admissions, and raises later risk."""
    latent = {r["patient_fhir_id"]: r for r in pq.read_table(cohort / LATENT_FILE).to_pylist()}
    marker_codes = {cat.AMYLOIDOSIS.icd10.replace(".", ""), cat.AMYLOIDOSIS.icd9.replace(".", "")}
    marked = set()
    for c in parsed["by_type"]["Condition"]:
        if c["code"]["coding"][0]["code"] in marker_codes:
            pid = c["subject"]["reference"].removeprefix("Patient/")
            enc = parsed["encounters"][c["encounter"]["reference"].removeprefix("Encounter/")]
            first = min(parsed["patient_encounters"][pid], key=lambda e: utc_seconds(e["period"]["start"]))
            assert enc["id"] == first["id"] and enc["class"]["code"] == "AMB"
            marked.add(pid)
    assert marked == {pid for pid, r in latent.items() if r["amyloidosis_marker"]}
    truth = pq.read_table(cohort / TRUTH_FILE).to_pylist()
    for pid in marked:
        first = min(utc_seconds(e["period"]["start"]) for e in parsed["patient_encounters"][pid])
        admits = [truth_seconds(r["admit_time"]) for r in truth if r["patient_fhir_id"] == pid]
        assert all(a - first > 300 * DAY for a in admits)

    with_marker = [r for r in truth if r["patient_fhir_id"] in marked]
    without = [r for r in truth if r["patient_fhir_id"] not in marked]
    for task, factor in (("mortality_30d", 2.0), ("readmission_30d", 1.5), ("los_7d", 1.3)):
        assert mean_of(with_marker, f"{task}_probability") > factor * mean_of(without, f"{task}_probability"), task


def mean_of(rows: list[dict], column: str) -> float:
    values = [r[column] for r in rows if r[column] is not None]
    return sum(values) / len(values)


def test_long_range_marker_shifts_realized_outcome_rates():
    """Realized rates, not only probabilities, differ by marker (1,200 simulated patients; z-test on proportions).

    Uses the simulator directly (no FHIR writing): test_truth_matches_the_fhir ties its truth to the files.
    """
    records = [simulate_patient(21, i) for i in range(1200)]
    for task in ("mortality_30d", "readmission_30d", "los_7d"):
        rows = [(rec.amyloidosis, getattr(row, task)) for rec in records for row in rec.truth
                if getattr(row, task) is not None]
        marked = [y for m, y in rows if m]
        other = [y for m, y in rows if not m]
        p1, p0 = sum(marked) / len(marked), sum(other) / len(other)
        pooled = (sum(marked) + sum(other)) / len(rows)
        z = (p1 - p0) / math.sqrt(pooled * (1 - pooled) * (1 / len(marked) + 1 / len(other)))
        assert z > 4, (task, p1, p0, len(marked))


def test_nothing_seen_at_the_los_prediction_time_reveals_the_drawn_stay():
    """Among stays eligible for the LOS task, a procedure is seen by admission + 24 h as often in long stays
    as in short ones (the oracle must stay an upper bound). 1,200 simulated patients; z-test on proportions."""
    seen = {True: [0, 0], False: [0, 0]}  # long stay -> [procedures seen by 24 h, procedures]
    for rec in (simulate_patient(23, i) for i in range(1200)):
        stays = {e.start: e for e in rec.encounters if e.cls == "IMP"}
        for row in rec.truth:
            if row.los_7d is None:
                continue
            for _, _, when in stays[row.admit_time].procedures:
                seen[row.los_7d][0] += when < row.admit_time + 86_400
                seen[row.los_7d][1] += 1
    (k1, n1), (k0, n0) = seen[True], seen[False]
    pooled = (k1 + k0) / (n1 + n0)
    z = (k1 / n1 - k0 / n0) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    assert min(n1, n0) > 200 and abs(z) < 3.5, (k1, n1, k0, n0, z)


def test_a_few_percent_of_histories_exceed_16k_tokens(cohort, parsed):
    """Rough token count from the FHIR: one per resource plus five per visit."""
    tokens = defaultdict(int)
    for rtype in ("Condition", "Procedure", "MedicationRequest", "Observation"):
        for res in parsed["by_type"][rtype]:
            tokens[res["subject"]["reference"]] += 1
    for enc in parsed["by_type"]["Encounter"]:
        tokens[enc["subject"]["reference"]] += 5
    long_share = sum(n > 16_000 for n in tokens.values()) / len(parsed["patients"])
    assert 0.01 <= long_share <= 0.06


def test_a_tenth_of_admissions_have_their_markers_2k_to_16k_tokens_back(cohort, parsed):
    """The medium-history group: the baseline visit (where the markers are) lies beyond a 2k context, inside 16k."""
    events_per_encounter = defaultdict(int)
    for rtype in ("Condition", "Procedure", "MedicationRequest", "Observation"):
        for res in parsed["by_type"][rtype]:
            events_per_encounter[res["encounter"]["reference"].removeprefix("Encounter/")] += 1
    latent = pq.read_table(cohort / "latent.parquet").to_pylist()
    medium = {row["patient_fhir_id"] for row in latent if row["medium_history"]}
    band, admissions = defaultdict(list), 0
    for patient, encounters in parsed["patient_encounters"].items():
        encounters = sorted(encounters, key=lambda e: utc_seconds(e["period"]["start"]))
        tokens_before, pid = 0, patient.removeprefix("Patient/")
        for enc in encounters:
            if enc["class"]["code"] == "IMP":
                admissions += 1
                band[pid in medium].append(2_048 < tokens_before <= 16_384)
            tokens_before += 5 + events_per_encounter[enc["id"]]
    assert 0.05 <= len(medium) / len(latent) <= 0.16
    assert all(band[True]), "every admission of the medium group has its markers 2k-16k tokens back"
    assert len(band[True]) / admissions >= 0.06


def test_cli_writes_cohort_and_report(tmp_path):
    from odyssey.cli import app

    result = CliRunner().invoke(app, ["synth", "--patients", "8", "--seed", "3", "--out", str(tmp_path / "c"),
                                      "--format", "r4", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "8 patients" in result.output
    assert orjson.loads((tmp_path / "c" / REPORT_FILE).read_bytes())["patients"] == 8
    bad = CliRunner().invoke(app, ["synth", "--patients", "8", "--out", str(tmp_path / "d"), "--format", "xml"])
    assert bad.exit_code == 2 and "unknown format" in bad.output


def test_catalogue_groups_follow_the_contract():
    assert cat.groups_of_code("I50.9", True) == ["heart_failure"]
    assert cat.groups_of_code("4280", False) == ["heart_failure"]
    assert cat.groups_of_code("99592", False) == ["sepsis"]
    assert cat.groups_of_code("J13", True) == ["pneumonia"]
    assert cat.groups_of_code("N17.9", True) == []
    assert cat.groups_of_code("E85.4", True) == []
