"""`odyssey tokenize DATA_DIR --out SEQ_DIR [--config configs/tokenize.yaml]`."""

from __future__ import annotations

from pathlib import Path

import typer

from odyssey.cli._common import user_errors


def register(app: typer.Typer) -> None:
    @app.command("tokenize")
    def tokenize_command(
        data_dir: Path = typer.Argument(..., help="MEDS dataset folder (data/, metadata/)"),
        out: Path = typer.Option(..., "--out", help="output folder: tokenizer/, sequences/, tokenize_report.json"),
        config: Path | None = typer.Option(None, "--config", help="YAML config (configs/tokenize.yaml)"),
        n_bins: int | None = typer.Option(None, help="quantile bins per numeric code"),
        min_code_count: int | None = typer.Option(None, help="rarer codes (in train) become [UNK]"),
        availability: str | None = typer.Option(None, help="issued | time: when a result counts as known"),
        max_rows_per_chunk: int | None = typer.Option(None, help="events tokenized at once (memory bound)"),
        workers: int | None = typer.Option(None, help="processes building chunks in parallel"),
        progress: bool = typer.Option(True, help="show a progress bar"),
    ) -> None:
        """Turn a MEDS dataset into token sequences and a tokenizer (vocabulary and bins fit on train)."""
        from odyssey.pipelines.meds_io import MedsFormatError
        from odyssey.tokenizer.config import TokenizeConfig
        from odyssey.tokenizer.sequences import REPORT_FILE
        from odyssey.tokenizer.tokenize import tokenize

        with user_errors((MedsFormatError,)):
            settings = TokenizeConfig.load(
                config,
                n_bins=n_bins,
                min_code_count=min_code_count,
                availability=availability,
                max_rows_per_chunk=max_rows_per_chunk,
                workers=workers,
            )
            report = tokenize(data_dir, out, settings, progress=progress)
        typer.echo(report.summary())
        typer.echo(f"report: {out / REPORT_FILE}")
