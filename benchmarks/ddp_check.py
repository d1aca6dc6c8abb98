"""Several GPUs vs one at the same global batch: does DDP pretraining follow the single-GPU run? (issue 4)

Runs `odyssey pretrain` on a small synthetic sequences folder once on one GPU (batch B) and once under
`torchrun --nproc_per_node N` (batch B/N per GPU), for each precision asked, and reports the per-step
training losses of both, the tuning losses and the largest weight difference. JSON to $OUT/ddp_check.json.

    python -P benchmarks/ddp_check.py --gpus 2 --steps 30 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "odyssey" / "training"))

from synthetic_sequences import write_sequences  # noqa: E402

CONFIG = (
    "model:\n  hidden_size: 64\n  embedding_dropout: 0.0\n"
    "learning_rate: 0.003\nwarmup_steps: 0\neval_steps: 10\nsave_steps: 1000\nlogging_steps: 1\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_losses(run: Path) -> list[float]:
    """Training loss per logged step, from the Trainer's log history in the TensorBoard-free state file."""
    states = sorted(run.rglob("trainer_state.json"))
    if not states:
        return []
    history = json.loads(states[-1].read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="ddp-check-"))
    data = write_sequences(work / "seq")
    (work / "cfg.yaml").write_text(CONFIG)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (gloo)"
    results = {"gpus": args.gpus, "device": device, "steps": args.steps, "runs": {}}
    for precision in args.precision:
        common = ["pretrain", "--config", str(work / "cfg.yaml"), "--data", str(data), "--max-steps",
                  str(args.steps), "--no-progress", "--seed", "11", "--precision", precision,
                  "--save-steps", str(args.steps)]
        one, many = work / f"one-{precision}", work / f"many-{precision}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([sys.executable, "-m", "odyssey.cli", *common, "--out", str(one), "--batch-size",
                        str(args.batch_size)], env={**env, "CUDA_VISIBLE_DEVICES": "0"}, check=True)
        torchrun = Path(sys.executable).with_name("torchrun")
        subprocess.run([str(torchrun), "--nproc_per_node", str(args.gpus), "--master_port", str(free_port()),
                        "-m", "odyssey.cli", *common, "--out", str(many), "--batch-size",
                        str(args.batch_size // args.gpus)], env=env, check=True)
        reports = [json.loads((run / "pretrain_report.json").read_text()) for run in (one, many)]
        a = load_file(one / "model" / "model.safetensors")
        b = load_file(many / "model" / "model.safetensors")
        losses_one, losses_many = step_losses(one), step_losses(many)
        results["runs"][precision] = {
            "one_gpu": {"tuning_loss": reports[0]["tuning_loss"], "train_loss": reports[0]["train_loss"],
                        "step_losses": losses_one},
            f"{args.gpus}_gpus": {"tuning_loss": reports[1]["tuning_loss"], "train_loss": reports[1]["train_loss"],
                                  "step_losses": losses_many},
            "max_step_loss_difference": max((abs(x - y) for x, y in zip(losses_one, losses_many, strict=False)),
                                            default=None),
            "max_weight_difference": max((a[k].float() - b[k].float()).abs().max().item() for k in a),
            "tokens_per_second": [reports[0]["tokens_per_second"], reports[1]["tokens_per_second"]],
        }
        print(precision, json.dumps(results["runs"][precision], indent=1)[:1500], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
