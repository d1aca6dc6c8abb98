"""Causal depthwise conv1d (+ SiLU, + padding mask): the step between Mamba's in_proj and its scan.

    causal_conv1d(x, weight, bias=None, mask=None, silu=True, backend="auto")

x (batch, dim, L) with any strides; weight (dim, K) or nn.Conv1d's (dim, 1, K); bias (dim,);
mask (batch, L), multiplied into the output (0 at padding). Returns (batch, dim, L) in x's dtype and,
when x is dense, in x's memory layout (a channel-major slice stays channel-major, no transpose copy).

Backends: `torch` (nn.functional.conv1d, any device: the CPU path and the reference); `triton`
(`causal_conv_kernels`, K <= 4, CUDA or TRITON_INTERPRET=1), one pass over x forward and one over
x and the output gradient backward; `auto` takes `triton` for CUDA tensors when it can run them.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from odyssey.kernels.triton_support import use_triton

MAX_TRITON_TAPS = 4
# (channels, time) tiles: the largest that compile for sm_90 without spilling (4 warps; checked with
# cuobjdump -res-usage on a local compile: forward 167 registers, backward 168, no stack)
BLOCK_D_FWD, BLOCK_T_FWD = 32, 64
BLOCK_D_BWD, BLOCK_T_BWD = 16, 64
# time steps one backward program walks, summing the weight gradient before its atomic adds
BWD_SPAN = 1024
WARPS = 4
# The backward: "seq", a channel a thread walking SEQ_SPAN steps backward (_causal_conv_bwd_seq_kernel), or
# "tile", the (channels, time) tile kernel. H200, 2026-11-28, pretraining benchmark in one call: 2k 768,667 ->
# 787,920 tokens/s, 16k 665,558 -> 680,228 (+2.5%, +2.2%). The same design in the forward was slower than the
# tile kernel (0.22-0.31 ms against 0.18 at b32/L2048/1536 channels; not kept).
BWD_VARIANT = "seq"
SEQ_SPAN = 1024
# overrides for benchmarks (kernels/conv_bench.py), filled at import from $ODYSSEY_CONV_OVERRIDES (a JSON
# object) so that a whole-model benchmark can time a same-run baseline
OVERRIDE_KEYS = ("block_d_fwd", "block_t_fwd", "warps_fwd", "block_d_bwd", "block_t_bwd", "warps_bwd", "span",
                 "bwd_variant", "seq_span")
OVERRIDES_ENV = "ODYSSEY_CONV_OVERRIDES"


def overrides_from_env(environ=os.environ) -> dict:
    text = environ.get(OVERRIDES_ENV, "").strip()
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"${OVERRIDES_ENV} is not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict) or set(value) - set(OVERRIDE_KEYS):
        raise ValueError(f"${OVERRIDES_ENV} must be a JSON object with keys among {OVERRIDE_KEYS}, got {text!r}")
    return value


TILE_OVERRIDES: dict[str, int | str] = overrides_from_env()


def _tile(name: str, default):
    if set(TILE_OVERRIDES) - set(OVERRIDE_KEYS):
        raise ValueError(f"unknown conv overrides {sorted(set(TILE_OVERRIDES) - set(OVERRIDE_KEYS))}; "
                         f"known: {OVERRIDE_KEYS}")
    return TILE_OVERRIDES.get(name, default)


def conv_weight_2d(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """A depthwise conv weight as (dim, K), from nn.Conv1d's (dim, 1, K) or already (dim, K)."""
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"conv weight must be (dim={dim}, K) or (dim, 1, K), got {tuple(weight.shape)}")
    return weight


def causal_conv1d_torch(x, weight, bias=None, mask=None, silu=True):
    """The reference: nn.functional.conv1d with K - 1 zeros of left padding (differentiable by autograd)."""
    batch, dim, length = x.shape
    weight = conv_weight_2d(weight, dim)
    taps = weight.shape[1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=taps - 1, groups=dim)[..., :length]
    if silu:
        out = F.silu(out)
    if mask is not None:
        out = out * mask[:, None, :].to(out.dtype)
    return out


def _padded_taps(weight: torch.Tensor) -> torch.Tensor:
    """(dim, K) -> (dim, 4) float32 with K leading zero taps prepended: the same causal sum."""
    return F.pad(weight.float(), (MAX_TRITON_TAPS - weight.shape[1], 0))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether a (channel, time) offset inside one batch row can reach 2**31 (then 64-bit offsets)."""
    limit = 2**31 - 1
    for t in tensors:
        _, dim, length = t.shape
        if (dim - 1) * abs(t.stride(1)) + (length + MAX_TRITON_TAPS) * abs(t.stride(2)) >= limit:
            return True
    return False


def _mask_args(mask, x):
    if mask is None:
        return x, (0, 0)
    return mask, tuple(mask.stride())


class CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, silu):
        from odyssey.kernels.causal_conv_kernels import _causal_conv_fwd_kernel

        batch, dim, length = x.shape
        taps = _padded_taps(conv_weight_2d(weight, dim))
        out = torch.empty_like(x)
        mask_ptr, mask_strides = _mask_args(mask, x)
        block_d, block_t = _tile("block_d_fwd", BLOCK_D_FWD), _tile("block_t_fwd", BLOCK_T_FWD)
        grid = (triton_cdiv(length, block_t), triton_cdiv(dim, block_d), batch)
        _causal_conv_fwd_kernel[grid](
            x, taps, bias if bias is not None else taps, mask_ptr, out, dim, length,
            *x.stride(), *taps.stride(), *mask_strides, *out.stride(),
            HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=bool(silu), WIDE=_wide(x, out),
            BLOCK_D=block_d, BLOCK_T=block_t, num_warps=_tile("warps_fwd", WARPS),
        )
        ctx.save_for_backward(x, taps, bias if bias is not None else taps.new_empty(0),
                              mask if mask is not None else taps.new_empty(0))
        ctx.has_bias, ctx.has_mask, ctx.silu = bias is not None, mask is not None, bool(silu)
        ctx.weight_shape, ctx.weight_dtype, ctx.taps = weight.shape, weight.dtype, weight.shape[-1]
        return out

    @staticmethod
    def backward(ctx, dout):
        from odyssey.kernels.causal_conv_kernels import _causal_conv_bwd_kernel, _causal_conv_bwd_seq_kernel

        x, taps, bias, mask = ctx.saved_tensors
        batch, dim, length = x.shape
        dx = torch.empty_like(x)
        dw = torch.zeros_like(taps)
        dbias = torch.zeros(dim, device=x.device, dtype=torch.float32) if ctx.has_bias else None
        mask_ptr, mask_strides = _mask_args(mask if ctx.has_mask else None, x)
        args = (x, taps, bias if ctx.has_bias else taps, mask_ptr, dout, dx, dw, dbias if dbias is not None else dw,
                dim, length, *x.stride(), *taps.stride(), *mask_strides, *dout.stride(), *dx.stride())
        flags = dict(HAS_BIAS=ctx.has_bias, HAS_MASK=ctx.has_mask, SILU=ctx.silu, WIDE=_wide(x, dout, dx))
        variant = _tile("bwd_variant", BWD_VARIANT)
        if variant == "seq":
            span = _tile("seq_span", SEQ_SPAN)
            grid = (triton_cdiv(dim, 32), batch, triton_cdiv(length, span))
            _causal_conv_bwd_seq_kernel[grid](*args, **flags, SPAN=span, num_warps=1)
        elif variant == "tile":
            block_d, block_t, span = _tile("block_d_bwd", BLOCK_D_BWD), _tile("block_t_bwd", BLOCK_T_BWD), _tile(
                "span", BWD_SPAN)
            grid = (triton_cdiv(length, span), triton_cdiv(dim, block_d), batch)
            _causal_conv_bwd_kernel[grid](*args, **flags, BLOCK_D=block_d, BLOCK_T=block_t, SPAN=span,
                                          num_warps=_tile("warps_bwd", WARPS))
        else:
            raise ValueError(f"unknown conv backward variant {variant!r}; choose seq or tile")
        dweight = dw[:, MAX_TRITON_TAPS - ctx.taps:].to(ctx.weight_dtype).reshape(ctx.weight_shape)
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        return dx, dweight, dbias, None, None


def resolve_conv_backend(backend: str, x: torch.Tensor, taps: int) -> str:
    """The backend a call runs: `auto` is `triton` for CUDA tensors with K <= 4 when Triton imports."""
    if backend == "triton" and taps > MAX_TRITON_TAPS:
        raise ValueError(f"the triton conv takes at most {MAX_TRITON_TAPS} taps; got {taps}")
    usable = use_triton(backend, None, "conv", x, "odyssey.kernels.causal_conv_kernels",
                        auto_triton=taps <= MAX_TRITON_TAPS)
    return "triton" if usable else "torch"


def causal_conv1d(x, weight, bias=None, mask=None, silu=True, backend="auto"):
    """silu(causal depthwise conv1d(x)) * mask, (batch, dim, L) -> (batch, dim, L); see the module doc."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, L), got shape {tuple(x.shape)}")
    batch, dim, length = x.shape
    weight2 = conv_weight_2d(weight, dim)
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"conv bias must be (dim={dim},), got {tuple(bias.shape)}")
    if mask is not None and tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must be (batch={batch}, L={length}), got {tuple(mask.shape)}")
    if resolve_conv_backend(backend, x, weight2.shape[1]) == "torch":
        return causal_conv1d_torch(x, weight2, bias, mask, silu)
    if mask is not None:
        mask = mask.to(torch.float32)
    return CausalConv1dTriton.apply(x, weight, bias, mask, silu)
