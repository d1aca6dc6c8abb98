"""Prediction tasks declared in YAML (`configs/tasks.yaml`), typed.

A task is predicted once per index admission (an encounter of `index.encounter_class`, from its
`ENCOUNTER_START//<class>` to its `ENCOUNTER_END//<class>` row):

- `prediction_time`: `anchor` (admission or discharge) + `offset_hours`; inputs are cut there.
- `outcome.kind`:
  - `death`: `MEDS_DEATH` in (prediction_time, prediction_time + horizon_days].
  - `length_of_stay`: discharge - admission >= `min_days`.
  - `next_admission`: the next index admission (the first starting after this discharge) starts
    within `horizon_days` of the prediction time.
  - `next_admission_codes`: multi-label, one boolean per condition group (`groups`, default all):
    the group's codes are diagnosed at the next index admission (rows with its encounter id).
  - `event`: any row whose code equals one of `codes` or starts with one of `prefixes` in
    (prediction_time, prediction_time + horizon_days].
- `exclude`: `died_during_stay` (death at or before discharge), `died_before_prediction` (death at or
  before the prediction time), `discharged_before_prediction` (a stay shorter than the offset).
- `require`: `has_next_admission`.

Condition groups match ICD codes by prefix after the vocabulary prefix (`ICD10CM//`, `ICD9CM//`),
dots removed on both sides.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from odyssey.config import StageConfig

Exclusion = Literal["died_during_stay", "died_before_prediction", "discharged_before_prediction"]
Requirement = Literal["has_next_admission"]
OutcomeKind = Literal["death", "length_of_stay", "next_admission", "next_admission_codes", "event"]


class UnknownTaskError(ValueError):
    """A task name that `configs/tasks.yaml` does not define."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConditionGroup(_Strict):
    token: str = Field(description="task token that prompts this group, e.g. [C0]")
    icd10: list[str] = Field(default_factory=list, description="ICD-10-CM prefixes, e.g. I50")
    icd9: list[str] = Field(default_factory=list, description="ICD-9-CM prefixes, e.g. 428")

    @model_validator(mode="after")
    def _has_codes(self) -> ConditionGroup:
        if not self.icd10 and not self.icd9:
            raise ValueError("a condition group needs icd10 or icd9 prefixes")
        return self


class IndexEvent(_Strict):
    encounter_class: str = Field("IMP", description="encounter class of index admissions (IMP: inpatient)")


class PredictionTime(_Strict):
    anchor: Literal["admission", "discharge"]
    offset_hours: float = 0.0


class Outcome(_Strict):
    kind: OutcomeKind
    horizon_days: float | None = Field(None, gt=0)
    min_days: float | None = Field(None, gt=0)
    groups: list[str] | None = None
    codes: list[str] = Field(default_factory=list)
    prefixes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Outcome:
        needs = {"death": "horizon_days", "next_admission": "horizon_days", "length_of_stay": "min_days"}
        name = needs.get(self.kind)
        if name and getattr(self, name) is None:
            raise ValueError(f"outcome kind {self.kind!r} needs {name}")
        if self.kind == "event" and (self.horizon_days is None or not (self.codes or self.prefixes)):
            raise ValueError("outcome kind 'event' needs horizon_days and codes or prefixes")
        return self


class TaskDefinition(_Strict):
    description: str = ""
    token: str | None = Field(None, description="task token for binary tasks, e.g. [MOR_1M]")
    index: IndexEvent = Field(default_factory=IndexEvent)
    prediction_time: PredictionTime
    outcome: Outcome
    exclude: list[Exclusion] = Field(default_factory=list)
    require: list[Requirement] = Field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.outcome.kind == "next_admission_codes"


class TaskSet(StageConfig):
    """All tasks of a `tasks.yaml`."""

    condition_groups: dict[str, ConditionGroup] = Field(default_factory=dict)
    tasks: dict[str, TaskDefinition]

    @model_validator(mode="after")
    def _groups_exist(self) -> TaskSet:
        for name, task in self.tasks.items():
            if task.multilabel:
                unknown = sorted(set(task.outcome.groups or []) - set(self.condition_groups))
                if unknown:
                    raise ValueError(f"task {name!r}: unknown condition groups {unknown}")
                if not self.groups_of(name):
                    raise ValueError(f"task {name!r}: no condition groups defined")
            elif task.token is None:
                raise ValueError(f"task {name!r}: a binary task needs a token")
        return self

    def groups_of(self, name: str) -> dict[str, ConditionGroup]:
        chosen = self.tasks[name].outcome.groups
        names = list(self.condition_groups) if chosen is None else chosen
        return {g: self.condition_groups[g] for g in names}

    def select(self, names: list[str] | None) -> dict[str, TaskDefinition]:
        """The named tasks (all when None); an unknown name raises with the list of known ones."""
        if names is None:
            return dict(self.tasks)
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise UnknownTaskError(
                f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(self.tasks)}"
            )
        return {n: self.tasks[n] for n in names}


def load_tasks(path: str | os.PathLike) -> TaskSet:
    return TaskSet.load(path)
