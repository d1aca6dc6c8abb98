"""Run one random batch as a few sub-batches of similar length: the same gradient, far less padding.

A random batch of 64 histories almost always holds one 2,048-token history while the median is about
130 tokens, so padding to the longest costs most of a step. Batching similar lengths together
(`group_by_length`) removes the padding but makes every batch length-homogeneous, which kept the heads
near chance on a small cohort (docs/finetune.md). Splitting keeps the random batch: its examples are
sorted by length and cut into sub-batches, each padded only to its own longest example; each sub-batch's
loss is weighted by its share of the batch's loss weight, and the gradients add up to the whole batch's.
"""

from __future__ import annotations

import numpy as np
import torch

from odyssey.training.data import TOKEN_COLUMNS, padded_width

_PER_TOKEN = (*TOKEN_COLUMNS, "attention_mask")


def plan_sub_batches(lengths: np.ndarray, overhead_tokens: int, multiple: int = 1) -> list[np.ndarray]:
    """Row groups (indices into `lengths`) that minimise padded tokens + `overhead_tokens` per group.

    Groups are contiguous runs of the rows sorted by length, so the cheapest split is an exact dynamic
    programme over cut points; `multiple` rounds each group's width up as the collator pads it.
    """
    order = np.argsort(lengths, kind="stable")
    width = padded_width(np.asarray(lengths)[order], multiple)
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: cheapest cost of the j shortest rows
    cut = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        starts = np.arange(end)
        costs = best[:end] + (end - starts) * width[end - 1] + overhead_tokens
        cut[end] = int(np.argmin(costs))
        best[end] = costs[cut[end]]
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def take_rows(batch: dict[str, torch.Tensor], rows: np.ndarray, lengths: np.ndarray,
              multiple: int = 1) -> dict[str, torch.Tensor]:
    """The sub-batch of `rows`, its token columns cut to their longest length (`lengths`, rounded up to
    `multiple`, as the collator pads)."""
    width = min(batch["attention_mask"].shape[1], int(padded_width(lengths[rows].max(), multiple)))
    index = torch.as_tensor(rows, dtype=torch.long, device=batch["attention_mask"].device)
    sub = {name: value.index_select(0, index.to(value.device)) for name, value in batch.items()}
    return {name: value[:, :width] if name in _PER_TOKEN else value for name, value in sub.items()}


__all__ = ["plan_sub_batches", "take_rows"]
