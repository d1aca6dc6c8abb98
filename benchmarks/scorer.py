"""Incremental scoring (issue 6): one new event through `EHRMambaScorer` against re-running the whole history.

A patient with `--history` tokens is prefilled once; then each of `--events` new tokens is scored two
ways: `scorer.update` (recurrent steps from the carried state, plus the trailing prompt on a copy of it)
and a full parallel forward over the prompted history. Then a ward of `--ward` patients, each after
`--history` tokens, takes one new event each in one `update_many` call, against full re-runs batched
`--rerun-batch` at a time: the per-event cost when a hospital streams events for many patients. Prints
the median times and ratios as JSON (target: >= 100x at 16k tokens of history).

    python benchmarks/scorer.py                                  # small model, 16k history, CPU or CUDA
    python benchmarks/scorer.py --size tiny --history 2048 --ward 64   # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from odyssey.models import EHRMambaConfig, EHRMambaForTaskClassification, EHRMambaScorer

TASK_TOKEN, TASK_TYPE, VOCAB = 24, 8, 2048


def _history(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    times = np.concatenate([[0.0], np.cumsum(rng.exponential(0.5, length - 1))]).astype(np.float32)
    return {
        "input_ids": np.concatenate([[TASK_TOKEN], rng.integers(33, VOCAB, length - 1)]),
        "token_type_ids": np.concatenate([[TASK_TYPE], rng.integers(1, 8, length - 1)]),
        "ages": (40 + times / 365.25).astype(np.float32),
        "times": times,
        "visit_orders": np.minimum(np.arange(length) // 20, 1000),
        "visit_segments": (np.arange(length) // 20) % 2 + 1,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--history", type=int, default=16_384)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--ward", type=int, default=1024, help="patients updated together (0: skip)")
    parser.add_argument("--rerun-batch", type=int, default=4, help="histories per batched full re-run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = EHRMambaConfig.from_size(args.size, vocab_size=VOCAB, task_names=["risk"], task_outputs=[1],
                                      task_prompt_ids=[[TASK_TOKEN]], task_token_type=TASK_TYPE)
    model = EHRMambaForTaskClassification(config).to(device).eval()
    tokens = _history(args.history + args.events, seed=0)
    scorer = EHRMambaScorer(model, "risk")
    scorer.update("patient", {k: v[: args.history] for k, v in tokens.items()})

    incremental, full, max_error = [], [], 0.0
    for i in range(args.events):
        end = args.history + i + 1
        _sync(device)
        started = time.perf_counter()
        risk = scorer.update("patient", {k: v[end - 1: end] for k, v in tokens.items()})
        _sync(device)
        incremental.append(time.perf_counter() - started)

        prompted = {k: np.concatenate([v[:end], v[end - 1: end]]) for k, v in tokens.items()}
        prompted["input_ids"][-1], prompted["token_type_ids"][-1], prompted["visit_segments"][-1] = TASK_TOKEN, TASK_TYPE, 0
        batch = {k: torch.as_tensor(v, device=device)[None].to(torch.float32 if k in ("ages", "times") else torch.long)
                 for k, v in prompted.items()}
        _sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            logit = model(**batch, task_index=torch.zeros(1, dtype=torch.long, device=device)).logits[0, 0]
        _sync(device)
        full.append(time.perf_counter() - started)
        reference = float(torch.sigmoid(logit))
        max_error = max(max_error, abs(float(risk[0]) - reference) / max(abs(reference), 1e-12))
    result = {
        "size": args.size, "history_tokens": args.history, "device": str(device),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "incremental_ms": round(1000 * statistics.median(incremental), 3),
        "full_rerun_ms": round(1000 * statistics.median(full), 3),
        "speedup": round(statistics.median(full) / statistics.median(incremental), 1),
        "max_relative_error": max_error,
    }
    if args.ward:
        result |= _ward(model, scorer, tokens, args, device)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


def _timed(device: torch.device, work, repeats: int) -> float:
    """Median seconds of `work()` over `repeats` runs after one warm-up."""
    work()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        work()
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _ward(model, scorer: EHRMambaScorer, tokens: dict[str, np.ndarray], args, device: torch.device) -> dict:
    """Per-event cost of `update_many` over a ward against batched full re-runs of the same histories."""
    for bed in range(args.ward):
        # Every bed starts from the state after the same long history (the cost does not depend on which).
        scorer.copy_patient("patient", bed)
    end = args.history + args.events
    event = {k: v[end - 1: end] for k, v in tokens.items()}
    ward_seconds = _timed(device, lambda: scorer.update_many({bed: event for bed in range(args.ward)}), args.repeats)

    prompted = {k: np.concatenate([v[:end], v[end - 1: end]]) for k, v in tokens.items()}
    prompted["input_ids"][-1], prompted["token_type_ids"][-1], prompted["visit_segments"][-1] = TASK_TOKEN, TASK_TYPE, 0
    batch = {k: torch.as_tensor(v, device=device)[None].expand(args.rerun_batch, -1)
             .to(torch.float32 if k in ("ages", "times") else torch.long) for k, v in prompted.items()}
    task_index = torch.zeros(args.rerun_batch, dtype=torch.long, device=device)

    def rerun():
        with torch.no_grad():
            model(**batch, task_index=task_index)

    rerun_seconds = _timed(device, rerun, args.repeats)
    per_event = ward_seconds / args.ward
    per_rerun = rerun_seconds / args.rerun_batch
    return {
        "ward_patients": args.ward, "ward_update_ms": round(1000 * ward_seconds, 3),
        "ward_per_event_us": round(1e6 * per_event, 2),
        "rerun_batch": args.rerun_batch, "batched_rerun_per_patient_ms": round(1000 * per_rerun, 3),
        "ward_speedup": round(per_rerun / per_event, 1),
    }


if __name__ == "__main__":
    main()
