"""The mixer's lean (channel-major) layout: same outputs, gradients and states as transformers'
MambaMixer and as our unfused layout; on the Triton kernels too (CPU interpreter, in a subprocess)."""


import pytest
import torch
from interpreted import run_interpreted
from test_ehrmamba_mixer import make_pair, relative_error


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
