"""The `torch` backend: a chunked selective scan in plain PyTorch, fast on CPU and correct on CUDA.

Time is cut into segments of at most `chunk_size` steps. Inside a segment the recurrence
h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t has a closed form in terms of the cumulative
log-decay S_t = sum_{s<=t} delta_s A (per channel d and state n):

    h_t = exp(S_t) h_start + sum_{s<=t} exp(S_t - S_s) x_s,        x_s = delta_s u_s B_s

which we evaluate with two cumulative sums by factoring exp(S_t - S_s) = E_t / E_s with
E_t = exp(S_t - m) and m = S_end / 2 (half the segment's total decay). Every exponent then lies in
[-R/2, R/2] where R bounds the segment's total |delta A|; the segment planner cuts segments so that
R/2 never exceeds `EXPONENT_LIMIT` (60: e^60 ~ 1e26, far from float32 overflow), so no intermediate
can overflow whatever the inputs. A single step needs no factoring (E = 1), so any decay is exact.
The (batch, dim, N) state is carried from segment to segment; memory is O(batch*dim*chunk*N).

The backward pass is a custom autograd Function: the forward keeps only the states at segment
starts; the backward walks segments from last to first, recomputes each segment's states and
runs the adjoint recurrence g_h_t = C_t g_y_t + exp(delta_{t+1} A) g_h_{t+1} in the same closed form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Fastest of 32/64/128/256 on the 2-core CPU dev box (benchmarks/scan_cpu.py): longer segments spill
# the (batch, dim, N, chunk) temporaries out of L2 without saving work.
DEFAULT_CHUNK_SIZE = 64
EXPONENT_LIMIT = 60.0


def _plan_segments(delta: torch.Tensor, A: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
    """Cut [0, L) into segments of <= chunk_size steps whose factored exponents stay within the limit.

    `delta` is the effective step (batch, dim, L) in float32. The decay range of a segment for channel
    d is at most max_n |A[d, n]| * sum_t |delta_t|. When all decays are contractions (delta >= 0,
    A <= 0) S is monotone and the factored exponents are within R/2; otherwise within 1.5 R.
    """
    length = delta.shape[-1]
    if length == 0:
        return []
    with torch.no_grad():
        monotone = bool((delta.min() >= 0) & (A.max() <= 0)) if delta.numel() else True
        range_limit = 2.0 * EXPONENT_LIMIT if monotone else EXPONENT_LIMIT / 1.5
        rate = delta.abs() * A.abs().amax(dim=1)[None, :, None]  # (batch, dim, L) decay per step bound
        n_chunks = math.ceil(length / chunk_size)
        padded = F.pad(rate, (0, n_chunks * chunk_size - length))
        chunk_range = padded.view(*rate.shape[:2], n_chunks, chunk_size).sum(-1).amax(dim=(0, 1))
        chunk_ok = (chunk_range <= range_limit).tolist()
        step_bound = None
    segments: list[tuple[int, int]] = []
    for index, ok in enumerate(chunk_ok):
        start, end = index * chunk_size, min((index + 1) * chunk_size, length)
        if ok:
            segments.append((start, end))
            continue
        if step_bound is None:  # conservative per-step bound, fetched only when a chunk is too steep
            step_bound = rate.amax(dim=(0, 1)).double().cpu().tolist()
        seg_start, acc = start, 0.0
        for t in range(start, end):
            if t > seg_start and acc + step_bound[t] > range_limit:
                segments.append((seg_start, t))
                seg_start, acc = t, 0.0
            acc += step_bound[t]
        segments.append((seg_start, end))
    return segments


# Layout inside this module: time innermost. dt, u: (batch, G, dim/G, L); A: (G, dim/G, N, 1);
# B, C: (batch, G, N, L); states of a segment: (batch, G, dim/G, N, T). Sums over N then run
# across contiguous time rows, and B, C keep the layout the caller gives them.


def _segment_states(dt, du, A, B_seg, h_start):
    """States of one segment in closed form, differentiable by plain autograd.

    dt, du: (batch, G, dim/G, T); A: (G, dim/G, N, 1); B_seg: (batch, G, 1, N, T);
    h_start: (batch, G, dim/G, N). Returns H (batch, G, dim/G, N, T).
    """
    steps = torch.cumsum(dt, dim=-1).unsqueeze(-2)  # (batch, G, dim/G, 1, T)
    total = steps[..., -1:]
    reference = total if steps.shape[-1] == 1 else 0.5 * total
    # exp(-(S - m)) rather than 1 / E: the derivative of a division squares E, which can overflow
    E = torch.exp((steps - reference) * A)
    inverse_E = torch.exp((reference - steps) * A)
    x = du.unsqueeze(-2) * B_seg
    return E * (torch.cumsum(x * inverse_E, dim=-1) + torch.exp(reference * A) * h_start.unsqueeze(-1))


def _flip_cumsum(v: torch.Tensor) -> torch.Tensor:
    return torch.flip(torch.cumsum(torch.flip(v, (-1,)), dim=-1), (-1,))


def _segment_states_fast(dt_seg, du_seg, A, B_seg, h_start):
    """`_segment_states` without autograd, reusing buffers in place; also returns the factors.

    Returns H, x = du * B, E = exp(S - m), 1/E (all (batch, G, dim/G, N, T)), E at the last step
    and exp(S_0), the first step's decay (both (batch, G, dim/G, N)).
    """
    steps = torch.cumsum(dt_seg, dim=-1).unsqueeze(-2)
    total = steps[..., -1:]
    reference = total if steps.shape[-1] == 1 else 0.5 * total
    E = torch.exp((steps - reference) * A)
    inverse_E = torch.reciprocal(E)  # exact enough: E lies in [e^-60, e^60]
    last_E = torch.exp((total - reference) * A)[..., 0]  # 1 for a single step
    first_decay = torch.exp(steps[..., :1] * A)[..., 0]
    x = du_seg.unsqueeze(-2) * B_seg
    H = torch.cumsum(x * inverse_E, dim=-1)
    if h_start is not None:
        H.add_(torch.exp(reference * A) * h_start.unsqueeze(-1))
    H.mul_(E)
    return H, x, E, inverse_E, last_E, first_decay


class _ChunkedScan(torch.autograd.Function):
    """Core scan: (dt, u, A, B, C) in the grouped layout -> (y, last_state); recomputing backward."""

    @staticmethod
    def forward(ctx, dt, u, A, B, C, segments):
        batch, groups, per_group, length = dt.shape
        du = dt * u
        y = dt.new_empty(batch, groups, per_group, length)
        h = None  # zero state before the first step
        starts = []
        for start, end in segments:
            starts.append(h)
            H = _segment_states_fast(
                dt[..., start:end], du[..., start:end], A, B[:, :, None, :, start:end], h
            )[0]
            h = H[..., -1].clone()  # a copy, so the saved start states do not pin whole segments
            y[..., start:end] = H.mul_(C[:, :, None, :, start:end]).sum(-2)
        if h is None:
            h = dt.new_zeros(batch, groups, per_group, A.shape[-2])
        ctx.segments = segments
        ctx.starts = len(starts)
        ctx.save_for_backward(dt, u, A, B, C, *[s for s in starts if s is not None])
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        dt, u, A, B, C, *saved_starts = ctx.saved_tensors
        starts = [None, *saved_starts][: ctx.starts]
        du = dt * u
        grad_dt = torch.empty_like(dt)
        grad_du = torch.empty_like(dt)
        grad_A = torch.zeros_like(A)
        grad_B = torch.empty_like(B)
        grad_C = torch.empty_like(C)
        if grad_y is None:
            grad_y = torch.zeros_like(dt)
        # carry = exp(delta_next A) * g_h_next: the adjoint flowing into a segment's last step from the right
        batch, groups, per_group, _ = dt.shape
        carry = grad_last if grad_last is not None else dt.new_zeros(batch, groups, per_group, A.shape[-2])
        for (start, end), h_start in zip(reversed(ctx.segments), reversed(starts), strict=True):
            dt_seg, du_seg = dt[..., start:end], du[..., start:end]
            B_seg, C_seg = B[:, :, None, :, start:end], C[:, :, None, :, start:end]
            gy = grad_y[..., start:end].unsqueeze(-2)
            H, x, E, inverse_E, last_E, first_decay = _segment_states_fast(dt_seg, du_seg, A, B_seg, h_start)
            # g_h_t = (1/E_t) [ sum_{s>=t} E_s C_s g_y_s + E_last carry ]
            grad_H = _flip_cumsum(E.mul_(C_seg).mul_(gy))
            grad_H.add_((last_E * carry).unsqueeze(-1)).mul_(inverse_E)
            carry = first_decay * grad_H[..., 0]
            grad_C[..., start:end] = (gy * H).sum(2)
            grad_B[..., start:end] = (grad_H * du_seg.unsqueeze(-2)).sum(2)
            grad_du[..., start:end] = (grad_H * B_seg).sum(-2)
            # d loss / d (delta_t A) = g_h_t * exp(delta_t A) h_{t-1} = g_h_t * (h_t - x_t)
            g_log_decay = torch.sub(H, x, out=x).mul_(grad_H)
            grad_dt[..., start:end] = (g_log_decay * A).sum(-2)
            grad_A += g_log_decay.mul_(dt_seg.unsqueeze(-2)).sum(dim=(0, -1)).unsqueeze(-1)
        grad_dt = grad_dt + grad_du * u
        grad_u = grad_du * dt
        return grad_dt, grad_u, grad_A, grad_B, grad_C, None


def _scan_plain_autograd(dt, u, A, B, C, segments):
    """The same closed form under plain autograd (keeps every segment's intermediates); for measurement."""
    batch, groups, per_group, _ = dt.shape
    du = dt * u
    h = dt.new_zeros(batch, groups, per_group, A.shape[-2])
    ys = []
    for start, end in segments:
        H = _segment_states(dt[..., start:end], du[..., start:end], A, B[:, :, None, :, start:end], h)
        ys.append((H * C[:, :, None, :, start:end]).sum(-2))
        h = H[..., -1]
    y = torch.cat(ys, dim=-1) if ys else dt.new_zeros(*dt.shape)
    return y, h


def _grouped(BC: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> contiguous (batch, G, N, L) in the compute dtype."""
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    return BC.to(dtype).contiguous()


def selective_scan_chunked(
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
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    recompute_backward: bool = True,
):
    """Selective scan with mamba-ssm's `selective_scan_fn` semantics.

    Math runs in float32 (float64 when u is float64, so gradcheck applies). Returns `out` in u's
    dtype, or `(out, last_state)` with last_state (batch, dim, N) in the compute dtype.
    `recompute_backward=False` runs the same closed form under plain autograd (more memory).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, dim, length = u.shape
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    Bg, Cg = _grouped(B, compute), _grouped(C, compute)
    groups = math.lcm(Bg.shape[1], Cg.shape[1])
    if dim % groups:
        raise ValueError(
            f"dim {dim} must be divisible by the groups of B ({Bg.shape[1]}) and C ({Cg.shape[1]})"
        )
    # B and C with different group counts are refined to a common grouping (still far below dim)
    Bg = Bg.repeat_interleave(groups // Bg.shape[1], dim=1) if Bg.shape[1] != groups else Bg
    Cg = Cg.repeat_interleave(groups // Cg.shape[1], dim=1) if Cg.shape[1] != groups else Cg
    u_compute = u.to(compute)
    dt = delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A_compute = A.to(compute)
    segments = _plan_segments(dt.detach(), A_compute.detach(), chunk_size)
    per_group = dim // groups
    args = (  # contiguous time rows: models hand over transposed (batch, length, dim) activations
        dt.reshape(batch, groups, per_group, length).contiguous(),
        u_compute.reshape(batch, groups, per_group, length).contiguous(),
        A_compute.reshape(groups, per_group, A.shape[-1], 1),
        Bg,
        Cg,
        segments,
    )
    if recompute_backward:
        y, last = _ChunkedScan.apply(*args)
    else:
        y, last = _scan_plain_autograd(*args)
    y = y.reshape(batch, dim, length)
    if D is not None:
        y = y + D.to(compute)[None, :, None] * u_compute
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    return (out, last.reshape(batch, dim, A.shape[-1])) if return_last_state else out
