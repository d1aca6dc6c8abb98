"""The float64 sequential selective scan: the numerical oracle every backend is tested against.

Semantics follow mamba-ssm's `selective_scan_fn` (Mamba-1):

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t        (per channel d, state n)
    y_t    = sum_n C_t[n] * h_t[n] + D * u_t
    out    = y * silu(z)  when z is given

Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or (batch, G, N, L) with
dim divisible by G (channel d uses group d // (dim // G)); D, delta_bias (dim,).
Slow by design (a Python loop over time); for tests only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L) by repeating each group's channels."""
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(BC.shape[0], dim, BC.shape[1], BC.shape[2])
    if BC.dim() != 4:
        raise ValueError(f"B and C must be (batch, N, L) or (batch, G, N, L), got shape {tuple(BC.shape)}")
    groups = BC.shape[1]
    if dim % groups:
        raise ValueError(f"dim {dim} is not divisible by the number of groups {groups}")
    return BC.repeat_interleave(dim // groups, dim=1)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Sequential scan in float64; returns `out` (u's dtype) or `(out, last_state)`.

    `last_state` is (batch, dim, N) float32, as in mamba-ssm. Differentiable through autograd.
    """
    dtype_out = u.dtype
    u64, delta64, A64 = u.double(), delta.double(), A.double()
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta64 = delta64 + delta_bias.double()[None, :, None]
    if delta_softplus:
        delta64 = F.softplus(delta64)
    B64 = expand_groups(B.double(), dim)
    C64 = expand_groups(C.double(), dim)
    state = u64.new_zeros(batch, dim, A.shape[1])
    ys = []
    # unbind once: the backward of per-step indexing would rebuild a full-size gradient every step (O(L^2))
    steps = zip(delta64.unbind(-1), u64.unbind(-1), B64.unbind(-1), C64.unbind(-1), strict=True)
    for dt_t, u_t, B_t, C_t in steps:
        dt = dt_t[:, :, None]
        state = torch.exp(dt * A64) * state + dt * B_t * u_t[:, :, None]
        ys.append((state * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u64.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.double()[None, :, None] * u64
    if z is not None:
        y = y * F.silu(z.double())
    out = y.to(dtype_out)
    return (out, state.float()) if return_last_state else out
