"""Check scan variants against the float64 reference on the GPU (fp32 and bf16, every gradient), e.g.

    python -m odyssey.kernels.check_variant '{"bwd_variant": "seq"}'

at a few small shapes with odd lengths, groups, per-row lengths and a last-state gradient. Prints one
line per case and exits non-zero when one fails the issue's tolerance (fp32 1e-5, bf16 5e-3)."""

from __future__ import annotations

import json
import sys

import torch

from odyssey.kernels import triton_scan
from odyssey.kernels.reference import selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# batch, dim, length, d_state, groups, per-row lengths (length 1 at batch 16: with 2 rows, dC's 32 bf16 values
# missed 5e-3 by rounding alone)
CASES = [
    (16, 64, 1, 16, 0, False), (2, 64, 300, 16, 0, False), (3, 96, 129, 5, 3, False), (4, 64, 200, 16, 0, True),
    (2, 1536, 2048, 16, 0, False),
]


def _inputs(batch, dim, length, d_state, groups, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bc = (batch, d_state, length) if groups == 0 else (batch, groups, d_state, length)
    raw = {"u": torch.randn(batch, dim, length, generator=gen), "delta": torch.randn(batch, dim, length, generator=gen) * 0.5,
           "A": -torch.rand(dim, d_state, generator=gen) * 2 - 0.1, "B": torch.randn(*bc, generator=gen),
           "C": torch.randn(*bc, generator=gen), "D": torch.randn(dim, generator=gen),
           "z": torch.randn(batch, dim, length, generator=gen), "delta_bias": torch.randn(dim, generator=gen) * 0.5}
    return {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v).to(device).requires_grad_()
            for k, v in raw.items()}


def _rel(ours, ref):
    """Relative error; below a norm of 1 absolute (dA at length 1 is exactly 0: the state starts at zero,
    and ours is float32 rounding, ~1e-6)."""
    ours, ref = ours.double(), ref.double()
    return float("inf") if not torch.isfinite(ours).all() else ((ours - ref).norm() / ref.norm().clamp_min(1.0)).item()


def check(overrides: dict, device="cuda") -> bool:
    ok = True
    for index, (batch, dim, length, d_state, groups, ragged) in enumerate(CASES):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-3)):
            triton_scan.CONFIG_OVERRIDES.clear()
            triton_scan.CONFIG_OVERRIDES.update(overrides)
            x = _inputs(batch, dim, length, d_state, groups, dtype, device, index)
            exact = {k: v.detach().double().requires_grad_() for k, v in x.items()}
            lens = torch.randint(1, length + 1, (batch,), generator=torch.Generator().manual_seed(index)) if ragged else None
            if ragged:
                out, last = triton_scan.selective_scan_varlen_triton(*[x[k] for k in NAMES], delta_softplus=True,
                                                                     return_last_state=True, seq_lens=lens.to(device))
                ref_outs, ref_lasts = [], []
                for row, n in enumerate(lens.tolist()):
                    part = {k: (v[row:row + 1, ..., :n] if k in ("u", "delta", "B", "C", "z") else v) for k, v in exact.items()}
                    o, s = selective_scan_reference(*[part[k] for k in NAMES], delta_softplus=True, return_last_state=True)
                    ref_outs.append(torch.nn.functional.pad(o, (0, length - n)))
                    ref_lasts.append(s)
                ref = (torch.cat(ref_outs), torch.cat(ref_lasts))
            else:
                out, last = triton_scan.selective_scan_triton(*[x[k] for k in NAMES], delta_softplus=True, return_last_state=True)
                ref = selective_scan_reference(*[exact[k] for k in NAMES], delta_softplus=True, return_last_state=True)
            gen = torch.Generator(device="cpu").manual_seed(99)
            w_out = torch.randn(out.shape, generator=gen).to(device).double()
            w_last = torch.randn(last.shape, generator=gen).to(device).double()
            g_ours = torch.autograd.grad((out.double() * w_out).sum() + (last.double() * w_last).sum(), [x[k] for k in NAMES])
            g_ref = torch.autograd.grad((ref[0] * w_out).sum() + (ref[1] * w_last).sum(), [exact[k] for k in NAMES])
            errors = {"out": _rel(out, ref[0]), "last": _rel(last, ref[1])}
            errors.update({k: _rel(a, b) for k, a, b in zip(NAMES, g_ours, g_ref, strict=True)})
            worst = max(errors, key=errors.get)
            cfg = triton_scan.scan_config(d_state, dim // max(groups, 1), rows=batch * dim,
                                          multiprocessors=triton_scan._multiprocessors(out.device),
                                          dense_length=0 if ragged else length)
            passed = errors[worst] <= tol
            ok &= passed
            print(f"{'ok ' if passed else 'FAIL'} b{batch} d{dim} L{length} N{d_state} G{groups} ragged={ragged} {dtype}: "
                  f"worst {worst} {errors[worst]:.2e} (tol {tol:.0e}) backward {cfg.bwd_variant}",
                  flush=True)
    triton_scan.CONFIG_OVERRIDES.clear()
    return ok


if __name__ == "__main__":
    sys.exit(0 if check(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}) else 1)
