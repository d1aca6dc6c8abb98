"""Cross-entropy over the rows of a logits matrix, as the pretraining loss computes it.

    cross_entropy(logits, targets, ignore_index=-100, reduction="mean", backend="auto")

logits (rows, vocab) in any float dtype, targets (rows,) integer; rows whose target is `ignore_index` count for
nothing. Returns a float32 scalar: the mean over counted rows (NaN when none is counted, as torch), or the sum.
The gradient comes back in the logits' dtype.

Backends: `torch` (`F.cross_entropy` on a float32 copy of the logits: the reference, any device) and `triton`
(`cross_entropy_kernels`; CUDA or TRITON_INTERPRET=1). torch's path makes a float32 copy of the logits, writes
float32 log-probabilities for its backward and reads them back: at 65,536 rows x 4,096 classes that is ~1.5 GB of
extra memory and several passes. The Triton forward reads the logits once and keeps two floats per row; the
backward reads them again and writes the gradient. `auto` is `triton` on CUDA (H200, 65,536 x 4,096 bf16, loss_bench:
forward+backward 3.01 -> 0.69 ms, peak 3,072 -> 513 MiB; pretraining at 2k +3.2%), `torch` elsewhere;
$ODYSSEY_LOSS_BACKEND names a backend for every `auto` call (how a benchmark times both in one run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from odyssey.kernels.triton_support import use_triton

BACKEND_ENV = "ODYSSEY_LOSS_BACKEND"
MAX_BLOCK = 4096  # vocabulary elements a step of a row: 16 a thread with 8 warps
WARPS = 8


def cross_entropy_torch(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    """In float32 at least (float64 logits stay float64: the tests' reference)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide, targets, ignore_index=ignore_index, reduction=reduction)


def _block(vocab: int) -> int:
    import triton

    return min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 1)))


class CrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction):
        from odyssey.kernels.cross_entropy_kernels import _cross_entropy_fwd_kernel

        rows, vocab = logits.shape
        loss_rows = torch.empty(rows, device=logits.device, dtype=torch.float32)
        stats = torch.empty(rows, 2, device=logits.device, dtype=torch.float32)  # each row's max and log-sum
        if rows:
            _cross_entropy_fwd_kernel[(rows,)](logits, targets, loss_rows, stats, vocab, logits.stride(0),
                                               ignore_index, BLOCK=_block(vocab), num_warps=WARPS)
        total = loss_rows.sum()
        count = (targets != ignore_index).sum()
        ctx.save_for_backward(logits, targets, stats, count)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        return total if reduction == "sum" else total / count

    @staticmethod
    def backward(ctx, grad_loss):
        from odyssey.kernels.cross_entropy_kernels import _cross_entropy_bwd_kernel

        logits, targets, stats, count = ctx.saved_tensors
        rows, vocab = logits.shape
        scale = grad_loss.float().reshape(1)
        if ctx.reduction == "mean":
            scale = scale / count.clamp_min(1)
        dx = torch.empty_like(logits)
        if rows:
            _cross_entropy_bwd_kernel[(rows,)](logits, targets, stats, scale, dx, vocab, logits.stride(0),
                                               dx.stride(0), ctx.ignore_index, BLOCK=_block(vocab), num_warps=WARPS)
        return dx, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of (rows, vocab) logits against (rows,) targets (see the module doc)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (rows, vocab) and targets (rows,); got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; choose mean or sum")
    if not use_triton(backend, BACKEND_ENV, "loss", logits, "odyssey.kernels.cross_entropy_kernels"):
        return cross_entropy_torch(logits, targets, ignore_index, reduction)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return CrossEntropyTriton.apply(logits, targets.contiguous(), ignore_index, reduction)
