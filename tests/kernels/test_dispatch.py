"""Backend choice of `selective_scan`: auto, the environment override, missing optional backends."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from odyssey.kernels import (
    ENV_VAR,
    ScanBackendUnavailable,
    dispatch,
    resolve_backend,
    resolve_step_backend,
    selective_scan,
    selective_state_update,
)
from odyssey.kernels.reference import selective_scan_reference

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Forget loaded backends, so a test can change what the triton module resolves to."""
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.delenv(ENV_VAR, raising=False)
    return dispatch


@pytest.fixture
def triton_missing(fresh_dispatch, monkeypatch):
    monkeypatch.setattr(fresh_dispatch, "TRITON_MODULE", "odyssey_scan_tests_no_such_module")
    return fresh_dispatch


@pytest.fixture
def triton_standin(fresh_dispatch, monkeypatch, tmp_path):
    """A module exposing `selective_scan_triton` that runs the reference, to see dispatch route to it."""
    (tmp_path / "odyssey_scan_tests_triton_standin.py").write_text(
        "from odyssey.kernels.reference import selective_scan_reference as selective_scan_triton\n"
        "from odyssey.kernels.step import selective_state_update as selective_state_update_triton\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(fresh_dispatch, "TRITON_MODULE", "odyssey_scan_tests_triton_standin")
    return fresh_dispatch


def small_inputs():
    gen = torch.Generator().manual_seed(0)
    return {
        "u": torch.randn(2, 4, 9, generator=gen),
        "delta": torch.randn(2, 4, 9, generator=gen),
        "A": -torch.rand(4, 3, generator=gen),
        "B": torch.randn(2, 3, 9, generator=gen),
        "C": torch.randn(2, 3, 9, generator=gen),
    }


def test_auto_on_cpu_is_torch(triton_standin):
    assert resolve_backend("auto", CPU) == "torch"


def test_auto_on_cuda_prefers_triton_when_it_imports(triton_standin):
    assert resolve_backend("auto", CUDA) == "triton"


def test_auto_on_cuda_falls_back_to_torch_without_triton(triton_missing):
    assert resolve_backend("auto", CUDA) == "torch"


def test_explicit_triton_when_absent_raises_a_clear_error(triton_missing):
    with pytest.raises(ScanBackendUnavailable, match="'triton' is unavailable.*odyssey_scan_tests_no_such"):
        selective_scan(**small_inputs(), backend="triton")


def test_explicit_triton_routes_to_the_module(triton_standin):
    inputs = small_inputs()
    out = selective_scan(**inputs, backend="triton", delta_softplus=True)
    assert torch.equal(out, selective_scan_reference(**inputs, delta_softplus=True))


def test_environment_overrides_auto_but_not_an_explicit_backend(fresh_dispatch, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend("auto", CPU) == "reference"
    assert resolve_backend("torch", CPU) == "torch"
    inputs = small_inputs()
    assert torch.equal(selective_scan(**inputs), selective_scan_reference(**inputs))


def test_environment_with_unknown_backend_is_rejected(fresh_dispatch, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda-fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("auto", CPU)


def test_unknown_backend_argument_is_rejected():
    with pytest.raises(ValueError, match="unknown scan backend"):
        selective_scan(**small_inputs(), backend="fast")


def test_torch_backend_matches_reference():
    inputs = small_inputs()
    out, last = selective_scan(**inputs, backend="torch", return_last_state=True)
    ref, ref_last = selective_scan_reference(**inputs, return_last_state=True)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(last, ref_last, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="mamba-ssm is installed")
def test_mamba_ssm_absent_raises_a_clear_error(fresh_dispatch):
    with pytest.raises(ScanBackendUnavailable, match="mamba-ssm is not installed"):
        selective_scan(**small_inputs(), backend="mamba_ssm")


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("delta", torch.zeros(2, 4, 8), "delta must have u's shape"),
        ("A", torch.zeros(5, 3), "A must be"),
        ("B", torch.zeros(2, 3, 8), "B must be"),
        ("C", torch.zeros(2, 3, 3, 9), "not divisible by the 3 groups of C"),
    ],
)
def test_bad_shapes_name_the_argument(name, bad, message):
    inputs = small_inputs() | {name: bad}
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


def step_inputs():
    gen = torch.Generator().manual_seed(1)
    return {
        "state": torch.zeros(2, 4, 3),
        "x": torch.randn(2, 4, generator=gen),
        "dt": torch.rand(2, 4, generator=gen),
        "A": -torch.rand(4, 3, generator=gen),
        "B": torch.randn(2, 3, generator=gen),
        "C": torch.randn(2, 3, generator=gen),
    }


def test_state_update_backend_choice(triton_standin, monkeypatch):
    assert resolve_step_backend("auto", CPU) == "torch"
    assert resolve_step_backend("auto", CUDA) == "triton"
    monkeypatch.setenv(ENV_VAR, "reference")  # a forced scan backend without a step steps with torch
    assert resolve_step_backend("auto", CUDA) == "torch"
    with pytest.raises(ValueError, match="unknown state-update backend"):
        resolve_step_backend("reference", CPU)


def test_state_update_without_triton(triton_missing):
    assert resolve_step_backend("auto", CUDA) == "torch"
    with pytest.raises(ScanBackendUnavailable, match="'triton step' is unavailable"):
        selective_state_update(**step_inputs(), backend="triton")


def test_state_update_routes_to_the_triton_module(triton_standin):
    via_triton, via_torch = step_inputs(), step_inputs()
    y_triton = selective_state_update(**via_triton, backend="triton")
    y_torch = selective_state_update(**via_torch, backend="torch")
    assert torch.equal(y_triton, y_torch) and torch.equal(via_triton["state"], via_torch["state"])
    assert via_torch["state"].abs().sum() > 0
