"""GPU benchmark of the causal conv + SiLU kernels (`causal_conv.py`) at the lean mixer's layout.

At the pretraining benchmark's 2k shape (batch 32, 1,536 channels, length 2,048, bf16) the conv's
backward took 5.0 ms of an 85 ms training step (8 layers), 3.5x its forward (benchmarks/RESULTS.md). For each
tile configuration in `CONFIGS` this script first checks the Triton conv against the torch reference
(float32, every gradient, relative L2 error <= 1e-5, with and without a padding mask), then times the
median forward and forward+backward, and writes `conv_bench.json` to `$OUT` (or --out).

    python -m odyssey.kernels.conv_bench [--batch 32 --dim 1536 --length 2048] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from odyssey.kernels import causal_conv
from odyssey.kernels.bench import rel_err, time_ms, write_report

TOLERANCE = 1e-5
REPORT_NAME = "conv_bench.json"
# {} is the default (causal_conv's module constants); each other row overrides some of its tiles
CONFIGS = [
    {},
    {"seq_span": 512},
    {"seq_span": 2048},
    {"bwd_variant": "tile"},
]


def conv_inputs(batch: int, dim: int, length: int, dtype, device, seed: int = 0, masked: bool = False):
    """x as the lean mixer passes it: a channel-major (batch, dim, L) view of in_proj's (2 dim, batch L)
    output; the output gradient in the same layout; a padding mask whose second row starts late."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    xz = torch.randn(2 * dim, batch * length, generator=gen).to(device, dtype)
    x = xz[:dim].view(dim, batch, length).transpose(0, 1)
    weight = (0.5 * torch.randn(dim, 1, 4, generator=gen)).to(device)
    bias = (0.1 * torch.randn(dim, generator=gen)).to(device)
    dout = torch.randn(dim, batch * length, generator=gen).to(device, dtype).view(dim, batch, length).transpose(0, 1)
    mask = None
    if masked:
        mask = torch.ones(batch, length, device=device)
        mask[min(1, batch - 1), : length // 3] = 0
    return x, weight, bias, mask, dout


def forward_backward(conv, x, weight, bias, mask, dout):
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
    out = conv(leaves[0], leaves[1], leaves[2], mask)
    grads = torch.autograd.grad(out, leaves, dout)
    return out, grads


def check(batch: int, dim: int, length: int, device, masked: bool) -> dict:
    """The Triton conv against the torch reference in float32: output, dx, dweight, dbias."""
    x, weight, bias, mask, dout = conv_inputs(batch, dim, length, torch.float32, device, seed=1, masked=masked)
    out, grads = forward_backward(lambda *a: causal_conv.causal_conv1d(*a, backend="triton"), x, weight, bias, mask,
                                  dout)
    ref, ref_grads = forward_backward(causal_conv.causal_conv1d_torch, x.double(), weight.double(), bias.double(),
                                      None if mask is None else mask.double(), dout.double())
    errors = {"out": rel_err(out, ref)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("x", "weight", "bias"), grads, ref_grads, strict=True)})
    return {"masked": masked, "errors": errors, "passed": all(e <= TOLERANCE for e in errors.values())}


def measure(batch: int, dim: int, length: int, device, masked: bool, reps: int) -> dict:
    x, weight, bias, mask, dout = conv_inputs(batch, dim, length, torch.bfloat16, device, masked=masked)

    def fwd():
        with torch.no_grad():
            causal_conv.causal_conv1d(x, weight, bias, mask, backend="triton")

    def fwd_bwd():
        forward_backward(lambda *a: causal_conv.causal_conv1d(*a, backend="triton"), x, weight, bias, mask, dout)

    return {"fwd_ms": time_ms(fwd, reps), "fwd_bwd_ms": time_ms(fwd_bwd, reps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "shape": [args.batch, args.dim, args.length], "rows": []}
    for overrides in CONFIGS:
        causal_conv.TILE_OVERRIDES.clear()
        causal_conv.TILE_OVERRIDES.update(overrides)
        row = {"overrides": overrides}
        try:
            row["checks"] = [check(4, args.dim, args.length, device, masked) for masked in (False, True)]
            for masked in (False, True):
                row["masked" if masked else "unmasked"] = measure(args.batch, args.dim, args.length, device, masked,
                                                                  args.reps)
        except Exception as exc:  # a tile that does not compile is a result, not the end of the sweep
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    causal_conv.TILE_OVERRIDES.clear()
    print("report:", write_report(report, args.out, REPORT_NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
