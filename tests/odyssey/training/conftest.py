"""Fixtures for the training tests: a synthetic sequences folder (see synthetic_sequences.py)."""

from pathlib import Path

import pytest
from synthetic_sequences import write_sequences


@pytest.fixture(scope="session")
def sequences_dir(tmp_path_factory) -> Path:
    return write_sequences(tmp_path_factory.mktemp("seq"))
