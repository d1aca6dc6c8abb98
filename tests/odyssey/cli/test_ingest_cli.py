"""The `odyssey ingest` command: exit codes, messages, --meds."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from odyssey.cli import app

FIXTURES = Path(__file__).parents[2] / "pipelines" / "fixtures"
runner = CliRunner()


def test_ingest_cli_writes_dataset_and_summary(tmp_path):
    out = tmp_path / "meds"
    result = runner.invoke(app, ["ingest", "--fhir", str(FIXTURES / "r4" / "Patient.ndjson"),
                                 str(FIXTURES / "r4" / "bundles.ndjson"), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "3 subjects" in result.output and "ingest_report.json" in result.output
    assert (out / "data" / "0.parquet").exists()


@pytest.mark.parametrize("flag", ["fast-path", "compiled-reader"])
def test_reader_flags_change_speed_not_output(tmp_path, flag):
    outputs = {}
    for option in (f"--{flag}", f"--no-{flag}"):
        out = tmp_path / option.strip("-")
        result = runner.invoke(app, ["ingest", "--fhir", str(FIXTURES / "r4"), "--out", str(out), "--workers", "1",
                                     option])
        assert result.exit_code == 0, result.output
        outputs[option] = sorted((p.relative_to(out), p.read_bytes()) for p in (out / "data").glob("*.parquet"))
    assert outputs[f"--{flag}"] == outputs[f"--no-{flag}"]


def test_missing_input_exits_2_with_message(tmp_path):
    result = runner.invoke(app, ["ingest", "--fhir", str(tmp_path / "absent.ndjson"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "absent.ndjson: no such file or folder" in result.output
    assert not (tmp_path / "o").exists()


def test_strict_exits_1_with_file_line_reason(tmp_path):
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"resourceType":"Patient","id":"a"}\n{oops\n')
    result = runner.invoke(app, ["ingest", "--fhir", str(bad), "--out", str(tmp_path / "o"), "--strict"])
    assert result.exit_code == 1
    assert f"{bad}:2: malformed JSON" in result.output


def test_meds_entry_adds_missing_splits_and_rejects_broken_datasets(tmp_path):
    out = tmp_path / "meds"
    assert runner.invoke(app, ["ingest", "--fhir", str(FIXTURES / "r4"), "--out", str(out), "--workers", "1"]).exit_code == 0
    (out / "metadata" / "subject_splits.parquet").unlink()
    (out / "metadata" / "codes.parquet").unlink()
    result = runner.invoke(app, ["ingest", "--meds", str(out)])
    assert result.exit_code == 0, result.output
    assert "metadata/subject_splits.parquet" in result.output
    assert pl.read_parquet(out / "metadata" / "subject_splits.parquet").height == 4
    assert pl.read_parquet(out / "metadata" / "codes.parquet").height > 10
    # unsorted times: stops with the file and the first bad row
    shard = out / "data" / "0.parquet"
    pl.read_parquet(shard).reverse().write_parquet(shard)
    result = runner.invoke(app, ["ingest", "--meds", str(out)])
    assert result.exit_code == 2
    assert "0.parquet: row" in result.output


@pytest.mark.parametrize("args", [["ingest"], ["ingest", "--fhir", "x.ndjson"]])
def test_incomplete_arguments_explain_themselves(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "error:" in result.output
