"""Fixtures of the forecasting tests: a hand-made vocabulary and sequence, a tiny random model, and a small
synthetic cohort (synth -> ingest -> tokenize with death kept as a token -> labels -> a few pretraining steps)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from odyssey.models import EHRMambaConfig, EHRMambaForPretraining
from odyssey.tokenizer import EHRTokenizer, SpecialTokens, TokenType

TASKS_YAML = Path(__file__).resolve().parents[3] / "configs" / "tasks.yaml"
COHORT_PATIENTS = 60
SPLITS = {"train": 0.5, "tuning": 0.1, "held_out": 0.4, "seed": 0}
TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "time_embedding_size": 8}
BIRTH_AGE_YEARS = 70.0
DAY0 = datetime(2150, 1, 1, 8, 0)

# Code words of the hand-made vocabulary and their token types.
WORDS = {
    "ENCOUNTER_START//AMB": TokenType.ENCOUNTER,
    "ENCOUNTER_START//IMP": TokenType.ENCOUNTER,
    "GENDER//female": TokenType.DEMOGRAPHIC,
    "ICD10CM//I509": TokenType.CONDITION,
    "LOINC//2160-0_0": TokenType.LAB,
    "LOINC//2160-0_1": TokenType.LAB,
    "MEDS_DEATH": TokenType.OBSERVATION,
    "NDC//1": TokenType.MEDICATION,
}


@pytest.fixture(scope="module", autouse=True)
def _every_module_on_one_thread(one_torch_thread):
    """Every test module in this folder runs its tiny models on one torch thread (tests/odyssey/conftest.py)."""


@pytest.fixture(scope="session")
def tokenizer() -> EHRTokenizer:
    return EHRTokenizer(words=list(WORDS), word_types=[int(t) for t in WORDS.values()],
                        bins={"LOINC//2160-0": [1.0]})


def hand_row(tokenizer: EHRTokenizer) -> dict:
    """Two visits laid out as `odyssey tokenize` writes them (docs/tokens.md), ending with [REG]."""
    S = SpecialTokens
    tokens = [  # (token, type, visit order, segment, days)
        (S.CLS.token, TokenType.SPECIAL, 0, 0, 0.0),
        ("GENDER//female", TokenType.DEMOGRAPHIC, 0, 0, 0.0),
        (S.VS.token, TokenType.SPECIAL, 1, 0, 0.0),
        ("ENCOUNTER_START//IMP", TokenType.ENCOUNTER, 1, 1, 0.0),
        ("ICD10CM//I509", TokenType.CONDITION, 1, 1, 0.5),
        ("LOINC//2160-0_0", TokenType.LAB, 1, 1, 1.0),
        (S.VE.token, TokenType.SPECIAL, 1, 0, 3.0),
        (S.REG.token, TokenType.SPECIAL, 1, 0, 3.0),
        (S.W_1.token, TokenType.TIME_GAP, 2, 0, 12.0),
        (S.VS.token, TokenType.SPECIAL, 2, 0, 12.0),
        ("ENCOUNTER_START//AMB", TokenType.ENCOUNTER, 2, 2, 12.0),
        ("LOINC//2160-0_1", TokenType.LAB, 2, 2, 12.2),
        ("NDC//1", TokenType.MEDICATION, 2, 2, 12.3),
        (S.VE.token, TokenType.SPECIAL, 2, 0, 12.5),
        (S.REG.token, TokenType.SPECIAL, 2, 0, 12.5),
    ]
    days = np.array([t[4] for t in tokens], dtype=np.float32)
    return {
        "subject_id": 1, "split": "held_out",
        "input_ids": np.array(tokenizer.encode([t[0] for t in tokens]), dtype=np.int32),
        "token_type_ids": np.array([int(t[1]) for t in tokens], dtype=np.int8),
        "ages": (BIRTH_AGE_YEARS + days / 365.25).astype(np.float32),
        "times": days,
        "visit_orders": np.array([t[2] for t in tokens], dtype=np.int32),
        "visit_segments": np.array([t[3] for t in tokens], dtype=np.int8),
        "event_times": np.array([np.datetime64(DAY0 + timedelta(days=float(d)), "us") for d in days]),
    }


@pytest.fixture()
def row(tokenizer) -> dict:
    return hand_row(tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tokenizer) -> EHRMambaForPretraining:
    torch.manual_seed(0)
    config = EHRMambaConfig(vocab_size=tokenizer.vocab_size, scan_backend="torch", **TINY_MODEL)
    return EHRMambaForPretraining(config).eval()


@dataclass(frozen=True)
class Cohort:
    meds: Path
    seq: Path
    labels: Path
    pretrain: Path


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Cohort:
    from odyssey.pipelines.ingest import ingest_fhir
    from odyssey.pipelines.labels import make_labels
    from odyssey.pipelines.synth import synthesize
    from odyssey.tokenizer import TokenizeConfig, tokenize
    from odyssey.training.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("forecast_cohort")
    paths = Cohort(root / "meds", root / "seq", root / "labels", root / "pretrain")
    synthesize(COHORT_PATIENTS, root / "fhir", seed=0, workers=1)
    ingest_fhir(root / "fhir", paths.meds, splits=SPLITS, workers=1)
    # Death stays a token (the default excludes it) so that futures can hold it.
    tokenize(paths.meds, paths.seq, TokenizeConfig(exclude_codes=["MEDS_BIRTH"]), progress=False)
    make_labels(paths.meds, TASKS_YAML, paths.labels, progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pretrain(PretrainConfig(data=paths.seq, out=paths.pretrain, max_steps=3, eval_steps=1000, save_steps=1000,
                            context_length=256, progress_bar=False, model=TINY_MODEL))
    torch.set_num_threads(before)
    return paths
