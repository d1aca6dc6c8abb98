"""Runs `odyssey pretrain` as a script (what torchrun launches in test_pretrain_distributed.py)."""

import typer

from odyssey.cli.pretrain import register

app = typer.Typer()
register(app)
app.command(name="noop", hidden=True)(lambda: None)

if __name__ == "__main__":
    app()
