"""`EHRMambaScorer`: a task's risk, updated as new events arrive, at a cost that does not grow with history.

The scorer keeps each patient's recurrent state (per layer, the conv window and the SSM state) after the
events seen so far. New events advance that state one recurrent step per token. To score, the task's
trailing prompt is stepped on a copy of the state, so the prompt never enters the patient's history; the
result equals running the whole prompted sequence through the parallel model
(`EHRMambaForTaskClassification`) up to float rounding.

States live in one pool of rows on the model's device (a row per patient), so a ward of patients is
gathered, stepped and scattered back in a few batched operations rather than one per patient.

The first events of a patient must begin like a finetuning input: the task prompt in place of `[CLS]`
(`odyssey.finetune.data.prompt_input` builds one; drop its trailing prompt, which the scorer adds).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .mixer import MixerState
from .modeling_ehrmamba import EHRMambaCache
from .modeling_ehrmamba_tasks import EHRMambaForTaskClassification

TOKEN_COLUMNS = ("input_ids", "token_type_ids", "ages", "times", "visit_orders", "visit_segments")
_FLOAT_COLUMNS = {"ages", "times"}
_SEGMENT_OF_PROMPT = 0
# The trailing prompt repeats the last event's age, time and visit.
_PROMPT_CONTEXT = ("ages", "times", "visit_orders")
_FIRST_CAPACITY = 8


class EHRMambaScorer:
    """Per-patient recurrent state and incremental risk of one task of a finetuned model."""

    def __init__(self, model: EHRMambaForTaskClassification, task: str, task_token_type: int | None = None):
        names = list(model.config.task_names)
        if task not in names:
            raise ValueError(f"unknown task {task!r}; the model serves {names}")
        token_type = task_token_type if task_token_type is not None else getattr(model.config, "task_token_type", None)
        if token_type is None:
            raise ValueError("task_token_type is not in the model config; pass it (odyssey.tokenizer.TokenType.TASK)")
        self.model = model.eval()
        self.task = task
        self.task_index = names.index(task)
        self.prompt = [int(t) for t in model.config.task_prompt_ids[self.task_index]]
        self.task_token_type = int(token_type)
        self.device = next(model.parameters()).device
        self.seen_tokens: dict[Hashable, int] = {}
        self._slots: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._pool: EHRMambaCache | None = None  # one row per slot
        self._context: dict[str, torch.Tensor] = {}  # per slot: the last event's age, time and visit order

    def __contains__(self, patient: Hashable) -> bool:
        return patient in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def forget(self, patient: Hashable) -> None:
        slot = self._slots.pop(patient, None)
        self.seen_tokens.pop(patient, None)
        if slot is not None:
            self._free.append(slot)

    def state(self, patient: Hashable) -> EHRMambaCache:
        """A copy of the patient's recurrent state."""
        cache = self._gather(self._index([patient]))
        cache.seen_tokens = self.seen_tokens[patient]
        return cache

    def copy_patient(self, source: Hashable, target: Hashable) -> None:
        """Start `target` from a copy of `source`'s state (a what-if branch; `target` is replaced)."""
        index = self._index([source])
        self.forget(target)
        self._store(target, self._gather(index), {c: self._context[c][index] for c in _PROMPT_CONTEXT},
                    self.seen_tokens[source])

    @torch.no_grad()
    def update(self, patient: Hashable, events: Mapping[str, np.ndarray]) -> np.ndarray:
        """Advance `patient`'s state over `events` (token columns as 1-D arrays); return the task's risk.

        A patient seen for the first time is prefilled with the parallel scan (its first events must start
        with the task prompt); later events take one recurrent step per token.
        """
        return self.update_many({patient: events})[patient]

    @torch.no_grad()
    def update_many(self, events_by_patient: Mapping[Hashable, Mapping[str, np.ndarray]]) -> dict[Hashable, np.ndarray]:
        """`update` for many patients at once: the known ones advance together in one batch of recurrent steps.

        Rows with fewer new events are padded (padding leaves a row's state unchanged), so a ward of patients
        costs about one patient's steps on a GPU. Returns each patient's risk.
        """
        known, arrays = [], []
        for patient, events in events_by_patient.items():
            columns = _columns(events)
            count = len(columns["input_ids"])
            if patient not in self._slots:
                self._prefill(patient, columns)
            elif count:
                known.append(patient)
                arrays.append(columns)
        if known:
            self._step_together(known, arrays)
        return self.score_many(list(events_by_patient))

    def _prefill(self, patient: Hashable, columns: dict[str, np.ndarray]) -> None:
        if len(columns["input_ids"]) == 0:
            raise ValueError("a new patient needs at least one event")
        if columns["input_ids"][: len(self.prompt)].tolist() != self.prompt:
            raise ValueError(f"a new patient's events must start with the task prompt {self.prompt}")
        batch = {c: self._tensor(c, v[None]) for c, v in columns.items()}
        cache = self.model.backbone(**batch, use_cache=True).cache
        self._store(patient, cache, {c: batch[c][:, -1] for c in _PROMPT_CONTEXT}, len(columns["input_ids"]))

    def _step_together(self, patients: list[Hashable], arrays: list[dict[str, np.ndarray]]) -> None:
        lengths = np.array([len(a["input_ids"]) for a in arrays])
        width = int(lengths.max())
        padded = {}
        for name in TOKEN_COLUMNS:
            values = np.zeros((len(arrays), width), dtype=np.float32 if name in _FLOAT_COLUMNS else np.int64)
            for row, columns in enumerate(arrays):
                values[row, : lengths[row]] = columns[name]
            padded[name] = self._tensor(name, values)
        mask = torch.as_tensor(np.arange(width)[None] < lengths[:, None], device=self.device).long()
        index = self._index(patients)
        cache = self._gather(index)
        self.model.backbone(**padded, attention_mask=mask, cache=cache)
        self._scatter(index, cache)
        rows, last = torch.arange(len(patients), device=self.device), torch.as_tensor(lengths - 1, device=self.device)
        for name in _PROMPT_CONTEXT:
            self._context[name].index_copy_(0, index, padded[name][rows, last].to(self._context[name].dtype))
        for patient, count in zip(patients, lengths.tolist(), strict=True):
            self.seen_tokens[patient] += count

    @torch.no_grad()
    def score(self, patient: Hashable) -> np.ndarray:
        """The task's probabilities now (one per task output), from a copy of the patient's state."""
        return self.score_many([patient])[patient]

    @torch.no_grad()
    def score_many(self, patients: Sequence[Hashable]) -> dict[Hashable, np.ndarray]:
        """`score` for many patients in one batch; each one's state is left untouched."""
        patients = list(patients)
        index = self._index(patients)
        count, rows = len(self.prompt), len(patients)
        prompt = {
            "input_ids": torch.tensor([self.prompt], device=self.device).expand(rows, count),
            "token_type_ids": torch.full((rows, count), self.task_token_type, device=self.device),
            "visit_segments": torch.full((rows, count), _SEGMENT_OF_PROMPT, device=self.device),
            **{c: self._context[c][index][:, None].expand(rows, count) for c in _PROMPT_CONTEXT},
        }
        state = self._gather(index)  # a copy: the prompt must not enter the patients' histories
        hidden = self.model.backbone(**prompt, cache=state).last_hidden_state  # (rows, count, hidden)
        offset = sum(self.model.config.task_outputs[: self.task_index])
        weight = self.model.classifier.weight[offset: offset + count]
        bias = self.model.classifier.bias[offset: offset + count]
        logits = (hidden.to(weight.dtype) * weight).sum(-1) + bias
        probabilities = torch.sigmoid(logits.float()).cpu().numpy()
        return {patient: probabilities[row] for row, patient in enumerate(patients)}

    @torch.no_grad()
    def trajectory(self, events: Mapping[str, np.ndarray], event_times: Sequence[Any]) -> list[tuple[Any, np.ndarray]]:
        """Risk after each moment of one patient's prompted history: [(time, probabilities)], oldest first.

        `events` starts with the task prompt (without the trailing one); `event_times` (one per token, never
        decreasing) says when each token became known. Tokens sharing a time are fed together, and the risk
        is read after each group, as a live scorer would see it.
        """
        times = list(event_times)
        if len(times) != len(np.asarray(events["input_ids"])):
            raise ValueError(f"{len(times)} event times for {len(np.asarray(events['input_ids']))} tokens")
        if any(later < earlier for earlier, later in zip(times[:-1], times[1:], strict=True)):
            raise ValueError("event times decrease; pass when each token became known (a running maximum)")
        patient = object()
        points = []
        start = 0
        # The prompt has no moment of its own: it joins the first group of events.
        for end in range(len(self.prompt) + 1, len(times) + 1):
            if end < len(times) and times[end] == times[end - 1]:
                continue
            risk = self.update(patient, {c: np.asarray(events[c])[start:end] for c in TOKEN_COLUMNS})
            points.append((times[end - 1], risk))
            start = end
        self.forget(patient)
        return points

    # The pool: one row per patient slot, gathered and scattered by index.

    def _tensor(self, name: str, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32 if name in _FLOAT_COLUMNS else torch.long, device=self.device)

    def _index(self, patients: Sequence[Hashable]) -> torch.Tensor:
        missing = [p for p in patients if p not in self._slots]
        if missing:
            raise KeyError(f"no events seen for patient {missing[0]!r}")
        return torch.as_tensor([self._slots[p] for p in patients], device=self.device)

    def _gather(self, index: torch.Tensor) -> EHRMambaCache:
        pool = self._pool
        return EHRMambaCache(
            layers=[MixerState(s.conv_state.index_select(0, index), s.ssm_state.index_select(0, index))
                    for s in pool.layers],
            last_times=pool.last_times.index_select(0, index),
        )

    def _scatter(self, index: torch.Tensor, cache: EHRMambaCache) -> None:
        for row, new in zip(self._pool.layers, cache.layers, strict=True):
            row.conv_state.index_copy_(0, index, new.conv_state.to(row.conv_state.dtype))
            row.ssm_state.index_copy_(0, index, new.ssm_state.to(row.ssm_state.dtype))
        self._pool.last_times.index_copy_(0, index, cache.last_times.float())

    def _store(self, patient: Hashable, cache: EHRMambaCache, context: dict[str, torch.Tensor], seen: int) -> None:
        if self._pool is None:
            self._pool = _empty_like(cache, _FIRST_CAPACITY)
            self._context = {c: torch.zeros(_FIRST_CAPACITY, dtype=context[c].dtype, device=self.device)
                             for c in _PROMPT_CONTEXT}
            self._free = list(range(_FIRST_CAPACITY - 1, -1, -1))
        if not self._free:
            self._grow()
        slot = self._free.pop()
        index = torch.tensor([slot], device=self.device)
        self._scatter(index, cache)
        for name in _PROMPT_CONTEXT:
            self._context[name].index_copy_(0, index, context[name].reshape(1).to(self._context[name].dtype))
        self._slots[patient] = slot
        self.seen_tokens[patient] = seen

    def _grow(self) -> None:
        """Double the pool's rows (amortised O(1) per new patient)."""
        capacity = self._pool.last_times.shape[0]
        bigger = _empty_like(self._pool, 2 * capacity)
        for row, old in zip(bigger.layers, self._pool.layers, strict=True):
            row.conv_state[:capacity] = old.conv_state
            row.ssm_state[:capacity] = old.ssm_state
        bigger.last_times[:capacity] = self._pool.last_times
        self._pool = bigger
        self._context = {c: torch.cat([v, torch.zeros_like(v)]) for c, v in self._context.items()}
        self._free = list(range(2 * capacity - 1, capacity - 1, -1))


def _columns(events: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    columns = {c: np.asarray(events[c]) for c in TOKEN_COLUMNS}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"event columns differ in length: {sorted(lengths)}")
    return columns


def _empty_like(cache: EHRMambaCache, rows: int) -> EHRMambaCache:
    def empty(tensor: torch.Tensor) -> torch.Tensor:
        return torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)

    return EHRMambaCache(layers=[MixerState(empty(s.conv_state), empty(s.ssm_state)) for s in cache.layers],
                         last_times=torch.full((rows,), float("nan"), device=cache.last_times.device))


__all__ = ["EHRMambaScorer"]
