"""The chunked `torch` scan against the float64 sequential reference: values, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch

from odyssey.kernels.chunked import DEFAULT_CHUNK_SIZE, _plan_segments, selective_scan_chunked
from odyssey.kernels.reference import selective_scan_reference

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, length, n_state, groups=None, dtype=torch.float32, seed=0, delta_scale=0.5):
    """Random scan inputs shaped like a Mamba layer's: A negative, delta around softplus's knee."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    inputs = {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length) * delta_scale,
        "A": -torch.exp(rand(dim, n_state)),
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": rand(dim) * 0.1,
    }
    # A, D and delta_bias are float32 parameters (as in mamba-ssm) unless the whole test runs in float64
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: v.to(param_dtype if k in ("A", "D", "delta_bias") else dtype) for k, v in inputs.items()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.double().abs().max().clamp_min(1e-30)
    return ((got.double() - want.double()).abs().max() / scale).item()


def run_both(inputs, chunk_size=DEFAULT_CHUNK_SIZE, recompute_backward=True, **flags):
    """Forward+backward of chunked and reference on the same leaves; loss touches out and last state."""
    results = []
    for scan in ("chunked", "reference"):
        leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        if scan == "chunked":
            out, last = selective_scan_chunked(
                **leaves,
                return_last_state=True,
                chunk_size=chunk_size,
                recompute_backward=recompute_backward,
                **flags,
            )
        else:
            out, last = selective_scan_reference(**leaves, return_last_state=True, **flags)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
        loss = (out.double() * weights).sum() + (last.double() ** 2).sum()
        loss.backward()
        results.append((out, last, {k: v.grad for k, v in leaves.items()}))
    return results


@pytest.mark.parametrize(
    ("batch", "dim", "length", "n_state", "groups"),
    [(2, 4, 1, 3, None), (2, 6, 127, 5, None), (2, 6, 127, 5, 3), (1, 2, 2049, 4, None), (1, 4, 2049, 4, 2)],
)
def test_matches_reference_values_and_gradients(batch, dim, length, n_state, groups):
    inputs = make_inputs(batch, dim, length, n_state, groups)
    (out, last, grads), (ref_out, ref_last, ref_grads) = run_both(inputs, delta_softplus=True)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(last, ref_last) <= 1e-5
    for name in ARG_NAMES:
        if ref_grads[name].abs().max() > 0:  # dL/dA is exactly 0 at length 1 (no earlier state)
            assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name
        else:
            assert grads[name].abs().max() == 0, name


@pytest.mark.parametrize("length", [7, 8, 9, 16, 17, 40])
def test_chunk_boundaries_do_not_change_the_result(length):
    inputs = make_inputs(2, 4, length, 3, groups=2, seed=length)
    ref_out, ref_last = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
    for chunk_size in (1, 3, 8, 64):
        out, last = selective_scan_chunked(
            **inputs, delta_softplus=True, return_last_state=True, chunk_size=chunk_size
        )
        assert rel_err(out, ref_out) <= 1e-5, chunk_size
        assert rel_err(last, ref_last) <= 1e-5, chunk_size


def test_plain_autograd_variant_gives_the_same_gradients():
    inputs = make_inputs(2, 4, 50, 3)
    (out_a, _, grads_a), _ = run_both(inputs, chunk_size=16, recompute_backward=True, delta_softplus=True)
    (out_b, _, grads_b), _ = run_both(inputs, chunk_size=16, recompute_backward=False, delta_softplus=True)
    assert rel_err(out_a, out_b) <= 1e-6
    for name in ARG_NAMES:
        assert rel_err(grads_a[name], grads_b[name]) <= 1e-6, name


def test_optional_arguments_absent():
    inputs = make_inputs(2, 4, 33, 3)
    core = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    out = selective_scan_chunked(**core, chunk_size=8)
    assert rel_err(out, selective_scan_reference(**core)) <= 1e-5


def test_gradcheck_float64_all_inputs():
    inputs = make_inputs(1, 4, 11, 2, groups=2, dtype=torch.float64, seed=3)
    names = list(ARG_NAMES)

    def scan(*tensors):
        out, last = selective_scan_chunked(
            **dict(zip(names, tensors, strict=True)),
            delta_softplus=True,
            return_last_state=True,
            chunk_size=4,
        )
        return out, last

    leaves = tuple(inputs[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_steep_decays_stay_finite_and_exact():
    """Per-step decays far beyond float32's exp range: the planner splits segments, nothing overflows."""
    inputs = make_inputs(2, 4, 100, 3, seed=5)
    inputs["A"] = inputs["A"] * 200.0  # |delta * A| up to several hundred in one step
    inputs["delta"] = inputs["delta"].abs() * 3
    (out, last, grads), (ref_out, ref_last, ref_grads) = run_both(inputs, chunk_size=64)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(last, ref_last) <= 1e-5
    for name in ARG_NAMES:
        assert torch.isfinite(grads[name]).all(), name
        assert rel_err(grads[name], ref_grads[name]) <= 1e-4, name


def test_growing_and_negative_steps_match_reference():
    """A > 0 or delta < 0 (no softplus) are unusual but legal: exponents are bounded the general way."""
    inputs = make_inputs(1, 4, 60, 3, seed=6, delta_scale=0.2)
    inputs["A"] = inputs["A"] * torch.tensor([1.0, -1.0, 1.0])  # mixed-sign A, delta of both signs
    (out, last, grads), (ref_out, ref_last, ref_grads) = run_both(inputs, chunk_size=32)
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(last, ref_last) <= 1e-5
    for name in ARG_NAMES:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


def test_planner_respects_exponent_limit_and_covers_sequence():
    inputs = make_inputs(2, 4, 300, 3, seed=7)
    delta = torch.nn.functional.softplus(inputs["delta"] * 4)
    A = inputs["A"] * 10
    segments = _plan_segments(delta, A, chunk_size=64)
    assert segments[0][0] == 0 and segments[-1][1] == 300
    assert all(a[1] == b[0] for a, b in zip(segments, segments[1:], strict=False))
    assert all(0 < end - start <= 64 for start, end in segments)
    rate = delta.abs() * A.abs().amax(dim=1)[None, :, None]
    for start, end in segments:
        if end - start > 1:  # a single step needs no factoring
            assert rate[..., start:end].sum(-1).max() <= 120.0 + 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    inputs = make_inputs(2, 4, 70, 3, groups=2, dtype=dtype, seed=8)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan_chunked(**leaves, delta_softplus=True, return_last_state=True, chunk_size=32)
    assert out.dtype == dtype and last.dtype == torch.float32
    out.float().sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype, name
    # reference on the same rounded inputs: only the output rounding differs
    ref_out, ref_last = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(out, ref_out.to(torch.float64)) <= tolerance
    assert rel_err(last, ref_last) <= 1e-5


def test_backward_saves_only_segment_start_states():
    """Memory: the recomputing backward keeps O(batch*dim*L + segments*batch*dim*N), not every state."""
    batch, dim, length, n_state = 2, 32, 512, 64
    inputs = make_inputs(batch, dim, length, n_state, seed=9)
    inputs["delta"] = inputs["delta"] * 0.01 - 6  # tiny steps: every segment has the full chunk size

    def saved_elements(recompute_backward: bool) -> int:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        saved = []

        def pack(tensor):
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            selective_scan_chunked(
                **leaves, delta_softplus=True, chunk_size=64, recompute_backward=recompute_backward
            )
        return sum(saved)

    all_states = batch * dim * length * n_state
    assert saved_elements(recompute_backward=True) < all_states / 4
    assert saved_elements(recompute_backward=False) > all_states  # plain autograd keeps them all


def test_transposed_inputs_as_a_model_hands_them_over():
    """u, delta, z as (batch, L, dim) activations transposed to (batch, dim, L), B and C likewise."""
    inputs = make_inputs(2, 6, 45, 3, seed=10)
    transposed = {
        k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() == 3 else v)
        for k, v in inputs.items()
    }
    assert not transposed["u"].is_contiguous() and not transposed["B"].is_contiguous()
    out = selective_scan_chunked(**transposed, delta_softplus=True, chunk_size=16)
    assert rel_err(out, selective_scan_reference(**inputs, delta_softplus=True)) <= 1e-5


def test_empty_sequence():
    inputs = make_inputs(2, 4, 0, 3)
    out, last = selective_scan_chunked(**inputs, return_last_state=True)
    assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 3))
