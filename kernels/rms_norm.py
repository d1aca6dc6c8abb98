"""RMSNorm over the last dimension for the model's float32 residual stream, with the output in the dtype
the next matrix product reads.

    rms_norm(x, weight, eps, out_dtype=None, backend="auto")

y = x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in `out_dtype` (default x's dtype).
Under bf16 autocast the model asks for bfloat16: with torch's float32 `rms_norm` the block wrote the
normalized rows in float32 and autocast then copied them to bfloat16 before in_proj (and back to float32
in the backward). Backends: `torch` (`F.rms_norm`, any device: the reference) and `triton`
(`rms_norm_kernels`: one pass each way; CUDA or TRITON_INTERPRET=1); `auto` takes `triton` for CUDA
tensors when Triton imports, unless $ODYSSEY_NORM_BACKEND names one (a benchmark's same-run baseline).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from odyssey.kernels.triton_support import use_triton

BACKEND_ENV = "ODYSSEY_NORM_BACKEND"
PROGRAMS_PER_MULTIPROCESSOR = 4
ROW_ELEMENTS = 4096  # elements of a (rows, features) step: 16 a thread with 8 warps
WARPS = 8


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None):
    y = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return y.to(out_dtype or x.dtype)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_shape(rows: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, programs): a few programs per multiprocessor, each summing dweight over its rows."""
    programs = PROGRAMS_PER_MULTIPROCESSOR * (_multiprocessors(device.index or 0) if device.type == "cuda" else 1)
    per_program = max(1, -(-rows // programs))
    return per_program, -(-rows // per_program)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, features) with unit column stride (a view when it has one)."""
    rows2 = x.reshape(-1, x.shape[-1])
    return rows2 if rows2.stride(-1) == 1 else rows2.contiguous()


def _block(features: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_R, warps) for rows of `features`."""
    import triton

    block = triton.next_power_of_2(features)
    return block, max(1, ROW_ELEMENTS // block), WARPS


class RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        from odyssey.kernels.rms_norm_kernels import _rms_norm_fwd_kernel

        rows2 = _rows(x)
        rows, features = rows2.shape
        y = torch.empty(rows, features, device=x.device, dtype=out_dtype)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        per_program, programs = _launch_shape(rows, x.device)
        block, block_rows, warps = _block(features)
        if rows:
            _rms_norm_fwd_kernel[(programs,)](rows2, weight, y, rstd, rows, features, per_program, rows2.stride(0),
                                              y.stride(0), eps, BLOCK_H=block, BLOCK_R=block_rows, num_warps=warps)
        ctx.save_for_backward(rows2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from odyssey.kernels.rms_norm_kernels import _rms_norm_bwd_kernel

        rows2, weight, rstd = ctx.saved_tensors
        rows, features = rows2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(rows2)
        per_program, programs = _launch_shape(rows, rows2.device)
        dw_parts = torch.zeros(max(programs, 1), features, device=rows2.device, dtype=torch.float32)
        block, block_rows, warps = _block(features)
        if rows:
            _rms_norm_bwd_kernel[(programs,)](rows2, weight, dy2, rstd, dx, dw_parts, rows, features, per_program,
                                              rows2.stride(0), dy2.stride(0), dx.stride(0), BLOCK_H=block,
                                              BLOCK_R=block_rows, num_warps=warps)
        return dx.view(ctx.shape), dw_parts.sum(0).to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x's last dimension with `weight`, returned in `out_dtype` (see the module doc)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1]},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    out_dtype = out_dtype or x.dtype
    if use_triton(backend, BACKEND_ENV, "norm", x, "odyssey.kernels.rms_norm_kernels"):
        return RMSNormTriton.apply(x, weight, eps, out_dtype)
    return rms_norm_torch(x, weight, eps, out_dtype)
