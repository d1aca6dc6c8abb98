"""The mixer's lean (channel-major) layout: same outputs, gradients and states as transformers'
MambaMixer and as our unfused layout; on the Triton kernels too (CPU interpreter, in a subprocess)."""


import pytest
import torch
from interpreted import run_interpreted
from test_ehrmamba_mixer import make_pair, relative_error

from odyssey.models.mixer import in_projection


def lean(mixer, conv_backend="torch"):
    mixer.layout, mixer.conv_backend = "lean", conv_backend
    return mixer


@pytest.mark.parametrize(("layout", "length"), [("lean", 1), ("lean", 37), ("lean", 130), ("unfused", 37)])
def test_both_layouts_match_transformers(layout, length):
    ours, theirs = make_pair(seed=20 + length)
    ours.layout, ours.conv_backend = layout, "torch"
    x = torch.randn(2, length, 32)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, : length // 3] = 0
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours, attention_mask=mask), theirs(x_theirs, attention_mask=mask)
    assert relative_error(y_ours, y_theirs) <= 1e-5
    weight = torch.randn_like(y_theirs)
    (y_ours * weight).sum().backward()
    (y_theirs * weight).sum().backward()
    assert relative_error(x_ours.grad, x_theirs.grad) <= 1e-5
    theirs_params = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        assert relative_error(parameter.grad, theirs_params[name].grad) <= 1e-5, name


def test_lean_layout_returns_the_same_state():
    ours, _ = make_pair(seed=5)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        ours.layout = "unfused"
        out_unfused, state_unfused = ours(x, return_state=True)
        out_lean, state_lean = lean(ours)(x, return_state=True)
    torch.testing.assert_close(out_lean, out_unfused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state_lean.conv_state, state_unfused.conv_state)
    torch.testing.assert_close(state_lean.ssm_state, state_unfused.ssm_state, rtol=1e-5, atol=1e-6)


def test_unknown_layout_is_refused():
    ours, _ = make_pair()
    ours.layout = "sideways"
    with pytest.raises(ValueError, match="layout"):
        ours(torch.randn(1, 3, 32))


def test_auto_layout_is_lean_and_unfused_is_selectable():
    ours, _ = make_pair()
    assert ours._lean(torch.randn(1, 3, 32))
    ours.layout = "unfused"
    assert not ours._lean(torch.randn(1, 3, 32))


SCRIPT = r"""
import torch
from odyssey.models import EHRMambaConfig, EHRMambaForPretraining

torch.manual_seed(0)
config = EHRMambaConfig(vocab_size=30, hidden_size=4, num_hidden_layers=1, state_size=4, embedding_dropout=0.0)
mixer = EHRMambaForPretraining(config).backbone.layers[0].mixer
with torch.no_grad():
    mixer.D.add_(0.3 * torch.randn_like(mixer.D))
x = torch.randn(1, 70, 4)  # crosses the scan's chunk of 64
mask = torch.ones(1, 70, dtype=torch.long)
mask[0, :9] = 0  # left padding
dy = torch.randn(1, 70, 4)
results = {}
for layout, conv, scan in (("unfused", "torch", "torch"), ("lean", "triton", "triton")):
    mixer.layout, mixer.conv_backend, mixer.scan_backend = layout, conv, scan
    mixer.zero_grad()
    xi = x.clone().requires_grad_()
    out = mixer(xi, attention_mask=mask)
    out.backward(dy)
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    results[layout] = (out.detach(), xi.grad, grads)
(out_u, dx_u, g_u), (out_l, dx_l, g_l) = results["unfused"], results["lean"]
torch.testing.assert_close(out_l, out_u, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(dx_l, dx_u, rtol=1e-4, atol=1e-6)
for name, grad in g_u.items():
    torch.testing.assert_close(g_l[name], grad, rtol=1e-4, atol=1e-6, msg=name)
print("ok")
"""


def test_lean_layout_on_the_triton_kernels_matches_the_unfused_torch_path():
    run_interpreted(SCRIPT)


def _in_projection_reference(tokens, weight, bias, first_rows):
    xz = torch.mm(weight, tokens.t()) if bias is None else torch.addmm(bias[:, None], weight, tokens.t())
    return torch.split(xz, [first_rows, xz.shape[0] - first_rows], dim=0)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("used", ["both", "first", "second"])
def test_in_projection_matches_one_product_and_split(with_bias, used):
    """The lean path's in_proj: outputs and every gradient as mm + split, also when only one block is used."""
    torch.manual_seed(0)
    tokens = torch.randn(50, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(14, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(14, dtype=torch.float64, requires_grad=True) if with_bias else None
    leaves = [tokens, weight] + ([bias] if with_bias else [])
    up_first, up_second = torch.randn(6, 50, dtype=torch.float64), torch.randn(8, 50, dtype=torch.float64)

    def grads(function):
        first, second = function(tokens, weight, bias, 6)
        loss = (first * up_first).sum() * (used != "second") + (second * up_second).sum() * (used != "first")
        return [first, second, *torch.autograd.grad(loss, leaves)]

    for ours, expected in zip(grads(in_projection), grads(_in_projection_reference), strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_in_projection_casts_as_autocast_does():
    """Under autocast the product runs in the autocast dtype and the weight's gradient comes back float32."""
    torch.manual_seed(1)
    tokens = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(20, 16, requires_grad=True)
    results = []
    for function in (in_projection, _in_projection_reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, second = function(tokens, weight, None, 8)
        loss = first.float().square().sum() + second.float().sum()
        results.append((first.dtype, *torch.autograd.grad(loss, [tokens, weight])))
    (dtype, d_tokens, d_weight), (ref_dtype, ref_tokens, ref_weight) = results
    assert dtype == ref_dtype == torch.bfloat16
    assert d_weight.dtype == torch.float32 and d_tokens.dtype == torch.float32
    torch.testing.assert_close(d_weight, ref_weight, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(d_tokens, ref_tokens, rtol=1e-2, atol=1e-2)
