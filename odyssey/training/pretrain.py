"""`odyssey.training.pretrain(config)`: next-token pretraining of EHRMamba with the transformers Trainer.

Run folder layout (`out`):
- `checkpoints/checkpoint-<step>/`: Trainer checkpoints (model.safetensors, optimizer, scheduler, RNG and
  trainer state) for `resume`; the Trainer reads the non-weight files with `torch.load(weights_only=True)`.
- `logs/`: TensorBoard event files (loss, learning rate, tuning loss and perplexity).
- `model/`: the final model (`model.safetensors` + `config.json`) and a copy of the tokenizer folder,
  written atomically when training ends.
- `pretrain_report.json`: the summary below.

Distributed runs (`torchrun`, `accelerate launch`) need no change: the Trainer places the model and
shards batches; only the main process writes TensorBoard logs, the final model and the report.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer import TRAINING_ARGS_NAME as PICKLED_TRAINING_ARGUMENTS
from transformers.trainer_utils import get_last_checkpoint

from odyssey.config import StageConfig
from odyssey.io import atomic_output_dir, read_json, write_json
from odyssey.kernels import BACKENDS as SCAN_BACKENDS
from odyssey.models import MODEL_SIZES, EHRMambaConfig, EHRMambaForPretraining, count_parameters
from odyssey.models.modeling_ehrmamba import IGNORE_INDEX

from .data import (
    LengthBucketSampler,
    SequenceCollator,
    SequenceDataset,
    read_sequences,
    read_vocabulary,
    sort_by_length,
)

MAX_CONTEXT_LENGTH = 65_536
CHECKPOINTS = "checkpoints"
LOGS = "logs"
MODEL = "model"
REPORT = "pretrain_report.json"
TRAINER_STATE = "trainer_state.json"  # written by the Trainer in every checkpoint
Precision = Literal["auto", "bf16", "fp16", "fp32"]
# Model fields that come from the tokenizer (and the scan backend from its own setting), never from `model`.
TOKENIZER_FIELDS = {"vocab_size", "pad_token_id", "scan_backend"}
MAX_LOG_PERPLEXITY = 50.0  # perplexity is reported as exp(min(loss, this)) to stay finite


class TrainerSettings(StageConfig):
    """Fields (and their checks) that pretraining and finetuning share; each stage adds its own."""

    model_size: str = Field("tiny", description="tiny, small or base (docs/model.md)")
    model: dict[str, Any] = Field(default_factory=dict, description="EHRMambaConfig fields overriding the size")
    eval_batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: float = Field(0.05, ge=0, description="a fraction of the run if < 1, else a step count")
    max_grad_norm: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: run `epochs`)")
    logging_steps: int = Field(20, ge=1)
    precision: Precision = Field("auto", description="auto: bf16 (else fp16) autocast on CUDA, fp32 on CPU")
    scan_backend: str = "auto"
    pad_to_multiple_of: int = Field(
        16, ge=1, description="batch lengths round up to this; 16 keeps every row stride divisible by 16, which the "
        "Triton scan's fastest backward needs (kernels/NOTES.md v9)")
    seed: int = 42
    progress_bar: bool = True

    @field_validator("model")
    @classmethod
    def _known_model_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed = {f.name for f in dataclasses.fields(EHRMambaConfig)} - TOKENIZER_FIELDS
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"model: unknown or tokenizer-owned EHRMambaConfig fields {unknown}")
        return value

    @field_validator("scan_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in ("auto", *SCAN_BACKENDS):
            raise ValueError(f"unknown scan_backend {value!r}; choose one of {('auto', *SCAN_BACKENDS)}")
        return value

    @field_validator("model_size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        if value not in MODEL_SIZES:
            raise ValueError(f"unknown model_size {value!r}; choose one of {sorted(MODEL_SIZES)}")
        return value


class PretrainConfig(TrainerSettings):
    """Settings of `odyssey pretrain` (configs/pretrain.yaml); CLI flags override fields."""

    data: Path | None = Field(None, description="sequences folder written by `odyssey tokenize`")
    out: Path | None = Field(None, description="run folder: checkpoints, logs, final model, report")
    resume: bool = Field(False, description="continue from the last checkpoint in out/checkpoints")
    context_length: int = Field(2048, ge=2, le=MAX_CONTEXT_LENGTH)
    long_sequences: Literal["recent", "windows"] = "windows"
    batch_size: int = Field(8, ge=1, description="sequences per device per micro-batch")
    learning_rate: float = Field(5e-4, gt=0)
    lr_scheduler: str = "cosine"
    epochs: float = Field(1.0, gt=0)
    eval_steps: int = Field(200, ge=1)
    save_steps: int = Field(200, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    gradient_checkpointing: bool = False
    dataloader_workers: int = Field(0, ge=0)
    keep_best: bool = Field(
        False, description="the final model is the checkpoint with the lowest tuning loss (scored every eval_steps), "
        "not the last: a guard against overfitting a small cohort with many epochs")

    @model_validator(mode="after")
    def _best_needs_saved_evaluations(self) -> PretrainConfig:
        if self.keep_best and self.save_steps % self.eval_steps:
            raise ValueError(f"keep_best needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                             f"({self.eval_steps}), so that every scored model is saved")
        return self


@dataclass
class PretrainResult:
    """What a pretraining run produced and measured (also written as pretrain_report.json)."""

    run_dir: str
    model_dir: str
    steps: int
    epochs: float
    parameters: int
    train_windows: int
    tuning_windows: int
    train_loss: float
    tuning_loss: float
    tuning_perplexity: float
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    resumed_from: str | None
    precision: str
    context_length: int
    devices: int = 1  # processes training together (torchrun); the global batch is batch_size x devices
    best_step: int | None = None  # keep_best: the step of the model kept
    tuning_history: list[dict[str, float]] | None = None  # every scored step's tuning loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss: the weights after that step would be garbage."""


class PickleFreeTrainer(Trainer):
    """A Trainer whose saved folders hold no pickle and that stops at the first non-finite loss.

    transformers writes `training_args.bin` with `torch.save` (a pickle, readable only with
    `weights_only=False`); nothing here reads it, and a model folder users share should not carry one.
    transformers also hides NaN losses from its logs (`logging_nan_inf_filter`) and keeps training, so a
    diverged run would otherwise save NaN weights and end "successfully".
    """

    def training_step(self, *args, **kwargs) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        # transformers already reads the loss back every step for its NaN filter; this adds no extra sync.
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"step {self.state.global_step + 1}: the training loss is {loss.float().item()}; the run stopped "
                f"before saving. Try a lower learning_rate (now {self.args.learning_rate}), more warmup_steps or "
                "precision fp32")
        return loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        (Path(output_dir or self.args.output_dir) / PICKLED_TRAINING_ARGUMENTS).unlink(missing_ok=True)


class EHRTrainer(PickleFreeTrainer):
    """Trainer with length-bucketed batches and a token-weighted tuning loss with perplexity."""

    def _get_train_sampler(self, train_dataset=None):
        # Buckets span one global optimizer step (all micro-batches on all devices), so a run on N devices
        # sees the same windows per step as a one-device run with N times the batch.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return LengthBucketSampler(dataset.lengths, batch, seed=args.seed)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Tuning loss averaged over every predicted token (not over batches), and its perplexity.

        Per-sequence sums are gathered with `gather_for_metrics`, so under several processes the padding
        samples that even out the last batch are dropped and the result equals a one-process run.
        """
        started = time.perf_counter()
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        sums, counts = [], []
        with torch.no_grad():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                labels = batch.pop("labels")
                with self.autocast_smart_context_manager():
                    logits = model(**batch).logits
                targets = labels[:, 1:]
                nll = F.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
                )
                row_sums, row_counts = self.accelerator.gather_for_metrics(
                    (nll.sum(dim=1), targets.ne(IGNORE_INDEX).sum(dim=1))
                )
                sums.append(row_sums.double().cpu())
                counts.append(row_counts.cpu())
        model.train(was_training)
        tokens = int(torch.cat(counts).sum()) if counts else 0
        loss = float(torch.cat(sums).sum() / tokens) if tokens else float("nan")
        metrics = {
            f"{metric_key_prefix}_loss": loss,
            f"{metric_key_prefix}_perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY)),
            f"{metric_key_prefix}_tokens": tokens,
            f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def resolve_precision(precision: Precision) -> str:
    """The autocast dtype this run uses: bf16/fp16 only on CUDA."""
    if precision == "fp32" or not torch.cuda.is_available():
        if precision in ("bf16", "fp16") and not torch.cuda.is_available():
            raise ValueError(f"precision {precision!r} needs a CUDA device; use 'auto' or 'fp32' on CPU")
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def _model_config(config: PretrainConfig, vocab_size: int, pad_id: int) -> EHRMambaConfig:
    fields = {**config.model, "vocab_size": vocab_size, "pad_token_id": pad_id, "scan_backend": config.scan_backend}
    return EHRMambaConfig.from_size(config.model_size, **fields)


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """transformers renamed `gradient_checkpointing` to `activation_checkpointing`; speak whichever it knows."""
    known = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def shared_training_arguments(config: TrainerSettings, output_dir: Path, precision: str) -> dict[str, Any]:
    """The TrainingArguments fields pretraining and finetuning set alike (their configs share these names)."""
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size or config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_steps,
        "lr_scheduler_type": config.lr_scheduler,
        "max_grad_norm": config.max_grad_norm,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "logging_steps": config.logging_steps,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "dataloader_pin_memory": torch.cuda.is_available(),
        # Without CUDA, tell accelerate so that torchrun / accelerate launch start gloo DDP across CPU processes.
        "use_cpu": not torch.cuda.is_available(),
        "remove_unused_columns": False,
        # Every parameter takes part in every step; transformers' default (True without gradient checkpointing)
        # makes DDP walk the autograd graph again each step to look for unused ones.
        "ddp_find_unused_parameters": False,
        "report_to": [],
        "disable_tqdm": not config.progress_bar,
        "seed": config.seed,
        "data_seed": config.seed,
    }


def _training_arguments(config: PretrainConfig, run_dir: Path, precision: str) -> TrainingArguments:
    return TrainingArguments(
        **shared_training_arguments(config, run_dir / CHECKPOINTS, precision),
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        **_checkpointing_arguments(config.gradient_checkpointing),
        dataloader_num_workers=config.dataloader_workers,
        include_num_input_tokens_seen="non_padding",
        load_best_model_at_end=config.keep_best,
        metric_for_best_model="eval_loss" if config.keep_best else None,
        greater_is_better=False if config.keep_best else None,
    )


def pretrain(config: PretrainConfig, callbacks: list[TrainerCallback] | None = None) -> PretrainResult:
    """Pretrain (or resume pretraining) EHRMamba on `config.data`; write the run folder `config.out`.

    `callbacks` are extra transformers `TrainerCallback`s (e.g. early stopping, custom logging).
    """
    if config.data is None or config.out is None:
        raise ValueError("pretrain needs both `data` (a sequences folder) and `out` (a run folder)")
    run_dir = Path(config.out)
    checkpoints = run_dir / CHECKPOINTS
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if config.resume and last is None:
        raise ValueError(f"{checkpoints}: no checkpoint to resume from")
    if not config.resume and last is not None:
        raise ValueError(f"{run_dir} already has checkpoints; pass --resume to continue or choose a new --out")

    vocabulary = read_vocabulary(config.data)
    model_config = _model_config(config, vocabulary.size, vocabulary.pad_id)
    datasets = {}
    for split in ("train", "tuning"):
        datasets[split] = SequenceDataset(
            read_sequences(config.data, split), vocabulary, config.context_length, config.long_sequences,
            type_vocab_size=model_config.type_vocab_size, visit_segment_size=model_config.visit_segment_size,
        )
        if len(datasets[split]) == 0:
            raise ValueError(f"{config.data}: no {split} sequences with at least 2 tokens")

    precision = resolve_precision(config.precision)
    set_seed(config.seed)
    model = EHRMambaForPretraining(model_config)
    trainer = EHRTrainer(
        model=model,
        args=_training_arguments(config, run_dir, precision),
        train_dataset=datasets["train"],
        eval_dataset=sort_by_length(datasets["tuning"]),
        data_collator=SequenceCollator(vocabulary.pad_id, config.pad_to_multiple_of),
        callbacks=callbacks,
    )
    tensorboard = TensorBoardCallback()  # writes on the main process only, opened lazily
    tensorboard.logging_dir = str(run_dir / LOGS)  # also where the post-training evaluation reopens it
    trainer.add_callback(tensorboard)

    # Speed counts this session only: a resumed run starts from the checkpoint's token count.
    tokens_before = read_json(Path(last) / TRAINER_STATE).get("num_input_tokens_seen", 0) if config.resume else 0
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=last if config.resume else None)
    seconds = time.perf_counter() - started  # includes periodic evaluation and checkpointing
    metrics = trainer.evaluate()  # of the best model with keep_best: transformers loaded it at the end
    tokens = int(trainer.state.num_input_tokens_seen)
    history = [{"step": int(e["step"]), "tuning_loss": float(e["eval_loss"])}
               for e in trainer.state.log_history if "eval_loss" in e]
    best = trainer.state.best_model_checkpoint if config.keep_best else None

    result = PretrainResult(
        run_dir=str(run_dir),
        model_dir=str(run_dir / MODEL),
        steps=int(trainer.state.global_step),
        epochs=float(trainer.state.epoch or 0.0),
        parameters=count_parameters(model),
        train_windows=len(datasets["train"]),
        tuning_windows=len(datasets["tuning"]),
        train_loss=float(train_output.training_loss),
        tuning_loss=float(metrics["eval_loss"]),
        tuning_perplexity=float(metrics["eval_perplexity"]),
        train_tokens=tokens,
        train_seconds=round(seconds, 3),
        tokens_per_second=round((tokens - tokens_before) / seconds, 1) if seconds > 0 else 0.0,
        resumed_from=Path(last).name if config.resume and last else None,
        precision=precision,
        context_length=config.context_length,
        devices=int(trainer.args.world_size),
        best_step=int(Path(best).name.rsplit("-", 1)[1]) if best else None,
        tuning_history=history[:-1],  # the last entry is the evaluation just above
    )
    if trainer.is_world_process_zero():
        with atomic_output_dir(run_dir / MODEL) as staging:
            trainer.model.save_pretrained(staging)
            shutil.copytree(Path(config.data) / "tokenizer", staging / "tokenizer")
        write_json(run_dir / REPORT, {**result.to_dict(), "config": config.model_dump(mode="json")})
    trainer.accelerator.wait_for_everyone()
    return result
