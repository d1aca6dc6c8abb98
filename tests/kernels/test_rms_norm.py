"""The Triton RMSNorm against torch's, on CPU under the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreter_guard import make_guard, reload_for_interpreter  # noqa: E402

from odyssey.kernels import rms_norm, rms_norm_kernels  # noqa: E402

reload_for_interpreter(rms_norm_kernels)

_interpreted_only, test_module_in_fresh_process = make_guard(__file__)


def rel_err(ours, ref):
    assert torch.isfinite(ours).all(), "non-finite values (an unwritten element?)"
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def forward_backward(backend, x, weight, dy, out_dtype=None):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    y = rms_norm.rms_norm(x, weight, 1e-5, out_dtype, backend=backend)
    y.backward(dy)
    return y, x.grad, weight.grad


@pytest.mark.parametrize(("shape", "features"),
                         [((3, 7), 40), ((2, 5), 64), ((1, 1), 24), ((9,), 100), ((100,), 512)])
def test_triton_matches_torch(shape, features):
    """Rows not a multiple of the programs or of a step's rows (512 features: 8-row steps, 4 a program),
    features not a power of 2 (masked columns), float32 out."""
    gen = torch.Generator().manual_seed(features)
    x = 3 * torch.randn(*shape, features, generator=gen)
    weight = 1 + 0.1 * torch.randn(features, generator=gen)
    dy = torch.randn(*shape, features, generator=gen)
    ours = forward_backward("triton", x, weight, dy)
    ref = forward_backward("torch", x.double(), weight.double(), dy.double())
    for name, a, b in zip(("y", "dx", "dweight"), ours, ref, strict=True):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-6, name


def test_bfloat16_output_for_autocast_and_float32_gradients():
    """out_dtype bfloat16 is the float32 result rounded once; the gradients stay float32 (from a bf16 dy)."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4, 6, 48, generator=gen), torch.randn(48, generator=gen)
    dy = torch.randn(4, 6, 48, generator=gen).bfloat16()
    y, dx, dw = forward_backward("triton", x, weight, dy, torch.bfloat16)
    ref_y, ref_dx, ref_dw = forward_backward("torch", x.double(), weight.double(), dy.double())
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    # one rounding of the float32 result (the interpreter's cast truncates, the GPU's rounds to nearest)
    assert rel_err(y, ref_y) <= 2**-7
    assert rel_err(dx, ref_dx) <= 1e-6 and rel_err(dw, ref_dw) <= 1e-6


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="unknown norm backend"):
        rms_norm.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5, backend="cuda")


def test_environment_picks_the_auto_backend(monkeypatch):
    monkeypatch.setenv("ODYSSEY_NORM_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="ODYSSEY_NORM_BACKEND"):
        rms_norm.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)
    monkeypatch.setenv("ODYSSEY_NORM_BACKEND", "triton")  # CPU tensors under the interpreter
    x = torch.randn(2, 8, requires_grad=True)
    assert rms_norm.rms_norm(x, torch.ones(8), 1e-5).grad_fn.name() == "RMSNormTritonBackward"
