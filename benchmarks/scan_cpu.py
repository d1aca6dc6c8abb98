"""CPU speed of the selective scan and of a 2-layer, hidden-64 Mamba train step (issue 4, CPU speed).

Measured side by side in one run:

(a) the scan alone, forward + backward, at the shapes a hidden-64 / expand-2 / d_state-16 model
    uses (dim 128, N 16, batch 4): our `torch` backend (several chunk sizes, and the same closed
    form under plain autograd) against transformers' eager scan (the sequential Python loop of its
    `mamba_selective_scan` torch path) at lengths where that loop finishes;
(b) one Mamba mixer, forward + backward: transformers' `MambaMixer` (eager path) against ours;
(c) the full 2-layer model train step (forward + loss + backward): `EHRMambaForPretraining`
    (tiny) at batch 4 / length 2048, against transformers' `MambaForCausalLM` of the same size.

transformers is timed at short lengths only; its time grows linearly with length (a Python loop
over time steps, both ways), so we also report a linear extrapolation to the target length,
labelled as such. Writes a JSON report to --out and prints a table.

    .venv/bin/python benchmarks/scan_cpu.py --out /tmp/scan_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Scripts in benchmarks/ may share a name with a stdlib module (tokenize.py); running this file puts
# benchmarks/ first on sys.path, which would shadow the stdlib for torch's own imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must not look for hub kernels

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from odyssey.kernels import selective_scan  # noqa: E402
from odyssey.kernels.chunked import selective_scan_chunked  # noqa: E402

HIDDEN, EXPAND, STATE, LAYERS = 64, 2, 16, 2
VOCAB = 1024  # a small EHR vocabulary; the output layer is not what this benchmark is about
TIME_STEP_MIN, TIME_STEP_MAX = 1e-3, 1e-1  # Mamba's dt init range, so decays look like a real layer's


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON report path")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048, help="target sequence length")
    parser.add_argument(
        "--baseline-lengths",
        type=int,
        nargs="+",
        default=[256, 512, 1024],
        help="lengths transformers is timed at (the longest once, the others --baseline-repeats times)",
    )
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median reported)")
    parser.add_argument("--baseline-repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, torch.get_num_threads()],
        help="torch intra-op thread counts to measure (each runs every case)",
    )
    parser.add_argument(
        "--baseline-at-target",
        action="store_true",
        help="also time transformers' model once at the target length (minutes)",
    )
    return parser.parse_args()


def time_call(fn: Callable[[], None], repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs_s": seconds}


def scan_inputs(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Scan inputs shaped and scaled like a freshly initialised hidden-64 Mamba layer's."""
    gen = torch.Generator().manual_seed(seed)
    dim = EXPAND * HIDDEN
    log_dt = torch.rand(dim, generator=gen) * (torch.log(torch.tensor(TIME_STEP_MAX / TIME_STEP_MIN)))
    dt = TIME_STEP_MIN * torch.exp(log_dt)
    return {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": torch.randn(batch, dim, length, generator=gen) * 0.1,
        "A": -torch.arange(1, STATE + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, STATE, length, generator=gen),
        "C": torch.randn(batch, STATE, length, generator=gen),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=gen),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus(delta_bias) = dt
    }


def scan_step(scan: Callable, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def step() -> None:
        for leaf in leaves.values():
            leaf.grad = None
        out = scan(**leaves, delta_softplus=True)
        out.sum().backward()

    return step


def saved_for_backward_bytes(scan: Callable, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps between forward and backward (the scan's activation memory)."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scan(**leaves, delta_softplus=True)
    return sum(saved.values()) - sum(v.untyped_storage().nbytes() for v in leaves.values())


def transformers_scan() -> Callable:
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    def scan(u, delta, **kwargs):  # transformers names u and delta `hidden_states` and `dt`
        return mamba_selective_scan(u, delta, **kwargs, use_mambapy=False, use_associative_scan=False)

    return scan


def mixer_step(mixer: torch.nn.Module, batch: int, length: int, seed: int) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, HIDDEN, generator=gen, requires_grad=True)

    def step() -> None:
        mixer.zero_grad(set_to_none=True)
        hidden.grad = None
        mixer(hidden).square().mean().backward()

    return step


def model_step(model: torch.nn.Module, batch: int, length: int, vocab: int, seed: int) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, length), generator=gen)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    return step


def extrapolate(per_length: dict[int, float], target: int) -> dict:
    """Fit the measured (length, seconds) points and evaluate the fit at the target length.

    transformers' eager loop is not linear in length: autograd's backward of every `tensor[:, :, t]`
    slice materialises a gradient of the whole (batch, dim, L, N) tensor, so its backward is
    O(L^2). With three or more lengths we fit a + b L + c L^2 (least squares); with two, a line
    through them (a lower bound).
    """
    lengths = sorted(per_length)
    if len(lengths) == 1:
        only = lengths[0]
        return {"seconds": per_length[only] * target / only, "method": f"proportional from L={only}"}
    degree = 2 if len(lengths) >= 3 else 1
    x = torch.tensor(lengths, dtype=torch.float64)
    y = torch.tensor([per_length[n] for n in lengths], dtype=torch.float64)
    design = torch.stack([x**k for k in range(degree + 1)], dim=1)
    coefficients = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    value = sum(float(c) * target**k for k, c in enumerate(coefficients))
    kind = "quadratic" if degree == 2 else "linear"
    return {"seconds": value, "method": f"{kind} fit through L={', '.join(map(str, lengths))}"}


def build_cases(args: argparse.Namespace) -> tuple[list[tuple], str]:
    """(kind, implementation, length, builder, repeats, warmup) for every measurement of one thread count."""
    from transformers import MambaConfig, MambaForCausalLM
    from transformers.models.mamba.modeling_mamba import MambaMixer

    batch, seed, target = args.batch, args.seed, args.length

    def baseline_repeats(length: int) -> int:
        return args.baseline_repeats if length < max(args.baseline_lengths) else 1

    cases: list[tuple] = []

    def chunked_with(**options):
        def scan(**kw):
            return selective_scan_chunked(**kw, **options)

        return scan

    for length in [*args.baseline_lengths, target]:
        cases.append(
            (
                "scan",
                "odyssey torch",
                length,
                lambda n=length: scan_step(selective_scan, scan_inputs(batch, n, seed)),
                args.repeats,
                1,
            )
        )
    for chunk in args.chunk_sizes:
        cases.append(
            (
                "scan",
                f"odyssey torch chunk={chunk}",
                target,
                lambda c=chunk: scan_step(chunked_with(chunk_size=c), scan_inputs(batch, target, seed)),
                args.repeats,
                1,
            )
        )
    cases.append(
        (
            "scan",
            "odyssey torch plain autograd",
            target,
            lambda: scan_step(chunked_with(recompute_backward=False), scan_inputs(batch, target, seed)),
            args.repeats,
            1,
        )
    )
    hf_config = MambaConfig(
        hidden_size=HIDDEN, state_size=STATE, expand=EXPAND, num_hidden_layers=LAYERS, vocab_size=VOCAB
    )
    baseline_model_lengths = [*args.baseline_lengths, *([target] if args.baseline_at_target else [])]
    for length in baseline_model_lengths:
        cases.append(
            (
                "model",
                "transformers MambaForCausalLM",
                length,
                lambda n=length: model_step(MambaForCausalLM(hf_config).train(), batch, n, VOCAB, seed),
                baseline_repeats(length),
                0,
            )
        )
    for length in args.baseline_lengths:
        cases.append(
            (
                "scan",
                "transformers eager",
                length,
                lambda n=length: scan_step(transformers_scan(), scan_inputs(batch, n, seed)),
                baseline_repeats(length),
                0,
            )
        )
        cases.append(
            (
                "mixer",
                "transformers MambaMixer",
                length,
                lambda n=length: mixer_step(MambaMixer(hf_config, layer_idx=0).train(), batch, n, seed),
                baseline_repeats(length),
                0,
            )
        )
    try:
        from odyssey.models import EHRMambaConfig, EHRMambaForPretraining
        from odyssey.models.mixer import EHRMambaMixer
    except ImportError as exc:  # the model package is built in parallel; the scan numbers stand alone
        return cases, f"unavailable: {exc}"
    ours = EHRMambaConfig.from_size("tiny", vocab_size=VOCAB, embedding_dropout=0.0)

    def our_mixer(length: int) -> Callable[[], None]:
        mixer = EHRMambaMixer(ours, layer_idx=0)
        mixer.reset_ssm_parameters(ours)
        return mixer_step(mixer.train(), batch, length, seed)

    for length in [*args.baseline_lengths, target]:
        cases.append(
            ("mixer", "odyssey EHRMambaMixer", length, lambda n=length: our_mixer(n), args.repeats, 1)
        )
        cases.append(
            (
                "model",
                "odyssey EHRMambaForPretraining",
                length,
                lambda n=length: model_step(EHRMambaForPretraining(ours).train(), batch, n, VOCAB, seed),
                args.repeats,
                1,
            )
        )
    return cases, "measured"


def compare(results: list[dict], threads: int, target: int) -> list[dict]:
    """Ours against transformers at equal lengths, and at the target length against the extrapolation."""

    def seconds(kind: str, name: str) -> dict[int, float]:
        return {
            r["length"]: r["median_s"]
            for r in results
            if r["kind"] == kind and r["name"] == name and r["threads"] == threads
        }

    comparisons = []
    for kind, baseline, ours_name in [
        ("scan", "transformers eager", "odyssey torch"),
        ("mixer", "transformers MambaMixer", "odyssey EHRMambaMixer"),
        ("model", "transformers MambaForCausalLM", "odyssey EHRMambaForPretraining"),
    ]:
        base, mine = seconds(kind, baseline), seconds(kind, ours_name)
        if not base or not mine:
            continue
        entry = {"kind": kind, "threads": threads, "baseline": baseline, "ours": ours_name, "same_length": {}}
        for length in sorted(set(base) & set(mine)):
            entry["same_length"][length] = {
                "baseline_s": base[length],
                "ours_s": mine[length],
                "speedup": base[length] / mine[length],
            }
        if target in mine:
            measured_target = target in base
            projected = (
                {"seconds": base[target], "method": "measured"}
                if measured_target
                else extrapolate(base, target)
            )
            entry["target"] = {
                "length": target,
                "ours_s": mine[target],
                "baseline_s": projected["seconds"],
                "baseline_how": projected["method"],
                "speedup": projected["seconds"] / mine[target],
            }
        comparisons.append(entry)
    return comparisons


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    results: list[dict] = []
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": "2-core CPU dev box",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
        "batch": args.batch,
        "length": args.length,
        "shape": {"hidden": HIDDEN, "dim": EXPAND * HIDDEN, "state": STATE, "layers": LAYERS, "vocab": VOCAB},
        "results": results,
    }
    target_inputs = scan_inputs(args.batch, args.length, args.seed)
    report["scan_saved_for_backward_MiB"] = {
        name: saved_for_backward_bytes(scan, target_inputs) / 2**20
        for name, scan in [
            ("odyssey torch (recomputing backward)", selective_scan_chunked),
            (
                "odyssey torch plain autograd",
                lambda **kw: selective_scan_chunked(**kw, recompute_backward=False),
            ),
        ]
    }
    comparisons = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        cases, report["odyssey_models"] = build_cases(args)
        for kind, name, length, build, repeats, warmup in tqdm(
            cases, desc=f"{threads} thread(s)", unit="case"
        ):
            timing = time_call(build(), repeats, warmup)
            results.append(
                {
                    "kind": kind,
                    "name": name,
                    "length": length,
                    "batch": args.batch,
                    "threads": threads,
                    **timing,
                }
            )
        comparisons += compare(results, threads, args.length)
    report["comparisons"] = comparisons
    report["load_average_after"] = os.getloadavg()

    print(
        f"\nbatch {args.batch}, hidden {HIDDEN}, dim {EXPAND * HIDDEN}, d_state {STATE}, {LAYERS} layers; "
        "forward + backward, median of repeats"
    )
    print(f"{'threads':>7} {'what':<6} {'implementation':<34} {'length':>6} {'median ms':>11} {'min ms':>10}")
    for r in results:
        print(
            f"{r['threads']:>7} {r['kind']:<6} {r['name']:<34} {r['length']:>6} "
            f"{r['median_s'] * 1e3:>11.1f} {r['min_s'] * 1e3:>10.1f}"
        )
    for c in comparisons:
        for length, v in c["same_length"].items():
            print(
                f"{c['threads']} thread(s) {c['kind']}: {c['ours']} vs {c['baseline']} at L={length}: "
                f"{v['speedup']:.1f}x faster"
            )
        if "target" in c:
            t = c["target"]
            print(
                f"{c['threads']} thread(s) {c['kind']}: at L={t['length']} ours {t['ours_s'] * 1e3:.0f} ms, "
                f"baseline {t['baseline_s']:.1f} s ({t['baseline_how']}): {t['speedup']:.0f}x"
            )
    for name, mib in report["scan_saved_for_backward_MiB"].items():
        print(f"scan memory kept for backward at L={args.length}, {name}: {mib:.1f} MiB (inputs excluded)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
