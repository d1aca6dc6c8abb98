"""Integrated gradients for one patient (issue 7): seconds per patient at a given history length.

Times `odyssey.interpretability.attribution.integrated_gradients` on a random-weight task model of a
named size over a synthetic prompted history of `--tokens` tokens (event tokens of mixed types inside
20-token visits, task prompt at both ends), for each `--steps` value; prints JSON with the median of
`--repeats` runs (after one warm-up) and the completeness error. Also times the risk-over-time panel
`odyssey explain` draws: `EHRMambaScorer.trajectory` over the same history, one point per visit.

    python benchmarks/explain_cpu.py                               # tiny, 2,048 tokens, 16/32/64 steps, CPU
    python benchmarks/explain_cpu.py --size small --threads 2 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from odyssey.interpretability.attribution import integrated_gradients
from odyssey.models import EHRMambaConfig, EHRMambaForTaskClassification, EHRMambaScorer
from odyssey.tokenizer import SpecialTokens, TokenType

TASK_TOKEN, VOCAB, VISIT_TOKENS = 24, 2048, 20
EVENT_TYPES = (TokenType.CONDITION, TokenType.PROCEDURE, TokenType.MEDICATION, TokenType.LAB)


def prompted_history(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(33, VOCAB, length)
    types = rng.choice([int(t) for t in EVENT_TYPES], length)
    visit = np.arange(length) // VISIT_TOKENS + 1
    starts, ends = np.arange(length) % VISIT_TOKENS == 0, np.arange(length) % VISIT_TOKENS == VISIT_TOKENS - 1
    ids[starts], ids[ends] = int(SpecialTokens.VS), int(SpecialTokens.VE)
    types[starts | ends] = int(TokenType.SPECIAL)
    ids[0] = ids[-1] = TASK_TOKEN
    types[0] = types[-1] = int(TokenType.TASK)
    times = np.concatenate([[0.0], np.cumsum(rng.exponential(0.5, length - 1))]).astype(np.float32)
    return {"input_ids": ids, "token_type_ids": types, "ages": (40 + times / 365.25).astype(np.float32),
            "times": times, "visit_orders": np.minimum(visit, 1000), "visit_segments": visit % 2 + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", default="16,32,64")
    parser.add_argument("--batch", type=int, default=None, help="interpolated inputs per forward (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = EHRMambaConfig.from_size(args.size, vocab_size=VOCAB, task_names=["task"], task_outputs=[1],
                                      task_prompt_ids=[[TASK_TOKEN]], task_token_type=int(TokenType.TASK))
    model = EHRMambaForTaskClassification(config).to(args.device)
    inputs = prompted_history(args.tokens, seed=0)
    results = []
    for steps in (int(s) for s in args.steps.split(",")):
        integrated_gradients(model, inputs, 0, n_steps=steps, internal_batch_size=args.batch)  # warm-up
        seconds, error = [], 0.0
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = integrated_gradients(model, inputs, 0, n_steps=steps, internal_batch_size=args.batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            error = abs(result.scores.sum() - (result.logit - result.baseline_logit))
        results.append({"n_steps": steps, "seconds_per_patient": round(statistics.median(seconds), 3),
                        "runs": [round(s, 3) for s in seconds], "completeness_error": error})
    history = {name: values[:-1] for name, values in inputs.items()}  # without the trailing prompt
    visits = history["visit_orders"]
    trajectory_seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        points = EHRMambaScorer(model, "task").trajectory(history, visits)
        trajectory_seconds.append(time.perf_counter() - started)
    print(json.dumps({"size": args.size, "tokens": args.tokens, "batch": args.batch, "threads": args.threads,
                      "device": args.device, "torch": torch.__version__, "machine": platform.machine(),
                      "processor": platform.processor(), "results": results,
                      "risk_over_time": {"points": len(points),
                                         "seconds_per_patient": round(statistics.median(trajectory_seconds), 3)}},
                     indent=1))


if __name__ == "__main__":
    main()
