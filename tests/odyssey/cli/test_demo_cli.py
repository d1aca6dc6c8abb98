"""`odyssey demo`: the whole pipeline end to end on a small synthetic cohort."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from odyssey.cli import app


def test_demo_runs_every_stage_and_prints_the_auroc_table(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--patients", "600", "--out", str(out),
                                      "--pretrain-steps", "3", "--finetune-steps", "3"])
    assert result.exit_code == 0, result.output[-3000:]
    stages = json.loads((out / "demo_report.json").read_text())
    assert set(stages) == {"fhir", "meds", "sequences", "labels", "pretrain", "finetune", "evaluate", "explain"}
    assert "## AUROC by model" in result.output and "oracle" in result.output
    for task in ("mortality_30d", "los_7d", "readmission_30d", "conditions_heart_failure"):
        assert f"| {task} |" in result.output
    assert (out / "evaluate" / "report.md").exists() and (out / "meds" / "data").is_dir()
    assert (out / "explain" / "explanation.json").exists() and (out / "explain" / "top_events.md").exists()
    # The last lines say where the report and the images are, and those files exist.
    tail = result.output.split("== done ==")[-1]
    for path in (out / "evaluate" / "report.md", out / "explain" / "timeline.png", out / "explain" / "top_events.md"):
        assert str(path) in tail and path.is_file()
    assert any((out / "evaluate" / "plots").glob("*.png"))

    # Running it again into the same folder starts over (it used to stop at pretraining's old checkpoints).
    again = CliRunner().invoke(app, ["demo", "--patients", "600", "--seed", "1", "--out", str(out),
                                     "--pretrain-steps", "2", "--finetune-steps", "2"])
    assert again.exit_code == 0, again.output[-3000:]
    assert "replacing the previous demo's" in again.output
    assert json.loads((out / "fhir" / "synth_report.json").read_text())["seed"] == 1
