"""Triton kernels of the next-token cross-entropy (`cross_entropy.py`): a program per row of logits, in float32.

    forward:  m = max(x), ls = log(sum(exp(x - m))), loss = (m - x[target]) + ls  (0 where the target is ignored)
    backward: dx = (exp((x - m) - ls) - onehot(target)) * scale                  (0 where the target is ignored)

The forward reads a row once, with a running maximum and sum over blocks of the vocabulary, and keeps the row's
m and ls (not their sum: m + ls rounded at |m| ~ 100 would cost the gradient ~1e-6, where torch's log-softmax
keeps x - m and ls apart too); the backward reads the row again and writes its gradient in the logits' dtype. `scale` is the upstream
gradient over the count of counted targets, a device scalar (no host synchronization).
"""

from __future__ import annotations

import triton
import triton.language as tl

# a finite start for the running maximum: padded lanes (-inf) then add exp(-inf) = 0, never exp(nan)
FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _cross_entropy_fwd_kernel(x_ptr, target_ptr, loss_ptr, stats_ptr, vocab, sx_r, ignore_index,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * sx_r
    top = tl.full([BLOCK], FLOOR, tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, x)
        total = total * tl.exp(top - new_top) + tl.exp(x - new_top)
        top = new_top
    row_max = tl.max(top, axis=0)
    log_sum = tl.log(tl.sum(total * tl.exp(top - row_max), axis=0))
    target = tl.load(target_ptr + row)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < vocab)
    picked = tl.load(row_ptr + tl.where(counted & in_range, target, 0), mask=counted & in_range,
                     other=0.0).to(tl.float32)
    loss = tl.where(counted, (row_max - picked) + log_sum, 0.0)
    # a target outside the vocabulary is never read; its loss is NaN so that it shows (torch raises instead)
    tl.store(loss_ptr + row, tl.where(counted & ~in_range, float("nan"), loss))
    tl.store(stats_ptr + 2 * row, row_max)
    tl.store(stats_ptr + 2 * row + 1, log_sum)


@triton.jit
def _cross_entropy_bwd_kernel(x_ptr, target_ptr, stats_ptr, scale_ptr, dx_ptr, vocab, sx_r, sdx_r, ignore_index,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    factor = tl.where(target != ignore_index, tl.load(scale_ptr), 0.0)
    row_max = tl.load(stats_ptr + 2 * row)
    log_sum = tl.load(stats_ptr + 2 * row + 1)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        x = tl.load(x_ptr + row * sx_r + cols, mask=inside, other=0.0).to(tl.float32)
        dx = (tl.exp((x - row_max) - log_sum) - tl.where(cols == target, 1.0, 0.0)) * factor
        tl.store(dx_ptr + row * sdx_r + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
