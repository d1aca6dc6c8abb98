"""GPU check and timing of the fused cross-entropy (`cross_entropy.py`) at the pretraining benchmark's shape.

The pretraining head gives bf16 logits, 65,536 tokens x 4,096 classes at 2k. Compared in one run: the Triton
kernels, and torch's `F.cross_entropy` on a float32 copy (the path before). Both are first checked against float64
(the loss, and the logits' gradient within bf16 rounding); then the median forward and forward+backward times go to
`loss_bench.json` in `$OUT` (or --out).

    python -m odyssey.kernels.loss_bench [--rows 65536 --vocab 4096]
"""

from __future__ import annotations

import argparse
import os

import torch

from odyssey.kernels.bench import peak_mib, rel_err, time_ms, write_report
from odyssey.kernels.cross_entropy import cross_entropy

LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 2**-8  # the gradient is written in bf16


def loss_and_grad(backend, logits, targets):
    leaf = logits.detach().requires_grad_()
    loss = cross_entropy(leaf, targets, backend=backend)
    return loss, torch.autograd.grad(loss, leaf)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (4 * torch.randn(args.rows, args.vocab, generator=gen)).to(device, torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=gen).to(device)
    targets[:: 64] = -100  # padding rows
    report = {"device": torch.cuda.get_device_name(0), "rows": args.rows, "vocab": args.vocab, "checks": [],
              "timings": {}}
    ref_loss, ref_grad = loss_and_grad("torch", logits.double(), targets)
    for backend in ("triton", "torch"):
        loss, grad = loss_and_grad(backend, logits, targets)
        errors = {"loss": rel_err(loss, ref_loss), "grad": rel_err(grad, ref_grad)}
        passed = errors["loss"] <= LOSS_TOLERANCE and errors["grad"] <= GRAD_TOLERANCE
        report["checks"].append({"backend": backend, "errors": errors, "passed": passed})
        print(f"check {backend:6s} {'PASS' if passed else 'FAIL'} {errors}", flush=True)
    del ref_grad
    for backend in ("triton", "torch"):
        def fwd(backend=backend):
            with torch.no_grad():
                cross_entropy(logits, targets, backend=backend)

        def fwd_bwd(backend=backend):
            loss_and_grad(backend, logits, targets)

        report["timings"][backend] = {"fwd_ms": time_ms(fwd, args.reps), "fwd_bwd_ms": time_ms(fwd_bwd, args.reps),
                                      "fwd_bwd_peak_mib": peak_mib(fwd_bwd)}
        print(backend, report["timings"][backend], flush=True)
    print("report:", write_report(report, args.out, "loss_bench.json"))
    return 0 if all(c["passed"] for c in report["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
