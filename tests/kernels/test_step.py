"""`selective_state_update`: token-by-token stepping reproduces the full scan and continues it."""

from __future__ import annotations

import pytest
import torch

from odyssey.kernels import selective_scan, selective_state_update
from odyssey.kernels.reference import selective_scan_reference


def scan_inputs(batch=2, dim=6, length=40, n_state=4, groups=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    return {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": torch.randn(batch, dim, length, generator=gen) * 0.5,
        "A": -torch.exp(torch.randn(dim, n_state, generator=gen)),
        "B": torch.randn(*bc_shape, generator=gen),
        "C": torch.randn(*bc_shape, generator=gen),
        "D": torch.randn(dim, generator=gen),
        "z": torch.randn(batch, dim, length, generator=gen),
        "delta_bias": torch.randn(dim, generator=gen) * 0.1,
    }


def step_through(state, inputs, start, end):
    """Feed steps [start, end) through selective_state_update; returns y (batch, dim, end - start)."""
    ys = []
    for t in range(start, end):
        ys.append(
            selective_state_update(
                state,
                inputs["u"][..., t],
                inputs["delta"][..., t],
                inputs["A"],
                inputs["B"][..., t],
                inputs["C"][..., t],
                D=inputs["D"],
                z=inputs["z"][..., t],
                dt_bias=inputs["delta_bias"],
                dt_softplus=True,
            )
        )
    return torch.stack(ys, dim=-1)


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("groups", [None, 3])
def test_token_by_token_equals_full_scan(groups):
    inputs = scan_inputs(groups=groups)
    full, full_last = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
    state = torch.zeros(2, 6, 4)
    stepped = step_through(state, inputs, 0, inputs["u"].shape[-1])
    assert stepped.dtype == torch.float32
    assert rel_err(stepped, full) <= 1e-5
    assert rel_err(state, full_last) <= 1e-5


def test_continuing_from_last_state_equals_whole_sequence():
    inputs = scan_inputs(length=50, seed=1)
    whole, whole_last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    split = 31
    prefix = {k: (v[..., :split] if v.dim() == 3 else v) for k, v in inputs.items()}
    prefix_out, state = selective_scan(**prefix, delta_softplus=True, return_last_state=True)
    continued = step_through(state, inputs, split, 50)
    assert rel_err(prefix_out, whole[..., :split]) <= 1e-5
    assert rel_err(continued, whole[..., split:]) <= 1e-5
    assert rel_err(state, whole_last) <= 1e-5


def test_state_is_updated_in_place_and_keeps_its_dtype():
    inputs = scan_inputs(batch=1, dim=2, length=1, n_state=3)
    state = torch.ones(1, 2, 3, dtype=torch.bfloat16)
    storage = state.data_ptr()
    u = inputs["u"][..., 0].to(torch.bfloat16)
    y = selective_state_update(
        state, u, inputs["delta"][..., 0], inputs["A"], inputs["B"][..., 0], inputs["C"][..., 0]
    )
    assert state.data_ptr() == storage and state.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    decay = torch.exp(inputs["delta"][..., 0, None] * inputs["A"])
    expected_state = decay + (inputs["delta"][..., 0] * u.float())[..., None] * inputs["B"][:, None, :, 0]
    assert torch.allclose(state.float(), expected_state, rtol=1e-2, atol=1e-2)


def test_bad_shapes_name_the_argument():
    inputs = scan_inputs(batch=1, dim=2, length=1, n_state=3)
    state = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="dt"):
        selective_state_update(
            state,
            inputs["u"][..., 0],
            torch.zeros(1, 3),
            inputs["A"],
            inputs["B"][..., 0],
            inputs["C"][..., 0],
        )
    with pytest.raises(ValueError, match="A must be"):
        selective_state_update(
            state,
            inputs["u"][..., 0],
            inputs["delta"][..., 0],
            torch.zeros(2, 4),
            inputs["B"][..., 0],
            inputs["C"][..., 0],
        )
