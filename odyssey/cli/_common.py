"""Helpers shared by subcommands: turning known errors into exit code 2 with a clear message."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from odyssey.config import ConfigError

# Exceptions whose message is already written for the user: no traceback, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, PermissionError, ValueError)


@contextlib.contextmanager
def user_errors(extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    try:
        yield
    except (*USER_ERRORS, *extra) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
