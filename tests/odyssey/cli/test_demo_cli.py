"""`odyssey demo`: the whole pipeline end to end on a small synthetic cohort."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from odyssey.cli import app


def test_demo_runs_every_stage_and_prints_the_auroc_table(tmp_path, monkeypatch):
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

    # Running it again into the same folder starts over (it used to stop at pretraining's old checkpoints): the
    # old stages' folders go before the new run writes; this run is cut after its sequences to stay short.
    def cut(*args, **kwargs):
        raise RuntimeError("cut after the sequences")

    monkeypatch.setattr("odyssey.pipelines.labels.make_labels", cut)
    again = CliRunner().invoke(app, ["demo", "--patients", "600", "--seed", "1", "--out", str(out)])
    assert isinstance(again.exception, RuntimeError), again.output[-3000:]
    assert "replacing the previous demo's" in again.output
    assert json.loads((out / "fhir" / "synth_report.json").read_text())["seed"] == 1
    assert not any((out / name).exists() for name in ("labels", "pretrain", "finetune", "evaluate", "explain"))


def test_demo_refuses_a_missing_task_file_before_writing(tmp_path):
    """A missing --tasks file stops the demo with its name before any stage writes (or a previous demo goes)."""
    out = tmp_path / "demo"
    (out / "pretrain").mkdir(parents=True)
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--tasks", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0
    assert "missing.yaml" in result.output and "task definitions not found" in result.output
    assert [p.name for p in out.iterdir()] == ["pretrain"]
