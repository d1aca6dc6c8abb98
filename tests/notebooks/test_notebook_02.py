"""Notebook 02 (finetune, evaluate, explain through the Python API) runs top to bottom on a small cohort."""

import re
from pathlib import Path

import nbformat
import polars as pl
import pytest
from nbclient import NotebookClient

import odyssey

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "02_finetune_and_explain.ipynb"
TASKS = Path(__file__).resolve().parents[2] / "configs" / "tasks.yaml"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """What `odyssey demo` leaves before finetuning: fhir/, meds/, sequences/, labels/, pretrain/."""
    root = tmp_path_factory.mktemp("notebook02")
    odyssey.synthesize(600, root / "fhir", seed=0, workers=1)
    odyssey.ingest_fhir([root / "fhir"], root / "meds", workers=1)
    odyssey.tokenize(root / "meds", root / "sequences", progress=False)
    odyssey.make_labels(root / "meds", TASKS, root / "labels", progress=False)
    odyssey.pretrain(odyssey.PretrainConfig(data=root / "sequences", out=root / "pretrain", max_steps=3,
                                            eval_steps=3, save_steps=3, context_length=256, progress_bar=False))
    return root


def test_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_notebook_finetunes_evaluates_and_explains(pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("ODYSSEY_NOTEBOOK_DATA", str(pipeline))
    monkeypatch.setenv("ODYSSEY_NOTEBOOK_OUT", str(tmp_path / "nb"))
    monkeypatch.setenv("ODYSSEY_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "EHRMambaForTaskClassification" in text
    assert re.search(r"mortality_30d.*probability", text)
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "AUROC by model" in markdown and "oracle" in markdown
    assert (tmp_path / "nb" / "explain" / "explanation.json").exists()
    predictions = sorted((tmp_path / "nb" / "evaluate" / "predictions").rglob("*.parquet"))
    assert predictions and {"subject_id", "prediction_time", "predicted_boolean_probability"} <= set(
        pl.read_parquet(predictions[0]).columns)
