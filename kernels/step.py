"""One recurrent step of the selective scan: the `selective_state_update` role for decoding and scoring.

Feeding a sequence token by token through `selective_state_update`, starting from a zero state (or
from the `last_state` a scan returned), gives the same outputs as scanning the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_step_groups(BC: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """(batch, N) or (batch, G, N) -> float32 (batch, dim, N) without copying shared values."""
    if BC.dim() == 2:
        return BC.float().unsqueeze(1).expand(BC.shape[0], dim, BC.shape[1])
    if BC.dim() == 3:
        groups = BC.shape[1]
        if dim % groups:
            raise ValueError(f"dim {dim} is not divisible by the {groups} groups of {name}")
        return BC.float().repeat_interleave(dim // groups, dim=1)
    raise ValueError(f"{name} must be (batch, N) or (batch, G, N), got shape {tuple(BC.shape)}")


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """Advance `state` (batch, dim, N) by one step in place and return y (batch, dim) in x's dtype.

    x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, G, N); D, dt_bias: (dim,).
    Math in float32; the state keeps its own dtype.
    """
    if state.dim() != 3:
        raise ValueError(f"state must be (batch, dim, N), got shape {tuple(state.shape)}")
    batch, dim, n_state = state.shape
    for name, tensor in (("x", x), ("dt", dt), ("z", z)):
        if tensor is not None and tuple(tensor.shape) != (batch, dim):
            raise ValueError(f"{name} must be (batch, dim) = {(batch, dim)}, got {tuple(tensor.shape)}")
    if tuple(A.shape) != (dim, n_state):
        raise ValueError(f"A must be (dim, N) = {(dim, n_state)}, got {tuple(A.shape)}")
    step = dt.float()
    if dt_bias is not None:
        step = step + dt_bias.float()
    if dt_softplus:
        step = F.softplus(step)
    B32 = _expand_step_groups(B, dim, "B")
    C32 = _expand_step_groups(C, dim, "C")
    x32 = x.float()
    decay = torch.exp(step.unsqueeze(-1) * A.float())
    new_state = decay * state.float() + (step * x32).unsqueeze(-1) * B32
    state.copy_(new_state)
    y = (new_state * C32).sum(-1)
    if D is not None:
        y = y + D.float() * x32
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
