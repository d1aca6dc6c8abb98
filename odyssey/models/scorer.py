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

from collections.abc import Hashable, Mapping

import numpy as np
import torch

from .mixer import MixerState
from .modeling_ehrmamba import EHRMambaCache
from .modeling_ehrmamba_tasks import EHRMambaForTaskClassification

TOKEN_COLUMNS = ("input_ids", "token_type_ids", "ages", "times", "visit_orders", "visit_segments")
_FLOAT_COLUMNS = {"ages", "times"}
_SEGMENT_OF_PROMPT = 0


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
        batch = self._tensors(events)
        if batch["input_ids"].shape[1] == 0:
            if patient not in self.states:
                raise ValueError("a new patient needs at least one event")
            return self.score(patient)
        if patient not in self.states:
            if batch["input_ids"][0, : len(self.prompt)].tolist() != self.prompt:
                raise ValueError(f"a new patient's events must start with the task prompt {self.prompt}")
            self.states[patient] = self.model.backbone(**batch, use_cache=True).cache
        else:
            self.model.backbone(**batch, cache=self.states[patient])
        # Kept on the device: reading them back would wait for the GPU at every event.
        self.last_token[patient] = {c: batch[c][:, -1:] for c in ("ages", "times", "visit_orders")}
        return self.score(patient)

    @torch.no_grad()
    def score(self, patient: Hashable) -> np.ndarray:
        """The task's probabilities now (one per task output), from a copy of the patient's state."""
        if patient not in self.states:
            raise KeyError(f"no events seen for patient {patient!r}")
        last = self.last_token[patient]
        count = len(self.prompt)
        prompt = {
            "input_ids": torch.tensor([self.prompt], device=self.device),
            "token_type_ids": torch.full((1, count), self.task_token_type, device=self.device),
            "ages": last["ages"].expand(1, count),
            "times": last["times"].expand(1, count),
            "visit_orders": last["visit_orders"].expand(1, count),
            "visit_segments": torch.full((1, count), _SEGMENT_OF_PROMPT, device=self.device),
        }
        state = _copy(self.states[patient])
        hidden = self.model.backbone(**prompt, cache=state).last_hidden_state[0]  # (count, hidden)
        offset = sum(self.model.config.task_outputs[: self.task_index])
        weight = self.model.classifier.weight[offset: offset + count]
        bias = self.model.classifier.bias[offset: offset + count]
        logits = (hidden.to(weight.dtype) * weight).sum(-1) + bias
        return torch.sigmoid(logits.float()).cpu().numpy()


def _copy(cache: EHRMambaCache) -> EHRMambaCache:
    return EHRMambaCache(
        layers=[MixerState(s.conv_state.clone(), s.ssm_state.clone()) for s in cache.layers],
        last_times=cache.last_times.clone(), seen_tokens=cache.seen_tokens,
    )


__all__ = ["EHRMambaScorer"]
