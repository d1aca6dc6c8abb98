"""Upper bound on the AUROC any model can reach on the synthetic cohort's LOS task (issue 6 analysis).

The cohort's "oracle" knows the admission's acuity `a`, which no record shows. This script builds a more
honest ceiling, a *generous oracle*: it knows every other term of the outcome law exactly (frailty z, the
admission's reason, age, amyloidosis, and the rest of the hidden state the lab laws use) but must infer `a`
from the events the generator made, before the prediction time, that depend on it:

- lab values (admission panel, the day-1 morning panel, the ICU-like evening panel) under their exact noise
  model, including the rounding to the reported decimals (interval likelihoods, not densities);
- lactate in the admission panel (always for sepsis, else only when a > 1.0);
- norepinephrine (sepsis with a > 1.0), the evening panel itself (a > 1.5).

P(long stay | observations, known terms) = integral of sigmoid(score(a)) against the exact posterior of a
(prior N(0, 1) times the likelihood), on a grid of cells. Every real model knows less, so (by Neyman-Pearson)
its population ROC curve lies under this one. With `--mortality` the same is done for 30-day mortality at
discharge, where everything the stay produced (all labs, ventilation, the LOS itself, survival of the stay,
the discharge disposition) informs `a`.

The patients are re-simulated with `pipelines/synth_model.py` unchanged: a subclass records each stay's
acuity, state and the noise draw of every lab. Laws the generator computes inline are restated below with the
line they restate, and every restated law is checked against the simulated events (exact reproduction of
every acuity-dependent lab value, of every evening panel time, of every presence rule).

    .venv/bin/python benchmarks/oracle_bound.py --patients 20000 --seed 0 --mortality \
        --out benchmarks/results/oracle_bound_los_2026-11-27.json

With `--frailty` (instead of the above) the same kind of bound for readmission_30d and mortality_30d at
discharge, hiding frailty (and, in a second variant, the acuity too): see "frailty-hidden bound" below.

    .venv/bin/python benchmarks/oracle_bound.py --frailty --patients 20000 --seed 0 \
        --out benchmarks/results/oracle_bound_frailty_2026-11-27.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import expit, log_ndtr, ndtr
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from odyssey.pipelines import synth_model as M
from odyssey.pipelines.fhir_flatten import stable_id
from odyssey.pipelines.splits import SplitRatios, assign_splits
from odyssey.pipelines.synth_catalog import LAB_KEYS, LABS

LOS_CUT = 24 * M.HOUR  # the LOS task's prediction time: admission + 24 h (configs/tasks.yaml)
AVAILABILITY = ("time", "issued")  # tokenizer/config.py: a lab is known at its time, or when issued (default)

# ----------------------------------------------------------------------------- restated generator laws
# Each constant below restates pipelines/synth_model.py (line numbers as of commit fb0449c).
LACTATE_ACUITY = 1.0  # l.495: lactate in the admission panel when reason == "sepsis" or a > 1.0
NOREPINEPHRINE_ACUITY = 1.0  # l.562: norepinephrine when reason == "sepsis" and a > 1.0
EVENING_PANEL_ACUITY = 1.5  # l.514: an evening panel when a > 1.5 and day_start + 13 h < end
VENTILATION_ACUITY = 1.3  # l.531: ventilation when a > 1.3 for sepsis, pneumonia, copd_exacerbation
LONG_VENTILATION_ACUITY = 1.8  # l.532: "ventilation_long" when the stay is long and a > 1.8
VENTILATED_REASONS = ("sepsis", "pneumonia", "copd_exacerbation")
MORNING = 11 * M.HOUR  # l.507: day_start = (t // DAY + 1) * DAY + 11 h
EVENING = 12 * M.HOUR  # l.515: evening panel at day_start + 12 h
EVENING_NEEDS = 13 * M.HOUR  # l.514: ... only when day_start + 13 h < end
ISSUED_DELAY_MINUTES = (25.0, 150.0)  # l.603: issued = t + _minute(uniform(25, 150) minutes)
# l.414-424 pick_disposition: shares taken in order from one uniform draw; HOME takes the rest.
HOSPICE_PER_MORTALITY = 0.25
FIXED_DISPOSITIONS = {"REHAB": 0.06, "HOME HEALTH CARE": 0.2, "AGAINST ADVICE": 0.015}


def snf_share(z: float) -> float:
    """l.417: the skilled-nursing share of pick_disposition."""
    return 0.45 * M.sigmoid(-1.0 + 0.8 * z)


def lab_shift(key: str, flags: dict, z: float, acuity: float, reason: str | None) -> float:
    """The state shift of one lab value (restates synth_model.lab_panel l.606-634, acuity-dependent labs)."""
    c = flags["chronic"]
    sepsis = reason == "sepsis"
    if key == "creatinine":
        return 0.5 * c["chronic_kidney_disease"] + 1.3 * flags["dialysis"] + 0.15 * acuity
    if key == "bun":
        return (0.45 * c["chronic_kidney_disease"] + 0.25 * c["heart_failure"] + 0.8 * flags["dialysis"]
                + 0.15 * acuity)
    if key == "glucose":
        return 0.35 * c["diabetes"] + 0.08 * flags["prediabetes"] + 0.08 * acuity
    if key == "hemoglobin":
        return -1.5 * c["chronic_kidney_disease"] - 0.6 * z - 0.3 * acuity - 1.0 * flags["dialysis"]
    if key == "albumin":
        return -0.3 * z - 0.15 * acuity
    if key == "wbc":
        return 0.5 * sepsis + 0.3 * (reason == "pneumonia") + 0.12 * acuity
    if key == "lactate":
        return 0.6 * sepsis + 0.25 * acuity
    if key == "sodium":
        return -2.0 * c["heart_failure"] - 0.8 * acuity
    if key == "bicarbonate":
        return -1.0 * acuity - 2.0 * flags["dialysis"]
    raise KeyError(key)


ACUITY_LABS = ("creatinine", "bun", "glucose", "hemoglobin", "albumin", "wbc", "lactate", "sodium", "bicarbonate")


def lab_value(key: str, shift: float, noise: float) -> float:
    """A reported value from its shift and standard-normal noise (restates l.635-643)."""
    lab = LABS[key]
    if lab.log_scale:
        value = lab.center * math.exp(shift + lab.spread * noise)
    else:
        value = max(lab.center + shift + lab.spread * noise, lab.spread)
    value = round(value, lab.decimals)
    return float(int(value)) if lab.decimals == 0 else value


class LabReporting:
    """What a model learns of a reported lab value: the value itself (its rounding interval), or with quantile
    bins, as `odyssey tokenize` turns values into tokens (tokenizer/binning.py), only which bin it fell in."""

    def __init__(self):
        self.breaks: dict[str, np.ndarray] | None = None  # lab key -> the tokenizer's cut points; None: exact

    def value_interval(self, key: str, value: float) -> tuple[float, float, bool]:
        """(lo, hi, floor): the unrounded values that report `value` (or any value of its bin) lie in [lo, hi);
        `floor`: the interval reaches the normal labs' floor, where lower values are reported as the floor."""
        lab = LABS[key]
        step = 10.0 ** -lab.decimals
        floor_value = None if lab.log_scale else round(lab.spread, lab.decimals)
        if self.breaks is None or key not in self.breaks:
            return value - 0.5 * step, value + 0.5 * step, value == floor_value
        breaks = self.breaks[key]
        k = int(np.count_nonzero(breaks < value))  # bin k holds the values in (breaks[k - 1], breaks[k]]
        # the bin's lowest and highest reportable values (multiples of `step`), with a tolerance for the float
        # division of values already on the grid
        lowest = -math.inf if k == 0 else (math.floor(breaks[k - 1] / step + 1e-9) + 1) * step
        highest = math.inf if k == len(breaks) else math.floor(breaks[k] / step + 1e-9) * step
        return lowest - 0.5 * step, highest + 0.5 * step, floor_value is not None and lowest <= floor_value


REPORTING = LabReporting()  # exact values unless main() fits bins (--lab-bins)


def fit_lab_breaks(patients: int, seed: int, n_bins: int) -> dict[str, np.ndarray]:
    """Each lab's cut points as `odyssey tokenize` fits them: quantiles k / n_bins (linear interpolation) of
    every reported value of the train split's patients, equal ones merged."""
    labs_by_patient = []
    for index in tqdm(range(patients), desc="values for the bins", unit="patient"):
        record = M.PatientSimulator(seed, index).run()
        labs_by_patient.append((record.id, [(lab, value) for e in record.encounters for _, lab, _, _, value in e.labs]))
    split = patient_splits(patient for patient, _ in labs_by_patient)
    values: dict[str, list[float]] = {key: [] for key in LAB_KEYS}
    for patient, labs in labs_by_patient:
        if split[patient] == "train":
            for lab, value in labs:
                values[LAB_KEYS[lab]].append(value)
    quantiles = [k / n_bins for k in range(1, n_bins)]
    return {key: np.unique(np.quantile(np.asarray(v, dtype=np.float64), quantiles)) for key, v in values.items() if v}


def noise_interval(key: str, value: float, shift0: float) -> tuple[float, float, float]:
    """The noise values that report `value` (as REPORTING sees it), as (low, high, slope): noise in
    [low - slope a, high - slope a) for the acuity term `slope_unit * a` added to shift0 (slope returned per unit
    of the lab's acuity term)."""
    lab = LABS[key]
    lo, hi, at_floor = REPORTING.value_interval(key, value)
    if lab.log_scale:
        low = -math.inf if lo <= 0 else (math.log(lo / lab.center) - shift0) / lab.spread
        high = (math.log(hi / lab.center) - shift0) / lab.spread
    else:
        low = -math.inf if at_floor else (lo - lab.center - shift0) / lab.spread
        high = (hi - lab.center - shift0) / lab.spread
    return low, high, 1.0 / lab.spread


# ----------------------------------------------------------------------------- re-simulation with capture
@dataclass
class LabDraw:
    key: str
    time: int
    issued: int
    value: float
    noise: float
    acuity_term: float  # the acuity the generator passed (a, or a decayed by the day)
    z: float
    panel: str  # admission, morning, evening


@dataclass
class StayCapture:
    patient_index: int
    patient_id: str
    admit: int
    end: int
    stay: M.Stay
    state_at_admission: M.State  # as p_long_stay and p_in_hospital_death saw it
    state_at_discharge: M.State  # as p_mortality saw it
    window_end: int
    labs: list[LabDraw] = field(default_factory=list)
    encounter: M.Encounter | None = None
    truth: M.TruthRow | None = None


class CapturingSimulator(M.PatientSimulator):
    """The generator unchanged, plus a record of each inpatient stay's acuity, state and lab noise."""

    def __init__(self, seed: int, index: int):
        super().__init__(seed, index)
        self.stays: list[StayCapture] = []
        self._current: StayCapture | None = None

    def inpatient(self, t, end, stay, dies):
        s = self.s
        at_discharge = _frozen(s)
        at_admission = dataclasses.replace(at_discharge, admissions=at_discharge.admissions[:-1])  # l.354
        # l.327/376: an in-hospital death is allowed only after the previous survivor's 30-day window.
        window_end = self.truth[-1].discharge_time + M.READMISSION_WINDOW if self.truth else -1
        self._current = StayCapture(self.index, "", t, end, stay, at_admission, at_discharge, window_end)
        try:
            enc = super().inpatient(t, end, stay, dies)
        finally:
            capture, self._current = self._current, None
        capture.encounter = enc
        self.stays.append(capture)
        return enc

    def lab_panel(self, enc, t, keys, acuity, reason):
        capture = self._current
        if capture is None or enc.cls != "IMP":
            return super().lab_panel(enc, t, keys, acuity, reason)
        real = self.rng
        recorder = _GaussRecorder(real)
        first = len(enc.labs)
        z = self.s.frailty(t)
        self.rng = recorder
        try:
            super().lab_panel(enc, t, keys, acuity, reason)
        finally:
            self.rng = real
        panel = "admission" if not capture.labs else ("evening" if (t - EVENING - MORNING) % M.DAY == 0 else "morning")
        for (_, index, when, issued, value), noise in zip(enc.labs[first:], recorder.draws, strict=True):
            capture.labs.append(LabDraw(LAB_KEYS[index], when, issued, value, noise, acuity, z, panel))
        return None


class _GaussRecorder:
    """Delegates to the patient's stream and records every gauss draw (the stream is unchanged)."""

    def __init__(self, rng):
        self._rng = rng
        self.draws: list[float] = []

    def gauss(self, mu, sigma):
        value = self._rng.gauss(mu, sigma)
        self.draws.append(value)
        return value

    def __getattr__(self, name):
        return getattr(self._rng, name)


def _frozen(s: M.State) -> M.State:
    return dataclasses.replace(s, chronic=dict(s.chronic), admissions=list(s.admissions))


def _flags(s: M.State) -> dict:
    return {"chronic": s.chronic, "dialysis": s.dialysis, "prediabetes": s.prediabetes}


def _linear_in_acuity(fn) -> tuple[float, float]:
    """(offset, slope) of logit(fn(a)) = offset + slope a, read off the generator's own function."""
    x0, x1, x2 = (math.log(p / (1 - p)) for p in (fn(0.0), fn(1.0), fn(2.0)))
    if abs((x2 - x1) - (x1 - x0)) > 1e-9:
        raise AssertionError("outcome score is not linear in the acuity")
    return x0, x1 - x0


# ----------------------------------------------------------------------------- per-stay observations
@dataclass
class Observations:
    """What informs the acuity, in a form the grid posterior uses."""

    lab_low: list[float] = field(default_factory=list)  # noise interval at a = 0 ...
    lab_high: list[float] = field(default_factory=list)
    lab_slope: list[float] = field(default_factory=list)  # ... moving by -slope per unit of a
    lower: float = -math.inf  # a > lower
    upper: float = math.inf  # a <= upper
    log_factor_above: dict[float, float] = field(default_factory=dict)  # threshold -> log factor for a > it

    def add_lab(self, draw: LabDraw, flags: dict, reason: str | None, a_true: float) -> None:
        scale = draw.acuity_term / a_true  # 1 at admission, exp(-day / 2.5) later (l.511, l.515)
        shift0 = lab_shift(draw.key, flags, draw.z, 0.0, reason)
        per_acuity = lab_shift(draw.key, flags, draw.z, 1.0, reason) - shift0
        low, high, inv_spread = noise_interval(draw.key, draw.value, shift0)
        self.lab_low.append(low)
        self.lab_high.append(high)
        self.lab_slope.append(per_acuity * scale * inv_spread)

    def above(self, threshold: float) -> None:
        self.lower = max(self.lower, threshold)

    def at_most(self, threshold: float) -> None:
        self.upper = min(self.upper, threshold)


def evening_slots(admit: int, end: int) -> list[int]:
    """Times of the evening panels a stay with a > 1.5 gets (restates the loop of l.507-518)."""
    slots, day_start = [], (admit // M.DAY + 1) * M.DAY + MORNING
    while day_start + 2 * M.HOUR < end:
        if day_start + EVENING_NEEDS < end:
            slots.append(day_start + EVENING)
        day_start += M.DAY
    return slots


def p_issued_by(draw_time: int, cut: int) -> float:
    """P(a panel drawn at draw_time is issued by cut) under l.603 (minute floor of uniform 25-150 min)."""
    minutes = (cut - draw_time) // M.MINUTE
    lo, hi = ISSUED_DELAY_MINUTES
    return min(max((minutes + 1 - lo) / (hi - lo), 0.0), 1.0)


def los_observations(c: StayCapture, availability: str, parts: set[str]) -> Observations:
    """What informs a before admission + 24 h. parts: subset of {labs, thresholds} (the values of labs drawn
    whatever a is; the presence rules with the values they select)."""
    cut = c.admit + LOS_CUT
    reason, a = c.stay.reason, c.stay.acuity
    flags = _flags(c.state_at_admission)
    obs = Observations()
    known_at = (lambda d: d.time) if availability == "time" else (lambda d: max(d.issued, d.time))
    if "labs" in parts:
        for draw in c.labs:
            # A value whose very presence depends on a (lactate outside sepsis, the evening panel) enters
            # only with that presence rule: its value alone would not give an exact posterior.
            presence_selected = draw.panel == "evening" or (draw.key == "lactate" and reason != "sepsis")
            if presence_selected and "thresholds" not in parts:
                continue
            if draw.key in ACUITY_LABS and known_at(draw) <= cut:
                obs.add_lab(draw, flags, reason, a)
    if "thresholds" in parts:
        lactate = any(d.key == "lactate" and d.panel == "admission" for d in c.labs)
        if reason != "sepsis":  # the admission panel is issued within 5 h: always known by the cut
            obs.above(LACTATE_ACUITY) if lactate else obs.at_most(LACTATE_ACUITY)
        else:  # authored 1-6 h after admission (l.563): always known by the cut
            norepinephrine = any(m[1] == "norepinephrine" and m[2] <= cut for m in c.encounter.medications)
            obs.above(NOREPINEPHRINE_ACUITY) if norepinephrine else obs.at_most(NOREPINEPHRINE_ACUITY)
        for slot in evening_slots(c.admit, c.end):
            if slot > cut:
                continue
            seen = [d for d in c.labs if d.panel == "evening" and d.time == slot and known_at(d) <= cut]
            p_seen = 1.0 if availability == "time" else p_issued_by(slot, cut)
            if seen:
                obs.above(EVENING_PANEL_ACUITY)
            elif p_seen >= 1.0:
                obs.at_most(EVENING_PANEL_ACUITY)
            elif p_seen > 0.0:  # a panel may exist but not be issued yet
                obs.log_factor_above[EVENING_PANEL_ACUITY] = (
                    obs.log_factor_above.get(EVENING_PANEL_ACUITY, 0.0) + math.log1p(-p_seen))
    return obs


def discharge_observations(c: StayCapture) -> Observations:
    """What informs a at discharge: every lab, every presence rule, ventilation (LOS and survival: see below)."""
    reason, a = c.stay.reason, c.stay.acuity
    flags = _flags(c.state_at_discharge)
    obs = Observations()
    for draw in c.labs:
        if draw.key in ACUITY_LABS:
            obs.add_lab(draw, flags, reason, a)
    if reason != "sepsis":
        lactate = any(d.key == "lactate" and d.panel == "admission" for d in c.labs)
        obs.above(LACTATE_ACUITY) if lactate else obs.at_most(LACTATE_ACUITY)
    else:
        norepinephrine = any(m[1] == "norepinephrine" for m in c.encounter.medications)
        obs.above(NOREPINEPHRINE_ACUITY) if norepinephrine else obs.at_most(NOREPINEPHRINE_ACUITY)
    if evening_slots(c.admit, c.end):
        evening = any(d.panel == "evening" for d in c.labs)
        obs.above(EVENING_PANEL_ACUITY) if evening else obs.at_most(EVENING_PANEL_ACUITY)
    if reason in VENTILATED_REASONS:
        kinds = {p[1] for p in c.encounter.procedures if p[1].startswith("ventilation")}
        if not kinds:
            obs.at_most(VENTILATION_ACUITY)
        elif "ventilation_long" in kinds:
            obs.above(LONG_VENTILATION_ACUITY)
        else:
            obs.above(VENTILATION_ACUITY)
            if c.stay.long_stay:
                obs.at_most(LONG_VENTILATION_ACUITY)
    return obs


# ----------------------------------------------------------------------------- grid posterior
class Grid:
    """Cells of width `step` on [-limit, limit]; thresholds 1.0 / 1.3 / 1.5 / 1.8 fall on cell edges."""

    def __init__(self, step: float, limit: float = 6.0):
        n = int(round(2 * limit / step))
        self.edges = -limit + step * np.arange(n + 1)
        self.a = 0.5 * (self.edges[1:] + self.edges[:-1])
        self.log_prior = np.log(np.diff(ndtr(self.edges)))


def _log_interval(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """log(Phi(high) - Phi(low)), stable in both tails."""
    upper = low > 0  # both in the upper tail: use the mirrored interval
    lo, hi = np.where(upper, -high, low), np.where(upper, -low, high)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    return log_hi + np.log1p(-np.exp(np.minimum(log_lo - log_hi, 0.0)))


def _add_rows(target: np.ndarray, owners: np.ndarray, rows: np.ndarray) -> None:
    """target[owners[i]] += rows[i]; owners sorted."""
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    target[owners[starts]] += np.add.reduceat(rows, starts, axis=0)


@dataclass
class PosteriorSummary:
    """Per stay: the expected outcome probability, and the posterior's mean, variance and PIT of the true a."""

    outcome: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    pit: np.ndarray


def posterior_summary(observations: list[Observations], grid: Grid, outcome: Callable[[slice], np.ndarray],
                      a_true: np.ndarray, extra: Callable[[slice], np.ndarray] | None = None,
                      chunk: int = 256) -> PosteriorSummary:
    """Posterior of a on the grid for each stay, summarized chunk by chunk (outcome(rows): P(outcome | a)
    on the grid; extra(rows): further log-likelihood on the grid)."""
    n = len(observations)
    out = PosteriorSummary(np.empty(n), np.empty(n), np.empty(n), np.empty(n))
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        block = observations[rows]
        ll = np.zeros((len(block), grid.a.size)) + grid.log_prior
        counts = np.array([len(o.lab_low) for o in block])
        if counts.sum():
            low = np.concatenate([o.lab_low for o in block])[:, None]
            high = np.concatenate([o.lab_high for o in block])[:, None]
            slope = np.concatenate([o.lab_slope for o in block])[:, None]
            _add_rows(ll, np.repeat(np.arange(len(block)), counts), _log_interval(low - slope * grid.a,
                                                                                  high - slope * grid.a))
        for i, o in enumerate(block):
            ll[i, (grid.a <= o.lower) | (grid.a > o.upper)] = -np.inf
            for threshold, factor in o.log_factor_above.items():
                ll[i, grid.a > threshold] += factor
        if extra is not None:
            ll += extra(rows)
        post = np.exp(ll - ll.max(axis=1, keepdims=True))
        post /= post.sum(axis=1, keepdims=True)
        out.outcome[rows] = (post * outcome(rows)).sum(axis=1)
        out.mean[rows] = post @ grid.a
        out.var[rows] = post @ grid.a ** 2 - out.mean[rows] ** 2
        cell = np.clip(np.searchsorted(grid.edges, a_true[rows]) - 1, 0, grid.a.size - 1)
        below = np.cumsum(post, axis=1)[np.arange(len(block)), cell]
        out.pit[rows] = below - 0.5 * post[np.arange(len(block)), cell]
    return out


# ----------------------------------------------------------------------------- statistics
def patient_bootstrap(groups: np.ndarray, y: np.ndarray, scores: dict[str, np.ndarray], resamples: int,
                      seed: int) -> dict[str, dict]:
    """AUROC with a 95% interval from resampling patients; and paired differences to the oracle."""
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = inverse.max() + 1
    point = {k: roc_auc_score(y, s) for k, s in scores.items()}
    draws = {k: [] for k in scores}
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[inverse]
        for k, s in scores.items():
            draws[k].append(roc_auc_score(y, s, sample_weight=weights))
    out = {}
    oracle = np.array(draws["oracle"])
    for k in scores:
        d = np.array(draws[k])
        out[k] = {"auroc": point[k], "ci95": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))],
                  "gap_to_oracle": point["oracle"] - point[k],
                  "gap_ci95": [float(np.quantile(oracle - d, 0.025)), float(np.quantile(oracle - d, 0.975))]}
    return out


def calibration(p: np.ndarray, y: np.ndarray, bins: int = 10) -> dict:
    """A true conditional probability is calibrated: deciles of p against the realized rate."""
    order = np.argsort(p, kind="stable")
    rows = []
    chi2 = 0.0
    for part in np.array_split(order, bins):
        mean_p, rate = float(p[part].mean()), float(y[part].mean())
        var = float((p[part] * (1 - p[part])).sum())
        chi2 += (y[part].sum() - p[part].sum()) ** 2 / var
        rows.append({"n": int(part.size), "mean_probability": mean_p, "realized": rate})
    return {"deciles": rows, "chi2": chi2, "dof": bins,
            "max_abs_gap": max(abs(r["mean_probability"] - r["realized"]) for r in rows)}


def posterior_checks(post: PosteriorSummary, a_true: np.ndarray) -> dict:
    """A correct posterior: E[(a - mean)^2] = E[var]; the true a's posterior CDF (PIT) is uniform."""
    return {
        "corr_posterior_mean_true_a": float(np.corrcoef(post.mean, a_true)[0, 1]),
        "predicted_corr": float(math.sqrt(np.var(post.mean) / (np.var(post.mean) + post.var.mean()))),
        "mse_posterior_mean": float(np.mean((a_true - post.mean) ** 2)),
        "mean_posterior_variance": float(post.var.mean()),
        "pit_mean": float(post.pit.mean()),
        "coverage_90": float(np.mean((post.pit > 0.05) & (post.pit < 0.95))),
    }


# ----------------------------------------------------------------------------- the run
def _run_with_truth(sim):
    """Run one patient's simulator; its captured stays get the patient id and their truth rows."""
    record = sim.run()
    truth = {row.encounter_id: row for row in record.truth}
    for c in sim.stays:
        c.patient_id, c.truth = record.id, truth[c.encounter.id]
    return record


def simulate(patients: int, seed: int) -> list[StayCapture]:
    stays = []
    for index in tqdm(range(patients), desc="simulating", unit="patient"):
        sim = CapturingSimulator(seed, index)
        _run_with_truth(sim)
        stays.extend(sim.stays)
    return stays


def verify_restated_laws(stays: list[StayCapture]) -> dict:
    """Every restated law reproduces the simulated events exactly."""
    labs = value_mismatch = outside = 0
    evening_mismatch = lactate_mismatch = norepi_mismatch = 0
    for c in stays:
        a, reason = c.stay.acuity, c.stay.reason
        flags = _flags(c.state_at_admission)
        for d in c.labs:
            if d.key not in ACUITY_LABS:
                continue
            labs += 1
            shift = lab_shift(d.key, flags, d.z, d.acuity_term, reason)
            value_mismatch += lab_value(d.key, shift, d.noise) != d.value
            shift0 = lab_shift(d.key, flags, d.z, 0.0, reason)
            low, high, inv = noise_interval(d.key, d.value, shift0)
            moved = (shift - shift0) * inv
            outside += not (low - moved <= d.noise < high - moved)
        expected = evening_slots(c.admit, c.end) if a > EVENING_PANEL_ACUITY else []
        evening_mismatch += sorted({d.time for d in c.labs if d.panel == "evening"}) != expected
        has_lactate = any(d.key == "lactate" and d.panel == "admission" for d in c.labs)
        lactate_mismatch += has_lactate != (reason == "sepsis" or a > LACTATE_ACUITY)
        has_norepi = any(m[1] == "norepinephrine" for m in c.encounter.medications)
        norepi_mismatch += has_norepi != (reason == "sepsis" and a > NOREPINEPHRINE_ACUITY)
    return {"acuity_labs": labs, "value_mismatches": value_mismatch, "noise_outside_interval": outside,
            "evening_panel_mismatches": evening_mismatch, "lactate_rule_mismatches": lactate_mismatch,
            "norepinephrine_rule_mismatches": norepi_mismatch}


REASON_MEDS = {"vancomycin": "sepsis", "ceftriaxone": "pneumonia", "furosemide_iv": "hf_exacerbation",
               "prednisone": "copd_exacerbation"}  # l.554-561: orders 0.5-4 h after admission


def reason_from_orders(c: StayCapture, cut: int) -> str:
    seen = {REASON_MEDS[m[1]] for m in c.encounter.medications if m[1] in REASON_MEDS and m[2] <= cut}
    return seen.pop() if len(seen) == 1 else ("other" if not seen else "ambiguous")


def patient_splits(patient_ids) -> dict[str, str]:
    """Each patient's split as `odyssey ingest` assigns it (configs/ingest.yaml ratios and seed)."""
    subjects = {patient: stable_id("Patient", patient) for patient in patient_ids}
    splits = assign_splits(list(subjects.values()), SplitRatios())
    by_subject = dict(zip(splits["subject_id"].to_list(), splits["split"].to_list(), strict=True))
    return {patient: by_subject[subject] for patient, subject in subjects.items()}


def held_out_mask(stays: list[StayCapture]) -> np.ndarray:
    """Admissions of the held_out split `odyssey ingest` assigns."""
    split = patient_splits({c.patient_id for c in stays})
    return np.array([split[c.patient_id] == "held_out" for c in stays])


def los_analysis(stays: list[StayCapture], grid: Grid, fine: Grid, resamples: int, seed: int) -> dict:
    eligible = [c for c in stays if c.truth.los_7d is not None]
    y = np.array([c.truth.los_7d for c in eligible], dtype=np.int8)
    truth_p = np.array([c.truth.los_7d_probability for c in eligible])
    a_true = np.array([c.stay.acuity for c in eligible])
    offsets, slopes, exact = [], [], 0
    for c in eligible:
        s, t, reason = c.state_at_admission, c.admit, c.stay.reason
        exact += M.p_long_stay(s, t, c.stay.acuity, reason) == c.truth.los_7d_probability
        x0, slope = _linear_in_acuity(lambda a, s=s, t=t, r=reason: M.p_long_stay(s, t, a, r))
        offsets.append(x0)
        slopes.append(slope)
    offsets, slopes = np.array(offsets), np.array(slopes)
    known_a = expit(offsets + slopes * a_true)

    def outcome_on(g: Grid) -> Callable[[slice], np.ndarray]:
        return lambda rows: expit(offsets[rows, None] + slopes[rows, None] * g.a)

    scores = {"oracle": truth_p, "known_a_recomputed": known_a, "acuity_hidden_no_information": offsets}
    checks = {}
    variants = {
        "bound_time": ("time", {"labs", "thresholds"}),
        "bound_issued": ("issued", {"labs", "thresholds"}),
        "always_drawn_lab_values_only": ("time", {"labs"}),
        "presence_rules_only": ("time", {"thresholds"}),
    }
    for name, (availability, parts) in tqdm(variants.items(), desc="LOS posteriors"):
        obs = [los_observations(c, availability, parts) for c in eligible]
        post = posterior_summary(obs, grid, outcome_on(grid), a_true)
        scores[name] = post.outcome
        checks[name] = {"posterior": posterior_checks(post, a_true), "calibration": calibration(post.outcome, y),
                        "mean_probability": float(post.outcome.mean()),
                        "acuity_labs_per_stay": float(np.mean([len(o.lab_low) for o in obs]))}
        if name == "bound_time":  # grid convergence on a subset
            few = min(3000, len(obs))
            finer = posterior_summary(obs[:few], fine, outcome_on(fine), a_true[:few])
            checks[name]["max_abs_change_at_4x_finer_grid"] = float(np.max(np.abs(finer.outcome - post.outcome[:few])))

    reasons = [reason_from_orders(c, c.admit + LOS_CUT) for c in eligible]
    groups = np.array([c.patient_index for c in eligible])
    held = held_out_mask(eligible)
    return {
        "admissions": len(eligible), "patients": int(np.unique(groups).size), "prevalence": float(y.mean()),
        "mean_truth_probability": float(truth_p.mean()),
        "known_a_reproduces_truth": {"exact_equal": int(exact), "of": len(eligible),
                                     "max_abs_diff_linearized": float(np.max(np.abs(known_a - truth_p)))},
        "slope_per_acuity": float(np.median(slopes)),
        "auroc": patient_bootstrap(groups, y, scores, resamples, seed),
        "held_out": {"admissions": int(held.sum()),
                     "auroc": patient_bootstrap(groups[held], y[held], {k: v[held] for k, v in scores.items()},
                                                resamples, seed)},
        "checks": {"oracle_calibration": calibration(truth_p, y), **checks},
        "hidden_reason": {
            "reason_identified_by_orders_before_cut": int(sum(r == c.stay.reason for r, c in zip(reasons, eligible, strict=True))),
            "of": len(eligible),
            "note": "sepsis, pneumonia, HF and COPD exacerbations get their own orders 0.5-4 h after admission; "
                    "when every reason is identified, hiding it leaves the bound unchanged"},
    }


def mortality_analysis(stays: list[StayCapture], grid: Grid, resamples: int, seed: int) -> dict:
    """30-day mortality at discharge, only the acuity hidden; everything the stay produced informs it."""
    eligible = [c for c in stays if c.truth.mortality_30d is not None]
    n = len(eligible)
    y = np.array([c.truth.mortality_30d for c in eligible], dtype=np.int8)
    truth_p = np.array([c.truth.mortality_30d_probability for c in eligible])
    a_true = np.array([c.stay.acuity for c in eligible])
    # logit-linear terms in a: outcome, P(long stay), P(in-hospital death); NaN offset: term absent
    mortality, length, death = np.zeros((n, 2)), np.full((n, 2), np.nan), np.full((n, 2), np.nan)
    long_stay = np.array([c.stay.long_stay for c in eligible])
    hospice = np.zeros(n, dtype=bool)
    home_rest = np.full(n, np.nan)  # P(HOME) = home_rest - 0.25 p_m(a)
    exact = 0
    for i, c in enumerate(eligible):
        s_end, s_adm, reason = c.state_at_discharge, c.state_at_admission, c.stay.reason
        exact += M.p_mortality(s_end, c.end, c.stay) == c.truth.mortality_30d_probability
        mortality[i] = _linear_in_acuity(
            lambda a, s=s_end, c=c: M.p_mortality(s, c.end, dataclasses.replace(c.stay, acuity=a)))
        if c.truth.los_7d is not None:  # the stay's length is known at discharge (stays < 24 h: no LOS draw)
            length[i] = _linear_in_acuity(lambda a, s=s_adm, c=c, r=reason: M.p_long_stay(s, c.admit, a, r))
        if c.end > c.window_end:  # it survived a draw it could have died in (l.350)
            death[i] = _linear_in_acuity(
                lambda a, s=s_adm, c=c, r=reason: M.p_in_hospital_death(s, c.admit, a, r))
        hospice[i] = c.encounter.disposition == "HOSPICE"
        if c.encounter.disposition == "HOME":
            home_rest[i] = 1.0 - snf_share(s_end.frailty(c.end)) - sum(FIXED_DISPOSITIONS.values())

    def p_outcome(rows: slice) -> np.ndarray:
        return expit(mortality[rows, :1] + mortality[rows, 1:] * grid.a)

    def extra(rows: slice) -> np.ndarray:
        ll = np.zeros((rows.stop - rows.start, grid.a.size))
        x = length[rows, :1] + length[rows, 1:] * grid.a
        has = ~np.isnan(length[rows, 0])
        sign = np.where(long_stay[rows], 1.0, -1.0)[:, None]
        ll[has] -= np.logaddexp(0.0, -sign[has] * x[has])  # log sigmoid(+-x)
        x = death[rows, :1] + death[rows, 1:] * grid.a
        has = ~np.isnan(death[rows, 0])
        ll[has] -= np.logaddexp(0.0, x[has])  # log(1 - sigmoid(x))
        p_hospice = HOSPICE_PER_MORTALITY * p_outcome(rows)
        ll[hospice[rows]] += np.log(p_hospice[hospice[rows]])
        home = ~np.isnan(home_rest[rows])
        ll[home] += np.log(home_rest[rows][home, None] - p_hospice[home])
        return ll

    obs = [discharge_observations(c) for c in tqdm(eligible, desc="mortality observations")]
    post = posterior_summary(obs, grid, p_outcome, a_true, extra)
    scores = {"oracle": truth_p, "bound_discharge": post.outcome,
              "known_a_recomputed": expit(mortality[:, 0] + mortality[:, 1] * a_true)}
    groups = np.array([c.patient_index for c in eligible])
    held = held_out_mask(eligible)
    return {
        "admissions": n, "prevalence": float(y.mean()),
        "known_a_reproduces_truth": {"exact_equal": int(exact), "of": n},
        "auroc": patient_bootstrap(groups, y, scores, resamples, seed),
        "held_out": {"admissions": int(held.sum()),
                     "auroc": patient_bootstrap(groups[held], y[held], {k: v[held] for k, v in scores.items()},
                                                resamples, seed)},
        "checks": {"oracle_calibration": calibration(truth_p, y),
                   "bound_discharge": {"posterior": posterior_checks(post, a_true),
                                       "calibration": calibration(post.outcome, y),
                                       "acuity_labs_per_stay": float(np.mean([len(o.lab_low) for o in obs]))}},
    }


# ============================================================================= frailty-hidden bound
# `--frailty`: readmission_30d and mortality_30d at discharge, the score knowing everything in the outcome
# laws (acuity included) except frailty. z(t) = x + 0.045 (age - 70) + 0.15 min(#admissions, 6), where
# x = f0 + drift is the only hidden part: f0 ~ N(0, 1) and the drift a random walk stepped at each admission
# (l.396-400). x is inferred by an exact forward filter on a grid (an HMM over the patient's admissions),
# given every event before the discharge whose law depends on z:
# - every albumin and hemoglobin value (baseline, dialysis, ED, inpatient panels) under its exact law,
#   rounding and floor included (interval likelihoods); in ED panels the acuity 0.3 N(0, 1) is hidden too
#   and widens the noise (a sum of Gaussians);
# - heart failure at the baseline visit (l.289), the condition groups of each admission (p_next_conditions,
#   fixed at the previous discharge), the LOS draw, survival of the in-hospital death draw, each
#   discharge's disposition, and for earlier stays: survival of the mortality draw, the readmission draw,
#   `continues` and the gap to a next non-readmission admission.
# Events left out (ED / ambulatory visit counts do not depend on z) would only loosen the bound.
FRAILTY_LABS = ("albumin", "hemoglobin")
ED_ACUITY_SD = 0.3  # l.688: an ED panel's acuity is 0.3 * gauss(0, 1)
DRIFT_SD_PER_SQRT_YEAR = 0.3  # l.399
BASELINE_HF = (-3.2, 0.06, 0.4, 1.0)  # l.289: logit = -3.2 + 0.06 (age0 - 65) + 0.4 f0 + 1.0 amyloidosis
CONTINUES = (0.1, 0.25, 0.3)  # l.394: sigmoid(0.1 + 0.25 z + 0.3 #chronic)
GAP_DAYS = (500.0, 0.4, 0.3)  # l.388: mean 500 / (1 + 0.4 #chronic + 0.3 max(z, 0)) days ...
GAP_AFTER = 31 * M.DAY  # l.389: ... after discharge + 31 days, floored to the minute


@dataclass
class FrailtyLab:
    key: str
    time: int
    value: float
    segment: int  # admissions so far = drift steps so far
    low: float  # standardized noise interval at x = 0 (hidden ED acuity folded into the noise) ...
    high: float
    slope: float  # ... moving by -slope x
    z_true: float
    full_shift: float  # for the verification: the shift the generator used ...
    noise: float  # ... its noise draw ...
    total_noise: float  # ... and the standardized noise the likelihood sees (hidden acuity included)
    acuity_slope: float = 0.0  # inpatient values: the interval moves by -acuity_slope per unit of stay acuity
    stay_acuity: float = 0.0  # (included in low / high above)


@dataclass
class PatientCapture:
    index: int
    patient_id: str = ""
    age0: float = 0.0
    amyloidosis: bool = False
    baseline_hf: bool = False
    first_groups_state: M.State | None = None
    first_admission: int = 0
    drift_steps: list[tuple[int, float, float]] = field(default_factory=list)  # (time, variance, x after)
    labs: list[FrailtyLab] = field(default_factory=list)
    stays: list[StayCapture] = field(default_factory=list)


class FrailtyCapturingSimulator(CapturingSimulator):
    """CapturingSimulator plus every albumin / hemoglobin value's law and every drift step."""

    def __init__(self, seed: int, index: int):
        super().__init__(seed, index)
        self.capture = PatientCapture(index)

    def baseline_visit(self, t):
        s = self.s
        self.capture.age0, self.capture.amyloidosis = s.age(s.t0), s.amyloidosis
        self.capture.baseline_hf = s.chronic["heart_failure"]
        return super().baseline_visit(t)

    def admissions(self, t):
        self.capture.first_groups_state, self.capture.first_admission = _frozen(self.s), t  # l.326
        return super().admissions(t)

    def update_drift(self, t):
        years = max(t - self.s.drift_time, 0) / M.YEAR
        super().update_drift(t)
        self.capture.drift_steps.append((t, (DRIFT_SD_PER_SQRT_YEAR * math.sqrt(years)) ** 2,
                                         self.s.frailty0 + self.s.drift))

    def lab_panel(self, enc, t, keys, acuity, reason):
        s, real = self.s, self.rng
        recorder = _GaussRecorder(real)
        first = len(enc.labs)
        self.rng = recorder
        try:
            super().lab_panel(enc, t, keys, acuity, reason)
        finally:
            self.rng = real
        flags, x = _flags(s), s.frailty0 + s.drift
        z = s.frailty(t)
        hidden_acuity = enc.cls == "EMER"
        known_acuity = 0.0 if hidden_acuity else acuity
        for (_, index, when, _, value), noise in zip(enc.labs[first:], recorder.draws, strict=True):
            key = LAB_KEYS[index]
            if key not in FRAILTY_LABS:
                continue
            spread = LABS[key].spread
            shift_x0 = lab_shift(key, flags, z - x, known_acuity, reason)  # z at x = 0
            per_z = lab_shift(key, flags, 1.0, known_acuity, reason) - lab_shift(key, flags, 0.0, known_acuity, reason)
            per_acuity = lab_shift(key, flags, 0.0, 1.0, reason) - lab_shift(key, flags, 0.0, 0.0, reason)
            hidden_sd = abs(per_acuity) * ED_ACUITY_SD if hidden_acuity else 0.0
            scale = spread / math.hypot(spread, hidden_sd)  # noise in units of the total sd
            low, high, _ = noise_interval(key, value, shift_x0)
            full_shift = lab_shift(key, flags, z, acuity, reason)
            total_noise = (full_shift + spread * noise - lab_shift(key, flags, z, known_acuity, reason)) / spread
            stay = self._current.stay if enc.cls == "IMP" and self._current is not None else None
            acuity_slope = per_acuity * acuity / stay.acuity / spread if stay is not None else 0.0
            self.capture.labs.append(FrailtyLab(
                key, when, value, len(s.admissions), low * scale, high * scale, per_z / spread * scale, z,
                full_shift, noise, total_noise * scale, acuity_slope, stay.acuity if stay is not None else 0.0))


def simulate_frailty(patients: int, seed: int) -> list[PatientCapture]:
    out = []
    for index in tqdm(range(patients), desc="simulating", unit="patient"):
        sim = FrailtyCapturingSimulator(seed, index)
        sim.capture.patient_id = _run_with_truth(sim).id
        sim.capture.stays = sim.stays
        out.append(sim.capture)
    return out


def _logit_in_x(fn: Callable[[M.State], float], state: M.State) -> tuple[float, float]:
    """(offset, slope) of logit(fn(state)) = offset + slope x, x = f0 + drift, read off the generator's law."""
    x0, x1, x2 = (math.log(p / (1 - p)) for p in (
        fn(dataclasses.replace(state, frailty0=v, drift=0.0)) for v in (0.0, 1.0, 2.0)))
    if abs((x2 - x1) - (x1 - x0)) > 1e-9:
        raise AssertionError("law is not logit-linear in frailty")
    return x0, x1 - x0


def _z_offset(state: M.State, t: int) -> float:
    """z - x: the known part of frailty (age and admission count)."""
    return state.frailty(t) - state.frailty0 - state.drift


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


class FrailtyGrid:
    """Cells of width `step` on [-limit, limit] for x, with the N(0, 1) prior of f0."""

    def __init__(self, step: float, limit: float = 10.0):
        n = int(round(2 * limit / step))
        self.step = step
        self.edges = -limit + step * np.arange(n + 1)
        self.x = 0.5 * (self.edges[1:] + self.edges[:-1])
        self.log_prior = np.log(np.maximum(np.diff(ndtr(self.edges)), 1e-300))

    def step_drift(self, log_p: np.ndarray, variance: float) -> np.ndarray:
        """x += N(0, variance): mass at cell centers spread by the cell-integrated kernel."""
        sd = math.sqrt(variance)
        reach = int(math.ceil(8 * sd / self.step))
        if reach == 0 or sd == 0.0:
            return log_p
        m = np.arange(-reach, reach + 1)
        kernel = np.diff(ndtr(np.r_[m - 0.5, reach + 0.5] * self.step / sd))
        top = log_p.max()
        p = np.convolve(np.exp(log_p - top), kernel, mode="full")[reach:reach + log_p.size]
        with np.errstate(divide="ignore"):
            return np.log(p) + top


@dataclass
class DischargePrediction:
    stay: StayCapture
    mortality: float  # E[p_mortality | observations]
    readmission: float  # E[(1 - p_mortality) q | observations]
    x_mean: float
    x_var: float
    x_pit: float
    x_true: float
    mortality_known_x: float
    readmission_known_x: float
    a_mean: float = math.nan  # with the acuity hidden too: its posterior
    a_var: float = math.nan
    a_pit: float = math.nan


def _disposition_log_lik(disposition: str, grid_z: np.ndarray, p_m: np.ndarray) -> np.ndarray:
    """log P(disposition | z) under pick_disposition (l.414-424)."""
    snf = 0.45 * expit(-1.0 + 0.8 * grid_z)
    hospice = HOSPICE_PER_MORTALITY * p_m
    if disposition == "HOSPICE":
        return np.log(hospice)
    if disposition == "SKILLED NURSING FACILITY":
        return np.log(snf)
    if disposition == "HOME":
        return np.log(1.0 - hospice - snf - sum(FIXED_DISPOSITIONS.values()))
    if disposition in FIXED_DISPOSITIONS:
        return np.zeros_like(grid_z)
    raise ValueError(f"unknown disposition {disposition!r}")


def _lab_log_lik(labs: list[FrailtyLab], x: np.ndarray) -> np.ndarray:
    if not labs:
        return np.zeros_like(x)
    low = np.array([d.low for d in labs])[:, None]
    high = np.array([d.high for d in labs])[:, None]
    slope = np.array([d.slope for d in labs])[:, None]
    return _log_interval(low - slope * x, high - slope * x).sum(axis=0)


def frailty_forward(p: PatientCapture, grid: FrailtyGrid, parts: set[str],
                    acuity_grid: Grid | None = None) -> list[DischargePrediction]:
    """Forward filter over the patient's admissions; a prediction at each survived discharge.
    parts: subset of {labs, events} (the lab values; the other z-dependent draws). With acuity_grid, each
    stay's acuity is hidden too: a joint (acuity, x) grid per stay, marginalized before the next."""
    x = grid.x
    log_p = grid.log_prior.copy()
    if "events" in parts:  # l.289: heart failure at baseline, a draw on f0 = x before any drift
        b0, b_age, b_f, b_amy = BASELINE_HF
        logit = b0 + b_age * (p.age0 - 65) + b_f * x + b_amy * p.amyloidosis
        log_p += _log_sigmoid(logit if p.baseline_hf else -logit)
    labs_by_segment: dict[int, list[FrailtyLab]] = {}
    for d in p.labs:
        labs_by_segment.setdefault(d.segment, []).append(d)
    out = []
    previous: StayCapture | None = None
    for k, c in enumerate(p.stays, start=1):
        # --- segment k-1: labs before admission k, and draws made at the previous discharge
        if "labs" in parts:
            log_p += _lab_log_lik([d for d in labs_by_segment.get(k - 1, []) if d.time < c.admit
                                   and (previous is None or d.time > previous.end)], x)
        if "events" in parts:
            if previous is None:
                state, t, reason = p.first_groups_state, p.first_admission, "other"
            else:
                state, t, reason = previous.state_at_discharge, previous.end, previous.stay.reason
                log_p += _past_discharge_log_lik(previous, c, x, survival=acuity_grid is None)
            for g, present in c.stay.groups.items():
                b0, b1 = _logit_in_x(lambda s, g=g, t=t, r=reason: M.p_next_conditions(s, t, r)[g], state)
                log_p += _log_sigmoid((b0 + b1 * x) if present else -(b0 + b1 * x))
        # --- admission k: the drift step, then the stay
        time, variance, x_true = p.drift_steps[k - 1]
        if time != c.admit:
            raise AssertionError("drift step and admission out of step")
        log_p = grid.step_drift(log_p, variance)
        s_adm, s_end = c.state_at_admission, c.state_at_discharge
        if acuity_grid is not None:
            if c.truth.mortality_30d is None:
                break
            following = p.stays[k] if k < len(p.stays) else None
            prediction, log_p = _joint_stay(c, labs_by_segment.get(k, []), log_p, grid, acuity_grid, following,
                                            x_true)
            out.append(prediction)
            previous = c
            continue
        if "events" in parts:
            if c.truth.los_7d is not None:
                b0, b1 = _logit_in_x(lambda s, c=c: M.p_long_stay(s, c.admit, c.stay.acuity, c.stay.reason), s_adm)
                log_p += _log_sigmoid((b0 + b1 * x) if c.stay.long_stay else -(b0 + b1 * x))
            if c.end > c.window_end:
                b0, b1 = _logit_in_x(lambda s, c=c: M.p_in_hospital_death(s, c.admit, c.stay.acuity, c.stay.reason), s_adm)
                log_p += _log_sigmoid(-(b0 + b1 * x))
        if "labs" in parts:
            log_p += _lab_log_lik([d for d in labs_by_segment.get(k, []) if d.time <= c.end], x)
        if c.truth.mortality_30d is None:  # died in hospital: the record ends
            break
        m0, m1 = _logit_in_x(lambda s, c=c: M.p_mortality(s, c.end, c.stay), s_end)
        q0, q1 = _logit_in_x(lambda s, c=c: M.p_readmission_if_alive(s, c.end), s_end)
        p_m, q = expit(m0 + m1 * x), expit(q0 + q1 * x)
        if "events" in parts:
            log_p += _disposition_log_lik(c.encounter.disposition, x + _z_offset(s_end, c.end), p_m)
        post = np.exp(log_p - log_p.max())
        post /= post.sum()
        mean = float(post @ x)
        cell = int(np.clip(np.searchsorted(grid.edges, x_true) - 1, 0, x.size - 1))
        out.append(DischargePrediction(
            c, float(post @ p_m), float(post @ ((1 - p_m) * q)), mean, float(post @ x ** 2 - mean ** 2),
            float(post[:cell].sum() + 0.5 * post[cell]), x_true,
            float(expit(m0 + m1 * x_true)), float((1 - expit(m0 + m1 * x_true)) * expit(q0 + q1 * x_true))))
        previous = c
    return out


def _acuity_log_lik(o: Observations, grid: Grid) -> np.ndarray:
    """Prior plus log-likelihood of the acuity on the grid (as posterior_summary, for one stay)."""
    ll = grid.log_prior.copy()
    if o.lab_low:
        low, high, slope = (np.array(v)[:, None] for v in (o.lab_low, o.lab_high, o.lab_slope))
        ll += _log_interval(low - slope * grid.a, high - slope * grid.a).sum(axis=0)
    ll[(grid.a <= o.lower) | (grid.a > o.upper)] = -np.inf
    for threshold, factor in o.log_factor_above.items():
        ll[grid.a > threshold] += factor
    return ll


def _logit_in_a_x(fn: Callable[[M.State, float], float], state: M.State) -> tuple[float, float, float]:
    """(offset, per acuity, per x) of a law logit-linear in both, read off the generator's law."""
    rows = [_logit_in_x(lambda s, a=a: fn(s, a), state) for a in (0.0, 1.0, 2.0)]
    if abs(rows[1][1] - rows[0][1]) > 1e-9 or abs((rows[2][0] - rows[1][0]) - (rows[1][0] - rows[0][0])) > 1e-9:
        raise AssertionError("law is not additive and logit-linear in acuity and frailty")
    return rows[0][0], rows[1][0] - rows[0][0], rows[0][1]


PRUNE_LOG = 30.0  # grid cells whose log mass is this far below the peak are dropped (e^-30)


def _pit(mass: np.ndarray, edges: np.ndarray, value: float) -> float:
    """Posterior CDF at the true value (half its cell counted)."""
    cell = int(np.clip(np.searchsorted(edges, value) - 1, 0, mass.size - 1))
    return float(mass[:cell].sum() + 0.5 * mass[cell])


def _joint_stay(c: StayCapture, segment_labs: list[FrailtyLab], log_p: np.ndarray, grid: FrailtyGrid,
                agrid: Grid, following: StayCapture | None, x_true: float) -> tuple[DischargePrediction, np.ndarray]:
    """One survived stay with acuity and x hidden: the joint posterior at discharge, and the log mass of x
    carried to the next admission (after the survival of this discharge's mortality draw)."""
    without_frailty_labs = dataclasses.replace(c, labs=[d for d in c.labs if d.key not in FRAILTY_LABS])
    ll_a = _acuity_log_lik(discharge_observations(without_frailty_labs), agrid)
    keep_a, keep_x = ll_a > ll_a.max() - PRUNE_LOG, log_p > log_p.max() - PRUNE_LOG
    a, x = agrid.a[keep_a][:, None], grid.x[keep_x][None, :]
    joint = ll_a[keep_a][:, None] + log_p[keep_x][None, :]
    for d in segment_labs:
        if d.time > c.end:
            continue
        shift = d.acuity_slope * (a - d.stay_acuity) + d.slope * x
        joint = joint + _log_interval(d.low - shift, d.high - shift)
    s_adm, s_end = c.state_at_admission, c.state_at_discharge
    if c.truth.los_7d is not None:
        b0, ba, bx = _logit_in_a_x(lambda s, v: M.p_long_stay(s, c.admit, v, c.stay.reason), s_adm)
        joint = joint + _log_sigmoid((1.0 if c.stay.long_stay else -1.0) * (b0 + ba * a + bx * x))
    if c.end > c.window_end:
        b0, ba, bx = _logit_in_a_x(lambda s, v: M.p_in_hospital_death(s, c.admit, v, c.stay.reason), s_adm)
        joint = joint - np.logaddexp(0.0, b0 + ba * a + bx * x)
    m0, ma, mx = _logit_in_a_x(lambda s, v: M.p_mortality(s, c.end, dataclasses.replace(c.stay, acuity=v)), s_end)
    q0, q1 = _logit_in_x(lambda s: M.p_readmission_if_alive(s, c.end), s_end)
    m_logit = m0 + ma * a + mx * x
    p_m, q = expit(m_logit), expit(q0 + q1 * x)
    joint = joint + _disposition_log_lik(c.encounter.disposition, x + _z_offset(s_end, c.end), p_m)
    post = np.exp(joint - joint.max())
    post /= post.sum()
    px, pa = np.zeros(grid.x.size), np.zeros(agrid.a.size)
    px[keep_x], pa[keep_a] = post.sum(axis=0), post.sum(axis=1)
    a_true = c.stay.acuity
    x_mean, a_mean = float(px @ grid.x), float(pa @ agrid.a)
    m_known = float(expit(m0 + ma * a_true + mx * x_true))
    prediction = DischargePrediction(
        c, float((post * p_m).sum()), float((post * (1 - p_m) * q).sum()),
        x_mean, float(px @ grid.x ** 2 - x_mean ** 2), _pit(px, grid.edges, x_true), x_true,
        m_known, (1 - m_known) * float(expit(q0 + q1 * x_true)),
        a_mean, float(pa @ agrid.a ** 2 - a_mean ** 2), _pit(pa, agrid.edges, a_true))
    carried = np.full(grid.x.size, -np.inf)
    if following is not None:  # the mortality draw of this discharge was survived
        with np.errstate(divide="ignore"):
            carried[keep_x] = np.log(np.maximum((post * expit(-m_logit)).sum(axis=0), 0.0)) + joint.max()
    return prediction, carried


def _past_discharge_log_lik(c: StayCapture, following: StayCapture, x: np.ndarray,
                            survival: bool = True) -> np.ndarray:
    """Draws at an earlier discharge that the next admission reveals: survival of the mortality draw, the
    readmission draw, and without a readmission `continues` and the gap (l.365-390)."""
    s = c.state_at_discharge
    m0, m1 = _logit_in_x(lambda st: M.p_mortality(st, c.end, c.stay), s)
    q0, q1 = _logit_in_x(lambda st: M.p_readmission_if_alive(st, c.end), s)
    ll = _log_sigmoid(-(m0 + m1 * x)) if survival else np.zeros_like(x)
    if c.truth.readmission_30d:
        return ll + _log_sigmoid(q0 + q1 * x)
    z = x + _z_offset(s, c.end)
    chronic = sum(s.chronic.values())
    c0, c_z, c_chronic = CONTINUES
    ll += _log_sigmoid(-(q0 + q1 * x)) + _log_sigmoid(c0 + c_z * z + c_chronic * chronic)
    base, per_chronic, per_z = GAP_DAYS
    mean_days = base / (1 + per_chronic * chronic + per_z * np.maximum(z, 0.0))
    gap_days = (following.admit - c.end - GAP_AFTER) / M.DAY
    minute_days = M.MINUTE / M.DAY  # the draw is floored to the minute: an interval of one minute
    return ll - gap_days / mean_days + np.log(-np.expm1(-minute_days / mean_days))


def verify_frailty_laws(patients: list[PatientCapture]) -> dict:
    """Every albumin / hemoglobin value reproduced from its restated law; its noise inside its interval;
    drift steps standardized; gaps to non-readmission admissions: exp(-gap / mean) uniform under true z."""
    labs = mismatch = outside = clamped = 0
    steps, gap_pit = [], []
    for p in patients:
        for d in p.labs:
            labs += 1
            mismatch += lab_value(d.key, d.full_shift, d.noise) != d.value
            clamped += d.value == round(LABS[d.key].spread, LABS[d.key].decimals)
        previous_x = p.first_groups_state.frailty0  # no drift before the first admission
        for _, variance, x_after in p.drift_steps:
            if variance > 0:
                steps.append((x_after - previous_x) / math.sqrt(variance))
            previous_x = x_after
        for c, nxt in zip(p.stays, p.stays[1:], strict=False):
            if not c.truth.readmission_30d:
                s = c.state_at_discharge
                z = s.frailty(c.end)
                mean_days = GAP_DAYS[0] / (1 + GAP_DAYS[1] * sum(s.chronic.values()) + GAP_DAYS[2] * max(z, 0))
                gap_pit.append(math.exp(-(nxt.admit - c.end - GAP_AFTER) / M.DAY / mean_days))
    for p in patients:  # the standardized noise inside its interval at the true x
        x_by_segment = [p.first_groups_state.frailty0] + [x for _, _, x in p.drift_steps]
        for d in p.labs:
            x = x_by_segment[d.segment]
            outside += not (d.low - d.slope * x <= d.total_noise < d.high - d.slope * x)
    steps_arr, pit = np.array(steps), np.array(gap_pit)
    return {"frailty_labs": labs, "value_mismatches": int(mismatch), "noise_outside_interval": int(outside),
            "clamped_values": int(clamped), "drift_steps": int(steps_arr.size),
            "drift_step_z_mean": float(steps_arr.mean()), "drift_step_z_var": float(steps_arr.var()),
            "gaps": int(pit.size), "gap_pit_mean": float(pit.mean()), "gap_pit_var": float(pit.var()),
            "note": "drift z-scores ~ N(0, 1) and gap PITs ~ U(0, 1) (mean 0.5, var 1/12) under the restated laws"}


FRAILTY_VARIANTS = {
    "frailty_hidden_bound": "frailty x hidden, every stay's acuity known; x inferred (exact grid forward filter) from "
                            "every albumin/hemoglobin value and every z-dependent draw up to the discharge",
    "frailty_hidden_labs_only": "diagnostic, not a bound: the lab values only; the z-dependence of the known admission "
                                "timeline, condition groups, LOS, survival and dispositions is ignored",
    "frailty_hidden_bound_acuity_hidden_too": "frailty and each stay's acuity hidden: a joint (acuity, x) grid per stay "
                                              "with all of the stay's acuity evidence (labs, presence rules, "
                                              "ventilation, LOS, survival, disposition)",
    "known": "everything else in the outcome laws and the generator's state: chronic groups, dialysis, amyloidosis, "
             "prediabetes, reason, long stay, age, admission times and count, condition groups",
}


def frailty_analysis(patients: list[PatientCapture], step: float, acuity_step: float, resamples: int,
                     seed: int) -> dict:
    grid, acuity_grid = FrailtyGrid(step), Grid(acuity_step)
    variants = {"bound": ({"labs", "events"}, None), "labs_only": ({"labs"}, None),
                "bound_acuity_hidden_too": ({"labs", "events"}, acuity_grid)}
    predictions = {name: [q for p in tqdm(patients, desc=f"frailty filter ({name})", unit="patient")
                          for q in frailty_forward(p, grid, parts, agrid)]
                   for name, (parts, agrid) in variants.items()}
    main_run = predictions["bound"]
    stays = [q.stay for q in main_run]
    groups = np.array([c.patient_index for c in stays])
    held = held_out_mask(stays)
    few = patients[: max(1, len(patients) // 20)]
    fine = [q for p in few for q in frailty_forward(p, FrailtyGrid(step / 4), variants["bound"][0])]
    few_joint = patients[: max(1, len(patients) // 40)]
    fine_joint = [q for p in tqdm(few_joint, desc="finer grids (acuity hidden too)", unit="patient")
                  for q in frailty_forward(p, FrailtyGrid(step / 2), variants["bound"][0], Grid(acuity_step / 2.5))]
    report = {"admissions": len(stays), "patients": int(np.unique(groups).size), "held_out_admissions": int(held.sum()),
              "grid_step": step, "acuity_grid_step": acuity_step, "variants": FRAILTY_VARIANTS}
    for task in ("mortality_30d", "readmission_30d"):
        y = np.array([getattr(c.truth, task) for c in stays], dtype=np.int8)
        truth_p = np.array([getattr(c.truth, f"{task}_probability") for c in stays])
        field_name = "mortality" if task == "mortality_30d" else "readmission"
        known = np.array([getattr(q, f"{field_name}_known_x") for q in main_run])
        scores = {"oracle": truth_p, "known_frailty_recomputed": known}
        checks = {"oracle_calibration": calibration(truth_p, y)}
        for name, run in predictions.items():
            score = np.array([getattr(q, field_name) for q in run])
            scores[f"frailty_hidden_{name}"] = score
            checks[f"frailty_hidden_{name}"] = {"calibration": calibration(score, y),
                                                "mean_probability": float(score.mean())}
        coarse = np.array([getattr(q, field_name) for q in main_run[: len(fine)]])
        checks["frailty_hidden_bound"]["max_abs_change_at_4x_finer_grid"] = float(
            np.max(np.abs(np.array([getattr(q, field_name) for q in fine]) - coarse)))
        coarse = np.array([getattr(q, field_name) for q in predictions["bound_acuity_hidden_too"][: len(fine_joint)]])
        checks["frailty_hidden_bound_acuity_hidden_too"]["max_abs_change_at_finer_grids"] = {
            "frailty_step": step / 2, "acuity_step": acuity_step / 2.5, "stays": len(fine_joint),
            "max_abs_change": float(np.max(np.abs(np.array([getattr(q, field_name) for q in fine_joint]) - coarse)))}
        report[task] = {
            "prevalence": float(y.mean()),
            "known_frailty_reproduces_truth": {"max_abs_diff": float(np.max(np.abs(known - truth_p)))},
            "auroc": patient_bootstrap(groups, y, scores, resamples, seed),
            "held_out": {"admissions": int(held.sum()),
                         "auroc": patient_bootstrap(groups[held], y[held], {k: v[held] for k, v in scores.items()},
                                                    resamples, seed)},
            "checks": checks,
        }
    x_true = np.array([q.x_true for q in main_run])
    report["posterior_of_x"] = {}
    for name, run in predictions.items():
        post = PosteriorSummary(np.zeros(len(run)), np.array([q.x_mean for q in run]),
                                np.array([q.x_var for q in run]), np.array([q.x_pit for q in run]))
        report["posterior_of_x"][name] = posterior_checks(post, x_true)
    hidden = predictions["bound_acuity_hidden_too"]
    post = PosteriorSummary(np.zeros(len(hidden)), np.array([q.a_mean for q in hidden]),
                            np.array([q.a_var for q in hidden]), np.array([q.a_pit for q in hidden]))
    report["posterior_of_acuity_in_bound_acuity_hidden_too"] = posterior_checks(
        post, np.array([q.stay.stay.acuity for q in hidden]))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-step", type=float, default=0.02)
    parser.add_argument("--resamples", type=int, default=200, help="patient bootstrap resamples")
    parser.add_argument("--mortality", action="store_true", help="also the mortality_30d bound at discharge")
    parser.add_argument("--frailty", action="store_true",
                        help="instead: the frailty-hidden bound for mortality_30d and readmission_30d")
    parser.add_argument("--frailty-grid-step", type=float, default=0.04)
    parser.add_argument("--frailty-acuity-step", type=float, default=0.05, help="acuity grid, joint variant")
    parser.add_argument("--lab-bins", type=int, default=None,
                        help="the bound for a model that sees each lab value only as its quantile bin (as "
                             "`odyssey tokenize` with n_bins), instead of the value")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    if args.lab_bins is not None:
        REPORTING.breaks = fit_lab_breaks(args.patients, args.seed, args.lab_bins)
    if args.frailty:
        run_frailty(args, started)
        return
    stays = simulate(args.patients, args.seed)
    verification = verify_restated_laws(stays)
    grid, fine = Grid(args.grid_step), Grid(args.grid_step / 4)
    report = {
        "command": "benchmarks/oracle_bound.py", **_lab_reporting(args), "patients": args.patients, "seed": args.seed,
        "grid_step": args.grid_step, "resamples": args.resamples, "machine": platform.processor() or platform.machine(),
        "inpatient_admissions": len(stays), "restated_law_verification": verification,
        "los_7d": los_analysis(stays, grid, fine, args.resamples, args.seed),
    }
    if args.mortality:
        report["mortality_30d"] = mortality_analysis(stays, grid, args.resamples, args.seed)
    _write_report(report, args.out, started)
    print_table(report)


def _lab_reporting(args: argparse.Namespace) -> dict:
    breaks = REPORTING.breaks or {}
    return {"lab_bins": args.lab_bins, "lab_breaks": {key: [float(b) for b in v] for key, v in breaks.items()}}


def _write_report(report: dict, out: Path, started: float) -> None:
    """The report with the run's seconds, written to a temporary file and moved into place."""
    report["seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)


def run_frailty(args: argparse.Namespace, started: float) -> None:
    patients = simulate_frailty(args.patients, args.seed)
    stays = [c for p in patients for c in p.stays]
    report = {
        "command": "benchmarks/oracle_bound.py --frailty", **_lab_reporting(args), "patients": args.patients, "seed": args.seed,
        "resamples": args.resamples, "machine": platform.processor() or platform.machine(),
        "inpatient_admissions": len(stays),
        "restated_law_verification": {**verify_restated_laws(stays), **verify_frailty_laws(patients)},
        "frailty_hidden": frailty_analysis(patients, args.frailty_grid_step, args.frailty_acuity_step,
                                           args.resamples, args.seed),
    }
    _write_report(report, args.out, started)
    print_frailty_table(report)


def _print_aurocs(task: str, admissions: int, result: dict) -> None:
    """One task's scores: AUROC with its interval, gap to the oracle, and the held-out AUROC."""
    print(f"\n{task}: {admissions:,} admissions, prevalence {result['prevalence']:.3f}; "
          f"held_out {result['held_out']['admissions']:,}")
    print(f"{'score':34} {'AUROC (all)':>26} {'gap to oracle':>24} {'AUROC (held_out)':>18}")
    for name, entry in result["auroc"].items():
        held = result["held_out"]["auroc"][name]["auroc"]
        ci, gap = entry["ci95"], entry["gap_ci95"]
        print(f"{name:34} {entry['auroc']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] "
              f"{entry['gap_to_oracle']:+.4f} [{gap[0]:+.4f}, {gap[1]:+.4f}] {held:18.4f}")


def print_frailty_table(report: dict) -> None:
    v = report["restated_law_verification"]
    print(f"\nrestated laws: {v['frailty_labs']:,} albumin/hemoglobin values, {v['value_mismatches']} value "
          f"mismatches, {v['noise_outside_interval']} outside their interval, {v['clamped_values']} clamped; "
          f"drift step z mean {v['drift_step_z_mean']:+.3f} var {v['drift_step_z_var']:.3f}; "
          f"gap PIT mean {v['gap_pit_mean']:.3f} var {v['gap_pit_var']:.4f}")
    r = report["frailty_hidden"]
    for task in ("mortality_30d", "readmission_30d"):
        _print_aurocs(task, r["admissions"], r[task])
    posteriors = {f"x, {k}": v for k, v in r["posterior_of_x"].items()}
    posteriors["acuity, bound_acuity_hidden_too"] = r["posterior_of_acuity_in_bound_acuity_hidden_too"]
    for name, q in posteriors.items():
        print(f"  {name}: corr(posterior mean, truth) {q['corr_posterior_mean_true_a']:.3f} (predicted "
              f"{q['predicted_corr']:.3f}), MSE {q['mse_posterior_mean']:.3f} vs mean posterior variance "
              f"{q['mean_posterior_variance']:.3f}, PIT mean {q['pit_mean']:.3f}, 90% coverage {q['coverage_90']:.3f}")
    print(f"\n{report['seconds']:.0f} s; report: see --out")


def print_table(report: dict) -> None:
    v = report["restated_law_verification"]
    print(f"\nrestated laws: {v['acuity_labs']:,} acuity-dependent labs, {v['value_mismatches']} value mismatches, "
          f"{v['noise_outside_interval']} outside their interval; evening/lactate/norepinephrine rule mismatches "
          f"{v['evening_panel_mismatches']}/{v['lactate_rule_mismatches']}/{v['norepinephrine_rule_mismatches']}")
    for task in ("los_7d", "mortality_30d"):
        if task not in report:
            continue
        r = report[task]
        _print_aurocs(task, r["admissions"], r)
        for name, entry in r["checks"].items():
            if "posterior" in entry:
                q = entry["posterior"]
                print(f"  {name}: corr(E[a|obs], a) {q['corr_posterior_mean_true_a']:.3f} (predicted "
                      f"{q['predicted_corr']:.3f}), MSE {q['mse_posterior_mean']:.3f} vs mean posterior variance "
                      f"{q['mean_posterior_variance']:.3f}, 90% interval coverage {q['coverage_90']:.3f}")
    print(f"\n{report['seconds']:.0f} s; report: see --out")


if __name__ == "__main__":
    main()
