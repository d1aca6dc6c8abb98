"""`odyssey pretrain` through typer's CliRunner on a Typer app holding only this command."""

import typer
from typer.testing import CliRunner

from odyssey.cli.pretrain import register
from odyssey.io import read_json

app = typer.Typer()
register(app)
app.command(name="noop", hidden=True)(lambda: None)  # a second command keeps subcommand dispatch


def test_cli_runs_with_config_and_overrides(sequences_dir, tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text(
        "model:\n  hidden_size: 32\n  time_embedding_size: 8\nbatch_size: 4\nmax_steps: 50\nsave_steps: 100\n"
        "eval_steps: 100\nlearning_rate: 0.005\n"
    )
    out = tmp_path / "run"
    args = ["pretrain", "--config", str(config), "--data", str(sequences_dir), "--out", str(out),
            "--max-steps", "3", "--no-progress", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tuning loss" in result.output and f"report: {out}/pretrain_report.json" in result.output
    report = read_json(out / "pretrain_report.json")
    assert report["steps"] == 3 and report["config"]["seed"] == 3 and report["config"]["batch_size"] == 4


def test_cli_reports_user_errors_without_traceback(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "tokenizer.json: missing" in result.output
    result = CliRunner().invoke(app, ["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                      "--context-length", "100000"])
    assert result.exit_code == 2 and "65536" in result.output
