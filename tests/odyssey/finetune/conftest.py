"""One small synthetic cohort shared by the finetuning tests: synth -> MEDS -> sequences -> labels.

Half the subjects are held out (and a fifth tune) so that held-out AUROCs rest on enough examples for
the shuffled-label alarm to be precise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

COHORT_PATIENTS = 400
SPLITS = {"train": 0.3, "tuning": 0.2, "held_out": 0.5, "seed": 0}
TASKS_YAML = Path(__file__).resolve().parents[3] / "configs" / "tasks.yaml"


@dataclass(frozen=True)
class Cohort:
    fhir: Path
    meds: Path
    seq: Path
    labels: Path

    @property
    def truth(self) -> Path:
        return self.fhir / "truth.parquet"


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Cohort:
    from odyssey.pipelines.ingest import ingest_fhir
    from odyssey.pipelines.labels import make_labels
    from odyssey.pipelines.synth import synthesize
    from odyssey.tokenizer import tokenize

    root = tmp_path_factory.mktemp("finetune_cohort")
    paths = Cohort(root / "fhir", root / "meds", root / "seq", root / "labels")
    synthesize(COHORT_PATIENTS, paths.fhir, seed=0, workers=1)
    ingest_fhir(paths.fhir, paths.meds, splits=SPLITS, workers=1)
    tokenize(paths.meds, paths.seq, progress=False)
    make_labels(paths.meds, TASKS_YAML, paths.labels, progress=False)
    return paths


@pytest.fixture(scope="module", autouse=True)
def _every_module_on_one_thread(one_torch_thread):
    """Every test module in this folder runs its tiny models on one torch thread (tests/odyssey/conftest.py)."""
