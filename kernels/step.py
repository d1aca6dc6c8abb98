"""Recurrent steps of the selective scan, for decoding and incremental scoring.

- `selective_state_update`: one token of a batch of states (the mamba-ssm function's role). Feeding a
  sequence token by token, starting from a zero state (or from the `last_state` a scan returned), gives
  the same outputs as scanning the whole sequence.
- `conv_chunk` and `selective_chunk`: a few tokens of many rows of a state pool per launch, the conv and
  the scan halves of a Mamba layer's step (see the section comment below); Triton kernels on CUDA, torch
  loops elsewhere. Triton is imported only when a kernel is first needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .causal_conv import conv_weight_2d


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


# ---------------------------------------------------------------------------------------------------
# Several tokens of several pooled rows per launch: what incremental scoring runs per layer.
#
# A scorer keeps every patient's recurrent state in one pool (a row per patient) and advances a batch
# of rows over a short chunk of tokens: the new events, whose end state is written back to the pool,
# then the task's trailing prompt, which continues from that state without being written back. Both
# functions below read and write the pool rows in place through `slots`, so no gather/scatter copy of
# the state is made, and a chunk costs one launch per function however many tokens it holds.
#
# Tokens are token-major, (rows, count, channels) with any strides: the layout of a linear layer's
# output, so in_proj's and x_proj's outputs are passed as views. `active` (rows, count) marks real
# tokens; a padding token leaves the state alone and its output is 0. A row's state is written back
# only when it had at least one active token among the first `save_after`, so padding rows may name
# any slot, even one that a real row of the same batch also names.
# ---------------------------------------------------------------------------------------------------

CHUNK_BACKENDS = ("torch", "triton")
MAX_CONV_TAPS = 4  # the Triton conv keeps the window in four registers per channel
# Channels per program. Conv: pure elementwise work per channel. Scan: a (channels, N) state tile plus
# the (channels, rank) dt_proj tile; 32 x 16 and 32 x 64 floats over 4 warps stay well inside registers.
_CONV_BLOCK_D = 128
_SCAN_BLOCK_D = 32
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default threshold

_triton_kernels: dict[str, object] = {}


def _check_chunk(x: torch.Tensor, states: torch.Tensor, slots: torch.Tensor, active: torch.Tensor,
                 save_after: int, state_name: str) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"tokens must be (rows, count, channels), got shape {tuple(x.shape)}")
    rows, count, dim = x.shape
    if states.dim() != 3 or states.shape[1] != dim:
        raise ValueError(f"{state_name} must be (slots, {dim}, ...), got shape {tuple(states.shape)}")
    if tuple(slots.shape) != (rows,):
        raise ValueError(f"slots must be (rows,) = ({rows},), got shape {tuple(slots.shape)}")
    if tuple(active.shape) != (rows, count):
        raise ValueError(f"active must be (rows, count) = {(rows, count)}, got shape {tuple(active.shape)}")
    if not 0 <= save_after <= count:
        raise ValueError(f"save_after must lie in [0, {count}], got {save_after}")
    return rows, count, dim


def _resolve_chunk_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_chunk_available() else "torch"
    if backend not in CHUNK_BACKENDS:
        raise ValueError(f"unknown chunk backend {backend!r}; choose one of {('auto', *CHUNK_BACKENDS)}")
    return backend


def triton_chunk_available() -> bool:
    try:
        _build_triton_kernels()
    except Exception:  # no Triton, or one that cannot build here: the torch path serves
        return False
    return True


def _write_rows(states: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, changed: torch.Tensor) -> None:
    states[slots[changed]] = values[changed].to(states.dtype)


def conv_chunk(
    x: torch.Tensor,
    conv_states: torch.Tensor,
    slots: torch.Tensor,
    active: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    save_after: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal depthwise conv + SiLU over `count` tokens that continue pooled conv windows.

    x (rows, count, dim); conv_states (slots, dim, K), row `slots[r]` holding row r's last K conv inputs;
    slots (rows,) int64; active (rows, count); weight (dim, K) or (dim, 1, K); bias (dim,). The window
    after the first `save_after` tokens (default: all) is written back (see the section comment).
    Returns (rows, count, dim) contiguous, in x's dtype.
    """
    save_after = x.shape[1] if save_after is None else int(save_after)
    rows, count, dim = _check_chunk(x, conv_states, slots, active, save_after, "conv_states")
    weight = conv_weight_2d(weight, dim)
    if weight.shape[1] != conv_states.shape[2]:
        raise ValueError(f"conv_states hold {conv_states.shape[2]} inputs but the conv has {weight.shape[1]} taps")
    if _resolve_chunk_backend(backend, x.device) == "torch":
        return _conv_chunk_torch(x, conv_states, slots, active, weight, bias, save_after)
    taps = weight.shape[1]
    if taps > MAX_CONV_TAPS:
        raise ValueError(f"the Triton chunk conv takes at most {MAX_CONV_TAPS} taps, got {taps}")
    out = torch.empty(rows, count, dim, dtype=x.dtype, device=x.device)
    kernel = _build_triton_kernels()["conv"]
    grid = (-(-dim // _CONV_BLOCK_D), rows)
    kernel[grid](
        x, conv_states, slots, active, weight, bias if bias is not None else weight, out,
        dim, count, save_after,
        *x.stride(), *conv_states.stride(), *active.stride(), *weight.stride(), *out.stride(),
        TAPS=taps, HAS_BIAS=bias is not None, BLOCK_D=_CONV_BLOCK_D, num_warps=4,
    )
    return out


def _conv_chunk_torch(x, conv_states, slots, active, weight, bias, save_after):
    """The reference: one token at a time, as `EHRMambaMixer.step` does it."""
    rows, count, _ = x.shape
    keep = active.bool()
    weight = weight.float()
    window = conv_states.index_select(0, slots).float()
    changed = keep[:, :save_after].any(dim=1)
    outputs = []
    for t in range(count):
        shifted = torch.cat([window[..., 1:], x[:, t, :, None].float()], dim=-1)
        window = torch.where(keep[:, t, None, None], shifted, window)
        value = (window * weight).sum(-1)
        if bias is not None:
            value = value + bias.float()
        outputs.append(torch.where(keep[:, t, None], F.silu(value), 0.0))
        if t == save_after - 1:
            _write_rows(conv_states, slots, window, changed)
    if not outputs:
        return x.new_empty(rows, 0, x.shape[2])
    return torch.stack(outputs, dim=1).to(x.dtype)


def selective_chunk(
    ssm_states: torch.Tensor,
    slots: torch.Tensor,
    u: torch.Tensor,
    dt_low: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    active: torch.Tensor,
    save_after: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mamba-1 recurrence over `count` tokens that continue pooled SSM states, dt_proj folded in.

    ssm_states (slots, dim, N) float32; u, z (rows, count, dim); dt_low (rows, count, rank), the
    low-rank step that dt_proj (`dt_weight` (dim, rank), `dt_bias` (dim,)) lifts to
    delta = softplus(dt_weight @ dt_low + dt_bias); A = -exp(A_log) (dim, N); B, C (rows, count, N);
    D (dim,). Per token: h <- exp(delta A) h + delta B u, y = (C.h + D u) silu(z). The state after the
    first `save_after` tokens (default: all) is written back (see the section comment).
    Returns y (rows, count, dim) contiguous, in u's dtype.
    """
    save_after = u.shape[1] if save_after is None else int(save_after)
    rows, count, dim = _check_chunk(u, ssm_states, slots, active, save_after, "ssm_states")
    n_state = ssm_states.shape[2]
    rank = dt_low.shape[-1]
    if tuple(A_log.shape) != (dim, n_state):
        raise ValueError(f"A_log must be (dim, N) = {(dim, n_state)}, got {tuple(A_log.shape)}")
    if tuple(dt_weight.shape) != (dim, rank):
        raise ValueError(f"dt_weight must be (dim, rank) = {(dim, rank)}, got {tuple(dt_weight.shape)}")
    for name, tensor, shape in (("dt_low", dt_low, (rows, count, rank)), ("B", B, (rows, count, n_state)),
                                ("C", C, (rows, count, n_state)), ("z", z, (rows, count, dim))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(tensor.shape)}")
    if _resolve_chunk_backend(backend, u.device) == "torch":
        return _selective_chunk_torch(ssm_states, slots, u, dt_low, dt_weight, dt_bias, A_log, B, C, D, z,
                                      active, save_after)
    out = torch.empty(rows, count, dim, dtype=u.dtype, device=u.device)
    z_arg = z if z is not None else u
    kernel = _build_triton_kernels()["scan"]
    grid = (-(-dim // _SCAN_BLOCK_D), rows)
    kernel[grid](
        ssm_states, slots, active, u, dt_low, dt_weight, dt_bias, A_log, B, C, D if D is not None else dt_bias,
        z_arg, out,
        dim, n_state, rank, count, save_after,
        *ssm_states.stride(), *active.stride(), *u.stride(), *dt_low.stride(), *dt_weight.stride(),
        *A_log.stride(), *B.stride(), *C.stride(), *z_arg.stride(), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, SOFTPLUS_AT=SOFTPLUS_THRESHOLD,
        BLOCK_D=_SCAN_BLOCK_D, BLOCK_N=_next_power_of_2(n_state), BLOCK_R=_next_power_of_2(rank), num_warps=4,
    )
    return out


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _selective_chunk_torch(ssm_states, slots, u, dt_low, dt_weight, dt_bias, A_log, B, C, D, z, active,
                           save_after):
    """The reference: `selective_state_update` one token at a time on gathered rows."""
    rows, count, _ = u.shape
    keep = active.bool()
    A = -torch.exp(A_log.float())
    state = ssm_states.index_select(0, slots).float()
    changed = keep[:, :save_after].any(dim=1)
    delta = dt_low.float() @ dt_weight.float().t()
    outputs = []
    for t in range(count):
        stepped = state.clone()
        y = selective_state_update(stepped, u[:, t], delta[:, t], A, B[:, t], C[:, t], D=D,
                                   z=None if z is None else z[:, t], dt_bias=dt_bias, dt_softplus=True)
        state = torch.where(keep[:, t, None, None], stepped, state)
        outputs.append(torch.where(keep[:, t, None], y.float(), 0.0))
        if t == save_after - 1:
            _write_rows(ssm_states, slots, state, changed)
    if not outputs:
        return u.new_empty(rows, 0, u.shape[2])
    return torch.stack(outputs, dim=1).to(u.dtype)


def _build_triton_kernels() -> dict[str, object]:
    """Define the Triton kernels on first use, so importing this module never imports Triton.

    (`odyssey.kernels` is imported everywhere, also where Triton must first be put in interpreter mode.)
    """
    if _triton_kernels:
        return _triton_kernels
    global triton, tl  # the kernels below resolve `tl` through this module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def conv_kernel(
        x_ptr, state_ptr, slot_ptr, active_ptr, w_ptr, b_ptr, out_ptr,
        dim, count, save_after,
        sx_r, sx_t, sx_d, ss_s, ss_d, ss_k, sa_r, sa_t, sw_d, sw_k, so_r, so_t, so_d,
        TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # The window sits right-aligned in s0..s3 (s3 the newest input); with fewer than four taps the
        # leading registers carry zero weights, so what shifts into them never counts.
        r = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < dim
        slot = tl.load(slot_ptr + r).to(tl.int64)
        state = state_ptr + slot * ss_s + offs * ss_d
        weights = w_ptr + offs * sw_d
        zero = tl.zeros([BLOCK_D], dtype=tl.float32)
        w0, w1, w2 = zero, zero, zero
        s0, s1, s2 = zero, zero, zero
        if TAPS >= 4:
            w0 = tl.load(weights + (TAPS - 4) * sw_k, mask=dmask, other=0.0).to(tl.float32)
            s0 = tl.load(state + (TAPS - 4) * ss_k, mask=dmask, other=0.0).to(tl.float32)
        if TAPS >= 3:
            w1 = tl.load(weights + (TAPS - 3) * sw_k, mask=dmask, other=0.0).to(tl.float32)
            s1 = tl.load(state + (TAPS - 3) * ss_k, mask=dmask, other=0.0).to(tl.float32)
        if TAPS >= 2:
            w2 = tl.load(weights + (TAPS - 2) * sw_k, mask=dmask, other=0.0).to(tl.float32)
            s2 = tl.load(state + (TAPS - 2) * ss_k, mask=dmask, other=0.0).to(tl.float32)
        w3 = tl.load(weights + (TAPS - 1) * sw_k, mask=dmask, other=0.0).to(tl.float32)
        s3 = tl.load(state + (TAPS - 1) * ss_k, mask=dmask, other=0.0).to(tl.float32)
        bias = zero
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
        seen = tl.program_id(0) * 0  # an int32 scalar: events seen so far (loop-carried)
        for t in range(0, count):
            on = tl.load(active_ptr + r * sa_r + t * sa_t) != 0
            xt = tl.load(x_ptr + r * sx_r + t * sx_t + offs * sx_d, mask=dmask, other=0.0).to(tl.float32)
            s0 = tl.where(on, s1, s0)
            s1 = tl.where(on, s2, s1)
            s2 = tl.where(on, s3, s2)
            s3 = tl.where(on, xt, s3)
            value = w0 * s0 + w1 * s1 + w2 * s2 + w3 * s3 + bias
            value = value * tl.sigmoid(value)
            tl.store(out_ptr + r * so_r + t * so_t + offs * so_d,
                     tl.where(on, value, 0.0).to(out_ptr.dtype.element_ty), mask=dmask)
            seen += tl.where(on & (t < save_after), 1, 0)
            # after the last event token (the trailing prompt goes on unsaved); the flag is widened to a
            # vector before joining the mask (the interpreter rejects scalar-vector mask products)
            flag = tl.where((seen > 0) & (t == save_after - 1), 1, 0)
            write = dmask & ((offs * 0 + flag) != 0)
            dtype = state_ptr.dtype.element_ty
            if TAPS >= 4:
                tl.store(state + (TAPS - 4) * ss_k, s0.to(dtype), mask=write)
            if TAPS >= 3:
                tl.store(state + (TAPS - 3) * ss_k, s1.to(dtype), mask=write)
            if TAPS >= 2:
                tl.store(state + (TAPS - 2) * ss_k, s2.to(dtype), mask=write)
            tl.store(state + (TAPS - 1) * ss_k, s3.to(dtype), mask=write)

    @triton.jit
    def scan_kernel(
        state_ptr, slot_ptr, active_ptr, u_ptr, low_ptr, wdt_ptr, bias_ptr, alog_ptr, B_ptr, C_ptr, D_ptr,
        z_ptr, out_ptr,
        dim, N, rank, count, save_after,
        ss_s, ss_d, ss_n, sa_r, sa_t, su_r, su_t, su_d, sl_r, sl_t, sl_k, sw_d, sw_k, sA_d, sA_n,
        sB_r, sB_t, sB_n, sC_r, sC_t, sC_n, sz_r, sz_t, sz_d, so_r, so_t, so_d,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS_AT: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        r = tl.program_id(1).to(tl.int64)
        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_R)
        mask_d = offs_d < dim
        mask_n = offs_n < N
        mask_k = offs_k < rank
        mask_dn = mask_d[:, None] & mask_n[None, :]
        slot = tl.load(slot_ptr + r).to(tl.int64)
        state = state_ptr + slot * ss_s + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n
        h = tl.load(state, mask=mask_dn, other=0.0).to(tl.float32)
        A = -tl.exp(tl.load(alog_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n,
                            mask=mask_dn, other=0.0).to(tl.float32))
        w_dt = tl.load(wdt_ptr + offs_d[:, None] * sw_d + offs_k[None, :] * sw_k,
                       mask=mask_d[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        dt_bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        skip = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_D:
            skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        seen = tl.program_id(0) * 0  # an int32 scalar: events seen so far (loop-carried)
        for t in range(0, count):
            on = tl.load(active_ptr + r * sa_r + t * sa_t) != 0
            low = tl.load(low_ptr + r * sl_r + t * sl_t + offs_k * sl_k, mask=mask_k, other=0.0)
            delta = tl.sum(w_dt * low.to(tl.float32)[None, :], axis=1) + dt_bias
            delta = tl.where(delta > SOFTPLUS_AT, delta, tl.log(1.0 + tl.exp(delta)))
            u = tl.load(u_ptr + r * su_r + t * su_t + offs_d * su_d, mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + r * sB_r + t * sB_t + offs_n * sB_n, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + r * sC_r + t * sC_t + offs_n * sC_n, mask=mask_n, other=0.0).to(tl.float32)
            stepped = tl.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bt[None, :]
            h = tl.where(on, stepped, h)
            y = tl.sum(h * Ct[None, :], axis=1) + skip * u
            if HAS_Z:
                zt = tl.load(z_ptr + r * sz_r + t * sz_t + offs_d * sz_d, mask=mask_d, other=0.0)
                zt = zt.to(tl.float32)
                y = y * zt * tl.sigmoid(zt)
            tl.store(out_ptr + r * so_r + t * so_t + offs_d * so_d,
                     tl.where(on, y, 0.0).to(out_ptr.dtype.element_ty), mask=mask_d)
            seen += tl.where(on & (t < save_after), 1, 0)
            flag = tl.where((seen > 0) & (t == save_after - 1), 1, 0)
            write = mask_dn & ((offs_d[:, None] * 0 + flag) != 0)
            tl.store(state, h.to(state_ptr.dtype.element_ty), mask=write)

    _triton_kernels.update(conv=conv_kernel, scan=scan_kernel)
    return _triton_kernels
