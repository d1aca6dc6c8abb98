"""`odyssey pretrain` under torchrun (2 CPU processes, gloo) matches one process with the global batch."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from odyssey.io import read_json

MAIN = Path(__file__).with_name("pretrain_cli_main.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def common_args(data: Path, out: Path, batch_size: int) -> list[str]:
    return ["pretrain", "--config", str(out.parent / "ddp.yaml"), "--data", str(data), "--out", str(out),
            "--batch-size", str(batch_size), "--max-steps", "6", "--no-progress", "--seed", "11"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(str(TORCHRUN)) is None, reason="torchrun not installed")
def test_two_processes_match_one_process_with_the_same_global_batch(sequences_dir, tmp_path):
    (tmp_path / "ddp.yaml").write_text(
        "model:\n  hidden_size: 32\n  time_embedding_size: 8\n  embedding_dropout: 0.0\n"
        "learning_rate: 0.005\nwarmup_steps: 0\neval_steps: 3\nsave_steps: 100\nlogging_steps: 1\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(MAIN.parent)}
    single = subprocess.run(
        [sys.executable, str(MAIN), *common_args(sequences_dir, tmp_path / "one", 8)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), str(MAIN),
         *common_args(sequences_dir, tmp_path / "two", 4)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("tuning loss") == 1  # one summary per job
    one, two = (read_json(tmp_path / run / "pretrain_report.json") for run in ("one", "two"))
    assert one["steps"] == two["steps"] == 6
    assert (one["devices"], two["devices"]) == (1, 2)
    assert [e["step"] for e in one["tuning_history"]] == [3, 6]
    assert [e["tuning_loss"] for e in two["tuning_history"]] == pytest.approx(
        [e["tuning_loss"] for e in one["tuning_history"]], rel=1e-4)
    assert two["tuning_loss"] == pytest.approx(one["tuning_loss"], rel=1e-4)
    assert two["train_tokens"] == one["train_tokens"]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-4, name
