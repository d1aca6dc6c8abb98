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
from odyssey.models import mixer as mixer_module

torch.manual_seed(0)
config = EHRMambaConfig(vocab_size=30, hidden_size=4, num_hidden_layers=1, state_size=4, embedding_dropout=0.0)
mixer = EHRMambaForPretraining(config).backbone.layers[0].mixer
with torch.no_grad():
    mixer.D.add_(0.3 * torch.randn_like(mixer.D))
x = torch.randn(1, 70, 4)  # crosses the scan's chunk of 64
mask = torch.ones(1, 70, dtype=torch.long)
mask[0, :9] = 0  # left padding
dy = torch.randn(1, 70, 4)
handoffs = []  # x_proj's handoffs: on the Triton kernels the scan's gradient of u reaches x_proj's backward first
real_handoff = mixer_module._Handoff
mixer_module._Handoff = lambda: handoffs.append(real_handoff()) or handoffs[-1]
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
assert [h.fused for h in handoffs] == [True], [vars(h) for h in handoffs]
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


def _channel_major(batch, channels, length, **kwargs):
    """A (batch, channels, L) view of a (channels, batch, L) buffer, as the lean mixer's tensors are."""
    return torch.randn(channels, batch, length, **kwargs).transpose(0, 1)


def _mixer_like_loss(u_for_scan, projected, weight_dt, a, c):
    """The lean mixer's use of u and W_x @ u after x_proj: dt_proj on the first rows, then a stand-in scan that
    reads u and delta elementwise (its gradient of u comes back channel-major, as the Triton scan's does)."""
    batch, channels, length = u_for_scan.shape
    time_step, rest = torch.split(projected, [weight_dt.shape[1], projected.shape[0] - weight_dt.shape[1]], dim=0)
    delta = torch.mm(weight_dt, time_step).view(channels, batch, length).transpose(0, 1)
    return (u_for_scan * delta * a).sum() + (rest * c).sum()


@pytest.mark.parametrize("layout", ["channel_major", "batch_major"])
def test_x_projection_sums_the_scan_gradient_into_its_product(layout, monkeypatch):
    """x_proj's backward adds its input gradient into the scan's gradient of u in place when u is channel-major
    (the Triton conv's output), and the gradients are those of the plain product either way (float64)."""
    from odyssey.models import mixer

    torch.manual_seed(2)
    batch, channels, length, rank, extra = 3, 6, 10, 2, 4
    if layout == "channel_major":
        u = _channel_major(batch, channels, length, dtype=torch.float64).requires_grad_()
        a = _channel_major(batch, channels, length, dtype=torch.float64)
    else:
        u = torch.randn(batch, channels, length, dtype=torch.float64, requires_grad=True)
        a = torch.randn(batch, channels, length, dtype=torch.float64)
    weight_x = torch.randn(rank + extra, channels, dtype=torch.float64, requires_grad=True)
    weight_dt = torch.randn(channels, rank, dtype=torch.float64, requires_grad=True)
    c = torch.randn(extra, batch * length, dtype=torch.float64)
    leaves = [u, weight_x, weight_dt]

    handoffs = []
    real_handoff = mixer._Handoff
    monkeypatch.setattr(mixer, "_Handoff", lambda: handoffs.append(real_handoff()) or handoffs[-1])
    u_for_scan, projected = mixer.x_projection(u, weight_x)
    ours = torch.autograd.grad(_mixer_like_loss(u_for_scan, projected, weight_dt, a, c), leaves)
    rows = u.transpose(0, 1).reshape(channels, -1)
    expected = torch.autograd.grad(_mixer_like_loss(u, torch.mm(weight_x, rows), weight_dt, a, c), leaves)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert [h.fused for h in handoffs] == ([True] if layout == "channel_major" else [])


def test_x_projection_sums_correctly_when_its_backward_runs_first():
    """If x_proj's backward runs before the scan's gradient of u is handed over, autograd adds the two itself."""
    from odyssey.models import mixer

    torch.manual_seed(3)
    u = _channel_major(2, 4, 5, dtype=torch.float64).requires_grad_()
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    a = _channel_major(2, 4, 5, dtype=torch.float64)
    b = torch.randn(3, 10, dtype=torch.float64)
    handoff = mixer._Handoff()
    u_for_scan = mixer._ScanInput.apply(u, handoff)  # created first: its backward runs last
    projected = mixer._XProjection.apply(u.transpose(0, 1).reshape(4, -1), weight, handoff)
    ours = torch.autograd.grad((u_for_scan * a).sum() + (projected * b).sum(), [u, weight])
    expected = torch.autograd.grad((u * a).sum() + (torch.mm(weight, u.transpose(0, 1).reshape(4, -1)) * b).sum(),
                                   [u, weight])
    assert not handoff.fused
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_x_projection_casts_as_autocast_does():
    """Under autocast the product runs in the autocast dtype; u's gradient keeps u's dtype, the weight's float32."""
    from odyssey.models.mixer import x_projection

    torch.manual_seed(4)
    u = _channel_major(2, 8, 6).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u_for_scan, projected = x_projection(u, weight)
        reference = torch.mm(weight, u.transpose(0, 1).reshape(8, -1))
    assert projected.dtype == reference.dtype == torch.bfloat16
    loss = (u_for_scan.float() * 2).sum() + projected.float().square().sum()
    d_u, d_weight = torch.autograd.grad(loss, [u, weight])
    assert d_u.dtype == torch.bfloat16 and d_weight.dtype == torch.float32
    ref_u, ref_weight = torch.autograd.grad((u.float() * 2).sum() + reference.float().square().sum(), [u, weight])
    torch.testing.assert_close(d_weight, ref_weight, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(d_u.float(), ref_u.float(), rtol=1e-2, atol=1e-2)
