"""Small builders of FHIR R4 resources for ingestion tests (MIMIC-IV-on-FHIR style by default)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson

MIMIC = "http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-"
V3 = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def patient(pid: str, birth: str = "2090-01-01", gender: str = "female", deceased: str | None = None) -> dict:
    res = {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": birth}
    if deceased:
        res["deceasedDateTime"] = deceased
    return res


def encounter(eid: str, pid: str, start: str, end: str | None, klass: str = "IMP") -> dict:
    period = {"start": start} | ({"end": end} if end else {})
    return {"resourceType": "Encounter", "id": eid, "status": "finished", "class": {"system": V3, "code": klass},
            "subject": {"reference": f"Patient/{pid}"}, "period": period}


def condition(cid: str, pid: str, eid: str | None, code: str = "I509", onset: str | None = None) -> dict:
    res = {"resourceType": "Condition", "id": cid,
           "code": {"coding": [{"system": MIMIC + "diagnosis-icd10", "code": code}]},
           "subject": {"reference": f"Patient/{pid}"}}
    if eid:
        res["encounter"] = {"reference": f"Encounter/{eid}"}
    if onset:
        res["onsetDateTime"] = onset
    return res


def lab(oid: str, pid: str, eid: str | None, when: str, value: float = 1.0, item: str = "50912",
        issued: str | None = None) -> dict:
    res = {"resourceType": "Observation", "id": oid, "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "laboratory"}]}],
           "code": {"coding": [{"system": MIMIC + "d-labitems", "code": item}]},
           "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
           "valueQuantity": {"value": value, "unit": "mg/dL"}}
    if eid:
        res["encounter"] = {"reference": f"Encounter/{eid}"}
    if issued:
        res["issued"] = issued
    return res


def medication(mid: str, ndc: str = "00338004904") -> dict:
    return {"resourceType": "Medication", "id": mid, "code": {"coding": [{"system": MIMIC + "medication-ndc", "code": ndc}]}}


def med_request(rid: str, pid: str, mid: str, when: str) -> dict:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "completed", "intent": "order",
            "medicationReference": {"reference": f"Medication/{mid}"}, "subject": {"reference": f"Patient/{pid}"},
            "authoredOn": when}


def write_ndjson(path: Path, resources: list[dict | bytes | str]) -> Path:
    """One resource (or raw line) per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in resources:
        if isinstance(item, dict):
            lines.append(orjson.dumps(item))
        else:
            lines.append(item if isinstance(item, bytes) else item.encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def small_cohort(folder: Path) -> Path:
    """Two patients with encounters, labs, medications and conditions, in a bulk-export layout."""
    write_ndjson(folder / "MimicPatient.ndjson", [patient("a"), patient("b", gender="male", deceased="2150-06-01")])
    write_ndjson(folder / "MimicEncounter.ndjson", [
        encounter("ea", "a", "2150-01-01T00:00:00Z", "2150-01-05T00:00:00Z"),
        encounter("eb", "b", "2150-05-01T00:00:00Z", "2150-05-10T00:00:00Z"),
    ])
    write_ndjson(folder / "MimicCondition.ndjson", [condition("ca", "a", "ea"), condition("cb", "b", "eb", "N184")])
    write_ndjson(folder / "MimicMedication.ndjson", [medication("m1")])
    write_ndjson(folder / "MimicMedicationRequest.ndjson", [med_request("r1", "a", "m1", "2150-01-02T00:00:00Z")])
    write_ndjson(folder / "MimicObservationLabevents.ndjson", [
        lab(f"o{i}", "a" if i % 2 else "b", None, f"2150-0{1 + i % 5}-02T0{i % 10}:00:00Z", float(i)) for i in range(20)
    ])
    return folder


def dataset_digests(out: Path) -> dict[str, str]:
    """SHA-256 of every file an ingest run wrote, less the two that hold times and paths."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in ("ingest_report.json", "dataset.json")}
