"""Generative model of the synthetic cohort: hidden health state, encounters, events and planted outcomes.

Each patient is simulated alone from `random.Random(f"{seed}:{index}")`, so a cohort is deterministic per
seed and patients can be generated in any order or in parallel. The model is documented (with every
coefficient) in docs/synthetic_cohort.md; the functions `p_*` below are the planted outcome laws.

Outcomes are drawn from exactly the probabilities written to truth.parquet:
- 30-day mortality D ~ Bernoulli(p_mortality) at discharge; a death happens out of hospital, 6 h to 29.9
  days after discharge (and after any earlier survivor's 30-day window), before any readmission.
- 30-day readmission: given survival, R ~ Bernoulli(q); so P(readmission) = (1 - p_mortality) * q.
- LOS >= 7 days ~ Bernoulli(p_los) at admission + 24 h (stays under 24 h are drawn first and excluded);
  an in-hospital death ends the stay at its drawn length, so it never changes the LOS label.
- Next-admission condition groups ~ Bernoulli(c_g) fixed at discharge and drawn at the next admission.
No later draw can flip a label: readmissions inside the 30-day window of a survivor cannot end in death,
and deaths outside that window sit more than 31 days after discharge.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field

from odyssey.pipelines.synth_catalog import (
    AMYLOIDOSIS,
    BACKGROUND_DX,
    CHRONIC_GROUPS,
    CKD_STAGE5,
    DIALYSIS_STATUS,
    ED_DX,
    GROUP_DX,
    GROUPS,
    LAB_INDEX,
    LABS,
    OTHER_REASON_DX,
    TOBACCO_HISTORY,
    Dx,
)

MINUTE = 60
HOUR = 3600
DAY = 86400
YEAR = 365.25 * DAY
READMISSION_WINDOW = 30 * DAY
# 2110-01-01 and 2176-01-01 UTC: MIMIC shifts dates into the 22nd century.
FIRST_VISIT_FROM = 4417977600
FIRST_VISIT_TO = 6500793600

LONG_HISTORY_SHARE = 0.03  # daily home hemodialysis for a decade or more: histories beyond 16k tokens
# In-center hemodialysis from the baseline visit, first admission 2.5-7 years later: the planted markers sit
# 2k-16k tokens back, inside a 16k context but beyond a 2k one.
MEDIUM_HISTORY_SHARE = 0.10
HOME_DIALYSIS_INTERVALS = (1, 1, 1, 1, 1, 2)  # days between sessions: six a week
IN_CENTER_DIALYSIS_INTERVALS = (2, 2, 3)  # three a week
OUTPATIENT_DAYS = 500.0  # mean days between ED / ambulatory visits
VISIT_SPACING = 12 * HOUR  # minimum time between two outpatient visit starts (longest visit: 9 h)
AMYLOIDOSIS_SHARE = 0.08  # planted long-range marker, coded once at the baseline visit
PREDIABETES_SHARE = 0.18  # planted long-range lab pattern (HbA1c 5.7-6.4 % at the baseline visit)
SMOKER_SHARE = 0.3
CHRONIC_CODING_RATE = 0.92  # a present chronic group is coded at an admission with this probability
SHORT_STAY_RATE = 0.04  # stays under 24 h (excluded from the LOS task)
PROCEDURE_DELAY_HOURS = (1.0, 48.0)  # inpatient procedures: hours after admission (capped by the discharge)
VENTILATION_CODED_AFTER = 30 * HOUR  # after the LOS prediction time (admission + 24 h) of every eligible stay
MEDICATION_CONCEPT_SHARE = 0.1  # MedicationRequests carrying medicationCodeableConcept, not a reference

BMP = ("sodium", "potassium", "chloride", "bicarbonate", "bun", "creatinine", "glucose")
CBC = ("wbc", "hemoglobin", "platelets")
DAILY = ("creatinine", "hemoglobin")


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------ data records
@dataclass(slots=True)
class Encounter:
    id: str
    cls: str  # IMP, EMER, AMB
    start: int  # UTC epoch seconds
    end: int
    icd10: bool
    disposition: str | None = None  # MIMIC discharge_location
    service: str | None = None
    diagnoses: list[tuple[str, Dx]] = field(default_factory=list)  # (resource id, concept)
    procedures: list[tuple[str, str, int]] = field(default_factory=list)  # (id, PROCEDURES key, time)
    medications: list[tuple[str, str, int, int, bool]] = field(default_factory=list)  # id, drug, start, end, as concept
    labs: list[tuple[str, int, int, int, float]] = field(default_factory=list)  # id, lab index, time, issued, value

    def n_events(self) -> int:
        return len(self.diagnoses) + len(self.procedures) + len(self.medications) + len(self.labs)


@dataclass(slots=True)
class TruthRow:
    encounter_id: str
    admit_time: int
    discharge_time: int
    mortality_30d_probability: float | None
    mortality_30d: bool | None
    los_7d_probability: float | None
    los_7d: bool | None
    readmission_30d_probability: float | None
    readmission_30d: bool | None
    condition_probabilities: dict[str, float] | None
    conditions: dict[str, bool] | None = None  # filled when the next admission is drawn


@dataclass(slots=True)
class PatientRecord:
    index: int
    id: str
    female: bool
    birth: int
    death: int | None
    encounters: list[Encounter]
    truth: list[TruthRow]
    amyloidosis: bool
    prediabetes: bool
    long_history: bool
    medium_history: bool
    smoker: bool
    frailty_baseline: float

    def n_tokens(self) -> int:
        """Rough token count: one per event plus five per visit (birth, gender and death count once)."""
        n = 2 + (self.death is not None)
        for enc in self.encounters:
            n += 5 + enc.n_events()
        return n

    def n_resources(self) -> int:
        """Resources of this patient (Medication resources are shared and not counted here)."""
        return 1 + sum(1 + enc.n_events() for enc in self.encounters)


# ------------------------------------------------------------------------------------ hidden state
@dataclass(slots=True)
class State:
    age0: float
    t0: int
    birth: int
    frailty0: float
    smoker: bool
    amyloidosis: bool
    prediabetes: bool
    hypertension: bool
    chronic: dict[str, bool]
    drift: float = 0.0  # random walk of frailty between admissions
    drift_time: int = 0
    admissions: list[int] = field(default_factory=list)  # admission start times
    sepsis_history: bool = False
    dialysis_intervals: tuple[int, ...] = ()  # days between outpatient dialysis sessions, cycled; () none

    @property
    def dialysis(self) -> bool:
        return bool(self.dialysis_intervals)

    def age(self, t: int) -> float:
        return (t - self.birth) / YEAR

    def frailty(self, t: int) -> float:
        return self.frailty0 + 0.045 * (self.age(t) - 70) + 0.15 * min(len(self.admissions), 6) + self.drift

    def recent_admissions(self, t: int) -> int:
        return sum(1 for a in self.admissions if t - a <= YEAR)


# ---------------------------------------------------------------------------- planted outcome laws
@dataclass(slots=True)
class Stay:
    """What is known about an admission at its discharge."""

    acuity: float
    groups: dict[str, bool]
    reason: str  # sepsis, pneumonia, hf_exacerbation, copd_exacerbation, other
    long_stay: bool


def p_mortality(s: State, t: int, stay: Stay) -> float:
    c = s.chronic
    x = (
        -3.45
        + 0.6 * s.frailty(t)
        + 0.03 * (s.age(t) - 70)
        + 0.35 * c["heart_failure"]
        + 0.3 * c["chronic_kidney_disease"]
        + 0.25 * c["copd"]
        + 0.4 * s.dialysis
        + 0.7 * (stay.reason == "sepsis")
        + 0.35 * (stay.reason == "pneumonia")
        + 0.35 * stay.acuity
        + 0.3 * stay.long_stay
        + 2.0 * s.amyloidosis
    )
    return sigmoid(x)


def p_readmission_if_alive(s: State, t: int) -> float:
    c = s.chronic
    x = (
        -2.8
        + 0.95 * s.frailty(t)
        + 0.35 * c["heart_failure"]
        + 0.3 * c["chronic_kidney_disease"]
        + 0.4 * c["copd"]
        + 0.3 * c["diabetes"]
        + 0.5 * s.dialysis
        + 0.35 * min(s.recent_admissions(t), 3)
        + 2.3 * s.amyloidosis
    )
    return sigmoid(x)


def p_long_stay(s: State, t: int, acuity: float, reason: str) -> float:
    x = (
        -1.15
        + 0.9 * acuity
        + 0.35 * s.frailty(t)
        + 0.9 * (reason == "sepsis")
        + 0.45 * (reason == "pneumonia")
        + 0.35 * (reason == "hf_exacerbation")
        + 0.015 * (s.age(t) - 70)
        + 1.1 * s.amyloidosis
    )
    return sigmoid(x)


def p_in_hospital_death(s: State, t: int, acuity: float, reason: str) -> float:
    x = -4.4 + 0.5 * s.frailty(t) + 0.8 * acuity + 0.8 * (reason == "sepsis") + 0.8 * s.amyloidosis
    return sigmoid(x)


def p_next_conditions(s: State, t: int, reason: str) -> dict[str, float]:
    """Probability that each condition group is coded at the next admission, fixed at discharge."""
    c = s.chronic
    z = s.frailty(t)
    age = s.age(t) - 70
    onset = {
        "heart_failure": -3.6 + 0.35 * z + 0.03 * age + 0.6 * c["chronic_kidney_disease"] + 2.6 * s.amyloidosis,
        "diabetes": -4.3 + 3.0 * s.prediabetes + 0.25 * z,
        "chronic_kidney_disease": -3.9 + 0.9 * c["diabetes"] + 0.6 * c["heart_failure"] + 1.5 * s.prediabetes + 0.03 * age,
        "copd": -4.6 + 2.0 * s.smoker + 0.03 * age,
    }
    probs = {g: CHRONIC_CODING_RATE if c[g] else sigmoid(onset[g]) for g in CHRONIC_GROUPS}
    probs["sepsis"] = sigmoid(
        -3.0 + 0.65 * z + 0.4 * c["chronic_kidney_disease"] + 0.4 * c["diabetes"] + 1.2 * s.dialysis
        + 1.2 * s.sepsis_history
    )
    probs["pneumonia"] = sigmoid(-2.7 + 0.6 * z + 1.6 * c["copd"] + 1.0 * (reason == "pneumonia") + 0.03 * age)
    return {g: probs[g] for g in GROUPS}


# ------------------------------------------------------------------------------------- the simulator
class PatientSimulator:
    """Simulates one patient's whole history; `run()` returns the PatientRecord."""

    def __init__(self, seed: int, index: int):
        self.rng = random.Random(f"odyssey-synth:{seed}:{index}")
        self.index = index
        self.encounters: list[Encounter] = []
        self.truth: list[TruthRow] = []

    # ids: random 128-bit values from the patient's stream, formatted as version-4 UUIDs
    def new_id(self) -> str:
        h = f"{self.rng.getrandbits(128) & _UUID_CLEAR | _UUID_SET:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def run(self) -> PatientRecord:
        rng = self.rng
        pid = self.new_id()
        female = rng.random() < 0.5
        history = rng.random()
        long_history = history < LONG_HISTORY_SHARE
        medium_history = not long_history and history < LONG_HISTORY_SHARE + MEDIUM_HISTORY_SHARE
        dialysis = long_history or medium_history
        age0 = (30 + 25 * rng.random()) if long_history else 30 + 55 * rng.betavariate(2.2, 1.8)
        t0 = _minute(rng.uniform(FIRST_VISIT_FROM, FIRST_VISIT_TO)) // DAY * DAY + _minute(rng.uniform(13, 22) * HOUR)
        birth_day = int((t0 - age0 * YEAR) // DAY)
        birth = birth_day * DAY + 5 * HOUR  # local midnight (UTC-05:00) of the birth date
        frailty0 = rng.gauss(0.0, 1.0)
        smoker = rng.random() < SMOKER_SHARE
        amyloidosis = rng.random() < AMYLOIDOSIS_SHARE
        diabetes = rng.random() < 0.17
        prediabetes = (not diabetes) and rng.random() < PREDIABETES_SHARE
        a = age0 - 65
        chronic = {
            "heart_failure": rng.random() < sigmoid(-3.2 + 0.06 * a + 0.4 * frailty0 + 1.0 * amyloidosis),
            "diabetes": diabetes,
            "chronic_kidney_disease": dialysis or rng.random() < sigmoid(-2.8 + 0.05 * a + 0.8 * diabetes),
            "copd": rng.random() < (0.18 if smoker else 0.03),
        }
        s = State(
            age0=age0, t0=t0, birth=birth, frailty0=frailty0, smoker=smoker, amyloidosis=amyloidosis,
            prediabetes=prediabetes, hypertension=rng.random() < 0.3 + 0.006 * max(a + 20, 0),
            chronic=chronic, drift_time=t0,
            dialysis_intervals=(HOME_DIALYSIS_INTERVALS if long_history
                                else IN_CENTER_DIALYSIS_INTERVALS if medium_history else ()),
        )
        self.s = s
        self.icd10_switch = t0 + int(rng.uniform(-3, 14) * YEAR)
        self.death: int | None = None

        self.baseline_visit(t0)
        if long_history:
            first_admission = t0 + int(rng.uniform(8.5, 10.5) * YEAR)
        elif medium_history:
            first_admission = t0 + int(rng.uniform(2.5, 7.0) * YEAR)
        else:
            first_admission = t0 + int(rng.uniform(1, 6) * YEAR)
        first_admission = _minute(first_admission)
        self.fill_gap(t0 + HOUR, first_admission)
        self.admissions(first_admission)
        self.encounters.sort(key=lambda e: e.start)
        return PatientRecord(
            index=self.index, id=pid, female=female, birth=birth, death=self.death, encounters=self.encounters,
            truth=self.truth, amyloidosis=amyloidosis, prediabetes=prediabetes, long_history=long_history,
            medium_history=medium_history,
            smoker=smoker, frailty_baseline=frailty0,
        )

    # ------------------------------------------------------------------------------ admissions
    def admissions(self, t: int) -> None:
        rng, s = self.rng, self.s
        groups_p = p_next_conditions(s, t, "other")
        window_end = -1  # in-hospital deaths before this time would flip an earlier survivor's label
        previous: TruthRow | None = None
        while True:
            self.update_drift(t)
            groups = {g: rng.random() < p for g, p in groups_p.items()}
            if previous is not None:
                previous.conditions = groups
            for g in CHRONIC_GROUPS:
                s.chronic[g] = s.chronic[g] or groups[g]
            reason = self.pick_reason(groups)
            acuity = rng.gauss(0.0, 1.0)
            if rng.random() < SHORT_STAY_RATE:
                p_los, long_stay = None, False
                length = _minute(rng.uniform(3, 23) * HOUR)
            else:
                p_los = p_long_stay(s, t, acuity, reason)
                long_stay = rng.random() < p_los
                if long_stay:
                    length = _minute(7 * DAY + HOUR + rng.gammavariate(1.3, 4.0) * DAY)
                else:
                    # from 26 h: a morning panel drawn before admission + 24 h always falls inside the stay
                    length = _minute(rng.uniform(DAY + 2 * HOUR, 7 * DAY - HOUR))
            end = t + length
            dies_here = rng.random() < p_in_hospital_death(s, t, acuity, reason) and end > window_end
            if s.sepsis_history is False and reason == "sepsis":
                s.sepsis_history = True
            stay = Stay(acuity=acuity, groups=groups, reason=reason, long_stay=long_stay)
            s.admissions.append(t)
            enc = self.inpatient(t, end, stay, dies_here)
            los_outcome = None if p_los is None else long_stay
            if dies_here:
                self.death = end
                self.truth.append(TruthRow(enc.id, t, end, None, None, p_los, los_outcome, None, None, None))
                return
            p_m = p_mortality(s, end, stay)
            q = p_readmission_if_alive(s, end)
            groups_p = p_next_conditions(s, end, reason)
            enc.disposition = self.pick_disposition(s, end, p_m)
            died = rng.random() < p_m
            readmitted = (not died) and rng.random() < q
            row = TruthRow(enc.id, t, end, p_m, died, p_los, los_outcome, (1 - p_m) * q, readmitted, groups_p)
            self.truth.append(row)
            previous = row
            if died:
                # After any earlier survivor's 30-day window, so that survivor's label stays 0.
                earliest = max(end + 6 * HOUR, window_end + HOUR)
                self.death = _minute(rng.uniform(earliest, end + 29.9 * DAY))
                self.fill_gap(end, self.death)
                return
            window_end = end + READMISSION_WINDOW
            if readmitted:
                t = _minute(end + rng.uniform(0.5, 29.0) * DAY)
                self.fill_gap(end, t)
                continue
            if not self.continues(end):
                follow_up = end + int(rng.uniform(60, 900) * DAY)
                if rng.random() < sigmoid(-1.2 + 0.5 * s.frailty(end)):
                    self.death = _minute(end + 31 * DAY + rng.expovariate(1 / 400) * DAY)
                    follow_up = self.death
                self.fill_gap(end, follow_up)
                return
            gap_mean = 500.0 / (1 + 0.4 * sum(s.chronic.values()) + 0.3 * max(s.frailty(end), 0))
            t = _minute(end + 31 * DAY + rng.expovariate(1 / gap_mean) * DAY)
            self.fill_gap(end, t)

    def continues(self, t: int) -> bool:
        s = self.s
        return self.rng.random() < sigmoid(0.1 + 0.25 * s.frailty(t) + 0.3 * sum(s.chronic.values()))

    def update_drift(self, t: int) -> None:
        s = self.s
        years = max(t - s.drift_time, 0) / YEAR
        s.drift += self.rng.gauss(0.0, 0.3 * math.sqrt(years))
        s.drift_time = t

    def pick_reason(self, groups: dict[str, bool]) -> str:
        r = self.rng.random()
        if groups["sepsis"]:
            return "sepsis"
        if groups["pneumonia"]:
            return "pneumonia"
        if groups["heart_failure"] and r < 0.35:
            return "hf_exacerbation"
        if groups["copd"] and r < 0.35:
            return "copd_exacerbation"
        return "other"

    def pick_disposition(self, s: State, t: int, p_m: float) -> str:
        """Drawn from the state only (never from the drawn outcome), so p_mortality stays exact."""
        r = self.rng.random()
        snf = 0.45 * sigmoid(-1.0 + 0.8 * s.frailty(t))
        hospice = 0.25 * p_m
        for name, share in (("HOSPICE", hospice), ("SKILLED NURSING FACILITY", snf), ("REHAB", 0.06),
                            ("HOME HEALTH CARE", 0.2), ("AGAINST ADVICE", 0.015)):
            if r < share:
                return name
            r -= share
        return "HOME"

    # ------------------------------------------------------------------------------ encounters
    def new_encounter(self, cls: str, start: int, end: int) -> Encounter:
        enc = Encounter(self.new_id(), cls, start, end, start >= self.icd10_switch, None, None, [], [], [], [])
        self.encounters.append(enc)
        return enc

    def add_dx(self, enc: Encounter, dx: Dx) -> None:
        enc.diagnoses.append((self.new_id(), dx))

    def group_dx(self, group: str) -> Dx:
        if group == "chronic_kidney_disease" and self.s.dialysis:
            return CKD_STAGE5
        codes = GROUP_DX[group]
        return codes[0] if self.rng.random() < 0.6 else self.rng.choice(codes)

    def background_dx(self, enc: Encounter, mean: float) -> None:
        rng, s = self.rng, self.s
        if s.hypertension and rng.random() < 0.8:
            self.add_dx(enc, BACKGROUND_DX[0])
        if s.smoker and rng.random() < 0.6:
            self.add_dx(enc, TOBACCO_HISTORY)
        if s.dialysis:
            self.add_dx(enc, DIALYSIS_STATUS)
        for dx in rng.sample(BACKGROUND_DX[1:], min(_poisson(rng, mean), len(BACKGROUND_DX) - 1)):
            self.add_dx(enc, dx)

    def baseline_visit(self, t: int) -> None:
        """First recorded visit: chronic problems, the planted markers, a full lab panel."""
        rng, s = self.rng, self.s
        enc = self.new_encounter("AMB", t, t + _minute(rng.uniform(30, 60) * MINUTE))
        for g in CHRONIC_GROUPS:
            if s.chronic[g] and rng.random() < CHRONIC_CODING_RATE:
                self.add_dx(enc, self.group_dx(g))
        if s.amyloidosis:
            self.add_dx(enc, AMYLOIDOSIS)
        self.background_dx(enc, 1.0)
        self.lab_panel(enc, t + 20 * MINUTE, (*BMP, *CBC, "hba1c", "albumin", "ntprobnp"), 0.0, None)
        self.chronic_meds(enc, t + 40 * MINUTE, enc.end + 90 * DAY, 0.5)

    def inpatient(self, t: int, end: int, stay: Stay, dies: bool) -> Encounter:
        rng, s = self.rng, self.s
        enc = self.new_encounter("IMP", t, end)
        enc.disposition = "DIED" if dies else None
        reason = stay.reason
        groups = [g for g in GROUPS if stay.groups[g]]
        principal: Dx | None = None
        if reason == "other":
            principal = rng.choice(OTHER_REASON_DX)
            self.add_dx(enc, principal)
        first = {"sepsis": "sepsis", "pneumonia": "pneumonia", "hf_exacerbation": "heart_failure",
                 "copd_exacerbation": "copd"}.get(reason)
        if first is not None:
            groups.remove(first)
            groups.insert(0, first)
        for g in groups:
            if g == "heart_failure" and reason == "hf_exacerbation":
                self.add_dx(enc, GROUP_DX["heart_failure"][3])
            elif g == "copd" and reason == "copd_exacerbation":
                self.add_dx(enc, GROUP_DX["copd"][1])
            else:
                self.add_dx(enc, self.group_dx(g))
        self.background_dx(enc, 1.3)
        enc.service = {"hf_exacerbation": "CMED"}.get(reason, "MED")
        if principal is not None:
            enc.service = {"I21.4": "CMED", "S72.001A": "SURG", "I63.9": "NMED"}.get(principal.icd10, "MED")

        a = stay.acuity
        # Labs: an admission panel, then a morning panel each day of the stay.
        panel = [*BMP, *CBC]
        if reason == "sepsis" or a > 1.0:
            panel.append("lactate")
        if s.chronic["heart_failure"] or s.amyloidosis and rng.random() < 0.5:
            panel.append("ntprobnp")
        if reason == "hf_exacerbation" or (principal is not None and principal.icd10 in ("R07.9", "I21.4")):
            panel.append("troponin")
        for key, rate in (("albumin", 0.5), ("magnesium", 0.5), ("bilirubin", 0.3)):
            if rng.random() < rate:
                panel.append(key)
        if s.chronic["diabetes"] and rng.random() < 0.4:
            panel.append("hba1c")
        self.lab_panel(enc, t + _minute(rng.uniform(0.3, 2.5) * HOUR), panel, a, reason)
        day_start = (t // DAY + 1) * DAY + 11 * HOUR  # 06:00 local
        day = 1
        while day_start + 2 * HOUR < end:  # the panel (drawn within 90 min) falls inside the stay
            if day <= 3 or day % 2 == 0:  # daily at first, then every other day
                extra = ("potassium", "wbc") if day == 1 or day % 4 == 0 else ()
                self.lab_panel(enc, day_start + _minute(rng.uniform(0, 90) * MINUTE), (*DAILY, *extra),
                               a * math.exp(-day / 2.5), reason)
            if a > 1.5 and day_start + 13 * HOUR < end:  # ICU-like stays: an evening panel
                self.lab_panel(enc, day_start + 12 * HOUR, ("creatinine", "potassium", "lactate"), a * math.exp(-day / 2.5),
                               reason)
            day_start += DAY
            day += 1

        self.inpatient_procedures(enc, stay, principal)
        self.inpatient_meds(enc, stay)
        return enc

    def inpatient_procedures(self, enc: Encounter, stay: Stay, principal: Dx | None) -> None:
        rng, s = self.rng, self.s
        t, end = enc.start, enc.end
        chosen: list[str] = []
        a = stay.acuity
        if stay.reason == "sepsis" and rng.random() < 0.6:
            chosen.append("central_line")
        if a > 1.3 and stay.reason in ("sepsis", "pneumonia", "copd_exacerbation"):
            chosen.append("ventilation_long" if stay.long_stay and a > 1.8 else "ventilation_short")
        if stay.reason == "pneumonia" and rng.random() < 0.1:
            chosen.append("bronchoscopy")
        if stay.reason == "hf_exacerbation" or (s.chronic["heart_failure"] and rng.random() < 0.2):
            chosen.append("echocardiogram")
            if rng.random() < 0.15:
                chosen.append("cardiac_cath")
        if principal is not None and principal.icd10 == "K92.2":
            chosen.extend(("egd", "transfusion"))
        if s.dialysis:
            chosen.append("hemodialysis")
        for key in chosen:
            # Drawn without regard to the stay's length, so what is visible at admission + 24 h (the LOS task's
            # prediction time) does not reveal it; a ventilation code says how long it lasted: coded later.
            delay = rng.uniform(*PROCEDURE_DELAY_HOURS) * HOUR
            if key.startswith("ventilation"):
                delay = max(delay, VENTILATION_CODED_AFTER)
            enc.procedures.append((self.new_id(), key, _minute(min(t + delay, end - 30 * MINUTE))))

    def inpatient_meds(self, enc: Encounter, stay: Stay) -> None:
        rng = self.rng
        t, end = enc.start, enc.end
        reason_meds = {
            "sepsis": ("vancomycin", "piperacillin_tazobactam"),
            "pneumonia": ("ceftriaxone", "azithromycin"),
            "hf_exacerbation": ("furosemide_iv",),
            "copd_exacerbation": ("prednisone", "albuterol"),
        }.get(stay.reason, ())
        for key in reason_meds:
            self.add_med(enc, key, t + _minute(rng.uniform(0.5, 4) * HOUR), end)
        if stay.reason == "sepsis" and stay.acuity > 1.0:
            self.add_med(enc, "norepinephrine", t + _minute(rng.uniform(1, 6) * HOUR), t + 2 * DAY)
        for key, rate in (("heparin", 0.7), ("acetaminophen", 0.6), ("pantoprazole", 0.4),
                          ("sodium_chloride", 0.5), ("potassium_chloride", 0.2)):
            if rng.random() < rate:
                self.add_med(enc, key, t + _minute(rng.uniform(0.5, 12) * HOUR), end)
        self.chronic_meds(enc, t + _minute(rng.uniform(2, 24) * HOUR), end, 0.8)

    def chronic_meds(self, enc: Encounter, t: int, end: int, rate: float) -> None:
        rng, s = self.rng, self.s
        c = s.chronic
        options: list[str] = []
        if c["heart_failure"]:
            options += ["furosemide_po", "metoprolol", "lisinopril"]
        if c["diabetes"]:
            options += ["insulin_glargine", "insulin_regular"] if enc.cls == "IMP" else ["metformin", "insulin_glargine"]
        if c["chronic_kidney_disease"] and s.dialysis:
            options += ["epoetin", "sevelamer"]
        if c["copd"]:
            options += ["tiotropium", "albuterol"]
        if s.hypertension and not c["heart_failure"]:
            options.append("lisinopril")
        if s.hypertension or c["diabetes"]:
            options += ["atorvastatin", "aspirin"]
        for key in options:
            if rng.random() < rate:
                self.add_med(enc, key, min(t, end), end)

    def add_med(self, enc: Encounter, key: str, start: int, end: int) -> None:
        as_concept = self.rng.random() < MEDICATION_CONCEPT_SHARE
        start = min(start, enc.end)  # ordered during the visit; the validity period may outlast it
        if enc.cls != "AMB":
            end = min(end, enc.end)
        enc.medications.append((self.new_id(), key, start, max(end, start), as_concept))

    # ---------------------------------------------------------------------------------- labs
    def lab_panel(self, enc: Encounter, t: int, keys, acuity: float, reason: str | None) -> None:
        rng, s = self.rng, self.s
        c = s.chronic
        sepsis = reason == "sepsis"
        z = s.frailty(t)
        issued = t + _minute(rng.uniform(25, 150) * MINUTE)
        if enc.cls == "IMP":  # inpatient results come back before discharge (or death)
            issued = max(min(issued, enc.end), t + MINUTE)
        for key in keys:
            lab = LABS[key]
            shift = 0.0
            if key == "creatinine":
                shift = 0.5 * c["chronic_kidney_disease"] + 1.3 * s.dialysis + 0.15 * acuity
            elif key == "bun":
                shift = 0.45 * c["chronic_kidney_disease"] + 0.25 * c["heart_failure"] + 0.8 * s.dialysis + 0.15 * acuity
            elif key == "glucose":
                shift = 0.35 * c["diabetes"] + 0.08 * s.prediabetes + 0.08 * acuity
            elif key == "hba1c":
                shift = 2.3 * c["diabetes"] + 0.85 * (s.prediabetes and not c["diabetes"])
            elif key == "hemoglobin":
                shift = -1.5 * c["chronic_kidney_disease"] - 0.6 * z - 0.3 * acuity - 1.0 * s.dialysis
            elif key == "albumin":
                shift = -0.3 * z - 0.15 * acuity
            elif key == "wbc":
                shift = 0.5 * sepsis + 0.3 * (reason == "pneumonia") + 0.12 * acuity
            elif key == "lactate":
                shift = 0.6 * sepsis + 0.25 * acuity
            elif key == "ntprobnp":
                shift = 2.0 * c["heart_failure"] + 0.4 * s.amyloidosis + 0.5 * c["chronic_kidney_disease"]
            elif key == "troponin":
                shift = 0.5 * c["heart_failure"] + 0.4 * s.amyloidosis
            elif key == "potassium":
                shift = 0.3 * c["chronic_kidney_disease"] + 0.6 * s.dialysis
            elif key == "sodium":
                shift = -2.0 * c["heart_failure"] - 0.8 * acuity
            elif key == "bicarbonate":
                shift = -1.0 * acuity - 2.0 * s.dialysis
            if lab.log_scale:
                value = lab.center * math.exp(shift + lab.spread * rng.gauss(0.0, 1.0))
            else:
                value = lab.center + shift + lab.spread * rng.gauss(0.0, 1.0)
                value = max(value, lab.spread)
            value = round(value, lab.decimals)
            if lab.decimals == 0:
                value = float(int(value))
            enc.labs.append((self.new_id(), LAB_INDEX[key], t, issued, value))

    # ---------------------------------------------------------------------------- outpatient
    def fill_gap(self, start: int, end: int) -> None:
        """Outpatient life between two time points: dialysis sessions, ED and ambulatory visits."""
        rng, s = self.rng, self.s
        lo, hi = start + DAY, end - DAY
        if hi <= lo:
            return
        n = min(_poisson(rng, (hi - lo) / DAY / OUTPATIENT_DAYS), 6)
        visits: list[int] = []
        for when in sorted(_minute(rng.uniform(lo, hi)) for _ in range(n)):
            if not visits or when - visits[-1] > VISIT_SPACING:  # visits never overlap
                visits.append(when)
        if s.dialysis_intervals:
            day = (lo // DAY + 1) * DAY + 12 * HOUR
            k = 0
            while day < hi:
                when = day + _minute(rng.uniform(0, 120) * MINUTE)
                nearest = bisect.bisect_left(visits, when - VISIT_SPACING)
                if nearest == len(visits) or visits[nearest] > when + VISIT_SPACING:
                    self.dialysis_session(when, k)
                day += s.dialysis_intervals[k % len(s.dialysis_intervals)] * DAY
                k += 1
        for when in visits:
            if rng.random() < 0.35:
                self.ed_visit(when)
            else:
                self.ambulatory_visit(when)

    def dialysis_session(self, t: int, k: int) -> None:
        enc = self.new_encounter("AMB", t, t + 4 * HOUR)
        if k % 12 == 0:
            self.lab_panel(enc, t + 10 * MINUTE, ("potassium",) if k % 24 else ("potassium", "hemoglobin"), 0.0, None)
        if k % 48 == 0:
            self.add_med(enc, "epoetin", t + HOUR, t + 2 * HOUR)

    def ed_visit(self, t: int) -> None:
        rng, s = self.rng, self.s
        enc = self.new_encounter("EMER", t, t + _minute(rng.uniform(2, 9) * HOUR))
        self.add_dx(enc, rng.choice(ED_DX))
        for g in CHRONIC_GROUPS:
            if s.chronic[g] and rng.random() < 0.5:
                self.add_dx(enc, self.group_dx(g))
        panel = ("potassium", "creatinine", "wbc", "hemoglobin")
        self.lab_panel(enc, t + _minute(rng.uniform(20, 90) * MINUTE), panel, 0.3 * rng.gauss(0, 1), None)
        if rng.random() < 0.3:
            self.add_med(enc, "acetaminophen", t + HOUR, enc.end)

    def ambulatory_visit(self, t: int) -> None:
        rng, s = self.rng, self.s
        enc = self.new_encounter("AMB", t, t + _minute(rng.uniform(20, 60) * MINUTE))
        for g in CHRONIC_GROUPS:
            if s.chronic[g] and rng.random() < 0.8:
                self.add_dx(enc, self.group_dx(g))
        self.background_dx(enc, 0.5)
        panel = ["creatinine", "potassium"] if rng.random() < 0.4 else []
        if s.chronic["diabetes"]:
            panel.append("hba1c")
        if panel:
            self.lab_panel(enc, t + 10 * MINUTE, panel, 0.0, None)
        self.chronic_meds(enc, t + 15 * MINUTE, t + 90 * DAY, 0.3)


# Version 4 (random) and RFC 4122 variant bits of a UUID.
_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID_SET = (0x4 << 76) | (0x2 << 62)


def _minute(t: float) -> int:
    return int(t) // MINUTE * MINUTE


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method; means here are small."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def simulate_patient(seed: int, index: int) -> PatientRecord:
    return PatientSimulator(seed, index).run()
