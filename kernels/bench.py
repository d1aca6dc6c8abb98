"""Benchmark of the Triton selective scan against mamba-ssm and the torch backend (GPU only).

One run does, in order: the HBM copy floor; loading mamba-ssm's `selective_scan_fn` (built from its
sdist, see kernels/NOTES.md); correctness at full shapes against a float64 sequential scan (forward and
every gradient, bf16 and fp32); then median forward and forward+backward times and peak memory for
ours, mamba-ssm and the torch backend, with ratios; optionally a sweep of tile configurations.
The table is printed last and the full report written to `$OUT/kernels_bench.json` (or --out).

    python -m odyssey.kernels.bench --mamba-src .mamba_src/mamba_ssm-2.3.2.post1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOLERANCE = {torch.bfloat16: 5e-3, torch.float16: 5e-3, torch.float32: 1e-5}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    length: int
    dim: int
    d_state: int

    @property
    def elements(self) -> int:
        return self.batch * self.dim * self.length


SHAPES = {
    "b32_L2048_N16": Shape("b32_L2048_N16", 32, 2048, 1536, 16),
    "b8_L16384_N16": Shape("b8_L16384_N16", 8, 16384, 1536, 16),
    "b32_L2048_N64": Shape("b32_L2048_N64", 32, 2048, 1536, 64),
    # 1,056 programs of 32 channels: one wave of the sequential backward's 8 resident programs on 132 SMs
    "b22_L2048_N16": Shape("b22_L2048_N16", 22, 2048, 1536, 16),
    # the pretraining benchmark's scan at 16k (65,536 tokens a step)
    "b4_L16384_N16": Shape("b4_L16384_N16", 4, 16384, 1536, 16),
    # one long sequence a batch (pretraining at batch 1): 48 warps of channels, so the kernels' parallelism is in
    # pieces of time
    "b1_L65536_N16": Shape("b1_L65536_N16", 1, 65536, 1536, 16),
    "b1_L16384_N16": Shape("b1_L16384_N16", 1, 16384, 1536, 16),
}
ISSUE_SHAPES = ("b32_L2048_N16", "b8_L16384_N16", "b32_L2048_N64")  # the issue's, timed by default


def make_inputs(shape: Shape, dtype: torch.dtype, device, seed: int, groups: int = 0, channel_major: bool = False):
    """Inputs shaped like a Mamba block's call: softplus'd delta with a bias, S4D-real A, gated by z.

    `channel_major`: (batch, channels, L) views of (channels, batch * L) storage, as the lean mixer passes
    them (row strides batch * L, not L)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size, scale=1.0):
        values = torch.randn(*size, generator=gen) * scale
        if channel_major and len(size) == 3:
            batch, channels, length = size
            values = values.permute(1, 0, 2).reshape(channels, batch * length).view(channels, batch, length)
            return values.to(device).transpose(0, 1)
        return values.to(device)

    b, d, L, N = shape.batch, shape.dim, shape.length, shape.d_state
    bc_shape = (b, N, L) if groups == 0 else (b, groups, N, L)
    dt_init = torch.exp(torch.rand(d, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": randn(b, d, L).to(dtype),
        "delta": randn(b, d, L, scale=0.5).to(dtype),
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1).to(device),
        "B": randn(*bc_shape).to(dtype),
        "C": randn(*bc_shape).to(dtype),
        "D": randn(d).float(),
        "z": randn(b, d, L).to(dtype),
        "delta_bias": (dt_init + torch.log(-torch.expm1(-dt_init))).float().to(device),
    }


def _at_step(BC: torch.Tensor, dim: int, t: int) -> torch.Tensor:
    """B or C at time t as (batch, dim, N), a view for shared B/C (no (batch, dim, N, L) copy)."""
    if BC.dim() == 3:
        return BC[:, None, :, t].expand(BC.shape[0], dim, BC.shape[1])
    return BC[..., t].repeat_interleave(dim // BC.shape[1], dim=1)


def _group_sum(per_channel: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch, dim, N) per-channel contributions -> B/C's (batch, N) or (batch, G, N)."""
    if like.dim() == 3:
        return per_channel.sum(1)
    batch, dim, N = per_channel.shape
    return per_channel.view(batch, like.shape[1], dim // like.shape[1], N).sum(2)


@torch.no_grad()
def reference_fwd_bwd(inputs: dict, dout: torch.Tensor, softplus: bool = True):
    """Float64 sequential scan with a hand-written backward (memory: the states, not an autograd graph).

    Returns (out float64, grads dict float64). The same math as `kernels.reference`, whose autograd
    it matches (tests/kernels/test_triton_bench.py).
    """
    f64 = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    u, A, D, z = f64["u"], f64["A"], f64.get("D"), f64.get("z")
    batch, dim, length = u.shape
    raw = f64["delta"] + (f64["delta_bias"][None, :, None] if f64.get("delta_bias") is not None else 0.0)
    dt = F.softplus(raw) if softplus else raw
    Bf, Cf = f64["B"], f64["C"]
    h = u.new_zeros(batch, dim, A.shape[1])
    states, y = [], torch.empty_like(u)
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * _at_step(Bf, dim, t)
        states.append(h)
        y[:, :, t] = (h * _at_step(Cf, dim, t)).sum(-1)
    if D is not None:
        y = y + D[None, :, None] * u
    dout = dout.double()
    grads = {}
    if z is not None:
        sig = torch.sigmoid(z)
        out = y * z * sig
        grads["z"] = dout * y * sig * (1 + z * (1 - sig))
        dy = dout * z * sig
    else:
        out, dy = y, dout
    g = torch.zeros_like(h)
    du, ddt = torch.empty_like(u), torch.empty_like(u)
    dA = torch.zeros_like(A)
    dB = torch.empty(*f64["B"].shape, dtype=torch.float64, device=u.device)
    dC = torch.empty_like(dB)
    for t in reversed(range(length)):
        g = g + _at_step(Cf, dim, t) * dy[:, :, t, None]
        decay = torch.exp(dt[:, :, t, None] * A)
        h_prev = states[t - 1] if t > 0 else torch.zeros_like(h)
        gB = (g * _at_step(Bf, dim, t)).sum(-1)
        du[:, :, t] = dt[:, :, t] * gB
        g_hprev = g * decay * h_prev
        ddt[:, :, t] = u[:, :, t] * gB + (g_hprev * A).sum(-1)
        dA += (g_hprev * dt[:, :, t, None]).sum(0)
        dB[..., t] = _group_sum(g * (dt[:, :, t] * u[:, :, t])[:, :, None], f64["B"])
        dC[..., t] = _group_sum(states[t] * dy[:, :, t, None], f64["C"])
        g = g * decay
    if D is not None:
        du = du + D[None, :, None] * dy
        grads["D"] = (dy * u).sum((0, 2))
    if softplus:
        ddt = ddt * torch.sigmoid(raw)
    if f64.get("delta_bias") is not None:
        grads["delta_bias"] = ddt.sum((0, 2))
    grads.update(u=du, delta=ddt, A=dA, B=dB, C=dC)
    return out, grads


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    if not torch.isfinite(ours).all():
        return float("inf")
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_scan(fn, inputs: dict, dout: torch.Tensor | None):
    """Forward (and backward when dout is given) through a selective_scan_fn-like function."""
    leaves = {k: v.detach().requires_grad_(dout is not None) for k, v in inputs.items()}
    out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
             z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True)
    if dout is None:
        return out, None
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], dout)
    return out, dict(zip(names, grads, strict=True))


def check(fn, shape: Shape, dtype, device, seed: int, groups: int = 0, channel_major: bool = False) -> dict:
    inputs = make_inputs(shape, dtype, device, seed, groups, channel_major)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(shape.batch, shape.dim, shape.length, generator=gen).to(device, dtype)
    out, grads = run_scan(fn, inputs, dout)
    ref_out, ref_grads = reference_fwd_bwd(inputs, dout)
    errors = {"out": rel_err(out, ref_out)}
    errors.update({k: rel_err(grads[k], ref_grads[k]) for k in GRAD_NAMES})
    del ref_grads, grads
    torch.cuda.empty_cache()
    tol = TOLERANCE[dtype]
    return {"shape": shape.name, "dtype": str(dtype), "groups": groups, "channel_major": channel_major, "errors": errors,
            "tolerance": tol, "passed": all(e <= tol for e in errors.values())}


def copy_bandwidth(device) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(512 * 2**20, device=device)  # 2 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def peak_mib(fn) -> float:
    """Peak memory allocated during fn beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(fn, shape: Shape, dtype, device, reps_fwd: int, reps_bwd: int) -> dict:
    inputs = make_inputs(shape, dtype, device, seed=7)
    dout = torch.randn(shape.batch, shape.dim, shape.length, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            run_scan(fn, inputs, None)

    def fwd_bwd():
        run_scan(fn, inputs, dout)

    result = {"fwd_ms": time_ms(fwd, reps_fwd), "fwd_bwd_ms": time_ms(fwd_bwd, reps_bwd)}
    result["fwd_peak_mib"] = peak_mib(fwd)
    result["fwd_bwd_peak_mib"] = peak_mib(fwd_bwd)
    return result


def floors(shape: Shape, dtype, bandwidth: float) -> dict:
    """Fewest HBM bytes: forward reads u, delta, z, B, C and writes out; backward also reads dout and
    writes du, ddelta, dz, dB, dC (B/C terms are N/dim of the rest)."""
    item = torch.tensor([], dtype=dtype).element_size()
    bc = shape.batch * shape.d_state * shape.length * item
    fwd_bytes = 4 * shape.elements * item + 2 * bc
    bwd_bytes = fwd_bytes + 4 * shape.elements * item + 4 * bc
    return {"fwd_bytes": fwd_bytes, "fwd_bwd_bytes": fwd_bytes + bwd_bytes,
            "fwd_floor_ms": fwd_bytes / bandwidth * 1e3, "fwd_bwd_floor_ms": (fwd_bytes + bwd_bytes) / bandwidth * 1e3,
            "exps_fwd": shape.elements * shape.d_state}


SWEEP = {  # tile and variant overrides timed per shape with --sweep (keys: triton_scan.ScanConfig fields)
    # v10: the sequential forward is the default for d_state <= 16 with rows enough (S1, not S2); H200
    # 2026-11-27 22:14-22:36 UTC: S1 forward 1.56-1.58 ms (state loop 1.63), f+b 6.15-6.22 (6.67-6.70); 2- and 4-warp
    # programs 1.58 / 1.61; S2 10.7 ms (state loop 3.9); time loop software-pipelined through shared
    # memory 4.9 ms at S1; a channel on 2 / 4 lanes (seq_split) S1 1.97 / 1.57, S2 7.2 / 5.8; register
    # prefetch of the next block (seq_prefetch, now the default without stored states) S1 1.46 but f+b 6.65.
    # v11 (H200 22:42 UTC): the next block's B and C lines prefetched into L1 (seq_l1_prefetch, the default):
    # S1 forward 1.46 -> 0.91 ms, f+b 6.17 -> 5.94; S2 sequential 10.7 -> 5.2 ms (state loop 3.9), 2 / 4 lanes
    # 4.7. 22:47 UTC: 2 / 4 blocks ahead 0.93 / 0.95 ms at S1, with the u, delta, z rows 1.00 (not kept); S2
    # best sequential 4.2 ms (2 lanes, 4 blocks ahead, rows). Kept for the next run: prefetch on and off.
    # 22:52 UTC: the backward's next state index's B and C lines prefetched into L1 the same way: S1 f+b
    # 5.96 -> 6.14 ms, S2 14.99 -> 14.93, N 64 24.6 -> 25.3 (removed: its 16 warps per multiprocessor hide
    # those misses already, and the addresses cost 27 instructions per state index).
    # v12 (22:57 UTC): time cut into pieces, a program each (seq_segments; a first pass for each piece's end
    # state): S2 1 / 2 / 4 / 8 pieces 5.24 / 6.47 / 3.61 / 3.63 ms (state loop 3.94), S1 2 pieces 1.69 (1: 0.93).
    # Now the default picks the pieces (S2: 4).
    # v13 (H100, 2026-11-28 00:39-01:09 UTC): the sequential backward, a channel a thread, 6.75-6.90 ms
    # f+b at S1 against the state loop's 6.10 (chunk in 2 / 4 pieces 7.15 / 7.57; register caps spill);
    # S2 20.1 vs 15.0; one wave (b22) 4.37 vs 4.24. A channel on 2 lanes (seq_bwd_split 2, now the default
    # where the forward is sequential in one piece): S1 5.58 ms.
    # v14: softplus's log as lg2.approx in the backward kernels (approx_log, the default; False is v13's libdevice
    # logf) and in the forward ones (approx_log_fwd, off: ncu at S1, the sequential forward under gradients 0.90 ->
    # 1.15 ms with it); at S2 the sequential backward in 8 pieces of time (the default since v14; H200 03:12 UTC,
    # with approx_log everywhere: 4 / 8 / 16 pieces f+b 13.26 / 12.77 / 12.58 ms against the state loop's 14.59,
    # 16 pieces over mamba-ssm's peak memory)
    # (H200 03:17 UTC, f+b ms: S1 default 5.050, approx_log_fwd 5.271, no approx_log 5.121, state-loop backward
    # 5.901; S2 13.096, 12.940, 13.577, 14.902, 4 pieces 13.568.) The forward's register prefetch of the next
    # block's u and delta under gradients (seq_prefetch; 03:32 UTC, with a v14 default that had it off): S1 4.968
    # -> 5.016 ms, S2 12.889 -> 12.362, now the default in pieces; with approx_log_fwd too 5.007 / 12.274, alone
    # 5.282 / 12.737
    # v14e (03:51 UTC): the sequential backward's B / C rows read a step ahead (seq_bwd_bc_ahead), f+b: S1 5.052 ->
    # 4.867 ms (now the default in one piece of time), S2 in pieces 12.529 -> 12.730 (not taken there)
    # v15 (H200, 2026-11-28 05:25 UTC): the forward's B / C rows a step ahead (seq_bc_ahead, since removed) loses: S1 forward 0.92
    # -> 1.17 ms (f+b 4.79 -> 5.03; with approx_log_fwd 1.20 / 4.89), S2 3.62 -> 3.88 (f+b 12.36 -> 12.61; one
    # piece with the register prefetch 7.79 / 14.82, on 2 lanes 7.18 / 13.52). The backward's B / C ahead
    # re-checked: S1 off 5.01 (on 4.79), S2 on 12.55 (off 12.36).
    # The sequential backward's checkpoint reads past L1 (".cg"; 05:49 UTC): S1 f+b 4.91 -> 4.85 ms, S2 12.54 ->
    # 12.52, ncu S1 backward 3.82 -> 3.83 ms with L1 hit rate 60.8% -> 51.7%: the u, delta, dout, z rows do not miss
    # for want of L1 room (removed; kernels/NOTES.md v15)
    # v16 (session 12): the per-channel work of a block split between a channel's two lanes (seq_bwd_share, now the
    # default in one piece of time). H200, f+b: 07:13 UTC S1 4.884 -> 4.680 ms, S2 in 8 pieces 12.529 -> 12.634; 07:34
    # UTC (the final form, alternating rows) S1 4.708 / 4.762 against 4.867 / 4.891 unshared. Register caps on it
    # (07:19 UTC; 144 compiles without spills, 14 resident warps) 144 / 136 / 128: 4.96 / 5.12 / 5.48 against 4.79;
    # the forward on 2 lanes a channel (seq_split 2) 0.92 -> 1.16 ms
    # The adjoint carried as g-hat = decay * g under a 168-register cap (seq_bwd_ghat; 07:48 UTC, alternating rows):
    # S1 f+b 4.700 / 4.709 -> 4.628 / 4.570 ms, now the default with the shared per-channel work
    # v16c (session 13, 09:24 UTC, medians of 3 alternating rounds, f+b): constant row strides S1 4.653 -> 4.655 ms,
    # S2 12.522 -> 12.447; g-hat off at S1 4.764; at S2 shared work + g-hat 12.435, with the constant strides 12.322
    # (all three now the defaults wherever a channel is on two lanes)
    "b32_L2048_N16": [{}],
    # The forward's first pass in parts a piece (seq_first_pass_parts; 96 registers against the second pass's 134)
    # and softplus's lg2.approx in that pass alone (approx_log_first_pass), the backward's first pass under a register
    # cap of its own (seq_bwd_first_pass_maxnreg). v18 (session 14, medians of 3 alternating rounds, fwd / f+b ms),
    # 11:55 UTC: 1 part 3.615 / 12.220; 2 parts 3.375 / 11.925; 4 parts 3.308 / 11.833; approx log 3.580 / 12.110,
    # with 2 parts 3.337 / 11.859; backward cap 64 / 80: f+b 12.149 / 12.154. 12:10 UTC: 4 parts 3.310 / 11.877,
    # with approx log 3.276 / 11.806; 8 parts 3.227 / 11.744, with approx log 3.203 / 11.732 (now the default);
    # 1 part 3.608 / 12.155
    "b8_L16384_N16": [{}, {"seq_first_pass_parts": 4, "approx_log_first_pass": False},
                      {"seq_first_pass_parts": 1, "approx_log_first_pass": False}],
    "b22_L2048_N16": [{}, {"bwd_variant": "state_loop"}],
    # pieces of time at the pretraining benchmark's 16k shape (H200, session 13, 09:41 UTC, f+b medians of 2: default,
    # 8 and 8 pieces, 6.187 ms; forward 4 / 16 pieces 7.072 / 6.188; backward 4 / 16 pieces 6.154 / 6.162)
    # v18 (as above at S2), 11:55 UTC: 1 part 1.815 / 6.199; 2 parts 1.787 / 6.185; 4 parts 1.716 / 6.105; 2 parts
    # with approx log 1.771 / 6.153; backward cap 64: f+b 6.298
    "b4_L16384_N16": [{}, {"seq_first_pass_parts": 4, "approx_log_first_pass": False},
                      {"seq_first_pass_parts": 8, "approx_log_first_pass": False},
                      {"seq_first_pass_parts": 1, "approx_log_first_pass": False}],
    # N 64 memory (peak above mamba-ssm's: the float32 states saved every 64 steps): states every 128
    # steps (no lane flip there: it needs 64-step tiles), B/C read as they come instead of float32 copies.
    # H200, 2026-11-27 18:29 UTC: chunk 128 1060 MiB (1028 with bc_f32 off, under mamba-ssm's 1032) but 2.0x
    # slower forward and backward (48.1 vs 24.7 ms); bc_f32 off alone 1220 MiB, +8% f+b. Not adopted.
    # v19: states kept every 4 chunks (the default at d_state > 16), the backward recomputing the other three a group
    # at a time (64-step tiles and the lane flip kept); every 2 and every chunk (before) for comparison
    "b32_L2048_N64": [{}, {"states_every": 2}, {"states_every": 1}],
    # v20: 32 pieces each way (the default at 65,536 steps, pretraining at batch 1 265k -> 755k tokens/s) against the
    # state-loop kernels it replaced, and piece counts around it (untimed at kernel level)
    "b1_L65536_N16": [{}, {"fwd_variant": "state_loop"}, {"seq_bwd_segments": 16}, {"seq_segments": 16},
                      {"seq_bwd_segments": 64}],
    # batch 1 at 16,384 steps still runs the state-loop kernels (8 pieces of 2,048 steps are too few rows for the
    # sequential forward); pieces of 512 steps would bring in the sequential kernels
    "b1_L16384_N16": [{}, {"few_rows_min_piece_steps": 512}, {"fwd_variant": "seq", "seq_segments": 32},
                      {"fwd_variant": "seq", "seq_segments": 32, "seq_bwd_segments": 16},
                      {"fwd_variant": "seq", "seq_segments": 32, "seq_bwd_segments": 32}],
}


def median_of_rounds(timings: list[dict]) -> dict:
    """Per-key median of several `measure` results of one configuration, with its forward+backward times by
    round (`fwd_bwd_rounds_ms`)."""
    keys = timings[0].keys()
    summary = {key: float(statistics.median(t[key] for t in timings)) for key in keys}
    summary["fwd_bwd_rounds_ms"] = [t["fwd_bwd_ms"] for t in timings]
    return summary


# The sweep also compares each row with the default at the shape's length minus this: an odd length ending inside a
# 4-step block. The kernels are specialized on whether lengths and strides divide by 16, and the first form of v16
# was wrong only when they did not (kernels/NOTES.md v16), which full-shape agreement cannot see.
ODD_LENGTH_CUT = 3


def _agreement(triton_scan, overrides: dict, inputs: dict, dout, reference) -> float:
    """Worst relative difference of the outputs and every gradient from `reference`, under `overrides`."""
    triton_scan.CONFIG_OVERRIDES.clear()
    triton_scan.CONFIG_OVERRIDES.update(overrides)
    out, grads = run_scan(triton_scan.selective_scan_triton, inputs, dout)
    ref_out, ref_grads = reference
    return max([rel_err(out, ref_out)] + [rel_err(grads[k], ref_grads[k]) for k in GRAD_NAMES])


def sweep_shape(triton_scan, shape: Shape, device, variants: list[dict], rounds: int = 1) -> list[dict]:
    """Time each override set; each must agree with the default configuration's outputs and gradients, at the
    shape and at an odd length (ODD_LENGTH_CUT steps shorter): `agreement` is the worse of the two.

    With `rounds` > 1 the variants are timed in turn, round after round, and each row reports the medians:
    a drift of the card's clocks during the sweep then reaches every row alike (single timings of one
    configuration varied by 2-4% within a call, kernels/NOTES.md v16)."""
    cases = []
    for case in (shape, Shape(f"{shape.name}_odd", shape.batch, shape.length - ODD_LENGTH_CUT, shape.dim,
                              shape.d_state)):
        inputs = make_inputs(case, torch.bfloat16, device, seed=11)
        dout = torch.randn(case.batch, case.dim, case.length, device=device, dtype=torch.bfloat16)
        triton_scan.CONFIG_OVERRIDES.clear()
        cases.append((inputs, dout, run_scan(triton_scan.selective_scan_triton, inputs, dout)))
    rows, timings = [], []
    for overrides in variants:
        try:
            full, odd = (_agreement(triton_scan, overrides, *case) for case in cases)
            rows.append({"overrides": overrides, "agreement": max(full, odd), "agreement_full": full,
                         "agreement_odd_length": odd})
            timings.append([])
        except Exception as exc:  # a configuration that fails to compile or run is reported, not fatal
            rows.append({"overrides": overrides, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            timings.append(None)
        torch.cuda.empty_cache()
    cases.clear()  # the timings make their own inputs
    for _ in range(rounds):
        for row, samples in zip(rows, timings, strict=True):
            if samples is None:
                continue
            triton_scan.CONFIG_OVERRIDES.clear()
            triton_scan.CONFIG_OVERRIDES.update(row["overrides"])
            samples.append(measure(triton_scan.selective_scan_triton, shape, torch.bfloat16, device, 20, 6))
            torch.cuda.empty_cache()
    for row, samples in zip(rows, timings, strict=True):
        if samples:
            row.update(median_of_rounds(samples) if rounds > 1 else samples[0])
        print("sweep", shape.name, json.dumps(row), flush=True)
    triton_scan.CONFIG_OVERRIDES.clear()
    return rows


def pick_overrides(report: dict, max_disagreement: float = 1e-3, slack: float = 1.01) -> dict:
    """The sweep row to run end to end: lowest forward+backward time at the sweep's first shape among
    rows that agree with the default configuration and, at every other shape where they were timed,
    are no slower than the default row there (within `slack`, run-to-run spread; ties go to the
    earlier row; {} is the default)."""
    sweep = report.get("sweep") or {}
    if not sweep:
        return {}
    shapes = list(sweep)

    def timed(row):
        return "error" not in row and row.get("agreement", float("inf")) <= max_disagreement

    defaults = {name: next((r for r in rows if r["overrides"] == {} and timed(r)), None)
                for name, rows in sweep.items()}
    best, best_ms = {}, float("inf")
    for row in sweep[shapes[0]]:
        if not timed(row):
            continue
        no_slower = True
        for name in shapes[1:]:
            other = next((r for r in sweep[name] if r["overrides"] == row["overrides"]), None)
            if other is not None and defaults[name] is not None and (
                    not timed(other) or other["fwd_bwd_ms"] > slack * defaults[name]["fwd_bwd_ms"]):
                no_slower = False
        if no_slower and row["fwd_bwd_ms"] < best_ms:
            best, best_ms = row["overrides"], row["fwd_bwd_ms"]
    return best


def write_report(report: dict, out_dir: str, name: str = "kernels_bench.json") -> str:
    """Written after the timings and again at the end, so a run cut short keeps what it measured."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(path + ".tmp", path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mamba-src", default=".mamba_src/mamba_ssm-2.3.2.post1")
    parser.add_argument("--shapes", default=",".join(ISSUE_SHAPES))
    parser.add_argument("--sweep", action="store_true", help="time the SWEEP tile configurations at the first shape")
    parser.add_argument("--sweep-rounds", type=int, default=1,
                        help="time the sweep's rows in turn this many times and report medians")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--torch-shapes", default="b32_L2048_N16",
                        help="shapes at which the (slow) torch backend is timed")
    parser.add_argument("--check-backends", default="triton", help="comma list, e.g. triton,mamba_ssm")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--pick", metavar="REPORT_JSON",
                        help="print the sweep overrides pick_overrides chooses from a report, as JSON, and exit")
    args = parser.parse_args(argv)
    if args.pick:
        with open(args.pick) as handle:
            print(json.dumps(pick_overrides(json.load(handle))))
        return 0
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    from odyssey.kernels import triton_scan

    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import triton

    report["triton"] = triton.__version__
    bandwidth = copy_bandwidth(device)
    report["copy_bandwidth_TBps"] = bandwidth / 1e12
    print(f"device {report['device']}  copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    backends = {"triton": triton_scan.selective_scan_triton}
    try:
        sys.path.insert(0, os.path.abspath(args.mamba_src))
        from odyssey.kernels.mamba_ssm_backend import load_mamba_ssm_scan

        backends["mamba_ssm"] = load_mamba_ssm_scan()
    except Exception as exc:  # report and go on without the baseline
        report["mamba_ssm_error"] = f"{type(exc).__name__}: {exc}"
        print("mamba-ssm unavailable:", report["mamba_ssm_error"], flush=True)
    try:
        from odyssey.kernels.chunked import selective_scan_chunked

        backends["torch"] = selective_scan_chunked
    except ImportError:
        pass

    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    checks = []
    if not args.skip_check:
        plan = [(shapes[0], torch.bfloat16, 0, False), (shapes[0], torch.float32, 0, False),
                (shapes[0], torch.bfloat16, 4, False)]
        for shape in shapes[1:]:
            # N=64's float64 states at batch 32 would take 51 GB; its check runs at batch 8
            small = Shape(shape.name + "_b8", min(shape.batch, 8), shape.length, shape.dim, shape.d_state)
            plan.append((small, torch.bfloat16, 0, False))
        # the lean mixer's channel-major views, at a length that is a multiple of 8 but not of 16 (a row
        # stride Triton cannot specialise as 16-divisible) and at one that is
        for length in (1000, 1024):
            plan.append((Shape(f"lean_b4_L{length}", 4, length, 1536, 16), torch.bfloat16, 0, True))
        for shape, dtype, groups, channel_major in plan:
            for name in args.check_backends.split(","):
                if name not in backends or (name == "mamba_ssm" and groups):
                    continue
                t0 = time.time()
                result = check(backends[name], shape, dtype, device, seed=len(checks), groups=groups,
                               channel_major=channel_major)
                result["backend"] = name
                checks.append(result)
                worst = max(result["errors"], key=result["errors"].get)
                print(f"check {name:9s} {shape.name:18s} {str(dtype):15s} G={groups} "
                      f"{'PASS' if result['passed'] else 'FAIL'} worst {worst} {result['errors'][worst]:.2e} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        report["checks"] = checks
        if not all(c["passed"] for c in checks if c["backend"] == "triton"):
            print("triton correctness FAILED: timings follow but do not count", flush=True)

    timings = {}
    for shape in shapes:
        timings[shape.name] = {"floors": floors(shape, torch.bfloat16, bandwidth)}
        for name, fn in backends.items():
            if name == "torch" and shape.name not in args.torch_shapes.split(","):
                continue
            reps = (2, 2) if name == "torch" else (30, 10)
            try:
                timings[shape.name][name] = measure(fn, shape, torch.bfloat16, device, *reps)
            except torch.OutOfMemoryError as exc:
                timings[shape.name][name] = {"error": f"out of memory: {str(exc)[:120]}"}
            torch.cuda.empty_cache()
            print(shape.name, name, timings[shape.name][name], flush=True)
    report["timings"] = timings
    write_report(report, args.out)

    if args.sweep:
        report["sweep"] = {}
        for shape in shapes:
            report["sweep"][shape.name] = sweep_shape(triton_scan, shape, device, SWEEP.get(shape.name, []),
                                                      rounds=args.sweep_rounds)
            write_report(report, args.out)

    path = write_report(report, args.out)

    print(f"\n{'shape':16s} {'backend':10s} {'fwd ms':>8s} {'f+b ms':>8s} {'fwd/mamba':>9s} {'f+b/mamba':>9s} "
          f"{'fwd/floor':>9s} {'f+b/floor':>9s} {'peak MiB':>9s}")
    for shape_name, rows in timings.items():
        fl = rows["floors"]
        base = rows.get("mamba_ssm", {})
        for name, row in rows.items():
            if name == "floors" or "error" in row:
                continue
            r_f = row["fwd_ms"] / base["fwd_ms"] if "fwd_ms" in base else float("nan")
            r_b = row["fwd_bwd_ms"] / base["fwd_bwd_ms"] if "fwd_bwd_ms" in base else float("nan")
            print(f"{shape_name:16s} {name:10s} {row['fwd_ms']:8.3f} {row['fwd_bwd_ms']:8.3f} {r_f:9.2f} {r_b:9.2f} "
                  f"{row['fwd_ms'] / fl['fwd_floor_ms']:9.1f} {row['fwd_bwd_ms'] / fl['fwd_bwd_floor_ms']:9.1f} "
                  f"{row['fwd_bwd_peak_mib']:9.0f}")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
