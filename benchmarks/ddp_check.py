"""Several GPUs vs one at the same global batch: does DDP pretraining follow the single-GPU run? (issue 4)

Runs `odyssey pretrain` on a small synthetic sequences folder once on one GPU (batch B) and once under
`torchrun --nproc_per_node N` (batch B/N per GPU), for each precision asked, and reports the per-step
training losses of both, the tuning losses and the largest weight difference. `--launcher accelerate`
starts the several-GPU run with `accelerate launch --multi_gpu` instead of torchrun. `--scaling` then
trains a model of `--scaling-size` on ~2,000-token sequences at a fixed batch per GPU on one GPU and on N,
and reports steady-state tokens/s (two run lengths, so start-up, compilation and the final save cancel)
and the scaling efficiency. JSON to $OUT/ddp_check.json.

    python -P benchmarks/ddp_check.py --gpus 2 --steps 30 --precision fp32 bf16
    python -P benchmarks/ddp_check.py --gpus 2 --steps 30 --precision fp32 --launcher torchrun accelerate --scaling --scaling-size base
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
SCALING_CONFIG = (
    "model_size: {size}\ncontext_length: 2048\nlearning_rate: 0.001\nwarmup_steps: 0\neval_steps: 100000\nsave_steps: 100000\n"
    "logging_steps: 10\nprecision: auto\n"
)
SHORT_RUN = 20
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def launch_many(launcher: str, gpus: int, precision: str) -> list[str]:
    """The command prefix that starts `odyssey` on `gpus` local GPUs."""
    if launcher == "torchrun":
        return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(gpus),
                "--master_port", str(free_port()), "-m"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
            "--num_machines", "1", "--mixed_precision", MIXED_PRECISION[precision], "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m"]


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
    parser.add_argument("--launcher", nargs="+", default=["torchrun"], choices=["torchrun", "accelerate"])
    parser.add_argument("--scaling", action="store_true", help="also measure tokens/s on 1 and N GPUs")
    parser.add_argument("--scaling-steps", type=int, default=120, help="the longer of the two timed runs")
    parser.add_argument("--scaling-size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="ddp-check-"))
    data = write_sequences(work / "seq")
    (work / "cfg.yaml").write_text(CONFIG)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (gloo)"
    results = {"gpus": args.gpus, "device": device, "steps": args.steps, "runs": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for precision in args.precision:
        common = ["pretrain", "--config", str(work / "cfg.yaml"), "--data", str(data), "--max-steps",
                  str(args.steps), "--no-progress", "--seed", "11", "--precision", precision,
                  "--save-steps", str(args.steps)]
        one = work / f"one-{precision}"
        subprocess.run([sys.executable, "-m", "odyssey.cli", *common, "--out", str(one), "--batch-size",
                        str(args.batch_size)], env={**env, "CUDA_VISIBLE_DEVICES": "0"}, check=True)
        for launcher in args.launcher:
            many = work / f"many-{launcher}-{precision}"
            subprocess.run([*launch_many(launcher, args.gpus, precision), "odyssey.cli", *common, "--out", str(many),
                            "--batch-size", str(args.batch_size // args.gpus)], env=env, check=True)
            key = precision if launcher == "torchrun" else f"{precision}-{launcher}"
            results["runs"][key] = compare(one, many, args.gpus, load_file)
            print(key, json.dumps(results["runs"][key], indent=1)[:1500], flush=True)
    if args.scaling:
        results["scaling"] = scaling(work, args, env)
        print("scaling", json.dumps(results["scaling"], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp_check.json").write_text(json.dumps(results, indent=2))


def compare(one: Path, many: Path, gpus: int, load_file) -> dict:
    """Losses, weights and speed of the one-GPU run against the several-GPU run."""
    reports = [json.loads((run / "pretrain_report.json").read_text()) for run in (one, many)]
    a = load_file(one / "model" / "model.safetensors")
    b = load_file(many / "model" / "model.safetensors")
    losses_one, losses_many = step_losses(one), step_losses(many)
    return {
        "one_gpu": {"tuning_loss": reports[0]["tuning_loss"], "train_loss": reports[0]["train_loss"],
                    "step_losses": losses_one},
        f"{gpus}_gpus": {"tuning_loss": reports[1]["tuning_loss"], "train_loss": reports[1]["train_loss"],
                         "step_losses": losses_many},
        "max_step_loss_difference": max((abs(x - y) for x, y in zip(losses_one, losses_many, strict=False)),
                                        default=None),
        "max_weight_difference": max((a[k].float() - b[k].float()).abs().max().item() for k in a),
        "tokens_per_second": [reports[0]["tokens_per_second"], reports[1]["tokens_per_second"]],
    }


def scaling(work: Path, args, env: dict) -> dict:
    """Steady-state tokens/s at a fixed batch per GPU: one GPU against `args.gpus` (weak scaling).

    Each setting trains twice, for `SHORT_RUN` steps and for `args.scaling_steps`; the difference in tokens
    over the difference in seconds leaves out what both runs pay once (start-up, first steps, the save).
    """
    data = write_sequences(work / "long", subjects=1024, max_visits=450)
    (work / "scaling.yaml").write_text(SCALING_CONFIG.format(size=args.scaling_size))
    per_gpu_batch = 8
    common = ["pretrain", "--config", str(work / "scaling.yaml"), "--data", str(data), "--no-progress",
              "--seed", "11", "--batch-size", str(per_gpu_batch)]
    one_gpu = {**env, "CUDA_VISIBLE_DEVICES": "0"}
    # A short run first, so Triton's compiled kernels are cached before any timed run.
    subprocess.run([sys.executable, "-m", "odyssey.cli", *common, "--max-steps", "2", "--out", str(work / "warm")],
                   env=one_gpu, check=True)
    launchers = {"one": ([sys.executable, "-m"], one_gpu), "many": (launch_many("torchrun", args.gpus, "bf16"), env)}
    reports = {}
    for name, (prefix, run_env) in launchers.items():
        for steps in (SHORT_RUN, args.scaling_steps):
            out = work / f"scale-{name}-{steps}"
            subprocess.run([*prefix, "odyssey.cli", *common, "--max-steps", str(steps), "--out", str(out)],
                           env=run_env, check=True)
            reports[name, steps] = json.loads((out / "pretrain_report.json").read_text())

    def steady(name: str) -> float:
        short, long = reports[name, SHORT_RUN], reports[name, args.scaling_steps]
        return (long["train_tokens"] - short["train_tokens"]) / (long["train_seconds"] - short["train_seconds"])

    one, many = steady("one"), steady("many")
    return {
        "model_size": args.scaling_size, "parameters": reports["one", SHORT_RUN]["parameters"],
        "context_length": 2048, "batch_per_gpu": per_gpu_batch, "steps": [SHORT_RUN, args.scaling_steps],
        "one_gpu_tokens_per_second": round(one, 1), f"{args.gpus}_gpus_tokens_per_second": round(many, 1),
        "speedup": round(many / one, 3), "efficiency": round(many / one / args.gpus, 3),
        "whole_run_tokens_per_second": {name: reports[name, args.scaling_steps]["tokens_per_second"]
                                        for name in launchers},
    }


if __name__ == "__main__":
    main()
