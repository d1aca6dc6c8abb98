"""`odyssey.finetune.finetune(config)`: multitask prompted finetuning (MTF) with the transformers Trainer.

One model serves every task: each example is prompted with its task's tokens (see `data`), and the head
reads the trailing prompt. Per-task loss weights and sampling rates, few-shot training on k labelled
examples per task, from a pretrained run (`pretrained`) or from scratch (`pretrained: null`).

Output folder (`out`):
- `model/`: the task model (`model.safetensors`, `config.json` with the task layout), `tasks.json` (the task
  specs) and a copy of the tokenizer;
- `finetune_report.json`: settings, examples per split and task, training loss, tuning AUROC per output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from transformers import TrainerCallback, TrainingArguments, set_seed

from odyssey.io import atomic_output_dir, read_json, write_json
from odyssey.models import EHRMambaConfig, EHRMambaForTaskClassification, count_parameters
from odyssey.models.modeling_ehrmamba_tasks import NEW_HEAD_PREFIX
from odyssey.tokenizer import EHRTokenizer, TokenType, load_sequences
from odyssey.training.data import LengthBucketSampler, read_vocabulary
from odyssey.training.pretrain import (
    PickleFreeTrainer,
    TrainerSettings,
    resolve_precision,
    shared_training_arguments,
)

from .data import (
    FinetuneDataError,
    SequenceStore,
    TaskCollator,
    TaskDataset,
    TaskExamples,
    TaskSpec,
    build_examples,
    check_both_classes,
    few_shot,
    read_task_labels,
    read_task_specs,
)
from .length_split import plan_sub_batches, take_rows
from .metrics import auroc
from .transformer import GPT, EHRGPTForTaskClassification, task_model_class

MODEL = "model"
TASKS_FILE = "tasks.json"
TOKENIZER = "tokenizer"
REPORT = "finetune_report.json"
CHECKPOINTS = "checkpoints"
PRETRAINED_MODEL = "model"  # `odyssey pretrain` writes its final model here inside the run folder


class FinetuneConfig(TrainerSettings):
    """Settings of `odyssey finetune` (configs/finetune.yaml); CLI flags override fields.

    `model_size` and `model` apply when training from scratch only."""

    pretrained: Path | None = Field(None, description="pretraining run folder (or its model/); null: from scratch")
    data: Path | None = Field(None, description="sequences folder written by `odyssey tokenize`")
    labels: Path | None = Field(None, description="labels folder written by `odyssey labels`")
    out: Path | None = Field(None, description="finetuning output folder")
    tasks: list[str] | None = Field(None, description="task names of LABEL_DIR/tasks.json; null: all source tasks")
    classifier_dropout: float = Field(0.1, ge=0, lt=1)
    context_length: int = Field(2048, ge=8)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    backbone_learning_rate: float | None = Field(
        None, ge=0, description="peak learning rate of everything but the task head; null: learning_rate for all "
        "(a pretrained backbone can keep more of what it learned at a lower rate; 0 trains the head alone)")
    lr_scheduler: str = "linear"
    epochs: float = Field(3.0, gt=0)
    eval_steps: int | None = Field(
        None, ge=1, description="score the tuning split every this many steps and keep the best model (mean AUROC)")
    task_loss_weights: dict[str, float] = Field(default_factory=dict, description="task -> loss weight (default 1)")
    task_sampling: dict[str, float] = Field(
        default_factory=dict, description="task -> relative share of training batches; empty: as many as examples"
    )
    few_shot_k: int | None = Field(None, ge=1, description="train on at most k labelled examples per task")
    architecture: Literal["ehrmamba", "gpt"] = Field(
        "ehrmamba", description="gpt: the transformer baseline (same embeddings and head, from scratch)")
    gpt_layers: int | None = Field(None, ge=1, description="gpt blocks; default half the Mamba layers")
    gpt_heads: int | None = Field(None, ge=1, description="attention heads; default hidden_size / 64")
    group_by_length: bool = Field(
        False, description="batch examples of similar length together: less padding, but one admission's tasks "
        "then share batches (worse heads in the demo); ignored with task_sampling")
    split_batches_by_length: bool = Field(
        True, description="run each batch as sub-batches of similar length: the same gradient, less padding")
    split_overhead_tokens: int | None = Field(
        None, ge=0, description="the fixed cost of one sub-batch in padded tokens: higher gives fewer, wider ones; "
        "null: by device (CPU 2,048; CUDA 32,768, where each sub-batch's launches cost far more)")
    dataloader_workers: int = Field(0, ge=0, description="processes that build examples (cut, truncate, prompt)")
    max_train_minutes: float | None = Field(
        None, gt=0, description="stop training after this much wall time (the learning-rate schedule is cut "
        "short, not rescaled); with eval_steps the tuning split is scored at the stop and the best model kept")

    @field_validator("task_loss_weights", "task_sampling")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if v < 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        return value


@dataclass
class FinetuneResult:
    """The finetuned model, where it was saved, and what finetuning measured."""

    model: EHRMambaForTaskClassification = field(repr=False)
    out: str
    model_dir: str
    tasks: list[str]
    examples: dict[str, dict[str, int]]
    steps: int
    train_loss: float
    tuning_auroc: dict[str, float | None]
    train_seconds: float
    parameters: int
    from_pretrained: bool
    stopped_by_time_budget_at_step: int | None = None  # set when max_train_minutes ended training

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


@dataclass
class FinetuneInputs:
    """Everything checked and loaded before training: tokenizer, tasks, sequences, examples per split."""

    tokenizer: EHRTokenizer
    specs: list[TaskSpec]
    store: SequenceStore
    examples: dict[str, TaskExamples]
    without_usable_input: dict[str, dict[str, int]]


def load_inputs(data: Path, labels: Path, tasks: Sequence[str] | None, splits: Sequence[str],
                specs: Sequence[TaskSpec] | None = None) -> FinetuneInputs:
    """Read tokenizer, task specs, sequences and labels; build each split's examples (checked)."""
    tokenizer = EHRTokenizer.from_pretrained(Path(data) / TOKENIZER)
    specs = list(specs) if specs is not None else read_task_specs(labels, tokenizer, tasks)
    frames = [read_task_labels(labels, spec) for spec in specs]
    store = SequenceStore(load_sequences(data))
    examples, dropped = {}, {}
    for split in splits:
        examples[split], dropped[split] = build_examples(store, specs, frames, split, labels)
    return FinetuneInputs(tokenizer, specs, store, examples, dropped)


def check_tokenizer_match(model_dir: Path, data: Path) -> None:
    """The checkpoint was trained with the tokenizer of `data` (same vocabulary), else a clear error."""
    config = EHRMambaConfig.from_pretrained(model_dir)
    vocabulary = read_vocabulary(data)
    if config.vocab_size != vocabulary.size:
        raise FinetuneDataError(
            f"{model_dir}: the checkpoint has a vocabulary of {config.vocab_size} tokens but {data}/tokenizer has "
            f"{vocabulary.size}; finetune on sequences made with the pretraining tokenizer"
        )
    saved = Path(model_dir) / TOKENIZER / "tokenizer.json"
    if saved.is_file():
        ours = EHRTokenizer.from_pretrained(Path(data) / TOKENIZER).get_vocab()
        theirs = EHRTokenizer.from_pretrained(saved.parent).get_vocab()
        if ours != theirs:
            changed = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
            raise FinetuneDataError(
                f"{model_dir}: the checkpoint's tokenizer differs from {data}/tokenizer (e.g. {changed}); "
                "finetune on sequences made with the pretraining tokenizer"
            )


def resolve_pretrained(path: Path) -> Path:
    """A pretraining run folder or its model folder -> the folder holding config.json and safetensors."""
    path = Path(path)
    for candidate in (path, path / PRETRAINED_MODEL):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no config.json here or in {path / PRETRAINED_MODEL} (a pretraining run?)")


def _build_model(config: FinetuneConfig, specs: Sequence[TaskSpec], vocab_size: int, pad_id: int,
                 model_dir: Path | None) -> EHRMambaForTaskClassification:
    weights = [config.task_loss_weights.get(s.name, 1.0) for s in specs]
    layout = {"task_names": [s.name for s in specs], "task_outputs": [len(s.outputs) for s in specs],
              "task_prompt_ids": [list(s.prompt_ids) for s in specs], "task_loss_weights": weights}
    if config.architecture == GPT:
        if model_dir is not None:
            raise ValueError("architecture 'gpt' trains from scratch; leave `pretrained` empty")
        fields = {**config.model, "vocab_size": vocab_size, "pad_token_id": pad_id}
        model_config = EHRMambaConfig.from_size(config.model_size, **fields, **layout,
                                                classifier_dropout=config.classifier_dropout)
        model_config.architecture = GPT
        model_config.gpt_layers = config.gpt_layers or max(1, model_config.num_hidden_layers // 2)
        model_config.gpt_heads = config.gpt_heads
        model_config.gpt_positions = config.context_length
        model = EHRGPTForTaskClassification(model_config)
    elif model_dir is not None:
        model = EHRMambaForTaskClassification.from_backbone(model_dir, **layout)
        model.config.scan_backend = config.scan_backend
        model.config.classifier_dropout = config.classifier_dropout
        model.dropout.p = config.classifier_dropout
    else:
        fields = {**config.model, "vocab_size": vocab_size, "pad_token_id": pad_id,
                  "scan_backend": config.scan_backend}
        model = EHRMambaForTaskClassification(EHRMambaConfig.from_size(
            config.model_size, **fields, **layout, classifier_dropout=config.classifier_dropout))
    model.config.task_token_type = int(TokenType.TASK)  # the scorer stamps its trailing prompt with it
    return model


def sampling_weights(examples: TaskExamples, specs: Sequence[TaskSpec], shares: dict[str, float]) -> np.ndarray | None:
    """Per-example sampling weights giving each task its share of batches; None: uniform over examples."""
    if not shares:
        return None
    counts = np.bincount(examples.task_index, minlength=len(specs))
    default = {s.name: counts[i] / counts.sum() for i, s in enumerate(specs)}
    task_share = np.array([shares.get(s.name, default[s.name]) for s in specs], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_example = np.where(counts > 0, task_share / counts, 0.0)
    return per_example[examples.task_index]


class KeepBestOnTuning(TrainerCallback):
    """Every `every` steps: mean AUROC over task outputs on the tuning split; keeps the best weights (CPU copy)."""

    def __init__(self, dataset: TaskDataset, pad_id: int, batch_size: int, every: int):
        self.dataset, self.pad_id, self.batch_size, self.every = dataset, pad_id, batch_size, every
        self.best_score, self.best_step, self.best_state = -np.inf, 0, None
        self.history: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.check(model, state.global_step)

    def check(self, model, step: int) -> None:
        probabilities = predict(model, self.dataset, self.pad_id, self.batch_size)
        scores = [v for v in output_aurocs(self.dataset.specs, self.dataset.examples, probabilities).values()
                  if v is not None]
        score = float(np.mean(scores)) if scores else -np.inf
        self.history.append({"step": step, "tuning_mean_auroc": score})
        if score > self.best_score:
            self.best_score, self.best_step = score, step
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class StopAfterMinutes(TrainerCallback):
    """Ends training at the first step past a wall-time budget (all processes stop at the same step)."""

    def __init__(self, minutes: float, keep_best: KeepBestOnTuning | None = None):
        self.seconds, self.keep_best = 60.0 * minutes, keep_best
        self.started: float | None = None
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.started is None or not self._over_budget(model):
            return
        self.stopped_at = state.global_step
        control.should_training_stop = True
        checked = self.keep_best is not None and any(h["step"] == state.global_step for h in self.keep_best.history)
        if self.keep_best is not None and not checked:
            self.keep_best.check(model, state.global_step)

    def _over_budget(self, model) -> bool:
        over = time.perf_counter() - self.started > self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # processes decide together: one that stopped alone would leave the others waiting in a collective
            device = next(model.parameters()).device if model is not None else "cpu"
            flag = torch.tensor([int(over)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item())
        return over


class TaskTrainer(PickleFreeTrainer):
    """Trainer whose training order follows per-task sampling weights when given, else groups by length.

    Length grouping (`LengthBucketSampler`: batches of similar length in random order) uses the dataset's
    precomputed lengths; without it, a batch of short histories pads to its one long history (most of a
    GPU step at 2,048). With `split_overhead_tokens`, each batch instead runs as sub-batches of similar
    length (`length_split`), whose weighted losses and gradients add up to the whole batch's.
    """

    def __init__(self, *args, sample_weights: np.ndarray | None = None, group_by_length: bool = False,
                 split_overhead_tokens: int | None = None, pad_to_multiple_of: int = 1,
                 backbone_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_learning_rate = backbone_learning_rate
        self.sample_weights = sample_weights
        self.group_examples_by_length = group_by_length
        self.split_overhead_tokens = split_overhead_tokens  # None: each batch runs whole
        self.pad_to_multiple_of = pad_to_multiple_of
        self._loss_share: float | None = None

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the backbone's parameters at `backbone_learning_rate` when set.

        Each of the Trainer's groups (weight decay or not) splits into head and backbone; the schedule then
        scales both rates alike.
        """
        made_before = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if self.backbone_learning_rate is None or made_before:
            return optimizer
        named = (self.model if model is None else model).named_parameters()
        head = {id(p) for name, p in named if name.startswith(NEW_HEAD_PREFIX)}
        groups = []
        for group in optimizer.param_groups:
            settings = {key: value for key, value in group.items() if key != "params"}
            for in_head, lr in ((True, group["lr"]), (False, self.backbone_learning_rate)):
                params = [p for p in group["params"] if (id(p) in head) == in_head]
                if params:
                    groups.append({**settings, "params": params, "lr": lr})
        optimizer.param_groups.clear()  # nothing has stepped yet: no state refers to the old groups
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The batch's step, run as sub-batches of similar length when that saves padded tokens."""
        if self.split_overhead_tokens is None:
            return super().training_step(model, inputs, num_items_in_batch)
        # What the split needs, copied to the host once: lengths, task indices, whether an example is labelled.
        lengths, task_index, labelled = torch.stack([
            inputs["attention_mask"].sum(dim=1), inputs["task_index"], inputs["label_mask"].any(dim=1).long(),
        ]).cpu().numpy()
        groups = plan_sub_batches(lengths, self.split_overhead_tokens, self.pad_to_multiple_of)
        shares = self._loss_shares(model, task_index, labelled, groups)
        if shares is None:
            return super().training_step(model, inputs, num_items_in_batch)
        total = None
        for number, (rows, share) in enumerate(zip(groups, shares, strict=True)):
            self._loss_share = share
            # Gradients synchronise across devices once, after the last sub-batch (devices may split differently).
            last = number == len(groups) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, take_rows(inputs, rows, lengths, self.pad_to_multiple_of),
                                             num_items_in_batch)
            total = loss if total is None else total + loss
        self._loss_share = None
        return total

    def _loss_shares(self, model, task_index: np.ndarray, labelled: np.ndarray,
                     groups: list[np.ndarray]) -> list[float] | None:
        """Each group's share of the batch loss's weight (the task weights of examples with a label)."""
        if len(groups) == 1:
            return None
        weights = np.asarray(self.accelerator.unwrap_model(model)._weights)[task_index] * labelled
        total = float(weights.sum())
        if total <= 0:
            return None
        return [float(weights[rows].sum()) / total for rows in groups]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self._loss_share is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss * self._loss_share, outputs
        return result * self._loss_share

    def _get_train_sampler(self, train_dataset=None):
        if self.sample_weights is None:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.group_examples_by_length and hasattr(dataset, "lengths"):
                return LengthBucketSampler(list(dataset.lengths), self.args.train_batch_size
                                           * self.args.gradient_accumulation_steps, seed=self.args.seed)
            return super()._get_train_sampler(train_dataset)
        return torch.utils.data.WeightedRandomSampler(
            torch.as_tensor(self.sample_weights, dtype=torch.double), num_samples=len(self.sample_weights),
            replacement=True, generator=torch.Generator().manual_seed(self.args.seed),
        )


# Fixed cost of one sub-batch in padded tokens, by device. H200, small model, batch 64, 5,000 patients
# (benchmarks/finetune_batching.py, RESULTS.md): at context 2,048 whole batches ran 7.8 steps/s, split
# at 2,048 3.9, at 8,192 8.3, at 32,768 10.4; on the 2-core CPU 2,048 took 40% off a 1,000-patient run.
SPLIT_OVERHEAD_TOKENS = {"cpu": 2048, "cuda": 32768}


def split_overhead_tokens(config: FinetuneConfig) -> int:
    if config.split_overhead_tokens is not None:
        return config.split_overhead_tokens
    return SPLIT_OVERHEAD_TOKENS["cuda" if torch.cuda.is_available() else "cpu"]


def _training_arguments(config: FinetuneConfig, out: Path, precision: str) -> TrainingArguments:
    return TrainingArguments(
        **shared_training_arguments(config, out / CHECKPOINTS, precision), eval_strategy="no", save_strategy="no",
        dataloader_num_workers=config.dataloader_workers,
    )


def predict(model: EHRMambaForTaskClassification, dataset: TaskDataset, pad_id: int,
            batch_size: int = 32) -> np.ndarray:
    """Probabilities (examples, max_outputs) in dataset order; batches go longest first to pad little."""
    order = np.argsort(-np.asarray(dataset.lengths), kind="stable")
    collate = TaskCollator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    width = max(len(s.outputs) for s in dataset.specs)
    out = np.zeros((len(dataset), width), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = collate([dataset[int(i)] for i in chosen])
            batch = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "label_mask")}
            logits = model(**batch).logits
            out[chosen] = torch.sigmoid(logits.float()).cpu().numpy()[:, :width]
    model.train(was_training)
    return out


def output_aurocs(specs: Sequence[TaskSpec], examples: TaskExamples, probabilities: np.ndarray) -> dict[str, float | None]:
    """AUROC of every task output (None where a class is missing)."""
    result: dict[str, float | None] = {}
    for task_index, spec in enumerate(specs):
        for j, name in enumerate(spec.output_names()):
            keep = (examples.task_index == task_index) & examples.label_mask[:, j]
            value = auroc(examples.labels[keep, j], probabilities[keep, j], np.ones((1, int(keep.sum()))))[0]
            result[name] = float(value) if np.isfinite(value) else None
    return result


def finetune(config: FinetuneConfig, callbacks: list[TrainerCallback] | None = None) -> FinetuneResult:
    """Finetune one EHRMamba on all `config.tasks`; write `config.out`; return the model and its metrics.

    Every input problem (unknown task, checkpoint/tokenizer mismatch, labels of unknown subjects, a split
    where a task has one class) stops here, before any training.
    """
    for name in ("data", "labels", "out"):
        if getattr(config, name) is None:
            raise ValueError(f"finetune needs `{name}`")
    if config.architecture == GPT and config.pretrained is not None:
        raise ValueError("architecture 'gpt' trains from scratch; leave `pretrained` empty")
    out = Path(config.out)
    model_dir = resolve_pretrained(config.pretrained) if config.pretrained is not None else None
    if model_dir is not None:
        check_tokenizer_match(model_dir, config.data)
    inputs = load_inputs(config.data, config.labels, config.tasks, ("train", "tuning"))
    specs = inputs.specs
    unknown = sorted((set(config.task_loss_weights) | set(config.task_sampling)) - {s.name for s in specs})
    if unknown:
        raise FinetuneDataError(f"task_loss_weights / task_sampling name tasks not being trained: {unknown}")
    train = inputs.examples["train"]
    if config.few_shot_k is not None:
        train = few_shot(train, specs, config.few_shot_k, config.seed)
    check_both_classes(train, specs, "train")
    check_both_classes(inputs.examples["tuning"], specs, "tuning")

    precision = resolve_precision(config.precision)
    set_seed(config.seed)
    vocabulary = read_vocabulary(config.data)
    model = _build_model(config, specs, vocabulary.size, vocabulary.pad_id, model_dir)
    datasets = {split: TaskDataset(inputs.store, ex, specs, config.context_length)
                for split, ex in (("train", train), ("tuning", inputs.examples["tuning"]))}
    trainer = TaskTrainer(
        model=model,
        args=_training_arguments(config, out, precision),
        train_dataset=datasets["train"],
        data_collator=TaskCollator(vocabulary.pad_id, config.pad_to_multiple_of),
        callbacks=callbacks,
        sample_weights=sampling_weights(train, specs, config.task_sampling),
        group_by_length=config.group_by_length,
        split_overhead_tokens=split_overhead_tokens(config) if config.split_batches_by_length else None,
        pad_to_multiple_of=config.pad_to_multiple_of,
        backbone_learning_rate=config.backbone_learning_rate,
    )
    keep_best = None
    if config.eval_steps is not None:
        keep_best = KeepBestOnTuning(datasets["tuning"], vocabulary.pad_id,
                                     config.eval_batch_size or config.batch_size, config.eval_steps)
        trainer.add_callback(keep_best)
    time_budget = None
    if config.max_train_minutes is not None:
        time_budget = StopAfterMinutes(config.max_train_minutes, keep_best)
        trainer.add_callback(time_budget)  # after keep_best: its own check at a scheduled step comes first
    started = time.perf_counter()
    train_output = trainer.train()
    seconds = time.perf_counter() - started
    model = trainer.model
    if keep_best is not None and keep_best.best_state is not None:
        model.load_state_dict(keep_best.best_state)
    tuning = predict(model, datasets["tuning"], vocabulary.pad_id, config.eval_batch_size or config.batch_size)
    counts = {split: {s.name: int((ex.task_index == i).sum()) for i, s in enumerate(specs)}
              for split, ex in (("train", train), ("tuning", inputs.examples["tuning"]))}
    result = FinetuneResult(
        model=model, out=str(out), model_dir=str(out / MODEL), tasks=[s.name for s in specs], examples=counts,
        steps=int(trainer.state.global_step), train_loss=float(train_output.training_loss),
        tuning_auroc=output_aurocs(specs, inputs.examples["tuning"], tuning), train_seconds=round(seconds, 3),
        parameters=count_parameters(model), from_pretrained=model_dir is not None,
        stopped_by_time_budget_at_step=None if time_budget is None else time_budget.stopped_at,
    )
    if trainer.is_world_process_zero():
        save_model(model, specs, Path(config.data), out / MODEL)
        selection = None if keep_best is None else {"best_step": keep_best.best_step, "history": keep_best.history}
        write_json(out / REPORT, {**result.to_dict(), "without_usable_input": inputs.without_usable_input,
                                  "model_selection": selection, "config": config.model_dump(mode="json")})
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # no intermediate checkpoints are kept
    return result


def save_model(model: EHRMambaForTaskClassification, specs: Sequence[TaskSpec], data: Path, target: Path) -> None:
    with atomic_output_dir(target) as staging:
        model.save_pretrained(staging)
        write_json(staging / TASKS_FILE, [s.to_dict() for s in specs])
        shutil.copytree(Path(data) / TOKENIZER, staging / TOKENIZER)


def load_finetuned(path: str | os.PathLike) -> tuple[EHRMambaForTaskClassification, list[TaskSpec]]:
    """A finetuned model (FT_DIR or FT_DIR/model) and its task specs."""
    path = Path(path)
    model_dir = path / MODEL if (path / MODEL / TASKS_FILE).is_file() else path
    if not (model_dir / TASKS_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {TASKS_FILE} here or in {path / MODEL} (an `odyssey finetune` folder?)")
    specs = [TaskSpec.from_dict(d) for d in read_json(model_dir / TASKS_FILE)]
    model = task_model_class(EHRMambaConfig.from_pretrained(model_dir)).from_pretrained(model_dir)
    if list(model.config.task_names) != [s.name for s in specs]:
        raise ValueError(f"{model_dir}: config.json and {TASKS_FILE} list different tasks")
    return model, specs
