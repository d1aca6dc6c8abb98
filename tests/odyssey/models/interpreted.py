"""Scripts run in a child process under Triton's CPU interpreter (TRITON_INTERPRET must be set before Triton is
imported), for the model tests that compare its GPU paths with the torch ones."""

import os
import subprocess
import sys

import pytest

# A tiny pretraining model and a padded batch (LAYERS: blocks), for scripts that compare two paths of it
TINY_MODEL_SCRIPT = r"""
import os
import torch
from odyssey.models import EHRMambaConfig, EHRMambaForPretraining

torch.manual_seed(0)
config = EHRMambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=LAYERS, embedding_dropout=0.0)
model = EHRMambaForPretraining(config)
ids = torch.randint(1, 50, (2, 19))
mask = torch.ones_like(ids)
mask[1, :5] = 0
"""


def run_interpreted(script: str) -> None:
    """The script must exit 0 and print "ok" last."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
