"""Incremental scoring (issue 6): one new event through `EHRMambaScorer` against re-running the whole history.

A patient with `--history` tokens is prefilled once; then each new token (`--warmup` untimed, then
`--events` timed) is scored four ways, in turn on the same model:
- `scorer.update` as it runs by default (on CUDA: the pass over all layers captured in a CUDA graph);
- `scorer.update` with `cuda_graphs=False` (the same pass, launched op by op);
- the previous scorer's path: one recurrent step per token through `EHRMambaModel`'s cache (event in
  place, prompt on a copy of the state), about 20 small launches per layer per token;
- a full parallel forward over the prompted history (the baseline).
Every risk is compared with the full forward's. Then a ward of `--ward` patients, each after
`--history` tokens, takes one new event each in one `update_many` call, against full re-runs batched
`--rerun-batch` at a time: the per-event cost when a hospital streams events for many patients. Prints
the median times and ratios as JSON (target: >= 100x at 16k tokens of history).

    python benchmarks/scorer.py                                  # small model, 16k history, CPU or CUDA
    python benchmarks/scorer.py --size tiny --history 2048 --ward 64   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections import Counter

import numpy as np
import torch

from odyssey.models import EHRMambaConfig, EHRMambaForTaskClassification, EHRMambaScorer
from odyssey.models.mixer import MixerState
from odyssey.models.modeling_ehrmamba import EHRMambaCache

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


def _prompted(tokens: dict[str, np.ndarray], end: int) -> dict[str, np.ndarray]:
    """The first `end` tokens plus the trailing prompt (repeating the last token's age, time and visit)."""
    prompted = {k: np.concatenate([v[:end], v[end - 1: end]]) for k, v in tokens.items()}
    prompted["input_ids"][-1], prompted["token_type_ids"][-1], prompted["visit_segments"][-1] = TASK_TOKEN, TASK_TYPE, 0
    return prompted


def _batch(columns: dict[str, np.ndarray], device: torch.device, rows: int = 1) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device)[None].expand(rows, -1)
            .to(torch.float32 if k in ("ages", "times") else torch.long) for k, v in columns.items()}


@torch.no_grad()
def _step_path(model, cache: EHRMambaCache, event: dict[str, torch.Tensor], prompt: dict[str, torch.Tensor]) -> float:
    """The previous scorer's update: one recurrent step per token through `EHRMambaModel`'s cache path
    (the event in place, the prompt on a copy of the state), without its pool bookkeeping."""
    model.backbone(**event, cache=cache)
    copy = EHRMambaCache(layers=[MixerState(s.conv_state.clone(), s.ssm_state.clone()) for s in cache.layers],
                         last_times=cache.last_times.clone())
    hidden = model.backbone(**prompt, cache=copy).last_hidden_state[0, -1]
    return float(torch.sigmoid(hidden @ model.classifier.weight[0] + model.classifier.bias[0]))


def _kernels(device: torch.device, work) -> dict | None:
    """GPU kernels and copies one call of `work()` launches (torch.profiler), by name; None off CUDA."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            work()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return {"count": len(names), "by_name": dict(Counter(name[:70] for name in names).most_common())}
    except Exception as error:  # the profiler is optional here; the timings stand without it
        print(f"kernel count unavailable: {error}")
        return None


def _replay_ms(scorer: EHRMambaScorer, device: torch.device, replays: int = 50) -> dict | None:
    """The single-patient, single-event graph alone: GPU time of a replay (back to back, no host work) and
    the wall time of one call (replay, synchronise, read the risk), without the packing in Python.

    Each replay re-applies the last event to the patient's state, so this runs after the equality checks.
    """
    graph = scorer._graphs.get((1, 1))
    if device.type != "cuda" or graph is None:
        return None
    graph.graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.graph.replay()
    stop.record()
    torch.cuda.synchronize()
    calls = []
    for _ in range(replays):  # one update's device round trip: replay, wait, read the risk
        started = time.perf_counter()
        graph()
        calls.append(time.perf_counter() - started)
    return {"replay_gpu_ms": round(start.elapsed_time(stop) / replays, 4),
            "call_ms": round(1000 * statistics.median(calls), 4)}


WARM = 3  # untimed first updates of each timed loop


def _median_ms(seconds: list[float]) -> float:
    return round(1000 * statistics.median(seconds[WARM:]), 4)


@contextlib.contextmanager
def _patient_copy_with_timed_packing(scorer: EHRMambaScorer, name: str):
    """A copy of "patient" under `name`, forgotten afterwards; yields the list that collects the seconds of
    each update's host packing (`scorer._pack`, wrapped for the duration)."""
    scorer.copy_patient("patient", name)
    pack, spent = scorer._pack, []

    def timed_pack(*args, **kwargs):
        started = time.perf_counter()
        pack(*args, **kwargs)
        spent.append(time.perf_counter() - started)

    scorer._pack = timed_pack
    try:
        yield spent
    finally:
        del scorer._pack
        scorer.forget(name)


def _updates_after(scorer: EHRMambaScorer, name: str, event: dict, device: torch.device, events: int,
                   before=lambda: None) -> list[float]:
    """Seconds of `WARM + events` single-event updates of patient `name`, each right after `before()`."""
    totals = []
    for _ in range(WARM + events):
        before()
        _sync(device)
        started = time.perf_counter()
        scorer.update(name, event)
        _sync(device)
        totals.append(time.perf_counter() - started)
    return totals


def _back_to_back(scorer: EHRMambaScorer, tokens: dict[str, np.ndarray], end: int, device: torch.device,
                  events: int) -> dict:
    """`scorer.update` of single events in a row with nothing else on the GPU between them (the main
    loop interleaves the other paths and the 16k re-run), split into the host's packing and the graph call
    (copy in, replay, risk out). Runs on a copy of the patient."""
    event = {k: v[end - 1: end] for k, v in tokens.items()}
    with _patient_copy_with_timed_packing(scorer, "back_to_back") as packing:
        totals = _updates_after(scorer, "back_to_back", event, device, events)
        graph = scorer._graphs.get((1, 1))
        replays = []
        for _ in range(WARM + events if graph is not None else 0):  # re-applies the last event to the copy
            started = time.perf_counter()
            graph()
            replays.append(time.perf_counter() - started)
    result = {"update_ms": _median_ms(totals), "pack_ms": _median_ms(packing)}
    return result | ({"graph_ms": _median_ms(replays)} if replays else {})


def _update_after(scorer: EHRMambaScorer, model, tokens: dict[str, np.ndarray], end: int, device: torch.device,
                  events: int, idle_seconds: float) -> dict:
    """Median `scorer.update` time (and its host packing) right after each of: nothing (back to back), a
    full re-run of the prompted history (as in the main loop), the host sleeping as long as that re-run
    took, and a matmul loop keeping the GPU busy that long (the host only launches and waits). Tells a slow
    update after a re-run apart by cause: the re-run's own host work (re-run slow, the others fast), or the
    host and GPU going cold between updates (sleep and busy GPU slow too). Runs on a copy of the patient."""
    event = {k: v[end - 1: end] for k, v in tokens.items()}
    batch = _batch(_prompted(tokens, end), device)
    busy = torch.randn(4096, 4096, device=device)

    def full_rerun():
        with torch.no_grad():
            model(**batch, task_index=torch.zeros(1, dtype=torch.long, device=device))

    def gpu_busy():
        deadline = time.perf_counter() + idle_seconds
        while time.perf_counter() < deadline:
            busy @ busy
            _sync(device)

    before = {"nothing": lambda: None, "full_rerun": full_rerun, "sleep": lambda: time.sleep(idle_seconds),
              "gpu_busy": gpu_busy}
    result = {"idle_seconds": round(idle_seconds, 4)}
    for name, work in before.items():
        with _patient_copy_with_timed_packing(scorer, "after") as packing:
            totals = _updates_after(scorer, "after", event, device, events, work)
        result[name] = {"update_ms": _median_ms(totals), "pack_ms": _median_ms(packing)}
    return result


def _relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--history", type=int, default=16_384)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed events first (CUDA graphs capture on the 2nd)")
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
    tokens = _history(args.history + args.warmup + args.events + 1, seed=0)
    history = {k: v[: args.history] for k, v in tokens.items()}
    scorer = EHRMambaScorer(model, "risk")  # CUDA graphs on CUDA
    eager = EHRMambaScorer(model, "risk", cuda_graphs=False)
    scorer.update("patient", history)
    eager.update("patient", history)
    cache = scorer.state("patient")

    times = {"graphed": [], "eager": [], "step_path": [], "full": []}
    errors = {"graphed": 0.0, "eager": 0.0, "step_path": 0.0, "graphed_vs_eager": 0.0}
    for i in range(args.warmup + args.events):
        end = args.history + i + 1
        event = {k: v[end - 1: end] for k, v in tokens.items()}
        risks = {}
        prompt_token = _batch({k: v[-1:] for k, v in _prompted(tokens, end).items()}, device)
        for name, work in (
            ("graphed", lambda event=event: scorer.update("patient", event)[0]),
            ("eager", lambda event=event: eager.update("patient", event)[0]),
            ("step_path", lambda event=event, prompt=prompt_token: _step_path(model, cache, _batch(event, device),
                                                                              prompt)),
        ):
            _sync(device)
            started = time.perf_counter()
            risks[name] = float(work())
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - started)
        batch = _batch(_prompted(tokens, end), device)
        _sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            logit = model(**batch, task_index=torch.zeros(1, dtype=torch.long, device=device)).logits[0, 0]
        _sync(device)
        if i >= args.warmup:
            times["full"].append(time.perf_counter() - started)
        reference = float(torch.sigmoid(logit))
        for name in ("graphed", "eager", "step_path"):
            errors[name] = max(errors[name], _relative(risks[name], reference))
        errors["graphed_vs_eager"] = max(errors["graphed_vs_eager"], _relative(risks["graphed"], risks["eager"]))
    median_ms = {name: 1000 * statistics.median(values) for name, values in times.items()}

    end = args.history + args.warmup + args.events + 1
    probe = {k: v[end - 1: end] for k, v in tokens.items()}
    eager.copy_patient("patient", "probe")
    probe_cache = EHRMambaCache(layers=[MixerState(s.conv_state.clone(), s.ssm_state.clone()) for s in cache.layers],
                                last_times=cache.last_times.clone())
    prompt_token = {k: v[-1:] for k, v in _prompted(tokens, end).items()}
    result = {
        "size": args.size, "history_tokens": args.history, "device": str(device),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cuda_graphs": scorer.cuda_graphs, "step_backend": scorer.step_backend,
        "events_timed": args.events,
        "incremental_ms": round(median_ms["graphed"], 3),
        "eager_ms": round(median_ms["eager"], 3),
        "step_path_ms": round(median_ms["step_path"], 3),
        "full_rerun_ms": round(median_ms["full"], 3),
        "speedup": round(median_ms["full"] / median_ms["graphed"], 1),
        "eager_speedup": round(median_ms["full"] / median_ms["eager"], 1),
        "step_path_speedup": round(median_ms["full"] / median_ms["step_path"], 1),
        "max_relative_error": errors["graphed"],
        "eager_max_relative_error": errors["eager"],
        "step_path_max_relative_error": errors["step_path"],
        "graphed_vs_eager_max_relative_error": errors["graphed_vs_eager"],
        "eager_kernels_per_update": _kernels(device, lambda: eager.update("probe", probe)),
        "step_path_kernels_per_update": _kernels(
            device, lambda: _step_path(model, probe_cache, _batch(probe, device), _batch(prompt_token, device))),
        "raw_ms": {name: [round(1000 * v, 4) for v in values] for name, values in times.items()},
    }
    result["graph"] = _replay_ms(scorer, device)
    result["back_to_back"] = _back_to_back(scorer, tokens, end, device, args.events)
    result["update_after"] = _update_after(scorer, model, tokens, end, device, args.events,
                                           median_ms["full"] / 1000)
    if args.ward:
        result |= _ward(model, scorer, eager, tokens, args, device)
    result["checks"] = _equality_checks(device)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


def _timed(device: torch.device, work, repeats: int, warmups: int = 3) -> float:
    """Median seconds of `work()` over `repeats` runs after `warmups` (a CUDA graph is captured on the 2nd)."""
    for _ in range(warmups):
        work()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        work()
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _ward(model, scorer: EHRMambaScorer, eager: EHRMambaScorer, tokens: dict[str, np.ndarray], args,
          device: torch.device) -> dict:
    """Per-event cost of `update_many` over a ward against batched full re-runs of the same histories."""
    for bed in range(args.ward):
        # Every bed starts from the state after the same long history (the cost does not depend on which).
        scorer.copy_patient("patient", bed)
        eager.copy_patient("patient", bed)
    end = args.history + args.warmup + args.events
    event = {k: v[end - 1: end] for k, v in tokens.items()}
    ward_seconds = _timed(device, lambda: scorer.update_many({bed: event for bed in range(args.ward)}), args.repeats)
    eager_seconds = _timed(device, lambda: eager.update_many({bed: event for bed in range(args.ward)}), args.repeats)
    batch = _batch(_prompted(tokens, end), device, rows=args.rerun_batch)
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
        "ward_eager_update_ms": round(1000 * eager_seconds, 3),
        "rerun_batch": args.rerun_batch, "batched_rerun_per_patient_ms": round(1000 * per_rerun, 3),
        "ward_speedup": round(per_rerun / per_event, 1),
        "ward_eager_speedup": round(per_rerun / (eager_seconds / args.ward), 1),
    }


def _equality_checks(device: torch.device, patients: int = 5, rounds: int = 12) -> dict:
    """A tiny two-task model: streamed risks (graphed and eager) against full re-runs, many shapes.

    Patients get 0-4 new events per round (a multi-token prompt, padding, rows without events), then one
    patient alone gets single events: the shapes repeat, so the graphed scorer replays captured graphs.
    """
    prompts = {"mortality": [24], "conditions": [27, 28, 29]}
    torch.manual_seed(0)
    config = EHRMambaConfig.from_size("tiny", vocab_size=VOCAB, task_names=list(prompts),
                                      task_outputs=[len(p) for p in prompts.values()],
                                      task_prompt_ids=list(prompts.values()), task_token_type=TASK_TYPE)
    model = EHRMambaForTaskClassification(config).to(device).eval()
    rng = np.random.default_rng(1)
    result = {}
    for task_index, (task, prompt) in enumerate(prompts.items()):
        histories = []
        for seed in range(patients):
            history = _history(400, seed=100 + seed)
            history["input_ids"][: len(prompt)], history["token_type_ids"][: len(prompt)] = prompt, TASK_TYPE
            histories.append(history)
        graphed, eager = EHRMambaScorer(model, task), EHRMambaScorer(model, task, cuda_graphs=False)
        seen = [200] * patients
        for scorer in (graphed, eager):
            scorer.update_many({p: {k: v[:200] for k, v in histories[p].items()} for p in range(patients)})
        worst_full, worst_eager = 0.0, 0.0
        for round_index in range(rounds + rounds):
            alone = round_index >= rounds
            counts = [1 if p == 0 else 0 for p in range(patients)] if alone else rng.integers(0, 5, patients).tolist()
            chunk = {p: {k: v[seen[p]: seen[p] + counts[p]] for k, v in histories[p].items()}
                     for p in range(patients) if not alone or p == 0}
            got, want = graphed.update_many(chunk), eager.update_many(chunk)
            for p in chunk:
                seen[p] += counts[p]
                prompted = {k: np.concatenate([v[: seen[p]], np.repeat(v[seen[p] - 1: seen[p]], len(prompt))])
                            for k, v in histories[p].items()}
                prompted["input_ids"][-len(prompt):] = prompt
                prompted["token_type_ids"][-len(prompt):], prompted["visit_segments"][-len(prompt):] = TASK_TYPE, 0
                with torch.no_grad():
                    logits = model(**_batch(prompted, device),
                                   task_index=torch.tensor([task_index], device=device)).logits[0, : len(prompt)]
                full = torch.sigmoid(logits).cpu().numpy()
                worst_full = max(worst_full, float(np.max(np.abs(got[p] - full) / np.abs(full))))
                worst_eager = max(worst_eager, float(np.max(np.abs(got[p] - want[p]) / np.abs(want[p]))))
        result[task] = {"max_relative_error_vs_full": worst_full, "max_relative_error_vs_eager": worst_eager,
                        "graphs_captured": sum(g is not None for g in graphed._graphs.values())}
    return result


if __name__ == "__main__":
    main()
