"""Triton kernels of the causal depthwise conv1d + SiLU that sits before Mamba's scan.

    out[b, d, t] = silu(bias[d] + sum_k w[d, k] * x[b, d, t - (TAPS - 1 - k)]) * mask[b, t]

with x[t] = 0 before the sequence start and TAPS = 4. The kernels always run 4 taps (Mamba's d_conv); a
shorter filter is padded with leading zero taps by the wrapper (`kernels/causal_conv.py`), which
leaves the sum unchanged. Strides are arguments, so x may be any (batch, dim, L) view: the mixer's
channel-major slice of in_proj's output is read without a copy. The forward's program owns a (channels,
time) tile and reads the taps as shifted tiles. Two backwards (`causal_conv.BWD_VARIANT`): the tile
kernel recomputes the pre-activation at the TAPS positions its output feeds (from 7 shifted input
tiles, L1/L2 hits); the sequential one (the default) gives each thread a channel and walks time in
registers, so each pre-activation and SiLU gradient is computed once. Both reduce the weight and bias
gradients over a span of time before one atomic add per (channel, tap).
"""

from __future__ import annotations

import triton
import triton.language as tl

from odyssey.kernels.triton_scan_kernels import _columns8, _rows8


@triton.jit
def _shifted(base_ptr, offsets, t, shift, stride_l, mask_rows, length):
    """x at time t + shift for a (channels, time) tile, 0 outside [0, length)."""
    ts = t + shift
    ok = mask_rows[:, None] & ((ts >= 0) & (ts < length))[None, :]
    return tl.load(base_ptr + (offsets + shift * stride_l), mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _tile_offsets(offs_d, t, stride_d, stride_l, WIDE: tl.constexpr):
    """Element offsets of a (channels, time) tile from its batch row's base; 32-bit unless WIDE (a
    tensor of 2**31 or more elements), which halves the registers that address the tiles."""
    if WIDE:
        return offs_d.to(tl.int64)[:, None] * stride_d + t.to(tl.int64)[None, :] * stride_l
    return offs_d[:, None] * stride_d + t[None, :] * stride_l


@triton.jit
def _taps(w_ptr, bias_ptr, offs_d, sw_d, sw_k, mask_d, HAS_BIAS: tl.constexpr):
    """The 4 taps and the bias (0 without one) of the channels offs_d: five float32 (channels,) vectors."""
    w_row = w_ptr + offs_d * sw_d
    w0 = tl.load(w_row, mask=mask_d, other=0.0).to(tl.float32)
    w1 = tl.load(w_row + sw_k, mask=mask_d, other=0.0).to(tl.float32)
    w2 = tl.load(w_row + 2 * sw_k, mask=mask_d, other=0.0).to(tl.float32)
    w3 = tl.load(w_row + 3 * sw_k, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros_like(w0)
    return w0, w1, w2, w3, bias


@triton.jit
def _add_tap_grads(dw_ptr, dbias_ptr, offs_d, dw0, dw1, dw2, dw3, db, mask_d, HAS_BIAS: tl.constexpr):
    """A program's weight and bias gradient sums added to the (dim, 4) / (dim,) float32 totals."""
    dw_row = dw_ptr + offs_d * 4
    tl.atomic_add(dw_row, dw0, mask=mask_d, sem="relaxed")
    tl.atomic_add(dw_row + 1, dw1, mask=mask_d, sem="relaxed")
    tl.atomic_add(dw_row + 2, dw2, mask=mask_d, sem="relaxed")
    tl.atomic_add(dw_row + 3, dw3, mask=mask_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, db, mask=mask_d, sem="relaxed")


@triton.jit
def _causal_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, mask_ptr, out_ptr,
    dim, length,
    sx_b, sx_d, sx_l, sw_d, sw_k, sm_b, sm_l, so_b, so_d, so_l,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_d = offs_d < dim
    mask_t = t < length
    x_base = x_ptr + b * sx_b
    x_offs = _tile_offsets(offs_d, t, sx_d, sx_l, WIDE)
    w0, w1, w2, w3, bias = _taps(w_ptr, bias_ptr, offs_d, sw_d, sw_k, mask_d, HAS_BIAS)
    acc = w3[:, None] * _shifted(x_base, x_offs, t, 0, sx_l, mask_d, length)
    acc += w2[:, None] * _shifted(x_base, x_offs, t, -1, sx_l, mask_d, length)
    acc += w1[:, None] * _shifted(x_base, x_offs, t, -2, sx_l, mask_d, length)
    acc += w0[:, None] * _shifted(x_base, x_offs, t, -3, sx_l, mask_d, length)
    if HAS_BIAS:
        acc += bias[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * sm_b + t * sm_l, mask=mask_t, other=0.0).to(tl.float32)
        acc = acc * keep[None, :]
    tl.store(out_ptr + b * so_b + _tile_offsets(offs_d, t, so_d, so_l, WIDE),
             acc.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])


@triton.jit
def _silu_grad(g, pre, SILU: tl.constexpr):
    """Gradient wrt the pre-activation from the output gradient g."""
    if SILU:
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _pre_grad(g_base, g_offs, m_row, t, shift, stride_gl, stride_ml, mask_d, length, pre,
              HAS_MASK: tl.constexpr, SILU: tl.constexpr):
    """Gradient wrt the pre-activation at time t + shift (0 past the sequence end)."""
    ts = t + shift
    ok_t = ts < length
    g = tl.load(g_base + (g_offs + shift * stride_gl), mask=mask_d[:, None] & ok_t[None, :],
                other=0.0).to(tl.float32)
    if HAS_MASK:
        g = g * tl.load(m_row + ts * stride_ml, mask=ok_t, other=0.0).to(tl.float32)[None, :]
    return _silu_grad(g, pre, SILU)


@triton.jit
def _causal_conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, mask_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr,
    dim, length,
    sx_b, sx_d, sx_l, sw_d, sw_k, sm_b, sm_l, sg_b, sg_d, sg_l, sdx_b, sdx_d, sdx_l,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, SPAN: tl.constexpr,
):
    """dx[t] = sum_k w[k] g[t + 3 - k] with g the pre-activation gradient; dw[k] = sum_t g[t] x[t - 3 + k].

    A program walks SPAN steps in tiles of BLOCK_T and sums dw and dbias in registers, so each
    (channel, tap) takes one atomic add per SPAN steps (one per tile contended on L2: 7x slower).
    """
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    x_base = x_ptr + b * sx_b
    g_base = dout_ptr + b * sg_b
    m_row = mask_ptr + b * sm_b
    w0, w1, w2, w3, bias = _taps(w_ptr, bias_ptr, offs_d, sw_d, sw_k, mask_d, HAS_BIAS)
    w0, w1, w2, w3, bias = w0[:, None], w1[:, None], w2[:, None], w3[:, None], bias[:, None]
    dw0 = tl.zeros([BLOCK_D], tl.float32)
    dw1 = tl.zeros([BLOCK_D], tl.float32)
    dw2 = tl.zeros([BLOCK_D], tl.float32)
    dw3 = tl.zeros([BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_D], tl.float32)
    span_start = pid_t * SPAN
    span_end = tl.minimum(span_start + SPAN, length)
    for t0 in range(span_start, span_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask_t = t < length
        x_offs = _tile_offsets(offs_d, t, sx_d, sx_l, WIDE)
        g_offs = _tile_offsets(offs_d, t, sg_d, sg_l, WIDE)
        xm3 = _shifted(x_base, x_offs, t, -3, sx_l, mask_d, length)
        xm2 = _shifted(x_base, x_offs, t, -2, sx_l, mask_d, length)
        xm1 = _shifted(x_base, x_offs, t, -1, sx_l, mask_d, length)
        x0 = _shifted(x_base, x_offs, t, 0, sx_l, mask_d, length)
        xp1 = _shifted(x_base, x_offs, t, 1, sx_l, mask_d, length)
        xp2 = _shifted(x_base, x_offs, t, 2, sx_l, mask_d, length)
        xp3 = _shifted(x_base, x_offs, t, 3, sx_l, mask_d, length)

        # output position t + e reads x[t + e - 3 .. t + e]; its gradient reaches x[t] through tap 3 - e
        pre0 = bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0
        g0 = _pre_grad(g_base, g_offs, m_row, t, 0, sg_l, sm_l, mask_d, length, pre0, HAS_MASK, SILU)
        g0 = tl.where(mask_t[None, :], g0, 0.0)
        dx = w3 * g0
        pre1 = bias + w0 * xm2 + w1 * xm1 + w2 * x0 + w3 * xp1
        dx += w2 * _pre_grad(g_base, g_offs, m_row, t, 1, sg_l, sm_l, mask_d, length, pre1, HAS_MASK, SILU)
        pre2 = bias + w0 * xm1 + w1 * x0 + w2 * xp1 + w3 * xp2
        dx += w1 * _pre_grad(g_base, g_offs, m_row, t, 2, sg_l, sm_l, mask_d, length, pre2, HAS_MASK, SILU)
        pre3 = bias + w0 * x0 + w1 * xp1 + w2 * xp2 + w3 * xp3
        dx += w0 * _pre_grad(g_base, g_offs, m_row, t, 3, sg_l, sm_l, mask_d, length, pre3, HAS_MASK, SILU)
        tl.store(dx_ptr + b * sdx_b + _tile_offsets(offs_d, t, sdx_d, sdx_l, WIDE),
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])
        dw0 += tl.sum(g0 * xm3, axis=1)
        dw1 += tl.sum(g0 * xm2, axis=1)
        dw2 += tl.sum(g0 * xm1, axis=1)
        dw3 += tl.sum(g0 * x0, axis=1)
        db += tl.sum(g0, axis=1)

    _add_tap_grads(dw_ptr, dbias_ptr, offs_d, dw0, dw1, dw2, dw3, db, mask_d, HAS_BIAS)


@triton.jit
def _x_block(x_base, offs_d, t, stride_d, stride_l, mask_d, length, WIDE: tl.constexpr):
    """x at the steps t as a float32 (channels, steps) tile, 0 outside [0, length)."""
    ok = mask_d[:, None] & ((t >= 0) & (t < length))[None, :]
    tile = tl.load(x_base + _tile_offsets(offs_d, t, stride_d, stride_l, WIDE), mask=ok, other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _g_block(g_base, m_row, offs_d, t, stride_d, stride_l, stride_ml, mask_d, length, HAS_MASK: tl.constexpr,
             WIDE: tl.constexpr):
    """The output gradient at the steps t (times the padding mask), float32 (channels, steps), 0 past the end."""
    in_time = t < length
    g = tl.load(g_base + _tile_offsets(offs_d, t, stride_d, stride_l, WIDE), mask=mask_d[:, None] & in_time[None, :],
                other=0.0).to(tl.float32)
    if HAS_MASK:
        g = g * tl.load(m_row + t * stride_ml, mask=in_time, other=0.0).to(tl.float32)[None, :]
    return g


@triton.jit
def _store_block(base, offs_d, t, stride_d, stride_l, tile, mask_d, length, WIDE: tl.constexpr):
    tl.store(base + _tile_offsets(offs_d, t, stride_d, stride_l, WIDE), tile.to(base.dtype.element_ty),
             mask=mask_d[:, None] & (t < length)[None, :])


@triton.jit
def _bwd_steps8(xm3, xm2, xm1, x, g, n0, n1, n2, w0, w1, w2, w3, bias, SILU: tl.constexpr):
    """8 steps of the conv backward, a channel a thread. In: x at the 3 steps before (columns), x and the
    output gradient g at the 8 steps ((channels, 8) tiles), the pre-activation gradients of the 3 steps
    after (columns). Out: dx (channels, 8), the pre-activation gradients of the first 3 steps, and the 8
    steps' sums of the weight gradients (taps 0-3) and of the bias gradient."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _columns8(x)
    g0, g1, g2, g3, g4, g5, g6, g7 = _columns8(g)
    g0 = _silu_grad(g0, bias + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * c0, SILU)
    g1 = _silu_grad(g1, bias + w0 * xm2 + w1 * xm1 + w2 * c0 + w3 * c1, SILU)
    g2 = _silu_grad(g2, bias + w0 * xm1 + w1 * c0 + w2 * c1 + w3 * c2, SILU)
    g3 = _silu_grad(g3, bias + w0 * c0 + w1 * c1 + w2 * c2 + w3 * c3, SILU)
    g4 = _silu_grad(g4, bias + w0 * c1 + w1 * c2 + w2 * c3 + w3 * c4, SILU)
    g5 = _silu_grad(g5, bias + w0 * c2 + w1 * c3 + w2 * c4 + w3 * c5, SILU)
    g6 = _silu_grad(g6, bias + w0 * c3 + w1 * c4 + w2 * c5 + w3 * c6, SILU)
    g7 = _silu_grad(g7, bias + w0 * c4 + w1 * c5 + w2 * c6 + w3 * c7, SILU)
    dx = _rows8(w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3,
                w3 * g1 + w2 * g2 + w1 * g3 + w0 * g4,
                w3 * g2 + w2 * g3 + w1 * g4 + w0 * g5,
                w3 * g3 + w2 * g4 + w1 * g5 + w0 * g6,
                w3 * g4 + w2 * g5 + w1 * g6 + w0 * g7,
                w3 * g5 + w2 * g6 + w1 * g7 + w0 * n0,
                w3 * g6 + w2 * g7 + w1 * n0 + w0 * n1,
                w3 * g7 + w2 * n0 + w1 * n1 + w0 * n2)
    s0 = g0 * xm3 + g1 * xm2 + g2 * xm1 + g3 * c0 + g4 * c1 + g5 * c2 + g6 * c3 + g7 * c4
    s1 = g0 * xm2 + g1 * xm1 + g2 * c0 + g3 * c1 + g4 * c2 + g5 * c3 + g6 * c4 + g7 * c5
    s2 = g0 * xm1 + g1 * c0 + g2 * c1 + g3 * c2 + g4 * c3 + g5 * c4 + g6 * c5 + g7 * c6
    s3 = g0 * c0 + g1 * c1 + g2 * c2 + g3 * c3 + g4 * c4 + g5 * c5 + g6 * c6 + g7 * c7
    sb = g0 + g1 + g2 + g3 + g4 + g5 + g6 + g7
    return dx, g0, g1, g2, s0, s1, s2, s3, sb


@triton.jit
def _last3(x):
    """The last 3 columns of a (R, 8) tile."""
    _, _, _, _, _, c5, c6, c7 = _columns8(x)
    return c5, c6, c7


@triton.jit
def _causal_conv_bwd_seq_kernel(
    x_ptr, w_ptr, bias_ptr, mask_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr,
    dim, length,
    sx_b, sx_d, sx_l, sw_d, sw_k, sm_b, sm_l, sg_b, sg_d, sg_l, sdx_b, sdx_d, sdx_l,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr, WIDE: tl.constexpr,
    SPAN: tl.constexpr,
):
    """The backward with a channel a thread: each thread walks its channel's SPAN steps backward in blocks
    of 16 (a 32-byte sector of a bf16 row, read as two 8-step halves) that sit in its registers, so the taps' time shifts
    are register names. The pre-activation and its SiLU gradient are computed once a step (the tile kernel
    above recomputes them at 4 shifts from 7 shifted loads); x is loaded once, a block ahead (the block
    before in time holds the inputs of the first steps' taps), and the pre-activation gradients of a
    block's first 3 steps are carried to the block before it. A first block past the span's end only makes
    those 3.
    """
    CHANNELS: tl.constexpr = 32
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_t = tl.program_id(2)
    offs_d = pid_d * CHANNELS + tl.arange(0, CHANNELS)
    mask_d = offs_d < dim
    steps = tl.arange(0, 8)
    x_base = x_ptr + b * sx_b
    g_base = dout_ptr + b * sg_b
    dx_base = dx_ptr + b * sdx_b
    m_row = mask_ptr + b * sm_b
    w0, w1, w2, w3, bias = _taps(w_ptr, bias_ptr, offs_d, sw_d, sw_k, mask_d, HAS_BIAS)
    span_start = pid_t * SPAN
    n_blocks = tl.cdiv(tl.minimum(span_start + SPAN, length) - span_start, 16)
    t_end = span_start + n_blocks * 16
    x_first = _x_block(x_base, offs_d, t_end + steps, sx_d, sx_l, mask_d, length, WIDE)
    x_last = _x_block(x_base, offs_d, t_end + 8 + steps, sx_d, sx_l, mask_d, length, WIDE)
    n0 = tl.zeros([CHANNELS], tl.float32)
    n1 = tl.zeros([CHANNELS], tl.float32)
    n2 = tl.zeros([CHANNELS], tl.float32)
    dw0 = tl.zeros([CHANNELS], tl.float32)
    dw1 = tl.zeros([CHANNELS], tl.float32)
    dw2 = tl.zeros([CHANNELS], tl.float32)
    dw3 = tl.zeros([CHANNELS], tl.float32)
    db = tl.zeros([CHANNELS], tl.float32)
    for k in range(0, n_blocks + 1):
        t = t_end - k * 16 + steps  # the block's first 8 steps; t + 8 its last 8
        before_first = _x_block(x_base, offs_d, t - 16, sx_d, sx_l, mask_d, length, WIDE)
        before_last = _x_block(x_base, offs_d, t - 8, sx_d, sx_l, mask_d, length, WIDE)
        g_first = _g_block(g_base, m_row, offs_d, t, sg_d, sg_l, sm_l, mask_d, length, HAS_MASK, WIDE)
        g_last = _g_block(g_base, m_row, offs_d, t + 8, sg_d, sg_l, sm_l, mask_d, length, HAS_MASK, WIDE)
        xm3, xm2, xm1 = _last3(x_first)
        dx_last, m0, m1, m2, s0, s1, s2, s3, sb = _bwd_steps8(xm3, xm2, xm1, x_last, g_last, n0, n1, n2,
                                                              w0, w1, w2, w3, bias, SILU)
        xm3, xm2, xm1 = _last3(before_last)
        dx_first, n0, n1, n2, r0, r1, r2, r3, rb = _bwd_steps8(xm3, xm2, xm1, x_first, g_first, m0, m1, m2,
                                                               w0, w1, w2, w3, bias, SILU)
        if k > 0:  # k = 0 is the block past the span's end: only its first gradients are wanted
            _store_block(dx_base, offs_d, t, sdx_d, sdx_l, dx_first, mask_d, length, WIDE)
            _store_block(dx_base, offs_d, t + 8, sdx_d, sdx_l, dx_last, mask_d, length, WIDE)
            dw0 += s0 + r0
            dw1 += s1 + r1
            dw2 += s2 + r2
            dw3 += s3 + r3
            db += sb + rb
        x_first = before_first
        x_last = before_last

    _add_tap_grads(dw_ptr, dbias_ptr, offs_d, dw0, dw1, dw2, dw3, db, mask_d, HAS_BIAS)

