"""`odyssey evaluate`: held-out metrics of a finetuned model next to baselines, with bootstrap intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from odyssey.cli._common import user_errors


def _compare(values: list[str] | None) -> dict[str, Path] | None:
    if not values:
        return None
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--compare takes NAME=FT_DIR, got {value!r}")
        pairs[name] = Path(path)
    return pairs


def evaluate(
    model: Annotated[Path | None, typer.Option("--model", help="finetuning output folder (FT_DIR)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="sequences folder from `odyssey tokenize`")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="labels folder from `odyssey labels`")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="evaluation folder (report.json, report.md, plots)")] = None,
    truth: Annotated[Path | None, typer.Option("--truth", help="truth.parquet of `odyssey synth` (oracle AUROC)")] = None,
    meds: Annotated[Path | None, typer.Option("--meds", help="MEDS folder (subject map for --truth)")] = None,
    compare: Annotated[list[str] | None, typer.Option("--compare", help="NAME=FT_DIR, another finetuned model (repeatable)")] = None,
    baselines: Annotated[str | None, typer.Option("--baselines", help="comma-separated; 'none' for no baseline")] = None,
    resamples: Annotated[int | None, typer.Option("--resamples", help="bootstrap resamples (default 1000)")] = None,
    long_history_tokens: Annotated[int | None, typer.Option(
        "--long-history-tokens", help="also score every model on examples with more history than this (2048)")] = None,
    long_history_max_tokens: Annotated[int | None, typer.Option(
        "--long-history-max-tokens",
        help="and, in a second table, with at most this much (default: the model's context length)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config with the same fields")] = None,
    progress_bar: Annotated[bool | None, typer.Option("--progress/--no-progress")] = None,
) -> None:
    """Evaluate a finetuned model on the held_out split: metrics, intervals, subgroups, baselines, report."""
    from odyssey.finetune.evaluate import EvaluateConfig
    from odyssey.finetune.evaluate import evaluate as run_evaluate
    from odyssey.finetune.report import comparison_table

    chosen = None
    if baselines is not None:
        chosen = [] if baselines.strip() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
    with user_errors():
        cfg = EvaluateConfig.load(
            config, model=model, data=data, labels=labels, out=out, truth=truth, meds=meds,
            compare=_compare(compare), baselines=chosen, resamples=resamples, progress_bar=progress_bar,
            long_history_tokens=long_history_tokens, long_history_max_tokens=long_history_max_tokens,
        )
        report = run_evaluate(cfg)
    typer.echo("\n".join(comparison_table(report)))
    typer.echo(f"report: {Path(cfg.out) / 'report.md'} ({report['seconds']:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command(name="evaluate")(evaluate)
