"""The `odyssey` command line. Each subcommand lives in its own module and registers itself."""

from __future__ import annotations

from importlib import import_module

import typer

app = typer.Typer(
    name="odyssey",
    help="EHR foundation models on Mamba: FHIR → MEDS → tokens → pretrain → finetune → evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per subcommand; each defines `register(app)`.
COMMAND_MODULES = ["synth", "ingest", "tokenize", "labels", "pretrain", "finetune", "evaluate", "explain", "forecast", "demo"]

for _name in COMMAND_MODULES:
    import_module(f"odyssey.cli.{_name}").register(app)


def main() -> None:
    app()
