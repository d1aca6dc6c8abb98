"""Triton kernels of the fused RMSNorm (`rms_norm.py`): a program walks a range of rows, BLOCK_R rows of up to
BLOCK_H features at a time, with the statistics in float32.

    y = x * rstd * weight,  rstd = 1 / sqrt(mean(x^2) + eps)
    dx = rstd * (weight dy - xhat * mean(xhat * weight dy)),  dweight = sum over rows of dy * xhat

Each step handles BLOCK_R rows. The forward writes y in the output's dtype (bfloat16 under autocast: the cast the next matrix product
would make is the store) and each row's rstd for the backward. The backward sums dweight over its rows in
registers and writes one partial row per program.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, features, rows_per_program, sx_r, sy_r, eps,
                         BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """BLOCK_R rows a step: their reductions issue together (one row a step waits on each one's)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < features
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # 64-bit row offsets
    end = tl.minimum(first + rows_per_program, rows)
    for start in range(first, end, BLOCK_R):
        row = start + tl.arange(0, BLOCK_R)
        ok = (row < end)[:, None] & in_row[None, :]
        x = tl.load(x_ptr + row[:, None] * sx_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / features + eps)
        tl.store(y_ptr + row[:, None] * sy_r + cols[None, :], (x * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty),
                 mask=ok)
        tl.store(rstd_ptr + row, rstd, mask=row < end)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, rows, features, rows_per_program,
                         sx_r, sdy_r, sdx_r, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < features
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(first + rows_per_program, rows)
    for start in range(first, end, BLOCK_R):
        row = start + tl.arange(0, BLOCK_R)
        ok = (row < end)[:, None] & in_row[None, :]
        x = tl.load(x_ptr + row[:, None] * sx_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row[:, None] * sdy_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < end, other=0.0)
        xhat = x * rstd[:, None]
        wdy = w[None, :] * dy
        dx = (wdy - xhat * (tl.sum(xhat * wdy, axis=1) / features)[:, None]) * rstd[:, None]
        tl.store(dx_ptr + row[:, None] * sdx_r + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * features + cols, tl.sum(dw, axis=0), mask=in_row)
