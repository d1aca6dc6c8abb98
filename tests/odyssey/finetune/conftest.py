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
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription (100x faster)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "time_embedding_size": 8}


def shuffle_labels(source: Path, target: Path, seed: int) -> Path:
    """A copy of a labels folder whose label values are permuted within each task (rows keep their keys)."""
    import shutil

    import numpy as np
    import polars as pl

    shutil.copytree(source, target)
    rng = np.random.default_rng(seed)
    for path in sorted(target.glob("*/labels.parquet")):
        frame = pl.read_parquet(path)
        values = [c for c in frame.columns if c not in ("subject_id", "prediction_time")]
        order = rng.permutation(len(frame))
        frame = frame.with_columns([frame[c].gather(order) for c in values])
        frame.write_parquet(path)
    return target
