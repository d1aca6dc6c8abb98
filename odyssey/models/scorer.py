"""`EHRMambaScorer`: a task's risk, updated as new events arrive, at a cost that does not grow with history.

The scorer keeps each patient's recurrent state (an `EHRMambaCache`: per layer, the conv window and the
SSM state) after the events seen so far. New events advance that state one recurrent step per token.
To score, the task's trailing prompt is stepped on a copy of the state, so the prompt never enters the
patient's history; the result equals running the whole prompted sequence through the parallel model
(`EHRMambaForTaskClassification`) up to float rounding.

The first events of a patient must begin like a finetuning input: the task prompt in place of `[CLS]`
(`odyssey.finetune.data.prompt_input` builds one; drop its trailing prompt, which the scorer adds).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .mixer import MixerState
from .modeling_ehrmamba import EHRMambaCache
from .modeling_ehrmamba_tasks import EHRMambaForTaskClassification

TOKEN_COLUMNS = ("input_ids", "token_type_ids", "ages", "times", "visit_orders", "visit_segments")
_FLOAT_COLUMNS = {"ages", "times"}
_SEGMENT_OF_PROMPT = 0
# The trailing prompt repeats the last event's age, time and visit.
_PROMPT_CONTEXT = ("ages", "times", "visit_orders")


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
        self.states: dict[Hashable, EHRMambaCache] = {}
        self.last_token: dict[Hashable, dict[str, torch.Tensor]] = {}

    def __contains__(self, patient: Hashable) -> bool:
        return patient in self.states

    def forget(self, patient: Hashable) -> None:
        self.states.pop(patient, None)
        self.last_token.pop(patient, None)

    def _tensors(self, events: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        lengths = {len(np.asarray(events[c])) for c in TOKEN_COLUMNS}
        if len(lengths) != 1:
            raise ValueError(f"event columns differ in length: {sorted(lengths)}")
        return {c: torch.as_tensor(np.asarray(events[c]), device=self.device)[None].to(
            torch.float32 if c in _FLOAT_COLUMNS else torch.long) for c in TOKEN_COLUMNS}

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
        batches = {patient: self._tensors(events) for patient, events in events_by_patient.items()}
        known = []
        for patient, batch in batches.items():
            if patient not in self.states:
                if batch["input_ids"].shape[1] == 0:
                    raise ValueError("a new patient needs at least one event")
                if batch["input_ids"][0, : len(self.prompt)].tolist() != self.prompt:
                    raise ValueError(f"a new patient's events must start with the task prompt {self.prompt}")
                self.states[patient] = self.model.backbone(**batch, use_cache=True).cache
                self._remember_last(patient, batch)
            elif batch["input_ids"].shape[1] > 0:
                known.append(patient)
        if known:
            self._step_together(known, [batches[p] for p in known])
        return self.score_many(list(batches))

    def _remember_last(self, patient: Hashable, batch: Mapping[str, torch.Tensor], row: int = 0, end: int = -1) -> None:
        # Kept on the device: reading them back would wait for the GPU at every event.
        self.last_token[patient] = {c: batch[c][row: row + 1, end: end + 1 or None] for c in _PROMPT_CONTEXT}

    def _step_together(self, patients: list[Hashable], batches: list[dict[str, torch.Tensor]]) -> None:
        if len(patients) == 1:
            self.model.backbone(**batches[0], cache=self.states[patients[0]])
            self._remember_last(patients[0], batches[0])
            return
        lengths = [b["input_ids"].shape[1] for b in batches]
        width = max(lengths)
        padded = {c: torch.cat([F.pad(b[c], (0, width - n)) for b, n in zip(batches, lengths, strict=True)])
                  for c in TOKEN_COLUMNS}
        mask = (torch.arange(width, device=self.device)[None] < torch.tensor(lengths, device=self.device)[:, None])
        seen = [self.states[p].seen_tokens for p in patients]
        cache = _stack([self.states[p] for p in patients])
        self.model.backbone(**padded, attention_mask=mask.long(), cache=cache)
        for row, (patient, state) in enumerate(zip(patients, _unstack(cache), strict=True)):
            state.seen_tokens = seen[row] + lengths[row]
            self.states[patient] = state
            self._remember_last(patient, padded, row, lengths[row] - 1)

    @torch.no_grad()
    def score(self, patient: Hashable) -> np.ndarray:
        """The task's probabilities now (one per task output), from a copy of the patient's state."""
        return self.score_many([patient])[patient]

    @torch.no_grad()
    def score_many(self, patients: list[Hashable]) -> dict[Hashable, np.ndarray]:
        """`score` for many patients in one batch; each one's state is left untouched."""
        for patient in patients:
            if patient not in self.states:
                raise KeyError(f"no events seen for patient {patient!r}")
        count, rows = len(self.prompt), len(patients)
        last = {c: torch.cat([self.last_token[p][c] for p in patients]).expand(rows, count) for c in _PROMPT_CONTEXT}
        prompt = {
            "input_ids": torch.tensor([self.prompt], device=self.device).expand(rows, count),
            "token_type_ids": torch.full((rows, count), self.task_token_type, device=self.device),
            "visit_segments": torch.full((rows, count), _SEGMENT_OF_PROMPT, device=self.device),
            **last,
        }
        state = _stack([self.states[p] for p in patients]) if rows > 1 else clone_cache(self.states[patients[0]])
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
        first = len(self.prompt)
        for end in range(first + 1, len(times) + 1):
            if end < len(times) and times[end] == times[end - 1]:
                continue
            risk = self.update(patient, {c: np.asarray(events[c])[start:end] for c in TOKEN_COLUMNS})
            points.append((times[end - 1], risk))
            start = end
        self.forget(patient)
        return points


def _stack(caches: list[EHRMambaCache]) -> EHRMambaCache:
    """One batched cache (new tensors) from single-row caches."""
    return EHRMambaCache(
        layers=[MixerState(torch.cat([c.layers[i].conv_state for c in caches]),
                           torch.cat([c.layers[i].ssm_state for c in caches])) for i in range(len(caches[0].layers))],
        last_times=torch.cat([c.last_times for c in caches]), seen_tokens=max(c.seen_tokens for c in caches),
    )


def _unstack(cache: EHRMambaCache) -> list[EHRMambaCache]:
    rows = cache.last_times.shape[0]
    return [EHRMambaCache(layers=[MixerState(s.conv_state[r: r + 1], s.ssm_state[r: r + 1]) for s in cache.layers],
                          last_times=cache.last_times[r: r + 1], seen_tokens=cache.seen_tokens) for r in range(rows)]


def clone_cache(cache: EHRMambaCache) -> EHRMambaCache:
    """An independent copy of a cache (its tensors cloned)."""
    return EHRMambaCache(
        layers=[MixerState(s.conv_state.clone(), s.ssm_state.clone()) for s in cache.layers],
        last_times=cache.last_times.clone(), seen_tokens=cache.seen_tokens,
    )


__all__ = ["EHRMambaScorer", "clone_cache"]
