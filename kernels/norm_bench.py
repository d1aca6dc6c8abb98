"""GPU check and timing of the fused RMSNorm (`rms_norm.py`) at the pretraining benchmark's shape.

A block's norm reads the float32 residual stream (65,536 tokens x 768 at 2k) and feeds in_proj under bf16
autocast. Compared in one run: the Triton kernels writing bfloat16, and torch's float32 `F.rms_norm`
followed by the cast autocast makes (the previous path). First both are checked against float64 (float32
output, every gradient; bf16 output within one rounding), then median forward and forward+backward
times go to `norm_bench.json` in `$OUT` (or --out).

    python -m odyssey.kernels.norm_bench [--rows 65536 --features 768]
"""

from __future__ import annotations

import argparse
import os

import torch

from odyssey.kernels.bench import rel_err, time_ms, write_report
from odyssey.kernels.rms_norm import rms_norm

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8}


def forward_backward(backend, x, weight, dy, out_dtype):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = rms_norm(x, weight, 1e-5, out_dtype, backend=backend)
    return (y, *torch.autograd.grad(y, (x, weight), dy))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--features", type=int, default=768)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (3 * torch.randn(args.rows, args.features, generator=gen)).to(device)
    weight = (1 + 0.1 * torch.randn(args.features, generator=gen)).to(device)
    report = {"device": torch.cuda.get_device_name(0), "rows": args.rows, "features": args.features, "checks": [],
              "timings": {}}
    dy64 = torch.randn(args.rows, args.features, generator=gen).to(device, torch.float64)
    reference = forward_backward("torch", x.double(), weight.double(), dy64, torch.float64)
    for backend in ("triton", "torch"):
        for out_dtype in (torch.float32, torch.bfloat16):
            ours = forward_backward(backend, x, weight, dy64.to(out_dtype), out_dtype)
            errors = {name: rel_err(a, b) for name, a, b in zip(("y", "dx", "dweight"), ours, reference, strict=True)}
            passed = all(e <= TOLERANCE[out_dtype] for e in errors.values())
            report["checks"].append({"backend": backend, "out_dtype": str(out_dtype), "errors": errors,
                                     "passed": passed})
            print(f"check {backend:6s} {str(out_dtype):15s} {'PASS' if passed else 'FAIL'} {errors}", flush=True)
    dy = torch.randn(args.rows, args.features, generator=gen).to(device, torch.bfloat16)
    for backend in ("triton", "torch"):
        def fwd(backend=backend):
            with torch.no_grad():
                rms_norm(x, weight, 1e-5, torch.bfloat16, backend=backend)

        def fwd_bwd(backend=backend):
            forward_backward(backend, x, weight, dy, torch.bfloat16)

        report["timings"][backend] = {"fwd_ms": time_ms(fwd, args.reps), "fwd_bwd_ms": time_ms(fwd_bwd, args.reps)}
        print(backend, report["timings"][backend], flush=True)
    print("report:", write_report(report, args.out, "norm_bench.json"))
    return 0 if all(c["passed"] for c in report["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
