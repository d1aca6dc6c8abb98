"""Notebook 01 runs from top to bottom on a small synthetic cohort (synth -> ingest -> tokenize)."""

import os
import re
import sys
from pathlib import Path

import nbformat
import polars as pl
import pytest
from nbclient import NotebookClient

from odyssey.pipelines.ingest import ingest_fhir
from odyssey.pipelines.synth import synthesize
from odyssey.tokenizer import tokenize

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "01_explore_timelines.ipynb"
PATIENTS = 40


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """demo_out-like folder: fhir/, meds/, sequences/, made by what `odyssey synth`, `odyssey ingest` and
    `odyssey tokenize` run (called directly, so this test does not depend on every CLI module importing)."""
    root = tmp_path_factory.mktemp("notebook01")
    synthesize(PATIENTS, root / "fhir", seed=7, workers=1)
    ingest_fhir([root / "fhir"], root / "meds", workers=1)
    tokenize(root / "meds", root / "sequences", progress=False)
    return root


def test_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "ODYSSEY_NOTEBOOK_DATA" in "".join(cell.source for cell in code)


def test_notebook_runs_on_a_synthetic_cohort(cohort, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("ODYSSEY_NOTEBOOK_DATA", str(cohort))
    monkeypatch.setenv("ODYSSEY_NOTEBOOK_FIGURES", str(figures))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # One extra cell, in memory only: which Python the kernel runs.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    kernel_python = re.search(r"KERNEL (.+)", text).group(1).strip()
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable)

    # The numbers it prints are this cohort's.
    subjects = pl.read_parquet(cohort / "meds" / "data").select(pl.col("subject_id").n_unique()).item()
    assert subjects == PATIENTS
    assert re.search(rf"^{PATIENTS} subjects, ", text, re.MULTILINE)
    assert f"{PATIENTS} sequences" in text
    # Histograms and at least two patient timelines are shown as images and written as PNG + SVG.
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3
    written = sorted(p.name for p in figures.iterdir())
    assert {"patient_0.png", "patient_0.svg", "patient_1.png", "patient_1.svg"} <= set(written)
    assert all((figures / name).stat().st_size > 5_000 for name in written)
    ids = pl.read_parquet(cohort / "meds" / "data", columns=["subject_id"])["subject_id"].unique().to_list()
    assert not [name for name in written for subject in ids if str(subject) in name]  # no ids in file names
