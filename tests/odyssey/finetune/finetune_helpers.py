"""Helpers the finetuning tests import (a module of its own: every test folder has a `conftest`)."""

from __future__ import annotations

from pathlib import Path

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
