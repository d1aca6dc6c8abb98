"""Sub-batches of similar length: the cheapest split, and the same gradient as the whole batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from finetune_helpers import TINY_MODEL
from transformers import TrainingArguments

from odyssey.finetune import FinetuneConfig
from odyssey.finetune.data import TaskCollator, TaskDataset
from odyssey.finetune.length_split import plan_sub_batches, take_rows
from odyssey.finetune.train import TaskTrainer, _build_model, load_inputs
from odyssey.training.data import read_vocabulary

TASKS = ["mortality_30d", "los_7d", "readmission_30d", "conditions"]


def _cost(lengths: np.ndarray, groups, overhead: int, multiple: int) -> int:
    widths = [-(-int(lengths[g].max()) // multiple) * multiple for g in groups]
    return sum(len(g) * w for g, w in zip(groups, widths, strict=True)) + overhead * len(groups)


def _every_split_cost(lengths: np.ndarray, overhead: int, multiple: int) -> int:
    order = np.argsort(lengths, kind="stable")
    n, best = len(order), None
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0, *[i + 1 for i, cut in enumerate(cuts) if cut], n]
        groups = [order[a:b] for a, b in itertools.pairwise(bounds)]
        cost = _cost(lengths, groups, overhead, multiple)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_plan_is_the_cheapest_split_and_covers_every_row(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.choice([7, 30, 64, 130, 131, 500, 2048], size=int(rng.integers(1, 10)))
    overhead, multiple = int(rng.choice([0, 64, 512, 4096])), int(rng.choice([1, 8]))
    groups = plan_sub_batches(lengths, overhead, multiple)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    assert _cost(lengths, groups, overhead, multiple) == _every_split_cost(lengths, overhead, multiple)


def test_one_long_history_gets_a_sub_batch_of_its_own():
    lengths = np.array([2048] + [120] * 63)
    groups = plan_sub_batches(lengths, overhead_tokens=2048, multiple=8)
    assert [len(g) for g in groups] == [63, 1] and groups[1].tolist() == [0]
    assert plan_sub_batches(np.full(16, 300), overhead_tokens=2048).__len__() == 1


@pytest.fixture(scope="module")
def batch_and_config(cohort):
    inputs = load_inputs(cohort.seq, cohort.labels, TASKS, ["train"])
    dataset = TaskDataset(inputs.store, inputs.examples["train"], inputs.specs, 256)
    order = np.argsort(dataset.lengths)
    picks = order[np.linspace(0, len(order) - 1, 12).astype(int)]  # shortest to longest, every task
    pad_id = read_vocabulary(cohort.seq).pad_id
    batch = TaskCollator(pad_id, 8)([dataset[int(i)] for i in picks])
    config = FinetuneConfig(model_size="tiny", model={**TINY_MODEL, "embedding_dropout": 0.0},
                            classifier_dropout=0.0, task_loss_weights={"los_7d": 2.0, "conditions": 0.5})
    return batch, config, inputs.specs, read_vocabulary(cohort.seq)


def test_take_rows_cuts_padding_and_keeps_each_examples_columns(batch_and_config):
    batch = batch_and_config[0]
    rows = np.array([0, 1, 2])
    sub = take_rows(batch, rows, batch["attention_mask"].sum(1).numpy(), multiple=8)
    longest = int(batch["attention_mask"][:3].sum(1).max())
    assert sub["input_ids"].shape == (3, -(-longest // 8) * 8) < batch["input_ids"].shape
    assert torch.equal(sub["labels"], batch["labels"][:3]) and torch.equal(sub["task_index"], batch["task_index"][:3])
    assert torch.equal(sub["ages"], batch["ages"][:3, : sub["ages"].shape[1]])


def _step(batch, config, specs, vocabulary, tmp_path, overhead):
    torch.manual_seed(0)
    model = _build_model(config, specs, vocabulary.size, vocabulary.pad_id, None)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = TaskTrainer(model=model, args=args, split_overhead_tokens=overhead, pad_to_multiple_of=8)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    loss = trainer.training_step(model, dict(batch))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def test_sub_batches_give_the_whole_batch_loss_and_gradient(batch_and_config, tmp_path):
    batch, config, specs, vocabulary = batch_and_config
    lengths = batch["attention_mask"].sum(1).numpy()
    assert len(plan_sub_batches(lengths, 0, 8)) >= 4  # the split below really splits
    whole_loss, whole = _step(batch, config, specs, vocabulary, tmp_path, overhead=None)
    split_loss, split = _step(batch, config, specs, vocabulary, tmp_path, overhead=0)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_overhead_follows_the_device_unless_set(monkeypatch):
    from odyssey.finetune.train import SPLIT_OVERHEAD_TOKENS, split_overhead_tokens

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert split_overhead_tokens(FinetuneConfig()) == SPLIT_OVERHEAD_TOKENS["cpu"] == 2048
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert split_overhead_tokens(FinetuneConfig()) == SPLIT_OVERHEAD_TOKENS["cuda"] == 32768
    assert split_overhead_tokens(FinetuneConfig(split_overhead_tokens=500)) == 500
