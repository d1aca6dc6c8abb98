"""`odyssey labels DATA_DIR --tasks configs/tasks.yaml --out LABEL_DIR [--task NAME ...]`."""

from __future__ import annotations

from pathlib import Path

import typer

from odyssey.cli._common import user_errors


def register(app: typer.Typer) -> None:
    @app.command("labels")
    def labels_command(
        data_dir: Path = typer.Argument(..., help="MEDS dataset folder (data/, metadata/)"),
        out: Path = typer.Option(..., "--out", help="output folder: one folder per task, tasks.json, report"),
        tasks: Path = typer.Option(Path("configs/tasks.yaml"), "--tasks", help="task definitions (YAML)"),
        task: list[str] | None = typer.Option(None, "--task", help="only these tasks (repeatable); default all"),
        progress: bool = typer.Option(True, help="show a progress bar"),
    ) -> None:
        """Write leakage-free task labels (MEDS label schema) for every index admission."""
        from odyssey.pipelines.labels import REPORT_FILE, make_labels
        from odyssey.pipelines.meds_io import MedsFormatError

        with user_errors((MedsFormatError,)):
            report = make_labels(data_dir, tasks, out, tasks=task or None, progress=progress)
        typer.echo(report.summary())
        typer.echo(f"report: {out / REPORT_FILE}")
