"""`odyssey ingest`: FHIR exports (or an existing MEDS dataset) -> a checked MEDS dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from odyssey.cli._common import user_errors


def ingest(
    fhir: Annotated[list[str] | None, typer.Option("--fhir", help="FHIR NDJSON/JSON files, folders or globs (repeatable; several paths may follow one --fhir)")] = None,
    meds: Annotated[Path | None, typer.Option("--meds", help="check an existing MEDS dataset in place and add missing splits")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output MEDS dataset folder (required with --fhir)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (configs/ingest.yaml)")] = None,
    strict: Annotated[bool | None, typer.Option("--strict/--no-strict", help="stop at the first problem with file:line: reason")] = None,
    validate: Annotated[str | None, typer.Option("--validate", help="full | sample | off (default sample)")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="parallel readers (default: CPU cores)")] = None,
    code_systems: Annotated[Path | None, typer.Option("--code-systems", help="YAML of extra code-system URIs")] = None,
    fast_path: Annotated[bool | None, typer.Option("--fast-path/--no-fast-path", help="decode common resource shapes with msgspec (default on; same output)")] = None,
    compiled_reader: Annotated[bool | None, typer.Option("--compiled-reader/--no-compiled-reader", help="flatten common shapes with the compiled C reader when it was built (default on; same output)")] = None,
    extra: Annotated[list[str] | None, typer.Argument(help="more FHIR paths (so that `--fhir a b c` works)", show_default=False)] = None,
) -> None:
    """Turn FHIR R4 exports into a MEDS v0.4 dataset; bad resources go to OUT/rejects/."""
    from odyssey.pipelines.ingest_pool import size_for_ingest_only

    if meds is None:  # this process only ingests: its thread pools are sized before polars is loaded
        size_for_ingest_only(workers if workers is not None else _config_workers(config))
    from odyssey.pipelines.fhir_sources import InputError
    from odyssey.pipelines.ingest import IngestConfig, StrictModeError, ingest_fhir
    from odyssey.pipelines.meds_io import MedsFormatError

    with user_errors((InputError, MedsFormatError)):
        if meds is not None:
            from odyssey.pipelines.meds_check import ingest_meds

            if fhir or extra:
                raise ValueError("give either --fhir or --meds, not both")
            cfg = IngestConfig.load(config)
            report = ingest_meds(meds, cfg.splits)
            typer.echo(report.summary())
            return
        paths = [*(fhir or []), *(extra or [])]
        if not paths:
            raise ValueError("nothing to ingest: pass --fhir PATH [PATH ...] or --meds DIR")
        if out is None:
            raise ValueError("--out DIR is required with --fhir")
        cfg = IngestConfig.load(
            config,
            strict=strict,
            validate=validate,
            workers=workers,
            code_systems=str(code_systems) if code_systems else None,
            fast_path=fast_path,
            compiled_reader=compiled_reader,
        )
        try:
            report = ingest_fhir(paths, out, cfg, show_progress=True)
        except StrictModeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(report.summary())
    typer.echo(f"report: {out}/ingest_report.json")


def _config_workers(config: Path | None) -> int | None:
    """`workers` of a config file, read before the config class (and polars) is loaded; None when absent
    or unreadable (the config is checked properly afterwards)."""
    if config is None:
        return None
    try:
        loaded = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError):
        return None
    workers = loaded.get("workers") if isinstance(loaded, dict) else None
    return workers if isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1 else None


def register(app: typer.Typer) -> None:
    app.command(name="ingest")(ingest)
