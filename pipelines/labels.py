"""Task labels from a MEDS dataset: `odyssey labels DATA_DIR --tasks configs/tasks.yaml --out LABEL_DIR`.

Output (one folder per task):
- binary task: `LABEL_DIR/<task>/labels.parquet`, MEDS `LabelSchema` (`subject_id`, `prediction_time`,
  `boolean_value`), one row per index admission kept, sorted by subject and prediction time.
- multi-label task (conditions): one MEDS label folder per group, `LABEL_DIR/<task>_<group>/`, and the
  combined view `LABEL_DIR/<task>/labels.parquet` with `subject_id`, `prediction_time` and one boolean
  column per group (an Odyssey extension: MEDS label files hold one value per row).
- `LABEL_DIR/tasks.json`: per folder, its kind (binary / multilabel), task token, groups and source task.
- `LABEL_DIR/labels_report.json`: per task, admissions, exclusions by reason, labels, positives, and
  labels whose prediction time precedes every event of the subject (no usable input; kept, counted).

Two admissions of one subject with the same prediction time keep the first (counted as duplicates).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from odyssey.io import atomic_output_dir, write_json
from odyssey.pipelines import schema as S
from odyssey.pipelines.meds_io import check_meds_dataset, data_files
from odyssey.pipelines.tasks import ConditionGroup, TaskDefinition, TaskSet, load_tasks

LABELS_FILE = "labels.parquet"
MANIFEST_FILE = "tasks.json"
REPORT_FILE = "labels_report.json"
PREDICTION_TIME = meds.LabelSchema.prediction_time_name
BOOLEAN_VALUE = meds.LabelSchema.boolean_value_name

ADMIT, DISCHARGE, DEATH = "_admit", "_discharge", "_death"
NEXT_ADMIT, NEXT_ENCOUNTER, FIRST_EVENT = "_next_admit", "_next_encounter", "_first_event"
ICD_VOCABULARIES = {"icd10": "ICD10CM", "icd9": "ICD9CM"}


@dataclass
class TaskCounts:
    admissions: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    labels: int = 0
    positives: dict[str, int] = field(default_factory=dict)
    without_usable_input: int = 0


@dataclass
class LabelsReport:
    data_dir: str
    out: str
    admissions_without_discharge: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, TaskCounts] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [
            f"{name}: {c.labels:,} labels ({', '.join(f'{k} {v:,}' for k, v in c.positives.items())} positive)"
            for name, c in self.tasks.items()
        ]
        return "; ".join(parts)


def _code_matches(group: ConditionGroup) -> pl.Expr:
    """True for condition codes of `group` (prefix match after the vocabulary, dots removed)."""
    code = pl.col(S.CODE)
    value = code.str.split(S.CODE_SEPARATOR).list.last().str.replace_all(".", "", literal=True)
    hit = pl.lit(False)
    for attribute, vocabulary in ICD_VOCABULARIES.items():
        prefixes = [p.replace(".", "") for p in getattr(group, attribute)]
        if prefixes:
            in_vocabulary = code.str.starts_with(vocabulary + S.CODE_SEPARATOR)
            hit = hit | (in_vocabulary & pl.any_horizontal([value.str.starts_with(p) for p in prefixes]))
    return hit


def _admissions(events: pl.LazyFrame, encounter_class: str) -> tuple[pl.DataFrame, int]:
    """Index admissions (subject, encounter, admit, discharge) of one class; and how many lack an end."""
    start_code = S.make_code(S.ENCOUNTER_START_PREFIX, encounter_class)
    end_code = S.make_code(S.ENCOUNTER_END_PREFIX, encounter_class)
    rows = events.filter(pl.col(S.CODE).is_in([start_code, end_code]) & pl.col(S.ENCOUNTER_ID).is_not_null())
    spans = (
        rows.group_by(S.SUBJECT_ID, S.ENCOUNTER_ID)
        .agg(
            pl.col(S.TIME).filter(pl.col(S.CODE) == start_code).min().alias(ADMIT),
            pl.col(S.TIME).filter(pl.col(S.CODE) == end_code).max().alias(DISCHARGE),
        )
        .filter(pl.col(ADMIT).is_not_null())
        .collect()
    )
    open_stays = spans.filter(pl.col(DISCHARGE).is_null()).height
    return spans.drop_nulls(DISCHARGE).sort(S.SUBJECT_ID, ADMIT, S.ENCOUNTER_ID), open_stays


def _with_next_admission(admissions: pl.DataFrame) -> pl.DataFrame:
    """Add the next admission (first to start strictly after this discharge) of the same subject."""
    later = admissions.select(
        S.SUBJECT_ID, pl.col(ADMIT).alias(NEXT_ADMIT), pl.col(S.ENCOUNTER_ID).alias(NEXT_ENCOUNTER)
    ).sort(S.SUBJECT_ID, NEXT_ADMIT)
    return (
        admissions.sort(S.SUBJECT_ID, DISCHARGE)
        .join_asof(
            later,
            left_on=DISCHARGE,
            right_on=NEXT_ADMIT,
            by=S.SUBJECT_ID,
            strategy="forward",
            allow_exact_matches=False,
            check_sortedness=False,
        )
        .sort(S.SUBJECT_ID, ADMIT, S.ENCOUNTER_ID)
    )


def _prediction_time(task: TaskDefinition) -> pl.Expr:
    anchor = pl.col(ADMIT if task.prediction_time.anchor == "admission" else DISCHARGE)
    offset_us = round(task.prediction_time.offset_hours * 3_600 * 1_000_000)
    return anchor + pl.duration(microseconds=offset_us)


def _exclusion(reason: str) -> pl.Expr:
    death, pt = pl.col(DEATH), pl.col(PREDICTION_TIME)
    rules = {
        "died_during_stay": death.is_not_null() & (death <= pl.col(DISCHARGE)),
        "died_before_prediction": death.is_not_null() & (death <= pt),
        "discharged_before_prediction": pl.col(DISCHARGE) < pt,
        "has_next_admission": pl.col(NEXT_ADMIT).is_null(),
    }
    return rules[reason]


# How a failed requirement is named among the exclusions of the report.
_REQUIREMENT_FAILED = {"has_next_admission": "no_next_admission"}


def _within(when: pl.Expr, days: float) -> pl.Expr:
    pt = pl.col(PREDICTION_TIME)
    return when.is_not_null() & (when > pt) & (when <= pt + pl.duration(microseconds=round(days * 86_400e6)))


def label_schema(*value_columns: str) -> pa.Schema:
    """The MEDS label schema restricted to the key columns and `value_columns` (all declared non-null)."""
    full = meds.LabelSchema.schema()
    names = (meds.LabelSchema.subject_id_name, PREDICTION_TIME, *value_columns)
    return pa.schema([full.field(n).with_nullable(False) for n in names])


def _write(path: Path, frame: pl.DataFrame, schema: pa.Schema) -> None:
    path.mkdir(parents=True, exist_ok=True)
    table = frame.to_arrow()
    if any(table[name].null_count for name in schema.names):
        raise ValueError(f"{path}: null label values (a bug: every kept admission has a label)")
    pq.write_table(
        pa.Table.from_arrays([table[n].cast(schema.field(n).type) for n in schema.names], schema=schema),
        path / LABELS_FILE,
    )


def make_labels(
    data_dir: str | os.PathLike,
    tasks_yaml: str | os.PathLike | TaskSet,
    out: str | os.PathLike,
    tasks: list[str] | None = None,
    progress: bool = True,
) -> LabelsReport:
    """Write labels of `tasks` (all tasks of the YAML when None) for the MEDS dataset at `data_dir`."""
    started = time.perf_counter()
    task_set = tasks_yaml if isinstance(tasks_yaml, TaskSet) else load_tasks(tasks_yaml)
    chosen = task_set.select(tasks)
    check_meds_dataset(data_dir)
    events = pl.scan_parquet(data_files(data_dir)).select(S.SUBJECT_ID, S.TIME, S.CODE, S.ENCOUNTER_ID)
    deaths = (
        events.filter(pl.col(S.CODE) == S.DEATH_CODE)
        .group_by(S.SUBJECT_ID)
        .agg(pl.col(S.TIME).min().alias(DEATH))
    )
    first_events = (
        events.filter(pl.col(S.TIME).is_not_null() & ~pl.col(S.CODE).is_in([S.BIRTH_CODE, S.DEATH_CODE]))
        .group_by(S.SUBJECT_ID)
        .agg(pl.col(S.TIME).min().alias(FIRST_EVENT))
    )
    subject_facts = deaths.join(first_events, on=S.SUBJECT_ID, how="full", coalesce=True).collect()
    report = LabelsReport(data_dir=str(data_dir), out=str(out))
    manifest: dict[str, dict] = {}
    admissions_by_class: dict[str, pl.DataFrame] = {}
    with atomic_output_dir(out) as tmp:
        for name, task in tqdm(chosen.items(), desc="labels", unit="task", disable=not progress):
            encounter_class = task.index.encounter_class
            if encounter_class not in admissions_by_class:
                admissions, open_stays = _admissions(events, encounter_class)
                admissions_by_class[encounter_class] = _with_next_admission(admissions).join(
                    subject_facts, on=S.SUBJECT_ID, how="left"
                )
                report.admissions_without_discharge[encounter_class] = open_stays
            frame = admissions_by_class[encounter_class].with_columns(
                _prediction_time(task).alias(PREDICTION_TIME)
            )
            counts = TaskCounts(admissions=frame.height)
            for reason in [*task.exclude, *task.require]:
                hit = frame.select(_exclusion(reason).fill_null(False)).to_series()
                counts.excluded[_REQUIREMENT_FAILED.get(reason, reason)] = int(hit.sum())
                frame = frame.filter(~hit)
            before = frame.height
            frame = frame.unique([S.SUBJECT_ID, PREDICTION_TIME], keep="first", maintain_order=True)
            counts.duplicates = before - frame.height
            counts.without_usable_input = frame.filter(
                pl.col(FIRST_EVENT).is_null() | (pl.col(FIRST_EVENT) > pl.col(PREDICTION_TIME))
            ).height
            counts.labels = frame.height
            keys = [S.SUBJECT_ID, PREDICTION_TIME]
            if task.multilabel:
                groups = task_set.groups_of(name)
                flags = _group_flags(events, groups)
                wide = (
                    frame.join(flags, left_on=NEXT_ENCOUNTER, right_on=S.ENCOUNTER_ID, how="left")
                    .with_columns([pl.col(g).fill_null(False) for g in groups])
                    .select(*keys, *groups)
                    .sort(keys)
                )
                combined = pa.schema(
                    [*label_schema(), *(pa.field(g, pa.bool_(), nullable=False) for g in groups)]
                )
                _write(tmp / name, wide, combined)
                manifest[name] = {
                    "kind": "multilabel",
                    "task": name,
                    "groups": {g: spec.token for g, spec in groups.items()},
                    "prediction_time": task.prediction_time.model_dump(),
                }
                for group, spec in groups.items():
                    folder = f"{name}_{group}"
                    binary = wide.select(*keys, pl.col(group).alias(BOOLEAN_VALUE))
                    _write(tmp / folder, binary, label_schema(BOOLEAN_VALUE))
                    manifest[folder] = {"kind": "binary", "task": name, "token": spec.token, "group": group}
                    counts.positives[group] = int(binary[BOOLEAN_VALUE].sum())
            else:
                if task.outcome.kind == "event":
                    labelled = _event_outcome(frame, events, task)
                else:
                    labelled = frame.with_columns(_outcome(task).fill_null(False).alias(BOOLEAN_VALUE))
                _write(
                    tmp / name, labelled.select(*keys, BOOLEAN_VALUE).sort(keys), label_schema(BOOLEAN_VALUE)
                )
                manifest[name] = {
                    "kind": "binary",
                    "task": name,
                    "token": task.token,
                    "prediction_time": task.prediction_time.model_dump(),
                }
                counts.positives[name] = int(labelled[BOOLEAN_VALUE].sum())
            report.tasks[name] = counts
        report.seconds = round(time.perf_counter() - started, 3)
        write_json(tmp / MANIFEST_FILE, manifest)
        write_json(tmp / REPORT_FILE, report.to_dict())
    return report


def _group_flags(events: pl.LazyFrame, groups: dict[str, ConditionGroup]) -> pl.DataFrame:
    """Per encounter with a condition row: one boolean per group."""
    return (
        events.filter(
            pl.col(S.ENCOUNTER_ID).is_not_null()
            & pl.any_horizontal([pl.col(S.CODE).str.starts_with(v + S.CODE_SEPARATOR) for v in ICD_VOCABULARIES.values()])
        )
        .group_by(S.ENCOUNTER_ID)
        .agg([_code_matches(spec).any().alias(group) for group, spec in groups.items()])
        .collect()
    )


def _outcome(task: TaskDefinition) -> pl.Expr:
    outcome = task.outcome
    if outcome.kind == "death":
        return _within(pl.col(DEATH), outcome.horizon_days)
    if outcome.kind == "length_of_stay":
        return (pl.col(DISCHARGE) - pl.col(ADMIT)) >= pl.duration(
            microseconds=round(outcome.min_days * 86_400e6)
        )
    if outcome.kind == "next_admission":
        return _within(pl.col(NEXT_ADMIT), outcome.horizon_days)
    raise ValueError(f"outcome kind {outcome.kind!r} is not a per-admission column")


def _event_outcome(frame: pl.DataFrame, events: pl.LazyFrame, task: TaskDefinition) -> pl.DataFrame:
    """`boolean_value`: a matching code occurs in (prediction_time, prediction_time + horizon]."""
    outcome = task.outcome
    code = pl.col(S.CODE)
    hit = code.is_in(outcome.codes)
    for prefix in outcome.prefixes:
        hit = hit | code.str.starts_with(prefix)
    matches = (
        events.filter(hit & pl.col(S.TIME).is_not_null())
        .select(S.SUBJECT_ID, pl.col(S.TIME).alias("_hit_time"))
        .sort(S.SUBJECT_ID, "_hit_time")
        .collect()
    )
    found = frame.sort(S.SUBJECT_ID, PREDICTION_TIME).join_asof(
        matches,
        left_on=PREDICTION_TIME,
        right_on="_hit_time",
        by=S.SUBJECT_ID,
        strategy="forward",
        allow_exact_matches=False,
        check_sortedness=False,
    )
    return found.with_columns(
        _within(pl.col("_hit_time"), outcome.horizon_days).fill_null(False).alias(BOOLEAN_VALUE)
    )
