"""Task-prompted classification on EHRMamba: one model, many tasks, binary and multi-label outputs.

Every task has a prompt (its task tokens, e.g. `[MOR_1M]`, or `[C0] .. [C5]` for the multi-label
conditions task) that the finetuning data puts at the start of the sequence and again at its end,
after the cut at prediction time. The head reads the hidden states of the trailing prompt: output `j`
of a task reads the position of its `j`-th trailing prompt token, so a binary task reads the last
real token and a multi-label task with G groups reads the last G real tokens. Each output has its own
row in one linear layer (`classifier`), selected per example by its task.

The task layout lives in the model config (`task_names`, `task_outputs`, `task_prompt_ids`,
`task_loss_weights`), so a saved model knows which tasks it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from .configuration_ehrmamba import EHRMambaConfig
from .modeling_ehrmamba import EHRMambaModel, EHRMambaPreTrainedModel

TASK_FIELDS = ("task_names", "task_outputs", "task_prompt_ids")
NEW_HEAD_PREFIX = "classifier."  # the task head a backbone checkpoint does not have


@dataclass
class EHRMambaTaskClassificationOutput(ModelOutput):
    """Per-example logits of its task's outputs, padded to the widest task (`output_mask` marks real ones).

    `loss` is the task-weighted binary cross-entropy over the labelled outputs (when labels are given).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    output_mask: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def task_layout(config: EHRMambaConfig) -> tuple[list[str], list[int], list[list[int]]]:
    """The config's task names, outputs per task and prompt token ids, checked for consistency."""
    missing = [name for name in TASK_FIELDS if getattr(config, name, None) is None]
    if missing:
        raise ValueError(f"EHRMambaConfig lacks the task layout fields {missing} (set them for a task model)")
    names, outputs, prompts = list(config.task_names), list(config.task_outputs), list(config.task_prompt_ids)
    if not names or not (len(names) == len(outputs) == len(prompts)):
        raise ValueError(
            f"task layout mismatch: {len(names)} task_names, {len(outputs)} task_outputs, "
            f"{len(prompts)} task_prompt_ids"
        )
    for name, count, prompt in zip(names, outputs, prompts, strict=True):
        if count < 1 or len(prompt) != count:
            raise ValueError(f"task {name!r}: {count} outputs need as many prompt tokens, got {len(prompt)}")
        bad = [token for token in prompt if not 0 <= token < config.vocab_size]
        if bad:
            raise ValueError(f"task {name!r}: prompt token ids {bad} outside the vocabulary of {config.vocab_size}")
    return names, outputs, prompts


class EHRMambaForTaskClassification(EHRMambaPreTrainedModel):
    """EHRMamba backbone + per-output logistic head on the trailing task prompt's hidden states.

    Start from a pretrained backbone with `EHRMambaForTaskClassification.from_backbone(run/model,
    task_names=[...], task_outputs=[...], task_prompt_ids=[[...], ...])`: the backbone weights load by
    name (`from_pretrained`), the pretraining head is dropped and the classifier starts fresh. A saved
    task model loads with plain `from_pretrained(path)`.
    """

    @classmethod
    def from_backbone(cls, path, task_names: list[str], task_outputs: list[int], task_prompt_ids: list[list[int]],
                      task_loss_weights: list[float] | None = None, **kwargs) -> EHRMambaForTaskClassification:
        """A task model whose backbone is the pretrained (or task) model saved at `path`."""
        config = EHRMambaConfig.from_pretrained(path)
        config.task_names, config.task_outputs = list(task_names), list(task_outputs)
        config.task_prompt_ids = [list(map(int, p)) for p in task_prompt_ids]
        config.task_loss_weights = list(task_loss_weights) if task_loss_weights is not None else None
        # The new head is the only thing a backbone checkpoint lacks: check that rather than print transformers'
        # load report (a table of "MISSING" keys) at every finetuning run.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(previous)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(NEW_HEAD_PREFIX))
        if missing:
            raise ValueError(f"{path}: the checkpoint lacks backbone weights {missing[:5]}; is it an EHRMamba model?")
        return model

    def __init__(self, config: EHRMambaConfig):
        super().__init__(config)
        names, outputs, _ = task_layout(config)
        self.backbone = EHRMambaModel(config)
        self.dropout = nn.Dropout(float(getattr(config, "classifier_dropout", 0.1) or 0.0))
        self.classifier = nn.Linear(config.hidden_size, sum(outputs))
        # Plain lists, not buffers: from_pretrained materialises modules from the meta device and would
        # leave non-persistent buffers uninitialised.
        self._widths = outputs
        self._offsets = [sum(outputs[:i]) for i in range(len(outputs))]
        weights = getattr(config, "task_loss_weights", None) or [1.0] * len(names)
        if len(weights) != len(names) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"task_loss_weights {weights} must give one non-negative weight per task")
        self._weights = [float(w) for w in weights]
        self.post_init()

    def _per_task(self, values: list, task_index: torch.Tensor, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=task_index.device)[task_index]

    @property
    def max_outputs(self) -> int:
        return int(max(self.config.task_outputs))

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: torch.LongTensor,
        task_index: torch.LongTensor,
        token_type_ids: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        visit_orders: torch.Tensor | None = None,
        visit_segments: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        label_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> EHRMambaTaskClassificationOutput | tuple:
        """Logits (batch, max_outputs) of each example's task; `labels` (same shape, 0/1) give the loss.

        Sequences are right-padded; `label_mask` (default: every real output) skips unlabelled outputs.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.backbone(
            input_ids, token_type_ids=token_type_ids, ages=ages, times=times, visit_orders=visit_orders,
            visit_segments=visit_segments, attention_mask=attention_mask,
            output_hidden_states=output_hidden_states, return_dict=True, inputs_embeds=inputs_embeds,
        )
        hidden = out.last_hidden_state
        batch, length = input_ids.shape
        lengths = (attention_mask.long().sum(dim=1) if attention_mask is not None
                   else torch.full((batch,), length, device=input_ids.device))
        task_index = task_index.to(input_ids.device).long()
        widths = self._per_task(self._widths, task_index)  # (batch,)
        if (lengths < widths).any():
            raise ValueError("a sequence is shorter than its task prompt")
        slots = torch.arange(self.max_outputs, device=input_ids.device)
        output_mask = slots[None, :] < widths[:, None]
        # Output j of a task with W outputs reads the j-th of its W trailing prompt tokens.
        positions = (lengths - widths)[:, None] + slots[None, :]
        positions = torch.where(output_mask, positions, lengths[:, None] - 1).clamp(min=0)
        read = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))
        read = self.dropout(read.to(self.classifier.weight.dtype))
        rows = torch.where(output_mask, self._per_task(self._offsets, task_index)[:, None] + slots[None, :], 0)
        logits = (read * self.classifier.weight[rows]).sum(-1) + self.classifier.bias[rows]
        logits = logits.masked_fill(~output_mask, 0.0)

        loss = None
        if labels is not None:
            loss = self.task_loss(logits, labels, output_mask if label_mask is None else output_mask & label_mask.bool(),
                                  task_index)
        output = EHRMambaTaskClassificationOutput(
            loss=loss, logits=logits, output_mask=output_mask, hidden_states=out.hidden_states
        )
        return output if return_dict else output.to_tuple()

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  task_index: torch.Tensor) -> torch.Tensor:
        """Task-weighted mean over examples of each example's summed BCE over its labelled outputs.

        Summed, not averaged, over outputs: each condition group's label then teaches the model as much as
        a binary task's label (averaging made six-group examples learn six times slower).
        """
        element = F.binary_cross_entropy_with_logits(
            logits.float(), labels.to(logits.device).float(), reduction="none"
        ) * mask
        counts = mask.sum(dim=1)
        per_example = element.sum(dim=1)
        weights = self._per_task(self._weights, task_index, torch.float32) * (counts > 0)
        return (per_example * weights).sum() / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)


__all__ = ["EHRMambaForTaskClassification", "EHRMambaTaskClassificationOutput", "task_layout"]
