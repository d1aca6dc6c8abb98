"""`odyssey synth`: write a synthetic MIMIC-IV-on-FHIR cohort with planted outcomes and its truth table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from odyssey.cli._common import user_errors

FORMAT_HELP = "mimic: MIMIC-IV-on-FHIR files; r4: plain R4 files per type; bundles: one transaction Bundle per patient"


def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder (replaced atomically).")],
    patients: Annotated[int, typer.Option("--patients", min=1, help="Number of patients.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, byte-identical files.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "mimic",
    gzip: Annotated[bool, typer.Option("--gzip", help="Write .ndjson.gz files.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Worker processes (default: CPUs).")] = None,
) -> None:
    """Generate a synthetic cohort: FHIR NDJSON, truth.parquet (true outcome probabilities), synth_report.json."""
    from odyssey.pipelines.synth import REPORT_FILE, synthesize

    with user_errors():
        report = synthesize(patients, out, seed=seed, format=fmt, gzip=gzip, workers=workers, progress=True)
    typer.echo(
        f"wrote {report.patients} patients, {report.resources_total} resources "
        f"({report.admissions} inpatient admissions) to {out} in {report.seconds:.1f} s"
    )
    typer.echo("  " + ", ".join(f"{k}: {v}" for k, v in report.resources.items()))
    typer.echo(f"  histories over 16k tokens: {report.long_history_patients} ({report.long_history_share:.1%}),"
               f" 2k-16k: {report.medium_history_patients} ({report.medium_history_share:.1%})")
    for task, summary in report.tasks.items():
        auroc = summary.get("oracle_auroc")
        typer.echo(
            f"  {task}: {summary['admissions']} admissions, prevalence {summary.get('prevalence', 0):.3f}"
            + (f", oracle AUROC {auroc:.3f}" if auroc is not None else "")
        )
    typer.echo(f"report: {Path(out) / REPORT_FILE}")


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
