"""The Triton causal conv1d + SiLU against the torch reference, on CPU under the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreter_guard import make_guard, reload_for_interpreter  # noqa: E402

from odyssey.kernels import causal_conv, causal_conv_kernels  # noqa: E402

reload_for_interpreter(causal_conv_kernels)

# Triton imported compiled before this module (another test folder first): rerun this file in a child
_interpreted_only, test_module_in_fresh_process = make_guard(__file__)


def rel_err(ours, ref):
    assert torch.isfinite(ours).all(), "non-finite values (an unwritten element?)"
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def channel_major(batch, dim, length, gen, dtype=torch.float32):
    """(batch, dim, L) view of a (dim, batch, L) buffer: the mixer's layout of in_proj's output."""
    return torch.randn(dim, batch, length, generator=gen).to(dtype).transpose(0, 1)


def run(fn, x, weight, bias, mask, silu, dout):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(x, weight, bias, mask, silu)
    out.backward(dout)
    return out, x.grad, weight.grad, None if bias is None else bias.grad


def triton_conv(x, weight, bias, mask, silu):
    return causal_conv.causal_conv1d(x, weight, bias, mask, silu, backend="triton")


@pytest.mark.parametrize(
    ("length", "taps", "with_bias", "with_mask", "silu", "layout"),
    [
        (1, 4, True, False, True, "channel_major"),
        (17, 4, True, True, True, "channel_major"),
        (130, 4, False, False, True, "contiguous"),  # crosses time tiles of 64 and 128
        (37, 3, True, True, False, "channel_last"),
        (9, 2, True, False, True, "contiguous"),
    ],
)
def test_triton_matches_torch_reference(length, taps, with_bias, with_mask, silu, layout):
    gen = torch.Generator().manual_seed(length * 10 + taps)
    batch, dim = 2, 40  # dim not a multiple of the channel tile
    if layout == "channel_major":
        x = channel_major(batch, dim, length, gen)
    elif layout == "channel_last":
        x = torch.randn(batch, length, dim, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length, generator=gen)
    weight = torch.randn(dim, 1, taps, generator=gen)
    bias = torch.randn(dim, generator=gen) if with_bias else None
    mask = None
    if with_mask:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, : length // 2] = 0
    dout = torch.randn(batch, dim, length, generator=gen)
    ours = run(triton_conv, x, weight, bias, mask, silu, dout)
    ref = run(causal_conv.causal_conv1d_torch, x, weight, bias, mask, silu, dout)
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), ours, ref, strict=True):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-5, name


def test_channel_major_input_gives_channel_major_output_and_gradient():
    gen = torch.Generator().manual_seed(0)
    x = channel_major(2, 8, 20, gen).requires_grad_()
    out = causal_conv.causal_conv1d(x, torch.randn(8, 4, generator=gen), backend="triton")
    assert out.stride() == x.stride()
    out.backward(torch.randn(out.shape, generator=gen))
    assert x.grad.stride() == x.stride()


def test_bf16_matches_reference_within_rounding():
    gen = torch.Generator().manual_seed(1)
    x = channel_major(2, 16, 70, gen, dtype=torch.bfloat16)
    weight, bias = torch.randn(16, 4, generator=gen), torch.randn(16, generator=gen)
    out = causal_conv.causal_conv1d(x, weight, bias, backend="triton")
    ref = causal_conv.causal_conv1d_torch(x.double(), weight.double(), bias.double())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 5e-3


def test_bad_shapes_are_named():
    x = torch.randn(2, 8, 5)
    with pytest.raises(ValueError, match="conv weight"):
        causal_conv.causal_conv1d(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match="mask"):
        causal_conv.causal_conv1d(x, torch.randn(8, 4), mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="taps"):
        causal_conv.causal_conv1d(x, torch.randn(8, 5), backend="triton")


def test_auto_runs_torch_on_cpu():
    assert causal_conv.resolve_conv_backend("auto", torch.randn(1, 2, 3), 4) == "torch"


def test_offsets_widen_only_past_32_bits():
    small = torch.empty_strided((2, 8, 100), (800, 100, 1), device="meta")
    huge = torch.empty_strided((1, 3, 10), (1, 2**30, 1), device="meta")
    assert not causal_conv._wide(small)
    assert causal_conv._wide(small, huge)


def test_64_bit_offset_path_matches(monkeypatch):
    monkeypatch.setattr(causal_conv, "_wide", lambda *tensors: True)
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = channel_major(2, 8, 21, gen), torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen)
    dout = torch.randn(2, 8, 21, generator=gen)
    ours = run(triton_conv, x, weight, bias, None, True, dout)
    ref = run(causal_conv.causal_conv1d_torch, x, weight, bias, None, True, dout)
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) <= 1e-5


def test_backward_spans_sum_the_weight_gradient_across_programs(monkeypatch):
    monkeypatch.setattr(causal_conv, "BWD_SPAN", 128)  # 300 steps: three programs per channel tile
    gen = torch.Generator().manual_seed(4)
    x, weight, bias = channel_major(2, 8, 300, gen), torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen)
    mask = torch.ones(2, 300)
    mask[0, :130] = 0
    dout = torch.randn(2, 8, 300, generator=gen)
    ours = run(triton_conv, x, weight, bias, mask, True, dout)
    ref = run(causal_conv.causal_conv1d_torch, x, weight, bias, mask, True, dout)
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("overrides", [{"bwd_variant": "tile"}, {"bwd_variant": "seq", "seq_span": 16},
                                       {"bwd_variant": "seq", "seq_span": 48}, {"bwd_variant": "seq"}])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 130])
def test_both_backwards_match_reference_across_spans(monkeypatch, overrides, length):
    """The sequential backward's 16-step blocks, its spans (the block past a span's end, the atomic adds of
    several spans) and the tile backward, with bias, padding mask and SiLU, against the torch reference."""
    for key, value in overrides.items():
        monkeypatch.setitem(causal_conv.TILE_OVERRIDES, key, value)
    gen = torch.Generator().manual_seed(length)
    batch, dim = 2, 40
    x = channel_major(batch, dim, length, gen)
    weight, bias = torch.randn(dim, 1, 4, generator=gen), torch.randn(dim, generator=gen)
    mask = torch.ones(batch, length)
    mask[1, : length // 3] = 0
    dout = torch.randn(batch, dim, length, generator=gen)
    ours = run(triton_conv, x, weight, bias, mask, True, dout)
    ref = run(causal_conv.causal_conv1d_torch, x, weight, bias, mask, True, dout)
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), ours, ref, strict=True):
        assert rel_err(a, b) <= 1e-5, name


def test_unknown_overrides_are_refused(monkeypatch):
    x = torch.randn(1, 8, 5, requires_grad=True)
    monkeypatch.setitem(causal_conv.TILE_OVERRIDES, "bwd_variant", "fancy")
    out = causal_conv.causal_conv1d(x, torch.randn(8, 4), backend="triton")
    with pytest.raises(ValueError, match="seq or tile"):
        out.sum().backward()
    monkeypatch.delitem(causal_conv.TILE_OVERRIDES, "bwd_variant")
    monkeypatch.setitem(causal_conv.TILE_OVERRIDES, "seq_spam", 8)
    with pytest.raises(ValueError, match="seq_spam"):
        causal_conv.causal_conv1d(x, torch.randn(8, 4), backend="triton")
    with pytest.raises(ValueError, match="ODYSSEY_CONV_OVERRIDES"):
        causal_conv.overrides_from_env({"ODYSSEY_CONV_OVERRIDES": "{bad json"})
    with pytest.raises(ValueError, match="keys among"):
        causal_conv.overrides_from_env({"ODYSSEY_CONV_OVERRIDES": '{"spann": 4}'})
    assert causal_conv.overrides_from_env({"ODYSSEY_CONV_OVERRIDES": '{"bwd_variant": "tile"}'}) == {
        "bwd_variant": "tile"}


def test_conv_bench_rows_and_check():
    """The GPU benchmark's configurations name real override keys, and its float32 check passes here."""
    from odyssey.kernels import conv_bench

    assert conv_bench.CONFIGS[0] == {}
    for row in conv_bench.CONFIGS:
        assert set(row) <= set(causal_conv.OVERRIDE_KEYS), row
    result = conv_bench.check(2, 40, 37, torch.device("cpu"), masked=True)
    assert result["passed"], result
