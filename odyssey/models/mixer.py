"""The Mamba-1 mixer, with transformers' `MambaMixer` parameter names, scanning through `odyssey.kernels`.

Two paths share the weights:
- `forward` over a whole sequence (training, scoring, prefill), scan by `selective_scan`;
- `step` over one token from a `MixerState` (conv window + SSM state), O(1) work per token, through
  `selective_state_update`: this is what forecasting and incremental scoring use.

`forward` has two layouts with the same result:
- `lean` (the default): every per-channel tensor lives channel-major, as (channels,
  batch * length) with each channel's time steps contiguous. in_proj is computed as W @ tokens^T, so
  x and the gate z are row slices of its output; the causal conv + SiLU (`odyssey.kernels.causal_conv`,
  a Triton kernel on CUDA) reads x and writes its output in that layout; x_proj and dt_proj are
  W @ activations products whose outputs are again channel-major, so u, delta, z, B and C reach the scan
  as strided (batch, channels, L) views and out_proj reads the scan's output through a transposed
  operand. No transpose copy and no float32 copy of a (batch, L, channels) tensor is made; every matrix
  product takes its transposed operands as cuBLAS does natively. dt_proj's bias and softplus run inside
  the scan (delta_bias, delta_softplus). Two gradients that autograd would join or add in an extra pass are
  formed inside the products' backward instead: in_proj's two halves (`in_projection`) and u's from the scan
  and from x_proj (`x_projection`).
  On CPU the conv is nn.functional.conv1d and the scan the chunked torch backend; the lean layout is
  still the faster one there (2-layer hidden-64 train step at batch 4, length 2048, one thread:
  0.40 s against 0.47 s).
- `unfused` (`mixer.layout = "unfused"`): transformers' MambaMixer sequence of operations
  (batch-first projections, nn.Conv1d, transposed views), kept as a second reference; on CUDA it hands
  the scan channels-last views, which our Triton scan reads 2-5x slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from odyssey.kernels import selective_scan, selective_state_update
from odyssey.kernels.causal_conv import causal_conv1d
from odyssey.kernels.step import conv_chunk, selective_chunk

from .configuration_ehrmamba import EHRMambaConfig


class _InProjection(torch.autograd.Function):
    """in_proj as W @ tokens^T, its two row blocks (x and the gate) returned as two outputs.

    Their gradients come from different kernels (the conv's backward and the scan's). Autograd's backward
    of a split would join them into one (2 x inter, tokens) copy before the product; here each block's
    gradient is multiplied on its own: the weight gradient's two halves written in place, the input
    gradient accumulated by the second product's epilogue (addmm, beta 1). Inputs come already cast
    (`in_projection`), so the backward needs no autocast state.
    """

    @staticmethod
    def forward(ctx, tokens, weight, bias, first_rows: int):
        xz = torch.mm(weight, tokens.t()) if bias is None else torch.addmm(bias[:, None], weight, tokens.t())
        ctx.save_for_backward(tokens, weight)
        ctx.first_rows, ctx.has_bias = first_rows, bias is not None
        return xz[:first_rows], xz[first_rows:]

    @staticmethod
    def backward(ctx, d_first, d_second):
        tokens, weight = ctx.saved_tensors
        rows = (slice(None, ctx.first_rows), slice(ctx.first_rows, None))
        grads = [None if grad is None else grad.to(tokens.dtype) for grad in (d_first, d_second)]
        d_tokens = d_weight = d_bias = None
        if ctx.needs_input_grad[1]:
            d_weight = weight.new_zeros(weight.shape)
            for grad, block in zip(grads, rows, strict=True):
                if grad is not None:
                    torch.mm(grad, tokens, out=d_weight[block])
        if ctx.needs_input_grad[0]:
            for grad, block in zip(grads, rows, strict=True):
                if grad is not None:
                    part = weight[block]
                    d_tokens = torch.mm(grad.t(), part) if d_tokens is None else d_tokens.addmm_(grad.t(), part)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = weight.new_zeros(weight.shape[0])
            for grad, block in zip(grads, rows, strict=True):
                if grad is not None:
                    d_bias[block] = grad.sum(1)
        return d_tokens, d_weight, d_bias, None


def _autocast_operands(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The operands cast as autocast casts torch.mm's (a custom Function's backward then needs no autocast state)."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def in_projection(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, first_rows: int):
    """(tokens, hidden) -> the row blocks [:first_rows] and [first_rows:] of W @ tokens^T (+ bias), as
    channel-major (rows, tokens) views of one product, with autocast's casts applied as for torch.mm."""
    tokens, weight, bias = _autocast_operands(tokens, weight, bias)
    return _InProjection.apply(tokens, weight, bias, first_rows)


class _Handoff:
    """The scan's gradient of u on its way from `_ScanInput`'s backward to `_XProjection`'s (`fused`: it arrived
    first and the product was added into it)."""

    def __init__(self):
        self.scan_grad: torch.Tensor | None = None
        self.projection_done = False
        self.fused = False


class _ScanInput(torch.autograd.Function):
    """u on its way into the scan (a view). Its backward hands the scan's gradient of u to x_proj's backward
    instead of to autograd, unless that one has already run (autograd then adds the two as it would anyway)."""

    @staticmethod
    def forward(ctx, u, handoff: _Handoff):
        ctx.handoff = handoff
        return u.view_as(u)

    @staticmethod
    def backward(ctx, d_u):
        if ctx.handoff.projection_done or d_u is None:
            return d_u, None
        ctx.handoff.scan_grad = d_u
        return None, None


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(batch, channels, L) -> (channels, batch * L): a view when channel-major, else a copy."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _channel_rows(x: torch.Tensor) -> torch.Tensor | None:
    """A (batch, channels, L) channel-major tensor as its (channels, batch * L) rows, a view; None if it is not."""
    rows = x.transpose(0, 1)
    return rows.view(x.shape[1], -1) if rows.is_contiguous() else None


class _XProjection(torch.autograd.Function):
    """x_proj as W @ u_rows, for u (the conv's output) that the scan reads too.

    Autograd would add the scan's gradient of u and this product's input gradient in a separate pass over
    (channels, tokens). Handed the scan's gradient (`_ScanInput`), the backward adds its product into that
    buffer in place instead (addmm_, beta 1: one read in the GEMM's epilogue). The buffer is the scan backward's
    fresh output, which nothing else holds once `_ScanInput` has kept it from autograd. Inputs come already cast.
    """

    @staticmethod
    def forward(ctx, rows, weight, handoff: _Handoff):
        ctx.save_for_backward(rows, weight)
        ctx.handoff = handoff
        return torch.mm(weight, rows)

    @staticmethod
    def backward(ctx, d_product):
        rows, weight = ctx.saved_tensors
        handoff = ctx.handoff
        handoff.projection_done = True
        scan_grad, handoff.scan_grad = handoff.scan_grad, None
        d_product = d_product.to(rows.dtype)
        d_rows = d_weight = None
        if ctx.needs_input_grad[0]:
            target = None if scan_grad is None else _channel_rows(scan_grad.to(rows.dtype))
            if target is not None:
                d_rows = target.addmm_(weight.t(), d_product)
                handoff.fused = True
            else:
                d_rows = torch.mm(weight.t(), d_product)
                if scan_grad is not None:  # not channel-major (e.g. the CPU scan's): added by a copy
                    d_rows += _as_rows(scan_grad).to(d_rows.dtype)
        if ctx.needs_input_grad[1]:
            d_weight = torch.mm(d_product, rows.t())
        return d_rows, d_weight, None


def x_projection(u: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u (batch, channels, L) -> (u for the scan, W @ u's (channels, batch * L) rows). Channel-major u (the
    Triton conv's output): the scan's gradient of u and the product's are summed inside the product's backward
    (`_XProjection`), with autocast's casts as for torch.mm. Otherwise (the CPU conv's batch-major output) a plain
    product of a copy of the rows, as autograd sums it."""
    rows = _channel_rows(u)
    if rows is None:
        return u, torch.mm(weight, _as_rows(u))
    rows, weight = _autocast_operands(rows, weight)
    handoff = _Handoff()
    # in this order: autograd runs ready nodes latest-created first, so _ScanInput's backward (ready right after the
    # scan's) comes before _XProjection's (ready after dt_proj's and the split's); either order sums correctly
    projected = _XProjection.apply(rows, weight, handoff)
    return _ScanInput.apply(u, handoff), projected


@dataclass
class MixerState:
    """Recurrent state of one mixer: the last `conv_kernel` conv inputs and the SSM state (float32)."""

    conv_state: torch.Tensor  # (batch, intermediate, conv_kernel)
    ssm_state: torch.Tensor  # (batch, intermediate, state_size)


class EHRMambaMixer(nn.Module):
    """Selective SSM block: in_proj -> causal depthwise conv -> SiLU -> selective scan (gated) -> out_proj."""

    def __init__(self, config: EHRMambaConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.ssm_state_size = config.state_size
        self.conv_kernel_size = config.conv_kernel
        self.time_step_rank = int(config.time_step_rank)
        self.scan_backend = config.scan_backend
        self.layout = "auto"  # "lean", "unfused", or "auto" (= lean; module docstring)
        self.conv_backend = "auto"  # odyssey.kernels.causal_conv backend of the lean layout
        self.in_proj = nn.Linear(self.hidden_size, 2 * self.intermediate_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size,
            self.intermediate_size,
            kernel_size=config.conv_kernel,
            groups=self.intermediate_size,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.x_proj = nn.Linear(self.intermediate_size, self.time_step_rank + 2 * self.ssm_state_size, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.intermediate_size, self.ssm_state_size))
        self.D = nn.Parameter(torch.empty(self.intermediate_size))
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)

    @torch.no_grad()
    def reset_ssm_parameters(self, config: EHRMambaConfig) -> None:
        """Mamba's S4D-real init of A, D = 1, and dt bias so softplus(bias) is log-uniform in [min, max]."""
        A = torch.arange(1, self.ssm_state_size + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.intermediate_size, -1))
        self.D.fill_(1.0)
        dt_std = self.time_step_rank**-0.5 * config.time_step_scale
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(self.intermediate_size, device=self.D.device) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=config.time_step_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, length, intermediate) -> delta (batch, inter, length) before bias, B and C (batch, N, length)."""
        time_step, B, C = torch.split(
            self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
        )
        delta = (time_step @ self.dt_proj.weight.t()).transpose(1, 2)
        return delta, B.transpose(1, 2), C.transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, MixerState]:
        """(batch, length, hidden) -> (batch, length, hidden); with `return_state`, also the final state.

        Padding positions (attention_mask 0) are zeroed before the projections and the scan, so left
        padding leaves the real tokens' outputs exactly as without padding.
        """
        length = hidden_states.shape[1]
        mask = None if attention_mask is None else attention_mask[:, :, None].to(hidden_states.dtype)
        if mask is not None:
            hidden_states = hidden_states * mask
        if self._lean(hidden_states):
            return self._lean_forward(hidden_states, attention_mask, return_state)
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        conv_input = x
        x = F.silu(self.conv1d(x)[..., :length])
        x = x.transpose(1, 2)
        if mask is not None:
            x = x * mask
        delta, B, C = self._ssm_inputs(x)
        result = self._scan(x.transpose(1, 2), delta, B, C, gate, return_state)
        if not return_state:
            return self.out_proj(result.transpose(1, 2).to(hidden_states.dtype))
        y, ssm_state = result
        out = self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))
        return out, self._state_after(conv_input, ssm_state)

    def _scan(self, u, delta, B, C, gate, return_state: bool):
        """The selective scan with this mixer's A, D, dt bias (softplus inside the scan) and backend."""
        return selective_scan(
            u, delta, -torch.exp(self.A_log.float()), B, C, D=self.D.float(), z=gate,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=return_state,
            backend=self.scan_backend,
        )

    def _state_after(self, conv_input: torch.Tensor, ssm_state: torch.Tensor) -> MixerState:
        """The recurrent state after a sequence: the last `conv_kernel` conv inputs (zero-padded) and the SSM state."""
        length = conv_input.shape[-1]
        window = F.pad(conv_input, (max(self.conv_kernel_size - length, 0), 0))[..., -self.conv_kernel_size :]
        return MixerState(conv_state=window.contiguous(), ssm_state=ssm_state.float())

    def _lean(self, hidden_states: torch.Tensor) -> bool:
        if self.layout not in ("auto", "lean", "unfused"):
            raise ValueError(f"unknown mixer layout {self.layout!r}; choose auto, lean or unfused")
        return self.layout != "unfused"

    def _lean_forward(self, hidden_states, attention_mask, return_state):
        """The channel-major forward (module docstring); same outputs as the unfused one."""
        batch, length, _ = hidden_states.shape
        inter, rank, n_state = self.intermediate_size, self.time_step_rank, self.ssm_state_size

        def per_channel(rows: torch.Tensor) -> torch.Tensor:
            """(channels, batch * L) -> a (batch, channels, L) view."""
            return rows.view(rows.shape[0], batch, length).transpose(0, 1)

        tokens = hidden_states.reshape(batch * length, self.hidden_size)
        x, gate = (per_channel(rows) for rows in in_projection(tokens, self.in_proj.weight, self.in_proj.bias,
                                                               inter))
        x_conv = causal_conv1d(x, self.conv1d.weight, self.conv1d.bias, mask=attention_mask,
                               backend=self.conv_backend)
        u, projected = x_projection(x_conv, self.x_proj.weight)
        time_step, B, C = torch.split(projected, [rank, n_state, n_state], dim=0)
        delta = torch.mm(self.dt_proj.weight, time_step)
        result = self._scan(u, per_channel(delta), per_channel(B), per_channel(C), gate, return_state)
        y = result[0] if return_state else result
        out = F.linear(_as_rows(y).t(), self.out_proj.weight, self.out_proj.bias)
        out = out.view(batch, length, self.hidden_size)
        if not return_state:
            return out
        return out, self._state_after(x, result[1])

    def empty_state(self, batch_size: int, device=None, dtype=None) -> MixerState:
        """The state before any token (zeros), for decoding from scratch."""
        device = device or self.A_log.device
        return MixerState(
            conv_state=torch.zeros(
                batch_size, self.intermediate_size, self.conv_kernel_size, device=device,
                dtype=dtype or self.in_proj.weight.dtype,
            ),
            ssm_state=torch.zeros(batch_size, self.intermediate_size, self.ssm_state_size, device=device),
        )

    def step(
        self, hidden_states: torch.Tensor, state: MixerState, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One token: (batch, hidden) -> (batch, hidden), updating `state` in place.

        Rows where `active` is False (padding) keep their state unchanged.
        """
        x, gate = self.in_proj(hidden_states).chunk(2, dim=-1)
        window = torch.cat([state.conv_state[..., 1:], x[..., None].to(state.conv_state.dtype)], dim=-1)
        x = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        delta, B, C = self._ssm_inputs(x[:, None, :])
        A = -torch.exp(self.A_log.float())
        ssm_state = state.ssm_state.clone()
        y = selective_state_update(
            ssm_state,
            x,
            delta[..., 0],
            A,
            B[..., 0],
            C[..., 0],
            D=self.D.float(),
            z=gate,
            dt_bias=self.dt_proj.bias.float(),
            dt_softplus=True,
        )
        if active is None:
            state.conv_state.copy_(window)
            state.ssm_state.copy_(ssm_state)
        else:
            keep = active.bool()[:, None, None]
            state.conv_state.copy_(torch.where(keep, window, state.conv_state))
            state.ssm_state.copy_(torch.where(keep, ssm_state, state.ssm_state))
        return self.out_proj(y.to(hidden_states.dtype))

    def step_tokens(
        self,
        hidden_states: torch.Tensor,
        conv_states: torch.Tensor,
        ssm_states: torch.Tensor,
        slots: torch.Tensor,
        active: torch.Tensor,
        save_after: int,
        backend: str = "auto",
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A few tokens of many pooled rows: (rows, count, hidden) -> (rows, count, hidden).

        Row r continues the state in row `slots[r]` of `conv_states` (slots, inter, conv_kernel) and
        `ssm_states` (slots, inter, N); the state after the first `save_after` tokens is written back there
        and the rest (a trailing prompt) continues unsaved. Inactive tokens (`active` 0) are padding. The
        same arithmetic as `count` calls of `step`, in one launch per operation (`odyssey.kernels.step`).
        With `residual` (same shape, float32), returns residual + the mixer's output, added in out_proj's
        matrix product where the dtypes allow.
        """
        x, gate = self.in_proj(hidden_states).split(self.intermediate_size, dim=-1)
        x = conv_chunk(x, conv_states, slots, active, self.conv1d.weight, self.conv1d.bias, save_after, backend)
        time_step, B, C = self.x_proj(x).split([self.time_step_rank, self.ssm_state_size, self.ssm_state_size],
                                               dim=-1)
        y = selective_chunk(ssm_states, slots, x, time_step, self.dt_proj.weight, self.dt_proj.bias, self.A_log,
                            B, C, self.D, gate, active, save_after, backend)
        y = y.to(hidden_states.dtype)
        if residual is None:
            return self.out_proj(y)
        if self.out_proj.bias is None and residual.dtype == y.dtype == self.out_proj.weight.dtype:
            return torch.addmm(residual.reshape(-1, residual.shape[-1]), y.reshape(-1, y.shape[-1]),
                               self.out_proj.weight.t()).view(residual.shape)
        return residual + self.out_proj(y)
