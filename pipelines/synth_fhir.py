"""Render simulated patients as FHIR R4 resources in three layouts: MIMIC-IV-on-FHIR, plain R4, Bundles.

- `mimic`: MIMIC code systems (new `http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-*` URIs), ICD codes
  without dots, `meta.profile` set, references `Type/id`.
- `r4`: standard URIs (ICD-10-CM / ICD-9-CM with dots, ICD-10-PCS, NDC, LOINC, UCUM), references `Type/id`.
- `bundles`: the `r4` resources, one transaction Bundle per patient; every entry has fullUrl
  `urn:uuid:<id>` and a `PUT Type/id` request, and references inside a Bundle are those `urn:uuid:` URLs.
  Each Bundle carries the Medication resources its requests reference (PUT, so loading is idempotent).
Times carry the US Eastern offset of their date (-05:00, or -04:00 from April to October).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson

from odyssey.pipelines import synth_catalog as cat
from odyssey.pipelines.synth_model import DAY, HOUR, PatientRecord

FORMATS = ("mimic", "r4", "bundles")


def _uuid_from(text: str) -> str:
    h = hashlib.sha256(text.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


MEDICATION_IDS = {key: _uuid_from(f"odyssey-synth-medication:{drug.ndc}") for key, drug in cat.DRUGS.items()}


_DAYS: dict[int, tuple[str, bool, str]] = {}  # EST day number -> (its date, summer time?, next date)


def _day(day: int) -> tuple[str, bool, str]:
    g = time.gmtime(day * DAY)
    n = time.gmtime((day + 1) * DAY)
    if len(_DAYS) > 1 << 20:
        _DAYS.clear()
    info = _DAYS[day] = (f"{g.tm_year:04d}-{g.tm_mon:02d}-{g.tm_mday:02d}", 4 <= g.tm_mon <= 10,
                         f"{n.tm_year:04d}-{n.tm_mon:02d}-{n.tm_mday:02d}")
    return info


def format_time(ts: int) -> str:
    """UTC epoch seconds -> local dateTime with the Eastern offset of that date (-04:00 April to October)."""
    day, rest = divmod(ts - 5 * HOUR, DAY)  # Eastern standard time
    info = _DAYS.get(day) or _day(day)
    if info[1]:  # summer time is one hour ahead of standard time
        rest += HOUR
        date = info[2] if rest >= DAY else info[0]
        rest %= DAY
        suffix = "-04:00"
    else:
        date = info[0]
        suffix = "-05:00"
    hour, rest = divmod(rest, HOUR)
    minute, second = divmod(rest, 60)
    return f"{date}T{hour:02d}:{minute:02d}:{second:02d}{suffix}"


def format_date(ts: int) -> str:
    g = time.gmtime(ts - 5 * HOUR)
    return f"{g.tm_year:04d}-{g.tm_mon:02d}-{g.tm_mday:02d}"


class FhirRenderer:
    """Turns PatientRecords into serialized resources (bytes, one JSON object each) per resource type."""

    def __init__(self, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.mimic = fmt == "mimic"
        self.urn_refs = fmt == "bundles"
        mimic = self.mimic
        self.meta = {t: {"profile": [p]} for t, p in cat.MIMIC_PROFILES.items()} if mimic else {}
        self.encounter_class = {
            code: {"system": cat.ACT_CODE, "code": code, "display": display}
            for code, display in cat.ENCOUNTER_CLASSES.items()
        }
        self.condition_category = [
            {"coding": [{"system": cat.CONDITION_CATEGORY, "code": "encounter-diagnosis",
                         "display": "Encounter Diagnosis"}]}
        ]
        self.lab_category = [
            {"coding": [{"system": cat.OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}
        ]
        if mimic:
            self.disposition = {
                name: {"coding": [{"system": cat.MIMIC_DISCHARGE_DISPOSITION, "code": name}]}
                for name in cat.DISPOSITIONS
            }
            self.service = {
                code: {"coding": [{"system": cat.MIMIC_SERVICES, "code": code, "display": text}]}
                for code, text in cat.SERVICES.items()
            }
        else:
            self.disposition = {
                name: {"coding": [{"system": cat.DISCHARGE_DISPOSITION, "code": code}], "text": name}
                for name, code in cat.DISPOSITIONS.items()
            }
            self.service = {code: {"text": text} for code, text in cat.SERVICES.items()}
        self.lab_code = []
        self.lab_unit = []
        self.lab_range = []
        for lab in cat.LABS.values():
            if mimic:
                coding = {"system": cat.MIMIC_LABITEMS, "code": lab.itemid, "display": lab.name}
                unit = {"unit": lab.unit, "system": cat.MIMIC_UNITS, "code": lab.unit}
            else:
                coding = {"system": cat.LOINC, "code": lab.loinc, "display": lab.name}
                unit = {"unit": lab.unit, "system": cat.UCUM, "code": lab.ucum}
            self.lab_code.append({"coding": [coding]})
            self.lab_unit.append(unit)
            self.lab_range.append([{"low": {"value": lab.low, "unit": lab.unit}, "high": {"value": lab.high, "unit": lab.unit}}])
        self.lab_decimals = [lab.decimals for lab in cat.LABS.values()]
        ndc_system = cat.MIMIC_MEDICATION_NDC if mimic else cat.NDC
        self.drug_code = {
            key: {"coding": [{"system": ndc_system, "code": d.ndc, "display": d.name}], "text": d.name}
            for key, d in cat.DRUGS.items()
        }
        self.drug_dosage = {
            key: [{"route": {"text": d.route}, "doseAndRate": [{"doseQuantity": {"value": d.dose, "unit": d.dose_unit}}]}]
            for key, d in cat.DRUGS.items()
        }
        self._dx_cache: dict[tuple[str, bool], dict] = {}
        self._proc_cache: dict[tuple[str, bool], dict] = {}

    # ------------------------------------------------------------------------------ helpers
    def ref(self, rtype: str, rid: str) -> dict:
        return {"reference": f"urn:uuid:{rid}" if self.urn_refs else f"{rtype}/{rid}"}

    @staticmethod
    def t(ts: int) -> str:
        return format_time(ts)

    def dx_code(self, dx: cat.Dx, icd10: bool) -> dict:
        key = (dx.icd10, icd10)
        out = self._dx_cache.get(key)
        if out is None:
            code = dx.icd10 if icd10 else dx.icd9
            if self.mimic:
                system = cat.MIMIC_DIAGNOSIS_ICD10 if icd10 else cat.MIMIC_DIAGNOSIS_ICD9
                code = code.replace(".", "")
            else:
                system = cat.ICD10CM if icd10 else cat.ICD9CM
            out = self._dx_cache[key] = {"coding": [{"system": system, "code": code, "display": dx.display}]}
        return out

    def proc_code(self, key: str, icd10: bool) -> dict:
        out = self._proc_cache.get((key, icd10))
        if out is None:
            proc = cat.PROCEDURES[key]
            if icd10:
                system = cat.MIMIC_PROCEDURE_ICD10 if self.mimic else cat.ICD10PCS
                code = proc.icd10pcs
            else:
                system = cat.MIMIC_PROCEDURE_ICD9 if self.mimic else cat.ICD9CM
                code = proc.icd9.replace(".", "") if self.mimic else proc.icd9
            out = self._proc_cache[(key, icd10)] = {
                "coding": [{"system": system, "code": code, "display": proc.display}]
            }
        return out

    def _with_meta(self, rtype: str, rid: str) -> dict[str, Any]:
        res: dict[str, Any] = {"resourceType": rtype, "id": rid}
        if self.mimic:
            res["meta"] = self.meta[rtype]
        return res

    # ----------------------------------------------------------------------------- resources
    def medication(self, key: str) -> dict:
        res = self._with_meta("Medication", MEDICATION_IDS[key])
        res["code"] = self.drug_code[key]
        res["status"] = "active"
        return res

    def _init_templates(self) -> None:
        """Pre-serialized JSON pieces for the high-volume types (Encounter, Condition, Observation).

        Those resources are assembled from these pieces instead of dicts + orjson (2-3x faster); the
        pieces come from orjson, so the output is the same JSON the dict path would write.
        """
        j = _json
        meta = {t: f'"meta":{j(m)},' for t, m in self.meta.items()} if self.mimic else {}
        self.enc_head = {
            cls: '{"resourceType":"Encounter","id":"%s",' + meta.get("Encounter", "")
            + f'"status":"finished","class":{j(coding)},'
            for cls, coding in self.encounter_class.items()
        }
        self.enc_service = {k: f',"serviceType":{j(v)}' for k, v in self.service.items()}
        self.enc_disposition = {
            k: f',"hospitalization":{{"dischargeDisposition":{j(v)}}}' for k, v in self.disposition.items()
        }
        self.cond_head = ('{"resourceType":"Condition","id":"%s",' + meta.get("Condition", "")
                          + f'"category":{j(self.condition_category)},"code":')
        self.obs_head = '{"resourceType":"Observation","id":"%s",' + meta.get("Observation", "")
        self.obs_code = [f'"status":"final","category":{j(self.lab_category)},"code":{j(code)},'
                         for code in self.lab_code]
        self.obs_tail = [
            "," + j(unit)[1:] + f',"referenceRange":{j(rng)}}}'  # close valueQuantity, then the resource
            for unit, rng in zip(self.lab_unit, self.lab_range, strict=True)
        ]

    def patient_lines(self, rec: PatientRecord) -> dict[str, list[tuple[str, bytes]]]:
        """All resources of one patient as (id, serialized JSON), grouped by type, in a stable order."""
        if not hasattr(self, "enc_head"):
            self._init_templates()
        dumps = orjson.dumps
        t = format_time
        mimic = self.mimic
        pid = rec.id
        subject = self.ref("Patient", pid)
        subject_json = _json(subject)
        patient = self._with_meta("Patient", pid)
        patient["identifier"] = [
            {"system": cat.MIMIC_PATIENT_IDENTIFIER if mimic else cat.SYNTH_IDENTIFIER,
             "value": str(10_000_000 + rec.index)}
        ]
        patient["gender"] = "female" if rec.female else "male"
        patient["birthDate"] = format_date(rec.birth)
        if rec.death is not None:
            patient["deceasedDateTime"] = t(rec.death)
        encounters: list[tuple[str, bytes]] = []
        conditions: list[tuple[str, bytes]] = []
        procedures: list[tuple[str, bytes]] = []
        requests: list[tuple[str, bytes]] = []
        labs: list[tuple[str, bytes]] = []
        used_drugs: set[str] = set()
        obs_head, obs_code, obs_tail, decimals = self.obs_head, self.obs_code, self.obs_tail, self.lab_decimals
        for enc in rec.encounters:
            text = (self.enc_head[enc.cls] % enc.id
                    + f'"subject":{subject_json},"period":{{"start":"{t(enc.start)}","end":"{t(enc.end)}"}}')
            if enc.service is not None:
                text += self.enc_service[enc.service]
            if enc.disposition is not None:
                text += self.enc_disposition[enc.disposition]
            encounters.append((enc.id, (text + "}").encode()))
            enc_ref = self.ref("Encounter", enc.id)
            links = f'"subject":{subject_json},"encounter":{_json(enc_ref)}'
            icd10 = enc.icd10
            for rid, dx in enc.diagnoses:
                text = self.cond_head % rid + _json(self.dx_code(dx, icd10)) + "," + links + "}"
                conditions.append((rid, text.encode()))
            for rid, key, when in enc.procedures:
                p = self._with_meta("Procedure", rid)
                p["status"] = "completed"
                p["code"] = self.proc_code(key, icd10)
                p["subject"] = subject
                p["encounter"] = enc_ref
                p["performedDateTime"] = t(when)
                procedures.append((rid, dumps(p)))
            for rid, key, start, end, as_concept in enc.medications:
                m = self._with_meta("MedicationRequest", rid)
                m["status"] = "completed"
                m["intent"] = "order"
                if as_concept:
                    m["medicationCodeableConcept"] = self.drug_code[key]
                else:
                    m["medicationReference"] = self.ref("Medication", MEDICATION_IDS[key])
                    used_drugs.add(key)
                m["subject"] = subject
                m["encounter"] = enc_ref
                m["authoredOn"] = t(start)
                m["dosageInstruction"] = self.drug_dosage[key]
                m["dispenseRequest"] = {"validityPeriod": {"start": t(start), "end": t(end)}}
                requests.append((rid, dumps(m)))
            for rid, li, when, issued, value in enc.labs:
                number = dumps(int(value) if decimals[li] == 0 else value).decode()
                text = (f'{obs_head % rid}{obs_code[li]}{links},"effectiveDateTime":"{t(when)}",'
                        f'"issued":"{t(issued)}","valueQuantity":{{"value":{number}{obs_tail[li]}')
                labs.append((rid, text.encode()))
        out = {
            "Patient": [(pid, dumps(patient))],
            "Encounter": encounters,
            "Condition": conditions,
            "Procedure": procedures,
            "MedicationRequest": requests,
            "Observation": labs,
        }
        if self.urn_refs:
            out["Medication"] = [(MEDICATION_IDS[key], dumps(self.medication(key)))
                                 for key in cat.DRUG_KEYS if key in used_drugs]
        return out

    def patient_resources(self, rec: PatientRecord) -> dict[str, list[dict]]:
        """All resources of one patient as dicts (parsed back from `patient_lines`)."""
        return {rtype: [orjson.loads(data) for _, data in items] for rtype, items in self.patient_lines(rec).items()}

    def bundle(self, rec: PatientRecord, lines: dict[str, list[tuple[str, bytes]]]) -> bytes:
        entries = []
        for rtype in cat.RESOURCE_TYPES:
            for rid, data in lines.get(rtype, ()):
                entries.append({
                    "fullUrl": f"urn:uuid:{rid}",
                    "resource": orjson.Fragment(data),
                    "request": {"method": "PUT", "url": f"{rtype}/{rid}"},
                })
        return orjson.dumps({"resourceType": "Bundle", "id": _uuid_from(f"odyssey-synth-bundle:{rec.id}"),
                             "type": "transaction", "entry": entries})

    def serialize_patient(self, rec: PatientRecord) -> tuple[dict[str, bytes], dict[str, int]]:
        """NDJSON bytes per output stream (resource type, or "Bundle") and resource counts per type."""
        lines = self.patient_lines(rec)
        counts = {rtype: len(items) for rtype, items in lines.items()}
        if self.urn_refs:
            return {"Bundle": self.bundle(rec, lines) + b"\n"}, counts
        return {
            rtype: b"\n".join(data for _, data in items) + b"\n" for rtype, items in lines.items() if items
        }, counts


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()
