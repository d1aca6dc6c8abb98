"""One FHIR R4 resource (a parsed dict) -> MEDS rows and lookup entries.

Flattening is per resource and all-or-nothing: a resource either yields all its rows or raises
`Rejected` with a reason, so no half of a resource ever reaches the dataset. Times stay strings here
and are parsed a whole chunk at a time (fhir_times); a resource with a bad time is rejected then.
References that point to other resources (the Patient, a Medication, an Encounter's end time) are
carried as keys and resolved later, when every file has been read. This is the hot loop of ingestion:
it favours plain dict lookups and fast paths over helper calls.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa

from odyssey.pipelines import schema
from odyssey.pipelines.schema import EventType

EVENT_RESOURCE_TYPES = (
    "Patient",
    "Encounter",
    "Condition",
    "Procedure",
    "MedicationRequest",
    "MedicationAdministration",
    "MedicationDispense",
    "Observation",
)
LOOKUP_RESOURCE_TYPES = ("Medication",)
SUPPORTED_RESOURCE_TYPES = frozenset(EVENT_RESOURCE_TYPES + LOOKUP_RESOURCE_TYPES)

# Observation.category codes -> event type; anything else is a generic observation.
OBSERVATION_CATEGORIES = {"laboratory": EventType.LAB, "vital-signs": EventType.VITAL}


class Rejected(Exception):
    """The resource cannot become MEDS rows; the message is the reason written to rejects/."""


_TYPE_HASHERS: dict[str, object] = {}  # resource type -> BLAKE2b state after "Type/" (copying it is cheaper)


def stable_id(resource_type: str, fhir_id: str) -> int:
    """A 63-bit id that depends only on the resource's type and FHIR id (same on every run):
    BLAKE2b-64 of `Type/id`, little-endian, shifted right by one bit."""
    prefix = _TYPE_HASHERS.get(resource_type)
    if prefix is None:
        prefix = _TYPE_HASHERS[resource_type] = hashlib.blake2b(f"{resource_type}/".encode(), digest_size=8)
    hasher = prefix.copy()
    hasher.update(fhir_id.encode())
    return int.from_bytes(hasher.digest(), "little") >> 1


# A MEDS row before resolution, as the tuples the Flattener appends (field order = tuple order).
# An Encounter is ONE row until its shard is written (half the rows to convert, spill and join): its
# ENCOUNTER_START row carries the period's end in `issued` and the discharge disposition in `text_value`,
# and becomes the ENCOUNTER_START and ENCOUNTER_END rows in ingest_resolve.
ROW_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.string()),  # the raw FHIR string
        ("time_field", pa.string()),  # where `time` came from, for messages (e.g. "Observation.effectiveDateTime")
        ("birth", pa.bool_()),  # True: a birth date (placed mid-period)
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
        ("text_value", pa.large_string()),
        ("encounter_id", pa.int64()),
        ("unit", pa.string()),
        ("comparator", pa.string()),
        ("event_type", pa.string()),
        ("issued", pa.string()),  # the raw FHIR string (an Encounter's: its period.end)
        ("medication_key", pa.string()),  # "Medication/<id>" still to resolve into `code`, else None
        ("time_from_encounter", pa.bool_()),  # True: `time` is the encounter's end, filled in at resolution
        ("resource_type", pa.string()),
        ("line", pa.int64()),
        ("entry", pa.int32()),
    ]
)


@dataclass
class Context:
    """What flattening needs besides the resource: known code systems and per-worker caches."""

    systems: dict[str, str]
    descriptions: dict[str, str] = field(default_factory=dict)  # code -> first display seen
    id_cache: dict[tuple[str, str], int] = field(default_factory=dict)
    bundle_urls: dict[str, tuple[str, str]] | None = None  # fullUrl -> (type, id) inside one Bundle
    code_cache: dict[tuple[str, str], str] = field(default_factory=dict)  # first coding -> its event code

    def stable_id(self, resource_type: str, fhir_id: str) -> int:
        key = (resource_type, fhir_id)
        value = self.id_cache.get(key)
        if value is None:
            if len(self.id_cache) > 1_000_000:
                self.id_cache.clear()
            value = self.id_cache[key] = stable_id(resource_type, fhir_id)
        return value

    def resolve_reference(self, ref: object, expected: str, what: str) -> str:
        """The FHIR id behind `{"reference": ...}` to a resource of type `expected`."""
        if not isinstance(ref, dict) or not isinstance(ref.get("reference"), str):
            raise Rejected(f"{what} has no literal reference")
        text = ref["reference"]
        if text.startswith("urn:uuid:") or text.startswith("urn:oid:"):
            target = self.bundle_urls.get(text) if self.bundle_urls else None
            if target is None:
                raise Rejected(f"{what} matches no entry of its Bundle: {text}")
            rtype, rid = target
        else:
            parts = text.split("/_history/")[0].rstrip("/").split("/")
            if len(parts) < 2:
                raise Rejected(f"{what} is not of the form Type/id: {text!r}")
            rtype, rid = parts[-2], parts[-1]
        if rtype != expected:
            raise Rejected(f"{what} does not point to a {expected}: {text}")
        if not rid:
            raise Rejected(f"{what} has an empty id: {text!r}")
        return rid

    def code_of(self, concept: object, what: str) -> str:
        """`VOCAB//code` of the first coding whose system is known; records its display."""
        try:  # fast path: a first coding seen before
            first = concept["coding"][0]
            return self.code_cache[(first["system"], first["code"])]
        except (KeyError, TypeError, IndexError):
            pass
        codings = concept.get("coding") if isinstance(concept, dict) else None
        if not isinstance(codings, list) or not codings:
            raise Rejected(f"{what} has no coding")
        systems = []
        for coding in codings:
            if not isinstance(coding, dict):
                continue
            system = coding.get("system")
            vocab = self.systems.get(system) if isinstance(system, str) else None
            value = coding.get("code")
            if vocab is not None and isinstance(value, str) and value:
                code = f"{vocab}{schema.CODE_SEPARATOR}{value}"
                if code not in self.descriptions:
                    display = coding.get("display") or concept.get("text")
                    if isinstance(display, str) and display:
                        self.descriptions[code] = display
                if coding is codings[0] and len(self.code_cache) < 1_000_000:
                    self.code_cache[(system, value)] = code
                return code
            systems.append(str(system))
        raise Rejected(f"{what} has no coding with a known system: {', '.join(systems)}")


_TIME_FIELDS = {
    "Condition": ("onsetDateTime", "onsetPeriod"),
    "Procedure": ("performedDateTime", "performedPeriod", "occurrenceDateTime", "occurrencePeriod"),
    "MedicationRequest": ("authoredOn",),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod", "occurenceDateTime"),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "Observation": ("effectiveDateTime", "effectivePeriod", "effectiveInstant"),
}


def _first_time(resource: dict, rtype: str) -> tuple[str | None, str | None]:
    """(raw time string, element name) of the first present time element; `xPeriod` gives its start."""
    for name in _TIME_FIELDS[rtype]:
        value = resource.get(name)
        if value is None:
            continue
        if name[-6:] == "Period":
            if not isinstance(value, dict) or not isinstance(value.get("start"), str):
                raise Rejected(f"{rtype}.{name} has no start")
            return value["start"], f"{rtype}.{name}.start"
        if not isinstance(value, str):
            raise Rejected(f"{rtype}.{name} is not a string")
        return value, f"{rtype}.{name}"
    return None, None


class Flattener:
    """Turns resources into rows; one instance per worker chunk."""

    def __init__(self, context: Context):
        self.ctx = context
        self.rows: list[tuple] = []
        self.patients: list[tuple[int, str, int, int]] = []  # subject_id, fhir id, line, entry
        self.medications: list[tuple[str, str, int, int]] = []  # "Medication/id", code, line, entry
        self._patient_refs: dict[str, int] = {}  # "Patient/id" -> subject_id
        self._encounter_refs: dict[str, int] = {}  # "Encounter/id" -> encounter_id
        self._dispatch = {
            "Patient": self._patient,
            "Encounter": self._encounter,
            "Condition": self._condition,
            "Procedure": self._procedure,
            "MedicationRequest": self._medication_use,
            "MedicationAdministration": self._medication_use,
            "MedicationDispense": self._medication_use,
            "Observation": self._observation,
            "Medication": self._medication,
        }

    def flatten(self, resource: dict, line: int, entry: int) -> None:
        """Append the resource's rows; raises Rejected (nothing appended) or KeyError (unsupported)."""
        handler = self._dispatch[resource["resourceType"]]
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            raise Rejected("resource has no id")
        handler(resource, rid, line, entry)

    # -- references ----------------------------------------------------------------------------------

    def _subject(self, resource: dict) -> int:
        try:  # fast path: a plain `Patient/id` reference seen before
            return self._patient_refs[resource["subject"]["reference"]]
        except (KeyError, TypeError):
            pass
        ref = resource.get("subject") or resource.get("patient")
        if ref is None:
            raise Rejected("no subject (Patient) reference")
        text = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(text, str) and text[:8] == "Patient/" and "/" not in text[8:] and len(text) > 8:
            return self._remember_patient(text)
        return self.ctx.stable_id("Patient", self.ctx.resolve_reference(ref, "Patient", "subject"))

    def _encounter_id(self, resource: dict) -> int | None:
        try:  # fast path: a plain `Encounter/id` reference seen before
            return self._encounter_refs[resource["encounter"]["reference"]]
        except (KeyError, TypeError):
            pass
        ref = resource.get("encounter") or resource.get("context")
        if ref is None:
            return None
        text = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(text, str) and text[:10] == "Encounter/" and "/" not in text[10:] and len(text) > 10:
            return self._remember_encounter(text)
        return self.ctx.stable_id("Encounter", self.ctx.resolve_reference(ref, "Encounter", "encounter"))

    def _remember_patient(self, text: str) -> int:
        """subject_id of a plain `Patient/id` reference, cached by its text."""
        sid = self.ctx.stable_id("Patient", text[8:])
        if len(self._patient_refs) < 1_000_000:
            self._patient_refs[text] = sid
        return sid

    def _remember_encounter(self, text: str) -> int:
        """encounter_id of a plain `Encounter/id` reference, cached by its text."""
        eid = self.ctx.stable_id("Encounter", text[10:])
        if len(self._encounter_refs) < 1_000_000:
            self._encounter_refs[text] = eid
        return eid

    # -- resource types ------------------------------------------------------------------------------

    def _patient(self, r: dict, rid: str, line: int, entry: int) -> None:
        sid = self.ctx.stable_id("Patient", rid)
        rows = self.rows
        birth = r.get("birthDate")
        deceased = r.get("deceasedDateTime")
        gender = r.get("gender")
        if birth is not None and not isinstance(birth, str):
            raise Rejected("Patient.birthDate is not a string")
        if deceased is not None and not isinstance(deceased, str):
            raise Rejected("Patient.deceasedDateTime is not a string")
        if gender is not None and (not isinstance(gender, str) or not gender):
            raise Rejected("Patient.gender is not a code")
        if birth is not None:
            rows.append((sid, birth, "Patient.birthDate", True, schema.BIRTH_CODE, None, None, None, None, None,
                         EventType.BIRTH, None, None, False, "Patient", line, entry))
        if deceased is not None:
            rows.append((sid, deceased, "Patient.deceasedDateTime", False, schema.DEATH_CODE, None, None, None, None,
                         None, EventType.DEATH, None, None, False, "Patient", line, entry))
        if gender is not None:
            rows.append((sid, None, None, False, f"{schema.GENDER_PREFIX}{schema.CODE_SEPARATOR}{gender}", None, None,
                         None, None, None, EventType.DEMOGRAPHIC, None, None, False, "Patient", line, entry))
        self.patients.append((sid, rid, line, entry))

    def _encounter(self, r: dict, rid: str, line: int, entry: int) -> None:
        sid = self._subject(r)
        eid = self.ctx.stable_id("Encounter", rid)
        period = r.get("period")
        start = period.get("start") if isinstance(period, dict) else None
        if not isinstance(start, str):
            raise Rejected("Encounter has no period.start")
        end = period.get("end")
        if end is not None and not isinstance(end, str):
            raise Rejected("Encounter.period.end is not a string")
        klass = r.get("class")
        if isinstance(klass, list):  # R5 shape: a list of CodeableConcepts
            klass = (klass[0].get("coding") or [{}])[0] if klass and isinstance(klass[0], dict) else None
        class_code = klass.get("code") if isinstance(klass, dict) else None
        if not isinstance(class_code, str) or not class_code:
            raise Rejected("Encounter has no class code")
        disposition = None
        hosp = r.get("hospitalization") or r.get("admission")
        if isinstance(hosp, dict) and isinstance(hosp.get("dischargeDisposition"), dict):
            dd = hosp["dischargeDisposition"]
            coding = (dd.get("coding") or [{}])[0]
            disposition = (coding.get("code") if isinstance(coding, dict) else None) or dd.get("text")
        code_start = f"{schema.ENCOUNTER_START_PREFIX}{schema.CODE_SEPARATOR}{class_code}"
        if code_start not in self.ctx.descriptions and isinstance(klass.get("display"), str):
            self.ctx.descriptions[code_start] = f"start of {klass['display']}"
        # one row for both events (see ROW_SCHEMA): the end row is made when the shard is written
        self.rows.append((sid, start, "Encounter.period.start", False, code_start, None, disposition, eid, None,
                          None, EventType.ENCOUNTER_START, end, None, False, "Encounter", line, entry))

    def _timed_event(self, r, line, entry, rtype, event_type, code, issued=None):
        """Condition / Procedure: without a time of their own they take their encounter's end."""
        sid = self._subject(r)
        eid = self._encounter_id(r)
        time, field = _first_time(r, rtype)
        from_encounter = time is None
        if from_encounter and eid is None:
            raise Rejected(f"{rtype} has no time of its own and no encounter to take it from")
        self.rows.append((sid, time, field, False, code, None, None, eid, None, None, event_type, issued, None,
                          from_encounter, rtype, line, entry))

    def _condition(self, r: dict, rid: str, line: int, entry: int) -> None:
        code = self.ctx.code_of(r.get("code"), "Condition.code")
        recorded = r.get("recordedDate")
        if recorded is not None and not isinstance(recorded, str):
            raise Rejected("Condition.recordedDate is not a string")
        self._timed_event(r, line, entry, "Condition", EventType.CONDITION, code, recorded)

    def _procedure(self, r: dict, rid: str, line: int, entry: int) -> None:
        code = self.ctx.code_of(r.get("code"), "Procedure.code")
        self._timed_event(r, line, entry, "Procedure", EventType.PROCEDURE, code)

    def _medication_use(self, r: dict, rid: str, line: int, entry: int) -> None:
        rtype = r["resourceType"]
        sid = self._subject(r)
        eid = self._encounter_id(r)
        time, field = _first_time(r, rtype)
        if time is None:
            raise Rejected(f"{rtype} has no time: none of {', '.join(_TIME_FIELDS[rtype])}")
        code, med_key = None, None
        concept = r.get("medicationCodeableConcept")
        reference = r.get("medicationReference")
        r5 = r.get("medication")
        if isinstance(r5, dict):  # R5 CodeableReference
            concept, reference = r5.get("concept"), r5.get("reference")
        if concept is not None:
            code = self.ctx.code_of(concept, f"{rtype}.medicationCodeableConcept")
        elif isinstance(reference, dict) and str(reference.get("reference", "")).startswith("#"):
            code = self._contained_medication(r, reference["reference"][1:])
        elif reference is not None:
            text = reference.get("reference") if isinstance(reference, dict) else None
            if isinstance(text, str) and text[:11] == "Medication/" and "/" not in text[11:] and len(text) > 11:
                med_key = text
            else:
                med_key = "Medication/" + self.ctx.resolve_reference(reference, "Medication", "medicationReference")
        else:
            raise Rejected(f"{rtype} has neither medicationCodeableConcept nor medicationReference")
        self.rows.append((sid, time, field, False, code, None, None, eid, None, None, EventType.MEDICATION, None,
                          med_key, False, rtype, line, entry))

    def _contained_medication(self, r: dict, local_id: str) -> str:
        for contained in r.get("contained") or ():
            if isinstance(contained, dict) and contained.get("id") == local_id:
                if contained.get("resourceType") != "Medication":
                    raise Rejected(f"contained resource is not a Medication: #{local_id}")
                return self.ctx.code_of(contained.get("code"), "contained Medication.code")
        raise Rejected(f"medicationReference has no contained resource: #{local_id}")

    def _medication(self, r: dict, rid: str, line: int, entry: int) -> None:
        code = self.ctx.code_of(r.get("code"), "Medication.code")
        self.medications.append(("Medication/" + rid, code, line, entry))

    def _observation(self, r: dict, rid: str, line: int, entry: int) -> None:
        sid = self._subject(r)
        eid = self._encounter_id(r)
        time, field = _first_time(r, "Observation")
        if time is None:
            raise Rejected("Observation has no effective time")
        issued = r.get("issued")
        if issued is not None and not isinstance(issued, str):
            raise Rejected("Observation.issued is not a string")
        try:  # fast path: the first category's first coding decides
            event_type = OBSERVATION_CATEGORIES[r["category"][0]["coding"][0]["code"]]
        except (KeyError, TypeError, IndexError):
            event_type = self._observation_category(r)
        components = r.get("component")
        if not components:
            code = self.ctx.code_of(r.get("code"), "Observation.code")
            value, text, unit, comparator = self._value(r, "Observation")
            self.rows.append((sid, time, field, False, code, value, text, eid, unit, comparator, event_type, issued,
                              None, False, "Observation", line, entry))
            return
        parts = [(r.get("code"), r, "Observation")] if any(k[:5] == "value" for k in r) else []
        for i, component in enumerate(components):
            if isinstance(component, dict):
                parts.append((component.get("code"), component, f"Observation.component[{i}]"))
        rows = []
        for concept, holder, what in parts:
            code = self.ctx.code_of(concept, f"{what}.code")
            value, text, unit, comparator = self._value(holder, what)
            rows.append((sid, time, field, False, code, value, text, eid, unit, comparator, event_type, issued, None,
                         False, "Observation", line, entry))
        self.rows.extend(rows)

    @staticmethod
    def _observation_category(r: dict) -> EventType:
        for category in r.get("category") or ():
            for coding in (category.get("coding") or ()) if isinstance(category, dict) else ():
                found = OBSERVATION_CATEGORIES.get(coding.get("code")) if isinstance(coding, dict) else None
                if found is not None:
                    return found
        return EventType.OBSERVATION

    def _value(self, holder: dict, what: str) -> tuple[float | None, str | None, str | None, str | None]:
        quantity = holder.get("valueQuantity")
        if quantity is not None:
            if not isinstance(quantity, dict):
                raise Rejected(f"{what}.valueQuantity is not an object")
            value = quantity.get("value")
            if value is not None and (value.__class__ is bool or not isinstance(value, int | float)):
                raise Rejected(f"{what}.valueQuantity.value is not a number: {value!r}")
            unit = quantity.get("unit") or quantity.get("code")
            comparator = quantity.get("comparator")
            if (unit is not None and not isinstance(unit, str)) or (comparator is not None and not isinstance(comparator, str)):
                raise Rejected(f"{what}.valueQuantity unit or comparator is not a string")
            return value, None, unit, comparator
        for name in ("valueInteger", "valueDecimal"):
            value = holder.get(name)
            if value is not None:
                if value.__class__ is bool or not isinstance(value, int | float):
                    raise Rejected(f"{what}.{name} is not a number: {value!r}")
                return value, None, None, None
        text = holder.get("valueString")
        if text is not None:
            return None, str(text), None, None
        concept = holder.get("valueCodeableConcept")
        if isinstance(concept, dict):
            try:
                return None, self.ctx.code_of(concept, f"{what}.valueCodeableConcept"), None, None
            except Rejected:
                display = concept.get("text") or ((concept.get("coding") or [{}])[0] or {}).get("display")
                return None, display if isinstance(display, str) else None, None, None
        if "valueBoolean" in holder:
            return None, "true" if holder["valueBoolean"] else "false", None, None
        return None, None, None, None
