"""The implicit ("hidden") attention of a Mamba layer's selective scan.

Unrolling the recurrence of one channel d,

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,      y_t = C_t . h_t   (+ D u_t, left out here),

gives y_t[d] = sum_{s <= t} alpha_d(t, s) u_s[d] with

    alpha_d(t, s) = sum_n C_t[n] exp(A[d, n] (S_t[d] - S_s[d])) delta_s[d] B_s[n],   S = cumsum(delta).

`alpha_d` is a causal (lower-triangular) matrix over positions, one per channel; the layer's hidden
attention is its mean over channels. The products of decays are differences of cumulative log-decays
(computed in float64), and the matrix is built in blocks of target, source and channel positions, so
memory is one block (at most target_block x max(target_block, source_block) x channel_block x N), never
L^2 x dim x N. Off-diagonal blocks factor the decay at the target block's start (see
`hidden_attention_from_scan`), so the cost is one (dim x N)-deep contraction per pair of positions.

`u` is the scan input (after the causal convolution and SiLU), so alpha mixes positions only through
the scan; the convolution's own short window (conv_kernel tokens) is not part of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Reduction = Literal["mean", "mean_abs", "none"]
# (target, source, channel) block sizes. Measured best of a few: CPU one thread, L = 2,048, dim 128;
# H100, L = 2,048-16,384, dim 1,536 (peak 6 GiB at 16k). Numbers in docs/viz.md.
DEFAULT_BLOCKS: dict[str, tuple[int, int, int]] = {"cpu": (32, 1024, 64), "cuda": (128, 4096, 256)}
REDUCTIONS: tuple[str, ...] = ("mean", "mean_abs", "none")


@dataclass
class ScanInputs:
    """What a mixer feeds its selective scan, for a batch: delta after bias and softplus.

    Shapes: u, delta, gate (batch, dim, L); A (dim, N); B, C (batch, N, L); D (dim,).
    """

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    gate: torch.Tensor


def _check_shapes(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    if delta.dim() != 3:
        raise ValueError(f"delta must be (batch, dim, L), got shape {tuple(delta.shape)}")
    batch, dim, length = delta.shape
    if A.shape[0] != dim or A.dim() != 2:
        raise ValueError(f"A must be (dim={dim}, N), got shape {tuple(A.shape)}")
    state = A.shape[1]
    for name, tensor in (("B", B), ("C", C)):
        if tuple(tensor.shape) != (batch, state, length):
            raise ValueError(f"{name} must be (batch={batch}, N={state}, L={length}), got {tuple(tensor.shape)}")


def hidden_attention_from_scan(
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reduce: Reduction = "mean",
    target_block: int | None = None,
    source_block: int | None = None,
    channel_block: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """alpha(t, s) of a selective scan, built block by block.

    `delta` is the step size after bias and softplus (batch, dim, L); A (dim, N) is negative; B, C
    (batch, N, L). Returns (batch, L, L) averaged over channels (`mean`, or `mean_abs` of |alpha_d|), or
    (batch, dim, L, L) with `reduce="none"`. Entries above the diagonal (s > t) are exactly zero.
    Computed in `dtype` (default: delta's dtype); decays come from float64 cumulative sums.
    Block sizes default by device (`DEFAULT_BLOCKS`: small tiles on CPU, larger ones on CUDA).

    For a block of targets starting at r, earlier sources split their decay at r:
    exp(A (S_t - S_s)) = exp(A (S_t - S_r)) * exp(A (S_r - S_s)), both factors <= 1 (no overflow), so
    the block is one contraction over (channel, state) instead of L^2 x dim x N exponentials. Sources
    inside the target block (the diagonal block) take their decays pair by pair.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    defaults = DEFAULT_BLOCKS["cuda" if delta.is_cuda else "cpu"]
    target_block = defaults[0] if target_block is None else target_block
    source_block = defaults[1] if source_block is None else source_block
    channel_block = defaults[2] if channel_block is None else channel_block
    for name, size in (("target_block", target_block), ("source_block", source_block),
                       ("channel_block", channel_block)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    _check_shapes(delta, A, B, C)
    dtype = dtype or delta.dtype
    batch, dim, length = delta.shape
    log_time = torch.cumsum(delta.double(), dim=-1)  # S_t per channel, (batch, dim, L)
    A64 = A.double()[None, :, :, None]  # (1, dim, N, 1)
    delta64, B64, C64 = delta.double(), B.double(), C.double()

    def weighted_B(channels: slice, sources: slice) -> torch.Tensor:
        """delta_s B_s for a tile, (batch, Db, N, Sb); built per tile to keep memory O(L x dim)."""
        return delta64[:, channels, None, sources] * B64[:, None, :, sources]
    shape = (batch, dim, length, length) if reduce == "none" else (batch, length, length)
    out = torch.zeros(shape, dtype=dtype, device=delta.device)
    positions = torch.arange(length, device=delta.device)

    def accumulate(block: torch.Tensor, rows: slice, cols: slice, channels: slice) -> None:
        """block: per-channel alpha (batch, Db, Tb, Sb) or its channel sum (batch, Tb, Sb)."""
        if reduce == "none":
            out[:, channels, rows, cols] = block.to(dtype)
        elif reduce == "mean_abs":
            out[:, rows, cols] += block.abs().sum(1).to(dtype)
        else:
            out[:, rows, cols] += (block if block.dim() == 3 else block.sum(1)).to(dtype)

    for t0 in range(0, length, target_block):
        t1 = min(t0 + target_block, length)
        targets = slice(t0, t1)
        causal = positions[t0:t1, None] >= positions[None, t0:t1]
        for d0 in range(0, dim, channel_block):
            channels = slice(d0, min(d0 + channel_block, dim))
            S = log_time[:, channels]
            A_d = A64[:, channels]
            # Diagonal block: decays pair by pair (both ends inside the block).
            elapsed = (S[:, :, targets, None] - S[:, :, None, targets]).clamp(min=0)  # (b, Db, Tb, Tb)
            decay = torch.exp(elapsed[:, :, None] * A_d[..., None]) * causal  # (b, Db, N, Tb, Tb)
            decay *= C64[:, None, :, targets, None] * weighted_B(channels, targets)[:, :, :, None, :]
            diagonal = decay.sum(2)  # over states: (b, Db, Tb, Tb)
            accumulate(diagonal, targets, targets, channels)
            if t0 == 0:
                continue
            # Earlier sources: decay split at the block start r = t0.
            # Both factors are bounded by |C| and |delta B|, so the contraction can run in `dtype`.
            into = C64[:, None, :, targets] * torch.exp((S[:, :, None, targets] - S[:, :, None, t0, None]) * A_d)
            into = into.to(dtype)
            for s0 in range(0, t0, source_block):
                sources = slice(s0, min(s0 + source_block, t0))
                out_of = torch.exp((S[:, :, None, t0, None] - S[:, :, None, sources]) * A_d)
                carried = (out_of * weighted_B(channels, sources)).to(dtype)  # (b, Db, N, Sb)
                if reduce == "mean":
                    block = torch.einsum("bdnt,bdns->bts", into, carried)
                else:
                    block = torch.einsum("bdnt,bdns->bdts", into, carried)
                accumulate(block, targets, sources, channels)
    if reduce != "none":
        out /= dim
    return out


def hidden_attention_bruteforce(
    delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Per-channel alpha (batch, dim, L, L) in float64 by explicit products of decays (tiny shapes only)."""
    _check_shapes(delta, A, B, C)
    delta, A, B, C = delta.double(), A.double(), B.double(), C.double()
    batch, dim, length = delta.shape
    out = torch.zeros(batch, dim, length, length, dtype=torch.float64)
    for t in range(length):
        for s in range(t + 1):
            decay = torch.ones(batch, dim, A.shape[1], dtype=torch.float64)
            for k in range(s + 1, t + 1):
                decay = decay * torch.exp(delta[:, :, k, None] * A[None])
            out[:, :, t, s] = (C[:, None, :, t] * decay * delta[:, :, s, None] * B[:, None, :, s]).sum(-1)
    return out


def mixer_scan_inputs(
    mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> ScanInputs:
    """The scan inputs of an `EHRMambaMixer` for its (batch, L, hidden) input, as its forward builds them."""
    length = hidden_states.shape[1]
    if attention_mask is not None:
        mask = attention_mask[:, :, None].to(hidden_states.dtype)
        hidden_states = hidden_states * mask
    x, gate = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    x = F.silu(mixer.conv1d(x)[..., :length]).transpose(1, 2)
    if attention_mask is not None:
        x = x * mask
    delta, B, C = mixer._ssm_inputs(x)
    delta = F.softplus(delta.float() + mixer.dt_proj.bias.float()[None, :, None])
    return ScanInputs(
        u=x.transpose(1, 2).float(),
        delta=delta,
        A=-torch.exp(mixer.A_log.float()),
        B=B.float(),
        C=C.float(),
        D=mixer.D.float(),
        gate=gate.float(),
    )


MODEL_INPUTS: dict[str, torch.dtype] = {
    "input_ids": torch.long,
    "token_type_ids": torch.long,
    "ages": torch.float32,
    "times": torch.float32,
    "visit_orders": torch.long,
    "visit_segments": torch.long,
}


def sequence_inputs(row: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """One stored sequence row (`load_sequences(...).row(i, named=True)`, or a cut/truncated row) as a
    batch of one for the model."""
    missing = [name for name in MODEL_INPUTS if name not in row]
    if missing:
        raise KeyError(f"sequence row lacks {missing}")
    return {
        name: torch.as_tensor(np.asarray(row[name]), dtype=dtype, device=device)[None]
        for name, dtype in MODEL_INPUTS.items()
    }


def _backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "layers"):
        raise TypeError(f"{type(model).__name__} has no Mamba layers (expected an EHRMamba model)")
    return backbone


@torch.no_grad()
def layer_scan_inputs(model: nn.Module, layer: int, **inputs: torch.Tensor) -> ScanInputs:
    """Run `model` (EHRMambaModel or a model with `.backbone`) on `inputs` and capture layer `layer`'s scan inputs.

    The model runs in eval mode (no dropout) and is put back in its mode afterwards.
    """
    backbone = _backbone(model)
    count = len(backbone.layers)
    if not -count <= layer < count:
        raise ValueError(f"layer {layer} out of range: the model has {count} layers")
    mixer = backbone.layers[layer].mixer
    captured: dict[str, torch.Tensor | None] = {}

    def capture(module, args, kwargs):
        captured["hidden"] = args[0]
        captured["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    handle = mixer.register_forward_pre_hook(capture, with_kwargs=True)
    was_training = backbone.training
    backbone.eval()  # no embedding dropout: the attention of the model as it predicts
    try:
        backbone(**inputs)
    finally:
        handle.remove()
        backbone.train(was_training)
    return mixer_scan_inputs(mixer, captured["hidden"], captured["mask"])


@torch.no_grad()
def hidden_attention(
    model: nn.Module,
    layer: int,
    reduce: Reduction = "mean",
    target_block: int | None = None,
    source_block: int | None = None,
    channel_block: int | None = None,
    **inputs: torch.Tensor,
) -> torch.Tensor:
    """Hidden attention of layer `layer` for a batch (`input_ids`, `token_type_ids`, ... as the model takes).

    Returns (batch, L, L) averaged over channels (see `hidden_attention_from_scan`).
    """
    scan = layer_scan_inputs(model, layer, **inputs)
    return hidden_attention_from_scan(
        scan.delta, scan.A, scan.B, scan.C, reduce=reduce,
        target_block=target_block, source_block=source_block, channel_block=channel_block,
    )
