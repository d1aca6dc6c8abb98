"""Finetuning data: task labels + sequences -> prompted, cut, truncated examples -> padded batches.

An example is one label row (subject, prediction time) of one task. Its input is the subject's sequence
cut at the prediction time (`odyssey.tokenizer.cut_at`: only facts available by then), truncated to the
context keeping the most recent visits (`truncate`), with the task prompt at the start (in place of
`[CLS]`) and again at the end, after the cut. The trailing prompt is added after truncation, so it is
never cut away; the head reads its hidden states.

A binary task's prompt is its token (`[MOR_1M]`); the multi-label conditions task's prompt is its group
tokens in order (`[C0] .. [C5]`), one output per group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from odyssey.io import read_json
from odyssey.tokenizer import (
    EHRTokenizer,
    SpecialTokens,
    TokenType,
    append_task_token,
    as_row,
    cut_at,
    truncate,
)
from odyssey.training.data import SPLITS, TOKEN_COLUMNS, SequenceCollator

LABELS_FILE = "labels.parquet"
MANIFEST_FILE = "tasks.json"
SUBJECT_ID = "subject_id"
PREDICTION_TIME = "prediction_time"
BOOLEAN_VALUE = "boolean_value"
EVENT_TIMES = "event_times"
TaskKind = Literal["binary", "multilabel"]
_SEGMENT_SPECIAL = 0


class FinetuneDataError(ValueError):
    """Task labels or sequences that cannot be used for finetuning (the message says which and why)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task as the model sees it: its outputs (label columns) and the prompt token of each output."""

    name: str
    kind: TaskKind
    outputs: tuple[str, ...]
    prompt_tokens: tuple[str, ...]
    prompt_ids: tuple[int, ...]
    prediction_time: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "outputs": list(self.outputs),
                "prompt_tokens": list(self.prompt_tokens), "prompt_ids": list(self.prompt_ids),
                "prediction_time": self.prediction_time}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        return cls(name=data["name"], kind=data["kind"], outputs=tuple(data["outputs"]),
                   prompt_tokens=tuple(data["prompt_tokens"]), prompt_ids=tuple(data["prompt_ids"]),
                   prediction_time=data.get("prediction_time"))

    def output_names(self) -> list[str]:
        """One name per output: the task name (binary) or `<task>_<group>` (multi-label)."""
        return [self.name] if self.kind == "binary" else [f"{self.name}_{o}" for o in self.outputs]


def default_task_names(label_dir: str | os.PathLike) -> list[str]:
    """The source tasks of a label folder (its per-group binary views left out)."""
    manifest = _manifest(label_dir)
    return [name for name, entry in manifest.items() if entry.get("task", name) == name]


def _manifest(label_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(label_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {label_dir} the output folder of `odyssey labels`?")
    return read_json(path)


def read_task_specs(label_dir: str | os.PathLike, tokenizer: EHRTokenizer,
                    names: Sequence[str] | None = None) -> list[TaskSpec]:
    """The named tasks of `LABEL_DIR/tasks.json` (default: its source tasks) with prompt ids from the tokenizer."""
    manifest = _manifest(label_dir)
    names = list(names) if names else default_task_names(label_dir)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise FinetuneDataError(
            f"unknown task(s) {', '.join(unknown)}; {Path(label_dir) / MANIFEST_FILE} defines: {', '.join(manifest)}"
        )
    if len(set(names)) != len(names):
        raise FinetuneDataError(f"task names repeat: {names}")
    specs = []
    for name in names:
        entry = manifest[name]
        if entry["kind"] == "binary":
            outputs, tokens = (BOOLEAN_VALUE,), (entry["token"],)
        elif entry["kind"] == "multilabel":
            groups = entry["groups"]  # group -> token; order the outputs by token (C0, C1, ...)
            ordered = sorted(groups, key=lambda g: tokenizer.token_to_id(groups[g]) or -1)
            outputs, tokens = tuple(ordered), tuple(groups[g] for g in ordered)
        else:
            raise FinetuneDataError(f"{MANIFEST_FILE}: task {name!r} has unknown kind {entry['kind']!r}")
        ids = tuple(tokenizer.token_to_id(t) for t in tokens)
        missing = [t for t, i in zip(tokens, ids, strict=True) if i is None]
        if missing:
            raise FinetuneDataError(f"task {name!r}: prompt tokens {missing} are not in the tokenizer's vocabulary")
        source = manifest.get(entry.get("task", name), entry)
        specs.append(TaskSpec(name, entry["kind"], outputs, tokens, ids, source.get("prediction_time")))
    return specs


def read_task_labels(label_dir: str | os.PathLike, spec: TaskSpec) -> pl.DataFrame:
    """`subject_id`, `prediction_time` and one boolean column per output of `spec`."""
    path = Path(label_dir) / spec.name / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing labels of task {spec.name!r}")
    frame = pl.read_parquet(path)
    needed = [SUBJECT_ID, PREDICTION_TIME, *spec.outputs]
    absent = [c for c in needed if c not in frame.columns]
    if absent:
        raise FinetuneDataError(f"{path}: missing columns {absent}")
    return frame.select(needed).with_columns(pl.col(PREDICTION_TIME).cast(pl.Datetime("us")))


def prompt_input(row: Mapping[str, Any], prediction_time: Any, max_length: int,
                 prompt_ids: Sequence[int]) -> dict[str, np.ndarray] | None:
    """The model input of one example: cut at `prediction_time`, truncated, prompted at both ends.

    None when nothing of the subject is known at the prediction time.
    """
    prompt = [int(p) for p in prompt_ids]
    cut = cut_at(row, prediction_time)
    if cut is None:
        return None
    # The leading prompt replaces [CLS] (len(prompt) - 1 extra tokens); the trailing one adds len(prompt).
    body = truncate(cut, max_length - 2 * len(prompt) + 1)
    if body["input_ids"][0] != SpecialTokens.CLS:
        raise FinetuneDataError("a sequence does not start with [CLS]; was it written by `odyssey tokenize`?")
    lead = {name: np.repeat(body[name][:1], len(prompt)) for name in (*TOKEN_COLUMNS, EVENT_TIMES)}
    lead["input_ids"] = np.asarray(prompt, dtype=body["input_ids"].dtype)
    lead["token_type_ids"][:] = int(TokenType.TASK)
    lead["visit_segments"][:] = _SEGMENT_SPECIAL
    out = {name: np.concatenate([lead[name], body[name][1:]]) for name in lead}
    for token in prompt:
        out = append_task_token(out, token)
    return {name: out[name] for name in (*TOKEN_COLUMNS, EVENT_TIMES)}


@dataclass
class TaskExamples:
    """The examples of one split: which sequence row, when, which task and its labels (numpy arrays)."""

    row: np.ndarray  # index into the sequence rows
    subject_id: np.ndarray
    prediction_time: np.ndarray  # datetime64[us]
    task_index: np.ndarray
    labels: np.ndarray  # (n, max_outputs) float32
    label_mask: np.ndarray  # (n, max_outputs) bool: labelled outputs of the example's task
    known_tokens: np.ndarray  # tokens available at the prediction time (before truncation)

    def __len__(self) -> int:
        return len(self.row)

    def subset(self, index: np.ndarray) -> TaskExamples:
        return TaskExamples(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


class SequenceStore:
    """Every subject's sequence as numpy arrays, looked up by subject id."""

    def __init__(self, frame: pl.DataFrame):
        self.rows = [as_row(r) for r in frame.iter_rows(named=True)]
        self.subject_ids = frame[SUBJECT_ID].to_numpy()
        self.splits = frame["split"].to_numpy()
        self.index = {int(s): i for i, s in enumerate(self.subject_ids)}

    def __len__(self) -> int:
        return len(self.rows)


def build_examples(store: SequenceStore, specs: Sequence[TaskSpec], labels: Sequence[pl.DataFrame],
                   split: str, label_dir: str | os.PathLike = "LABEL_DIR") -> tuple[TaskExamples, dict[str, int]]:
    """Examples of `split` for every task; also the count of labels dropped for want of any known token."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    width = max(len(s.outputs) for s in specs)
    parts, dropped = [], {}
    for task_index, (spec, frame) in enumerate(zip(specs, labels, strict=True)):
        subjects = frame[SUBJECT_ID].to_numpy()
        rows = np.array([store.index.get(int(s), -1) for s in subjects], dtype=np.int64)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            raise FinetuneDataError(
                f"{Path(label_dir) / spec.name / LABELS_FILE}: {missing.size} label rows name subjects missing "
                f"from the sequences (first at row {int(missing[0])}); were labels and sequences made from the "
                "same MEDS dataset?"
            )
        keep = store.splits[rows] == split
        rows, frame = rows[keep], frame.filter(pl.Series(keep))
        times = frame[PREDICTION_TIME].to_numpy().astype("datetime64[us]")
        known = np.array([np.count_nonzero(store.rows[r][EVENT_TIMES] <= t) for r, t in zip(rows, times, strict=True)],
                         dtype=np.int64)
        usable = known > 0
        dropped[spec.name] = int((~usable).sum())
        values = np.zeros((len(frame), width), dtype=np.float32)
        mask = np.zeros((len(frame), width), dtype=bool)
        for j, column in enumerate(spec.outputs):
            column_values = frame[column]
            mask[:, j] = column_values.is_not_null().to_numpy()
            values[:, j] = column_values.fill_null(False).cast(pl.Float32).to_numpy()
        parts.append(TaskExamples(
            row=rows[usable], subject_id=store.subject_ids[rows[usable]], prediction_time=times[usable],
            task_index=np.full(int(usable.sum()), task_index, dtype=np.int64), labels=values[usable],
            label_mask=mask[usable], known_tokens=known[usable],
        ))
    merged = TaskExamples(**{name: np.concatenate([getattr(p, name) for p in parts])
                             for name in TaskExamples.__dataclass_fields__})
    return merged, dropped


def few_shot(examples: TaskExamples, specs: Sequence[TaskSpec], k: int, seed: int) -> TaskExamples:
    """At most `k` examples per task, drawn at random; a binary task keeps both classes when k >= 2."""
    rng = np.random.default_rng(seed)
    chosen = []
    for task_index, spec in enumerate(specs):
        members = np.flatnonzero(examples.task_index == task_index)
        if len(members) <= k:
            chosen.append(members)
            continue
        picked = rng.choice(members, size=k, replace=False)
        if spec.kind == "binary" and k >= 2:
            positives = members[examples.labels[members, 0] == 1]
            negatives = members[examples.labels[members, 0] == 0]
            has = examples.labels[picked, 0]
            if positives.size and not (has == 1).any():
                picked[0] = rng.choice(positives)
            if negatives.size and not (has == 0).any():
                picked[0] = rng.choice(negatives)
        chosen.append(picked)
    return examples.subset(np.sort(np.concatenate(chosen)))


def check_both_classes(examples: TaskExamples, specs: Sequence[TaskSpec], split: str) -> None:
    """Every output of every task has positive and negative labels in this split (else AUROC is undefined)."""
    problems = []
    for task_index, spec in enumerate(specs):
        members = examples.task_index == task_index
        if not members.any():
            problems.append(f"{spec.name}: no examples")
            continue
        for j, name in enumerate(spec.output_names()):
            labelled = members & examples.label_mask[:, j]
            values = examples.labels[labelled, j]
            if values.size == 0 or values.min() == values.max():
                classes = "no labels" if values.size == 0 else f"only {'positive' if values[0] else 'negative'} labels"
                problems.append(f"{name}: {classes}")
    if problems:
        raise FinetuneDataError(f"the {split} split cannot be used: {'; '.join(problems)} (a task needs both classes)")


class TaskDataset(torch.utils.data.Dataset):
    """Prompted model inputs of `examples`, built on access (an item is a dict of numpy arrays)."""

    def __init__(self, store: SequenceStore, examples: TaskExamples, specs: Sequence[TaskSpec], max_length: int):
        longest_prompt = max(len(s.prompt_ids) for s in specs)
        if max_length < 2 * longest_prompt + 2:
            raise ValueError(f"context_length {max_length} leaves no room for a prompt of {longest_prompt} tokens")
        self.store, self.examples, self.specs, self.max_length = store, examples, list(specs), max_length
        prompts = np.array([2 * len(s.prompt_ids) for s in specs])
        # For length-grouped batches; exact up to the tokens that close a visit open at the cut.
        self.lengths = np.minimum(examples.known_tokens + prompts[examples.task_index], max_length).tolist()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples
        spec = self.specs[int(ex.task_index[index])]
        item = prompt_input(self.store.rows[int(ex.row[index])], ex.prediction_time[index], self.max_length,
                            spec.prompt_ids)
        item.pop(EVENT_TIMES)
        item["task_index"] = int(ex.task_index[index])
        item["labels"] = ex.labels[index]
        item["label_mask"] = ex.label_mask[index]
        return item


class TaskCollator(SequenceCollator):
    """Right-pads token columns (to a multiple of `pad_to_multiple_of`) and stacks task indices and labels."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(items)
        batch["task_index"] = torch.tensor([item["task_index"] for item in items], dtype=torch.long)
        batch["labels"] = torch.from_numpy(np.stack([item["labels"] for item in items]))
        batch["label_mask"] = torch.from_numpy(np.stack([item["label_mask"] for item in items]))
        return batch
