"""Triton kernels of the causal depthwise conv1d + SiLU that sits before Mamba's scan.

    out[b, d, t] = silu(bias[d] + sum_k w[d, k] * x[b, d, t - (TAPS - 1 - k)]) * mask[b, t]

with x[t] = 0 before the sequence start and TAPS = 4. The kernels always run 4 taps (Mamba's d_conv); a
shorter filter is padded with leading zero taps by the wrapper (`kernels/causal_conv.py`), which
leaves the sum unchanged. Strides are arguments, so x may be any (batch, dim, L) view: the mixer's
channel-major slice of in_proj's output is read without a copy. A program owns a (channels, time)
tile; the backward recomputes the pre-activation at the TAPS positions its output feeds (from the
7 shifted input tiles, L1/L2 hits) instead of storing it, and reduces the weight and bias
gradients over its tile before one atomic add per (channel, tap).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    w_row = w_ptr + offs_d * sw_d
    w0 = tl.load(w_row, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    w1 = tl.load(w_row + sw_k, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    w2 = tl.load(w_row + 2 * sw_k, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    w3 = tl.load(w_row + 3 * sw_k, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    acc = w3 * _shifted(x_base, x_offs, t, 0, sx_l, mask_d, length)
    acc += w2 * _shifted(x_base, x_offs, t, -1, sx_l, mask_d, length)
    acc += w1 * _shifted(x_base, x_offs, t, -2, sx_l, mask_d, length)
    acc += w0 * _shifted(x_base, x_offs, t, -3, sx_l, mask_d, length)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * sm_b + t * sm_l, mask=mask_t, other=0.0).to(tl.float32)
        acc = acc * keep[None, :]
    tl.store(out_ptr + b * so_b + _tile_offsets(offs_d, t, so_d, so_l, WIDE),
             acc.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])


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
    if SILU:
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


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
    w_row = w_ptr + offs_d * sw_d
    w0 = tl.load(w_row, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    w1 = tl.load(w_row + sw_k, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    w2 = tl.load(w_row + 2 * sw_k, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    w3 = tl.load(w_row + 3 * sw_k, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    else:
        bias = tl.zeros([BLOCK_D, 1], tl.float32)
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

    dw_row = dw_ptr + offs_d * 4
    tl.atomic_add(dw_row, dw0, mask=mask_d, sem="relaxed")
    tl.atomic_add(dw_row + 1, dw1, mask=mask_d, sem="relaxed")
    tl.atomic_add(dw_row + 2, dw2, mask=mask_d, sem="relaxed")
    tl.atomic_add(dw_row + 3, dw3, mask=mask_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, db, mask=mask_d, sem="relaxed")
