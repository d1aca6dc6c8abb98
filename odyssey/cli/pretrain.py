"""`odyssey pretrain`: next-token pretraining of EHRMamba on a sequences folder (transformers Trainer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from odyssey.cli._common import user_errors


def pretrain(
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (configs/pretrain.yaml)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="sequences folder from `odyssey tokenize`")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run folder (checkpoints, logs, model, report)")] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help="continue from the last checkpoint in OUT")] = None,
    model_size: Annotated[str | None, typer.Option("--model-size", help="tiny | small | base")] = None,
    context_length: Annotated[int | None, typer.Option("--context-length", help="tokens per window (<= 65536)")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="sequences per device per micro-batch")] = None,
    gradient_accumulation_steps: Annotated[int | None, typer.Option("--grad-accum", help="micro-batches per optimizer step")] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="> 0 overrides --epochs")] = None,
    eval_steps: Annotated[int | None, typer.Option("--eval-steps")] = None,
    save_steps: Annotated[int | None, typer.Option("--save-steps")] = None,
    keep_best: Annotated[bool | None, typer.Option(
        "--keep-best/--no-keep-best", help="final model: the checkpoint with the lowest tuning loss")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="auto | bf16 | fp16 | fp32")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    scan_backend: Annotated[str | None, typer.Option("--scan-backend", help="auto | torch | triton | mamba_ssm")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    progress_bar: Annotated[bool | None, typer.Option("--progress/--no-progress", help="show the progress bar")] = None,
) -> None:
    """Pretrain EHRMamba (next-token prediction); works unchanged under torchrun / accelerate launch."""
    from odyssey.training.pretrain import REPORT, PretrainConfig
    from odyssey.training.pretrain import pretrain as run_pretrain

    with user_errors():
        cfg = PretrainConfig.load(
            config, data=data, out=out, resume=resume, model_size=model_size, context_length=context_length,
            batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            learning_rate=learning_rate, epochs=epochs, max_steps=max_steps, eval_steps=eval_steps,
            save_steps=save_steps, keep_best=keep_best, precision=precision, gradient_checkpointing=gradient_checkpointing,
            scan_backend=scan_backend, seed=seed, progress_bar=progress_bar,
        )
        result = run_pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per job, not one per process
        typer.echo(
            f"pretrained {result.parameters:,} parameters for {result.steps} steps ({result.epochs:.2f} epochs, "
            f"{result.train_tokens:,} tokens, {result.tokens_per_second:,.0f} tokens/s, {result.precision})"
        )
        typer.echo(f"tuning loss {result.tuning_loss:.4f}, perplexity {result.tuning_perplexity:.2f}")
        typer.echo(f"model: {result.model_dir}")
        typer.echo(f"report: {Path(result.run_dir) / REPORT}")


def register(app: typer.Typer) -> None:
    app.command(name="pretrain")(pretrain)
