"""The fast path of flattening: typed decoding (msgspec) of the common resource shapes, straight to rows.

`msgspec` decodes a line into small typed structs holding only the fields Odyssey reads, which costs
about half of `orjson.loads` (nothing is built for `meta`, `referenceRange`, ...) and checks every
field's JSON type on the way. The fast flatteners below then handle the shapes real exports use.
Anything else - a type mismatch, a Bundle, an unsupported resource type, a field only the general path
understands (components, contained Medications, R5 shapes, non-literal references) or anything the
general path would reject - makes `flatten` return False, and the caller runs the general path
(`fhir_flatten`) on the same line. So the fast path never decides a reject reason: it either writes
exactly the rows the general path writes, or defers to it. `msgspec` is optional: without it every
line takes the general path.
"""

from __future__ import annotations

import sys
from typing import ClassVar

from odyssey.pipelines import schema
from odyssey.pipelines.fhir_flatten import OBSERVATION_CATEGORIES, Flattener, stable_id
from odyssey.pipelines.schema import EventType

try:
    import msgspec
except ImportError:  # the general path alone still works, only slower
    msgspec = None

_BIRTH, _DEATH, _DEMOGRAPHIC = EventType.BIRTH, EventType.DEATH, EventType.DEMOGRAPHIC
_START = EventType.ENCOUNTER_START
_FLOAT_MAX = sys.float_info.max
_GENDER = f"{schema.GENDER_PREFIX}{schema.CODE_SEPARATOR}"
_START_PREFIX = f"{schema.ENCOUNTER_START_PREFIX}{schema.CODE_SEPARATOR}"

if msgspec is not None:
    Struct, Raw = msgspec.Struct, msgspec.Raw
    # Fields typed `Raw | None` are only checked for presence: when present the general path takes over.

    class Coding(Struct, gc=False):
        system: str | None = None
        code: str | None = None
        display: str | None = None

    class Concept(Struct, gc=False):
        coding: list[Coding] | None = None
        text: str | None = None

    class CategoryCoding(Struct, gc=False):  # only the code decides an Observation's event type
        code: str | None = None

    class Category(Struct, gc=False):
        coding: list[CategoryCoding] | None = None

    class Reference(Struct, gc=False):
        reference: str | None = None

    class Period(Struct, gc=False):
        start: str | None = None
        end: str | None = None

    class Quantity(Struct, gc=False):
        value: int | float | None = None
        unit: str | None = None
        code: str | None = None
        comparator: str | None = None

    class Hospitalization(Struct, gc=False):
        dischargeDisposition: Concept | None = None  # noqa: N815 - FHIR's name

    class _Resource(Struct, gc=False, tag_field="resourceType"):
        id: str | None = None

    class _SubjectResource(_Resource, tag_field="resourceType"):
        subject: Reference | None = None
        patient: Raw | None = None
        encounter: Reference | None = None
        context: Raw | None = None

    class Patient(_Resource, tag="Patient"):
        birthDate: str | None = None  # noqa: N815
        deceasedDateTime: str | None = None  # noqa: N815
        gender: str | None = None

    class Encounter(_SubjectResource, tag="Encounter"):
        period: Period | None = None
        class_: Coding | None = msgspec.field(default=None, name="class")
        hospitalization: Hospitalization | None = None
        admission: Raw | None = None

    class Condition(_SubjectResource, tag="Condition"):
        code: Concept | None = None
        recordedDate: str | None = None  # noqa: N815
        onsetDateTime: str | None = None  # noqa: N815
        onsetPeriod: Period | None = None  # noqa: N815

    class Procedure(_SubjectResource, tag="Procedure"):
        code: Concept | None = None
        performedDateTime: str | None = None  # noqa: N815
        performedPeriod: Period | None = None  # noqa: N815
        occurrenceDateTime: Raw | None = None  # noqa: N815
        occurrencePeriod: Raw | None = None  # noqa: N815

    class _MedicationUse(_SubjectResource, tag_field="resourceType"):
        TIME_FIELDS: ClassVar[tuple[str, ...]] = ()
        medicationCodeableConcept: Concept | None = None  # noqa: N815
        medicationReference: Reference | None = None  # noqa: N815
        medication: Raw | None = None

    class MedicationRequest(_MedicationUse, tag="MedicationRequest"):
        TIME_FIELDS: ClassVar[tuple[str, ...]] = ("authoredOn",)
        authoredOn: str | None = None  # noqa: N815

    class MedicationAdministration(_MedicationUse, tag="MedicationAdministration"):
        TIME_FIELDS: ClassVar[tuple[str, ...]] = ("effectiveDateTime", "effectivePeriod", "occurenceDateTime")
        effectiveDateTime: str | None = None  # noqa: N815
        effectivePeriod: Period | None = None  # noqa: N815
        occurenceDateTime: Raw | None = None  # noqa: N815

    class MedicationDispense(_MedicationUse, tag="MedicationDispense"):
        TIME_FIELDS: ClassVar[tuple[str, ...]] = ("whenHandedOver", "whenPrepared")
        whenHandedOver: str | None = None  # noqa: N815
        whenPrepared: str | None = None  # noqa: N815

    class Medication(_Resource, tag="Medication"):
        code: Concept | None = None

    class Observation(_SubjectResource, tag="Observation"):
        category: list[Category] | None = None
        code: Concept | None = None
        effectiveDateTime: str | None = None  # noqa: N815
        effectivePeriod: Period | None = None  # noqa: N815
        effectiveInstant: str | None = None  # noqa: N815
        issued: str | None = None
        component: Raw | None = None
        valueQuantity: Quantity | None = None  # noqa: N815
        valueString: str | None = None  # noqa: N815
        valueInteger: Raw | None = None  # noqa: N815
        valueDecimal: Raw | None = None  # noqa: N815
        valueCodeableConcept: Raw | None = None  # noqa: N815
        valueBoolean: Raw | None = None  # noqa: N815

    _TYPES = (Patient, Encounter, Condition, Procedure, MedicationRequest, MedicationAdministration,
              MedicationDispense, Medication, Observation)
    _DECODER = msgspec.json.Decoder(Patient | Encounter | Condition | Procedure | MedicationRequest
                                    | MedicationAdministration | MedicationDispense | Medication | Observation)
else:  # pragma: no cover - exercised only where msgspec is absent
    _DECODER = None


AVAILABLE = _DECODER is not None


def _category(categories) -> str:
    """The event type of the first category coding Odyssey knows, else a generic observation."""
    for category in categories or ():
        for coding in category.coding or ():
            found = OBSERVATION_CATEGORIES.get(coding.code)
            if found is not None:
                return found
    return EventType.OBSERVATION


class FastFlattener:
    """Flattens decoded structs into the general Flattener's rows, sharing its caches."""

    def __init__(self, flattener: Flattener):
        if not AVAILABLE:
            raise RuntimeError("the fast path needs msgspec")
        self.flat = flattener
        self.ctx = flattener.ctx
        self.decode = _DECODER.decode
        self._dispatch = {
            Patient: self._patient,
            Encounter: self._encounter,
            Condition: self._condition,
            Procedure: self._procedure,
            MedicationRequest: self._medication_use,
            MedicationAdministration: self._medication_use,
            MedicationDispense: self._medication_use,
            Medication: self._medication,
            Observation: self._observation,
        }
        self._tags = {cls: cls.__struct_config__.tag for cls in _TYPES}

    def flatten(self, raw: bytes, line: int) -> tuple[str, str] | None:
        """(resource type, id) after appending the line's rows, or None: the general path must take it."""
        if not raw.isascii():  # msgspec skips unread fields without checking their UTF-8; orjson rejects it
            try:
                raw.decode()
            except UnicodeDecodeError:
                return None
        try:
            resource = self.decode(raw)
        except (ValueError, RecursionError):  # msgspec.DecodeError: bad JSON or an unexpected shape
            return None
        rid = resource.id
        if not rid:
            return None
        cls = resource.__class__
        if self._dispatch[cls](resource, rid, line):
            return self._tags[cls], rid
        return None

    # -- shared pieces -------------------------------------------------------------------------------

    def _code(self, concept) -> str | None:
        """Like Context.code_of, or None where the general path must decide (it would reject)."""
        if concept is None or not concept.coding:
            return None
        codings = concept.coding
        first = codings[0]
        found = self.ctx.code_cache.get((first.system, first.code))
        if found is not None:
            return found
        systems = self.ctx.systems
        for coding in codings:
            system, value = coding.system, coding.code
            vocab = systems.get(system) if system is not None else None
            if vocab is not None and value:
                code = f"{vocab}{schema.CODE_SEPARATOR}{value}"
                descriptions = self.ctx.descriptions
                if code not in descriptions:
                    display = coding.display or concept.text
                    if display:
                        descriptions[code] = display
                if coding is first and len(self.ctx.code_cache) < 1_000_000:
                    self.ctx.code_cache[(system, value)] = code
                return code
        return None

    def _subject(self, r) -> int | None:
        ref = r.subject
        if ref is None:
            return None
        text = ref.reference
        sid = self.flat._patient_refs.get(text)
        if sid is not None:
            return sid
        if text is not None and text[:8] == "Patient/" and "/" not in text[8:] and len(text) > 8:
            return self.flat._remember_patient(text)
        return None

    def _encounter_ref(self, r) -> tuple[bool, int | None]:
        """(handled, encounter id or None)."""
        ref = r.encounter
        if ref is None:
            return r.context is None, None
        text = ref.reference
        eid = self.flat._encounter_refs.get(text)
        if eid is not None:
            return True, eid
        if text is not None and text[:10] == "Encounter/" and "/" not in text[10:] and len(text) > 10:
            return True, self.flat._remember_encounter(text)
        return False, None

    # -- resource types ------------------------------------------------------------------------------

    def _patient(self, r, rid: str, line: int) -> bool:
        birth, deceased, gender = r.birthDate, r.deceasedDateTime, r.gender
        if gender == "":
            return False
        sid = self.ctx.stable_id("Patient", rid)
        rows = self.flat.rows
        if birth is not None:
            rows.append((sid, birth, "Patient.birthDate", True, schema.BIRTH_CODE, None, None, None, None, None,
                         _BIRTH, None, None, False, "Patient", line, 0))
        if deceased is not None:
            rows.append((sid, deceased, "Patient.deceasedDateTime", False, schema.DEATH_CODE, None, None, None, None,
                         None, _DEATH, None, None, False, "Patient", line, 0))
        if gender is not None:
            rows.append((sid, None, None, False, _GENDER + gender, None, None, None, None, None, _DEMOGRAPHIC, None,
                         None, False, "Patient", line, 0))
        self.flat.patients.append((sid, rid, line, 0))
        return True

    def _encounter(self, r, rid: str, line: int) -> bool:
        period, klass = r.period, r.class_
        if period is None or period.start is None or klass is None or not klass.code or r.admission is not None:
            return False
        subject = r.subject
        sid = self.flat._patient_refs.get(subject.reference) if subject is not None else None
        if sid is None:
            sid = self._subject(r)
            if sid is None:
                return False
        disposition = None
        hosp = r.hospitalization
        if hosp is not None and hosp.dischargeDisposition is not None:
            dd = hosp.dischargeDisposition
            codings = dd.coding
            disposition = (codings[0].code if codings else None) or dd.text
        eid = stable_id("Encounter", rid)  # not cached: an Encounter's own id is rarely met again in its chunk
        code_start = _START_PREFIX + klass.code
        if klass.display is not None and code_start not in self.ctx.descriptions:
            self.ctx.descriptions[code_start] = f"start of {klass.display}"
        self.flat.rows.append((sid, period.start, "Encounter.period.start", False, code_start, None, disposition, eid,
                               None, None, _START, period.end, None, False, "Encounter", line, 0))  # see ROW_SCHEMA
        return True

    def _timed_event(self, r, line: int, rtype: str, event_type: str, code: str, time: str | None, field: str | None,
                     issued: str | None) -> bool:
        sid = self._subject(r)
        if sid is None:
            return False
        handled, eid = self._encounter_ref(r)
        if not handled or (time is None and eid is None):
            return False
        self.flat.rows.append((sid, time, field, False, code, None, None, eid, None, None, event_type, issued, None,
                               time is None, rtype, line, 0))
        return True

    def _condition(self, r, rid: str, line: int) -> bool:
        code = self._code(r.code)
        if code is None:
            return False
        if r.onsetDateTime is not None:
            time, field = r.onsetDateTime, "Condition.onsetDateTime"
        elif r.onsetPeriod is not None:
            time, field = r.onsetPeriod.start, "Condition.onsetPeriod.start"
            if time is None:
                return False
        else:
            time = field = None
        return self._timed_event(r, line, "Condition", EventType.CONDITION, code, time, field, r.recordedDate)

    def _procedure(self, r, rid: str, line: int) -> bool:
        code = self._code(r.code)
        if code is None:
            return False
        if r.performedDateTime is not None:
            time, field = r.performedDateTime, "Procedure.performedDateTime"
        elif r.performedPeriod is not None:
            time, field = r.performedPeriod.start, "Procedure.performedPeriod.start"
            if time is None:
                return False
        elif r.occurrenceDateTime is not None or r.occurrencePeriod is not None:
            return False
        else:
            time = field = None
        return self._timed_event(r, line, "Procedure", EventType.PROCEDURE, code, time, field, None)

    def _medication_use(self, r, rid: str, line: int) -> bool:
        if r.medication is not None:
            return False
        rtype = r.__struct_config__.tag
        time = field = None
        for name in r.TIME_FIELDS:
            value = getattr(r, name)
            if value is None:
                continue
            if name[-6:] == "Period":
                value = value.start
                if value is None:
                    return False
                time, field = value, f"{rtype}.{name}.start"
            elif value.__class__ is not str:  # a Raw: a field only the general path reads
                return False
            else:
                time, field = value, f"{rtype}.{name}"
            break
        if time is None:
            return False
        sid = self._subject(r)
        if sid is None:
            return False
        handled, eid = self._encounter_ref(r)
        if not handled:
            return False
        code = med_key = None
        if r.medicationCodeableConcept is not None:
            code = self._code(r.medicationCodeableConcept)
            if code is None:
                return False
        else:
            reference = r.medicationReference
            text = reference.reference if reference is not None else None
            if text is None or text[:11] != "Medication/" or "/" in text[11:] or len(text) <= 11:
                return False
            med_key = text
        self.flat.rows.append((sid, time, field, False, code, None, None, eid, None, None, EventType.MEDICATION, None,
                               med_key, False, rtype, line, 0))
        return True

    def _medication(self, r, rid: str, line: int) -> bool:
        code = self._code(r.code)
        if code is None:
            return False
        self.flat.medications.append(("Medication/" + rid, code, line, 0))
        return True

    def _observation(self, r, rid: str, line: int) -> bool:
        # the commonest resource: cache hits are inlined (subject, encounter, code), misses take the helpers
        if r.component is not None:
            return False
        if r.effectiveDateTime is not None:
            time, field = r.effectiveDateTime, "Observation.effectiveDateTime"
        elif r.effectivePeriod is not None:
            time, field = r.effectivePeriod.start, "Observation.effectivePeriod.start"
            if time is None:
                return False
        elif r.effectiveInstant is not None:
            time, field = r.effectiveInstant, "Observation.effectiveInstant"
        else:
            return False
        quantity = r.valueQuantity
        value = text = unit = comparator = None
        if quantity is not None:
            value = quantity.value
            if value.__class__ is float and not -_FLOAT_MAX <= value <= _FLOAT_MAX:  # 1e999: orjson calls it malformed
                return False
            unit = quantity.unit or quantity.code
            comparator = quantity.comparator
        elif (r.valueInteger is not None or r.valueDecimal is not None or r.valueCodeableConcept is not None
              or r.valueBoolean is not None):
            return False
        else:
            text = r.valueString
        flat = self.flat
        subject = r.subject
        sid = flat._patient_refs.get(subject.reference) if subject is not None else None
        if sid is None:
            sid = self._subject(r)
            if sid is None:
                return False
        encounter = r.encounter
        eid = flat._encounter_refs.get(encounter.reference) if encounter is not None else None
        if eid is None:
            handled, eid = self._encounter_ref(r)
            if not handled:
                return False
        # the general path reads the code only once subject, encounter and time are good (descriptions)
        concept = r.code
        codings = concept.coding if concept is not None else None
        code = self.ctx.code_cache.get((codings[0].system, codings[0].code)) if codings else None
        if code is None:
            code = self._code(concept)
            if code is None:
                return False
        categories = r.category
        first = categories[0].coding if categories else None
        event_type = OBSERVATION_CATEGORIES.get(first[0].code) if first else None  # the usual case: decided here
        if event_type is None:
            event_type = _category(categories)
        flat.rows.append((sid, time, field, False, code, value, text, eid, unit, comparator, event_type, r.issued,
                          None, False, "Observation", line, 0))
        return True


__all__ = ["AVAILABLE", "FastFlattener"]
