"""`odyssey finetune`: multitask prompted finetuning of EHRMamba on task labels (transformers Trainer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from odyssey.cli._common import user_errors


def finetune(
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (configs/finetune.yaml)")] = None,
    pretrained: Annotated[Path | None, typer.Option("--pretrained", help="pretraining run folder (omit: from scratch)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="sequences folder from `odyssey tokenize`")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="labels folder from `odyssey labels`")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="comma-separated task names (default: all)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (model/, finetune_report.json)")] = None,
    few_shot_k: Annotated[int | None, typer.Option("--few-shot-k", help="at most k training examples per task")] = None,
    context_length: Annotated[int | None, typer.Option("--context-length")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate")] = None,
    backbone_learning_rate: Annotated[float | None, typer.Option(
        "--backbone-learning-rate", help="peak rate of everything but the task head (default: --learning-rate)")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="> 0 overrides --epochs")] = None,
    eval_steps: Annotated[int | None, typer.Option("--eval-steps", help="keep the best model on tuning, checked this often")] = None,
    architecture: Annotated[str | None, typer.Option("--architecture", help="ehrmamba | gpt (transformer baseline)")] = None,
    model_size: Annotated[str | None, typer.Option("--model-size", help="from scratch: tiny | small | base")] = None,
    scan_backend: Annotated[str | None, typer.Option("--scan-backend")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    group_by_length: Annotated[bool | None, typer.Option(
        "--group-by-length/--no-group-by-length", help="batches of similar length (less padding, worse heads)")] = None,
    split_batches_by_length: Annotated[bool | None, typer.Option(
        "--split-by-length/--no-split-by-length", help="each batch as sub-batches of similar length")] = None,
    max_train_minutes: Annotated[float | None, typer.Option(
        "--max-train-minutes", help="stop training after this much wall time (best tuning model kept with --eval-steps)")] = None,
    progress_bar: Annotated[bool | None, typer.Option("--progress/--no-progress", help="show the progress bar")] = None,
) -> None:
    """Finetune one EHRMamba on several tasks, each prompted by its task token."""
    from odyssey.finetune.train import REPORT, FinetuneConfig
    from odyssey.finetune.train import finetune as run_finetune

    with user_errors():
        cfg = FinetuneConfig.load(
            config, pretrained=pretrained, data=data, labels=labels, out=out,
            tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None, few_shot_k=few_shot_k,
            context_length=context_length, batch_size=batch_size, learning_rate=learning_rate,
            backbone_learning_rate=backbone_learning_rate, epochs=epochs,
            max_steps=max_steps, eval_steps=eval_steps, architecture=architecture, model_size=model_size, scan_backend=scan_backend, seed=seed,
            progress_bar=progress_bar, group_by_length=group_by_length, split_batches_by_length=split_batches_by_length,
            max_train_minutes=max_train_minutes,
        )
        result = run_finetune(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # one summary per job, not one per process
        return
    origin = "pretrained" if result.from_pretrained else "from scratch"
    typer.echo(f"finetuned {result.parameters:,} parameters ({origin}) on {', '.join(result.tasks)} for "
               f"{result.steps} steps in {result.train_seconds:.0f} s; train loss {result.train_loss:.4f}"
               + (" (stopped by the time budget)" if result.stopped_by_time_budget_at_step is not None else ""))
    aurocs = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in result.tuning_auroc.items())
    typer.echo(f"tuning AUROC: {aurocs}")
    typer.echo(f"model: {result.model_dir}")
    typer.echo(f"report: {Path(result.out) / REPORT}")


def register(app: typer.Typer) -> None:
    app.command(name="finetune")(finetune)
