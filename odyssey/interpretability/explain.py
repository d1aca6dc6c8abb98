"""`odyssey explain`: integrated gradients of a finetuned task head for one patient, in words and pictures.

Writes to OUT (atomically): `explanation.json` (prediction, completeness check, per-token scores and their
sums per event, visit, code, code category and code family, the top events in plain words),
`top_events.md` (the same top events as a table) and, when the MEDS dataset is at hand,
`timeline.png` / `timeline.svg` (the patient's timeline up to the prediction time with the
per-event attributions overlaid and the risk over time, read by incremental scoring after each moment of
the history, `odyssey.viz`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from odyssey.io import atomic_output_dir, read_json, write_json
from odyssey.tokenizer import EHRTokenizer, SpecialTokens, load_sequences
from odyssey.tokenizer.sequences import REPORT_FILE, TOKENIZER_DIR

from .attribution import (
    COMPLETENESS_FLOOR,
    DEFAULT_STEPS,
    aggregate,
    describe_events,
    integrated_gradients,
    token_table,
)

EXPLANATION_FILE = "explanation.json"
TOP_EVENTS_FILE = "top_events.md"
TIMELINE_STEM = "timeline"
FINETUNE_REPORT = "finetune_report.json"
DEFAULT_CONTEXT_LENGTH = 2048
INPATIENT_START = "ENCOUNTER_START//IMP"
# Steps double from n_steps until the attributions add up to the logit difference within this share of it.
DEFAULT_TOLERANCE = 0.05
DEFAULT_MAX_STEPS = 256
MICROSECONDS_PER_HOUR = 3_600_000_000


class ExplainError(ValueError):
    """An explanation that cannot be made from the given inputs (the message says which and why)."""


@dataclass
class ExplainReport:
    """What `explain` computed and wrote (also the summary of `explanation.json`)."""

    out: str
    task: str
    output: str
    prediction_time: str
    tokens: int
    event_tokens: int
    probability: float
    logit: float
    baseline_logit: float
    attribution_sum: float
    completeness_error: float
    n_steps: int
    seconds: float
    top_events: list[dict[str, Any]] = field(default_factory=list)
    risk_points: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.output} at {self.prediction_time}: probability {self.probability:.3f} "
                 f"(logit {self.logit:+.3f}; blanked-events baseline {self.baseline_logit:+.3f}); "
                 f"{self.event_tokens} event tokens of {self.tokens}; completeness error "
                 f"{self.completeness_error:.2e} with {self.n_steps} steps; {self.seconds:.1f} s"]
        for event in self.top_events[:5]:
            lines.append(f"  {event['score']:+.3g}  {event['time']}  {event['description']}")
        return "\n".join(lines)


def _context_length(model_dir: Path) -> int:
    for folder in (model_dir, model_dir.parent):
        report = folder / FINETUNE_REPORT
        if report.is_file():
            return int(read_json(report).get("config", {}).get("context_length", DEFAULT_CONTEXT_LENGTH))
    return DEFAULT_CONTEXT_LENGTH


def _subject_row(seq_dir: Path, subject_id: int) -> dict[str, Any]:
    frame = load_sequences(seq_dir).filter(pl.col("subject_id") == subject_id)
    if frame.height == 0:
        raise ExplainError(f"{seq_dir}: subject {subject_id} has no sequence (is it in this dataset?)")
    return frame.row(0, named=True)


def last_admission_time(row: dict[str, Any], tokenizer: EHRTokenizer, anchor: str, offset_hours: float) -> datetime:
    """The task's prediction time at the subject's last inpatient admission, read off the sequence.

    `[VS]` carries the admission time and `[VE]` the discharge time of its visit.
    """
    inpatient = tokenizer.token_to_id(INPATIENT_START)
    ids, visits, times = (np.asarray(row[c]) for c in ("input_ids", "visit_orders", "event_times"))
    admitted = sorted(set(visits[ids == inpatient].tolist())) if inpatient is not None else []
    if not admitted:
        raise ExplainError("the subject has no inpatient admission in the sequence; pass a prediction time")
    in_visit = visits == admitted[-1]
    marker = SpecialTokens.VS if anchor == "admission" else SpecialTokens.VE
    hits = np.flatnonzero(in_visit & (ids == marker))
    if not hits.size:
        raise ExplainError(f"the last inpatient visit has no {marker.name} token; pass a prediction time")
    moment = np.datetime64(times[hits[0]], "us") + np.timedelta64(round(offset_hours * MICROSECONDS_PER_HOUR), "us")
    return moment.astype(datetime)


def _prediction_time(value: datetime | str | None, row, tokenizer, spec) -> datetime:
    if value is not None:
        try:
            return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        except ValueError as exc:
            raise ExplainError(f"prediction time {value!r} is not an ISO date/time (e.g. 2130-05-01T14:00)") from exc
    rule = spec.prediction_time or {"anchor": "discharge"}
    return last_admission_time(row, tokenizer, rule.get("anchor", "discharge"), float(rule.get("offset_hours", 0) or 0))


def _pick_output(model, inputs, task_index: int, spec, output: str | None) -> int:
    names = list(spec.outputs)
    if output is not None:
        if output not in names and output not in spec.output_names():
            raise ExplainError(f"task {spec.name!r} has no output {output!r}; its outputs: {', '.join(names)}")
        return names.index(output) if output in names else spec.output_names().index(output)
    if len(names) == 1:
        return 0
    # Multi-label: explain the output the model finds most likely.
    import torch

    from .attribution import MODEL_INPUTS, _tensors

    device = next(model.parameters()).device
    tensors = _tensors({k: inputs[k] for k in MODEL_INPUTS}, device)
    model.eval()
    with torch.no_grad():
        logits = model(**tensors, task_index=torch.tensor([task_index], device=device)).logits[0, : len(names)]
    return int(torch.argmax(logits))


def risk_over_time(model, inputs: dict[str, np.ndarray], task: str, output: int,
                   prompt_length: int) -> list[tuple[datetime, float]]:
    """The task output's risk after each moment of the explained input, by incremental scoring.

    The last point is the explained prediction itself (the whole input with its trailing prompt).
    """
    from odyssey.models import EHRMambaScorer

    history = {name: values[: len(values) - prompt_length] for name, values in inputs.items()}
    # A result issued late (a lab) can sit before earlier-known events: a risk is known once all it read is.
    known = np.maximum.accumulate(np.asarray(history["event_times"], dtype="datetime64[us]"))
    moments = [t.astype(datetime) for t in known]
    points = EHRMambaScorer(model, task).trajectory(history, moments)
    return [(moment, float(risk[output])) for moment, risk in points]


def _top_events_markdown(report: ExplainReport) -> str:
    lines = [f"# Why the model gives {report.output} = {report.probability:.3f}",
             "",
             f"Prediction time {report.prediction_time}. Integrated gradients of the logit ({report.n_steps} steps) "
             f"against the same timeline with every event blanked ({report.baseline_logit:+.3f} there, "
             f"{report.logit:+.3f} here). Positive scores raise the risk.",
             "",
             "| rank | score | effect | date | event | type | visit |",
             "|---|---|---|---|---|---|---|"]
    for rank, event in enumerate(report.top_events, start=1):
        text = event["description"].replace("|", "\\|")
        lines.append(f"| {rank} | {event['score']:+.3g} | {event['direction']} | {event['time']} | {text} "
                     f"| {event['type']} | {event['visit']} |")
    return "\n".join(lines) + "\n"


def _frame_records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    records = []
    for record in frame.iter_rows(named=True):
        records.append({k: v.isoformat() if isinstance(v, datetime) else v for k, v in record.items()})
    return records


def _meds_dir(seq_dir: Path, meds_dir: str | os.PathLike | None) -> Path | None:
    if meds_dir is not None:
        if not (Path(meds_dir) / "data").is_dir():
            raise ExplainError(f"{meds_dir}: not a MEDS dataset (no data/ folder)")
        return Path(meds_dir)
    report = seq_dir / REPORT_FILE
    if report.is_file():
        source = Path(read_json(report).get("data_dir", ""))
        if (source / "data").is_dir():
            return source
    return None


def explain(
    model_dir: str | os.PathLike,
    seq_dir: str | os.PathLike,
    task: str,
    subject_id: int,
    out: str | os.PathLike,
    *,
    meds_dir: str | os.PathLike | None = None,
    prediction_time: datetime | str | None = None,
    output: str | None = None,
    n_steps: int = DEFAULT_STEPS,
    tolerance: float | None = DEFAULT_TOLERANCE,
    max_steps: int = DEFAULT_MAX_STEPS,
    internal_batch_size: int | None = None,
    context_length: int | None = None,
    top_k: int = 10,
    formats: tuple[str, ...] = ("png", "svg"),
    device: str = "cpu",
) -> ExplainReport:
    """Explain one prediction of a finetuned model (`odyssey finetune` folder) for one subject of `seq_dir`.

    The prediction time defaults to the task's rule (e.g. discharge) at the subject's last inpatient
    admission; `meds_dir` (default: the dataset `seq_dir` was tokenized from, when it is still there)
    gives code descriptions and the timeline. Steps double from `n_steps` (up to `max_steps`) until the
    completeness error is within `tolerance` of the logit difference (None: exactly `n_steps`).
    See `odyssey.interpretability.attribution` for the method.
    """
    from odyssey.finetune import load_finetuned
    from odyssey.finetune.data import prompt_input

    started = time.perf_counter()
    model_dir, seq_dir = Path(model_dir), Path(seq_dir)
    model, specs = load_finetuned(model_dir)
    names = [s.name for s in specs]
    if task not in names:
        raise ExplainError(f"{model_dir}: the model was not finetuned on task {task!r}; it knows: {', '.join(names)}")
    task_index = names.index(task)
    spec = specs[task_index]
    tokenizer = EHRTokenizer.from_pretrained(seq_dir / TOKENIZER_DIR)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ExplainError(f"{seq_dir}/{TOKENIZER_DIR} has {tokenizer.vocab_size} tokens but the model "
                           f"{model.config.vocab_size}; use the sequences the model was finetuned on")
    meds = _meds_dir(seq_dir, meds_dir)
    model.to(device)
    row = _subject_row(seq_dir, int(subject_id))
    when = _prediction_time(prediction_time, row, tokenizer, spec)
    length = context_length or _context_length(model_dir)
    inputs = prompt_input(row, when, length, spec.prompt_ids)
    if inputs is None:
        raise ExplainError(f"nothing of subject {subject_id} is known at {when}: no input to explain")
    chosen = _pick_output(model, inputs, task_index, spec, output)
    attributions = integrated_gradients(model, inputs, task_index, chosen, n_steps=n_steps,
                                        internal_batch_size=internal_batch_size, tolerance=tolerance,
                                        max_steps=max(max_steps, n_steps))
    table = token_table(inputs, attributions.scores, tokenizer)
    sums = aggregate(table)
    notes = []
    descriptions: dict[str, str] = {}
    if meds is not None:
        from odyssey.viz import load_code_descriptions

        descriptions = load_code_descriptions(meds)
    else:
        notes.append("no MEDS dataset found (pass meds_dir): codes are not described and no timeline is drawn")
    top = describe_events(sums["events"], tokenizer, descriptions, top_k)
    total = float(attributions.scores.sum())
    difference = attributions.logit - attributions.baseline_logit
    error = abs(total - difference)
    if tolerance is not None and error > tolerance * max(abs(difference), COMPLETENESS_FLOOR):
        notes.append(f"completeness error {error:.3g} exceeds {tolerance:g} of the logit difference {difference:.3g} "
                     f"after {attributions.n_steps} steps: scores are approximate (raise max_steps)")
    risk = risk_over_time(model, inputs, task, chosen, len(spec.prompt_ids))
    report = ExplainReport(
        out=str(out), task=task, output=spec.output_names()[chosen], prediction_time=when.isoformat(sep=" "),
        tokens=int(len(inputs["input_ids"])), event_tokens=int(attributions.event_mask.sum()),
        probability=attributions.probability, logit=attributions.logit, baseline_logit=attributions.baseline_logit,
        attribution_sum=total, completeness_error=error, n_steps=attributions.n_steps, seconds=0.0, top_events=top,
        risk_points=len(risk), notes=notes,
    )
    with atomic_output_dir(out) as staging:
        files = [EXPLANATION_FILE, TOP_EVENTS_FILE]
        if meds is not None:
            from odyssey.viz import load_patient_events, plot_timeline, save_timeline, token_scores_to_events

            events = load_patient_events(meds, int(subject_id))
            # From the first visit the model saw (not birth, not history truncated away) to the prediction.
            in_visits = table.filter(pl.col("visit") > 0)
            start = in_visits["time"].min() if in_visits.height else None
            if start is not None and start < when:
                # Only the rows in view: the timeline draws a band per visit of the frame it gets (thousands
                # in a long history), window or not.
                events = events.filter(pl.col("time").is_null() | pl.col("time").is_between(start, when))
            timeline = plot_timeline(
                events, descriptions=descriptions, attributions=token_scores_to_events(inputs, attributions.scores, tokenizer),
                window=(start, when) if start is not None and start < when else None,
                risk=risk, risk_label=f"{report.output} risk",
                title=f"{report.output}: risk {report.probability:.2f} at {when:%Y-%m-%d %H:%M}",
            )
            files += [p.name for p in save_timeline(timeline, staging / TIMELINE_STEM, formats)]
        report.files = files
        report.seconds = time.perf_counter() - started
        (staging / TOP_EVENTS_FILE).write_text(_top_events_markdown(report))
        write_json(staging / EXPLANATION_FILE, {
            **report.to_dict(),
            "subject_id": int(subject_id),
            "method": {"name": "integrated_gradients", "layer": "concept (word) embeddings", "target": "logit",
                       "baseline": "event tokens as [PAD]; specials, time gaps and task prompts kept",
                       "n_steps_requested": n_steps, "n_steps": attributions.n_steps, "tolerance": tolerance,
                       "captum_convergence_delta": attributions.convergence_delta},
            "risk_over_time": [{"time": t.isoformat(), "probability": p} for t, p in risk],
            "tokens": _frame_records(table.drop("is_event").with_columns(pl.col("score"))),
            "events": _frame_records(sums["events"]),
            "visits": _frame_records(sums["visits"]),
            "codes": _frame_records(sums["codes"]),
            "categories": _frame_records(sums["categories"]),
            "families": _frame_records(sums["families"]),
        })
    return report


__all__ = ["EXPLANATION_FILE", "ExplainError", "ExplainReport", "TOP_EVENTS_FILE", "explain", "last_admission_time",
           "risk_over_time"]
