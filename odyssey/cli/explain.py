"""`odyssey explain`: integrated gradients of a finetuned model's prediction for one patient."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from odyssey.cli._common import user_errors


def explain(
    model: Annotated[Path, typer.Option("--model", help="finetuning output folder (FT_DIR)")],
    data: Annotated[Path, typer.Option("--data", help="sequences folder from `odyssey tokenize`")],
    task: Annotated[str, typer.Option("--task", help="task to explain, e.g. mortality_30d")],
    subject: Annotated[int, typer.Option("--subject", help="subject_id (MEDS) of the patient")],
    out: Annotated[Path, typer.Option("--out", help="output folder (explanation.json, top_events.md, timeline)")],
    meds: Annotated[Path | None, typer.Option("--meds", help="MEDS folder (default: the one SEQ_DIR was made from)")] = None,
    time: Annotated[str | None, typer.Option("--time", help="prediction time, ISO (default: the task's rule at the last admission)")] = None,
    output: Annotated[str | None, typer.Option("--output", help="output of a multi-label task (default: the likeliest)")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="integration steps (first try)")] = 32,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0.0, help="double the steps until attributions add up to the logit change within this share; 0: fixed --steps")] = 0.05,
    max_steps: Annotated[int, typer.Option("--max-steps", min=1, help="most integration steps when doubling")] = 256,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="interpolated inputs per forward pass (default: 8 on CPU, all steps on a GPU)")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="top events listed")] = 10,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
) -> None:
    """Explain one prediction: per-token integrated gradients, summed per event, visit, code and family."""
    from odyssey.interpretability.explain import explain as run_explain

    with user_errors((KeyError,)):
        report = run_explain(model, data, task, subject, out, meds_dir=meds, prediction_time=time, output=output,
                             n_steps=steps, tolerance=tolerance or None, max_steps=max_steps,
                             internal_batch_size=batch, top_k=top, device=device)
    typer.echo(report.summary())
    typer.echo(f"report: {Path(out) / 'explanation.json'}; table: {Path(out) / 'top_events.md'}")


def register(app: typer.Typer) -> None:
    app.command(name="explain")(explain)
