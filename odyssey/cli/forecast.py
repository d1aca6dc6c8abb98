"""`odyssey forecast`: sampled futures from a pretrained EHRMamba, next-visit metrics and zero-shot risks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from odyssey.cli._common import user_errors


def _summary(report: dict) -> list[str]:
    lines = [
        f"forecast {report['prediction_times_forecast']} prediction times of {report['subjects']} subjects: "
        f"{report['generated_tokens']:,} tokens in {report['seconds']['sample']:.1f} s "
        f"({report['tokens_per_second']:,.0f} tokens/s)",
    ]
    recalls = [f"{name} {value:.3f}" for name, value in report["next_visit"].items() if value is not None]
    lines.append(f"next visit ({report['prediction_times_with_next_visit']} with one): "
                 + (", ".join(recalls) if recalls else "n/a"))
    for task, result in report["zero_shot"].items():
        if "unavailable" in result:
            lines.append(f"zero-shot {task}: unavailable ({result['unavailable']})")
        elif result["value"] is None:
            lines.append(f"zero-shot {task}: AUROC n/a (one class among {result['n']} labels)")
        else:
            lines.append(f"zero-shot {task}: AUROC {result['value']:.3f} [{result['low']:.3f}, {result['high']:.3f}] "
                         f"({result['n']} labels, {result['positives']} positive)")
    return lines


def forecast(
    model: Annotated[Path | None, typer.Option("--model", help="pretraining run folder (RUN_DIR)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="sequences folder from `odyssey tokenize`")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="labels folder from `odyssey labels`")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (futures.parquet, risks.parquet, report.json)")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="futures per prediction time (K)")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="nucleus sampling mass")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="0: greedy")] = None,
    max_visits: Annotated[int | None, typer.Option("--max-visits", help="generated visits per future (V)")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="generated tokens per future at most")] = None,
    max_subjects: Annotated[int | None, typer.Option("--max-subjects", help="forecast this many subjects")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    meds: Annotated[Path | None, typer.Option("--meds", help="MEDS folder: draw timelines with the futures")] = None,
    plots: Annotated[int | None, typer.Option("--plots", help="timelines drawn with --meds (default 3)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (configs/forecast.yaml)")] = None,
    progress_bar: Annotated[bool | None, typer.Option("--progress/--no-progress", help="show the progress bar")] = None,
) -> None:
    """Sample K futures at each held-out discharge; score next-visit codes and zero-shot risks."""
    from odyssey.forecast.run import REPORT, ForecastConfig
    from odyssey.forecast.run import forecast as run_forecast

    with user_errors():
        cfg = ForecastConfig.load(
            config, model=model, data=data, labels=labels, out=out, samples=samples, top_p=top_p,
            temperature=temperature, max_visits=max_visits, max_tokens=max_tokens, max_subjects=max_subjects,
            device=device, seed=seed, meds=meds, plots=plots, progress_bar=progress_bar,
        )
        report = run_forecast(cfg)
    typer.echo("\n".join(_summary(report)))
    if report.get("plots"):
        typer.echo(f"timelines: {', '.join(str(Path(cfg.out) / p) for p in report['plots'] if p.endswith('.png'))}")
    typer.echo(f"report: {Path(cfg.out) / REPORT}")


def register(app: typer.Typer) -> None:
    app.command(name="forecast")(forecast)
