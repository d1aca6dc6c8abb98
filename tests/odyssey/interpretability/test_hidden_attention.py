"""Hidden attention of the selective scan: blocks == brute force, it reproduces the scan and the mixer, causal."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from odyssey.interpretability import (
    attention_by_visit,
    hidden_attention,
    hidden_attention_bruteforce,
    hidden_attention_from_scan,
    layer_scan_inputs,
    mixer_scan_inputs,
    plot_hidden_attention,
    save_heatmap,
    sequence_inputs,
    visit_spans,
)
from odyssey.kernels.reference import selective_scan_reference
from odyssey.models import EHRMambaConfig, EHRMambaModel

VOCAB = 30


def random_scan(batch=2, dim=5, state=3, length=9, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=generator, dtype=dtype)
    delta = F.softplus(torch.randn(batch, dim, length, generator=generator, dtype=dtype))
    A = -torch.exp(torch.randn(dim, state, generator=generator, dtype=dtype))
    B = torch.randn(batch, state, length, generator=generator, dtype=dtype)
    C = torch.randn(batch, state, length, generator=generator, dtype=dtype)
    return u, delta, A, B, C


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-5), (torch.float32, 1e-4)]
)
@pytest.mark.parametrize("blocks", [(64, 64, 64), (2, 3, 2), (1, 1, 1), (4, 9, 5)])
def test_blocked_equals_bruteforce(dtype, tolerance, blocks):
    _, delta, A, B, C = random_scan(dtype=dtype)
    want = hidden_attention_bruteforce(delta, A, B, C)
    target_block, source_block, channel_block = blocks
    got = hidden_attention_from_scan(
        delta, A, B, C, reduce="none", target_block=target_block, source_block=source_block,
        channel_block=channel_block,
    )
    assert got.dtype == dtype and got.shape == want.shape
    assert relative_error(got, want) <= tolerance
    mean = hidden_attention_from_scan(delta, A, B, C, target_block=target_block, source_block=source_block,
                                      channel_block=channel_block)
    assert relative_error(mean, want.mean(1)) <= tolerance
    mean_abs = hidden_attention_from_scan(delta, A, B, C, reduce="mean_abs", target_block=target_block,
                                          source_block=source_block, channel_block=channel_block)
    assert relative_error(mean_abs, want.abs().mean(1)) <= tolerance


def test_alpha_times_inputs_reproduces_the_scan_without_D():
    u, delta, A, B, C = random_scan(batch=2, dim=6, state=4, length=23, seed=3)
    alpha = hidden_attention_from_scan(delta, A, B, C, reduce="none", target_block=5, source_block=7,
                                       channel_block=4)
    y = torch.einsum("bdts,bds->bdt", alpha, u)
    want = selective_scan_reference(u, delta, A, B, C)  # D and gate left out
    assert relative_error(y, want) <= 1e-10
    # And the D term is what the full scan adds on top.
    D = torch.randn(6, dtype=torch.float64)
    with_skip = selective_scan_reference(u, delta, A, B, C, D=D)
    torch.testing.assert_close(y + D[None, :, None] * u, with_skip, rtol=1e-10, atol=1e-12)


def test_causal_and_first_row():
    _, delta, A, B, C = random_scan(length=12, seed=5)
    alpha = hidden_attention_from_scan(delta, A, B, C, reduce="none", target_block=5, source_block=4)
    upper = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)
    assert torch.all(alpha[..., upper] == 0)
    # The diagonal is C_t . delta_t B_t (no decay yet).
    diagonal = torch.einsum("bnt,bdt,bnt->bdt", C, delta, B)
    torch.testing.assert_close(torch.diagonal(alpha, dim1=-2, dim2=-1), diagonal)
    # A source's weight on later targets fades as its decays accumulate (|A| large, one state).
    fast = -torch.full((5, 1), 50.0, dtype=torch.float64)
    ones = torch.ones(2, 1, 12, dtype=torch.float64)
    faded = hidden_attention_from_scan(torch.ones_like(delta), fast, ones, ones)
    assert faded[0, 11, 0] < 1e-200 and faded[0, 11, 11] == pytest.approx(1.0)


def test_long_sequence_stays_finite_in_float32():
    _, delta, A, B, C = random_scan(batch=1, dim=4, state=2, length=300, dtype=torch.float32, seed=9)
    alpha = hidden_attention_from_scan(delta, A, B, C, target_block=64, source_block=32)
    assert torch.isfinite(alpha).all()
    want = hidden_attention_from_scan(delta.double(), A.double(), B.double(), C.double())
    assert relative_error(alpha, want) <= 1e-4


def test_bad_inputs_are_named():
    _, delta, A, B, C = random_scan()
    with pytest.raises(ValueError, match="B must be"):
        hidden_attention_from_scan(delta, A, B[:, :, :-1], C)
    with pytest.raises(ValueError, match="reduce"):
        hidden_attention_from_scan(delta, A, B, C, reduce="max")
    with pytest.raises(ValueError, match="target_block"):
        hidden_attention_from_scan(delta, A, B, C, target_block=0)


def tiny_backbone(seed=0) -> EHRMambaModel:
    torch.manual_seed(seed)
    config = EHRMambaConfig.from_size("tiny", vocab_size=VOCAB, embedding_dropout=0.0)
    return EHRMambaModel(config).eval().double()


def ehr_batch(length=14, seed=1):
    generator = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(1, length, generator=generator, dtype=torch.float64) * 30, dim=1)
    orders = torch.arange(length)[None] // 4
    return {
        "input_ids": torch.randint(1, VOCAB, (1, length), generator=generator),
        "token_type_ids": torch.randint(1, 8, (1, length), generator=generator),
        "ages": 40 + times / 365.25,
        "times": times,
        "visit_orders": orders,
        "visit_segments": 1 + orders % 2,
    }


def test_alpha_rebuilds_the_real_mixer_output():
    """out_proj((sum_s alpha_d(t, s) u_s + D u_t) * silu(gate)) is exactly what the model's mixer returns."""
    model = tiny_backbone()
    batch = ehr_batch()
    layer = 1
    mixer = model.layers[layer].mixer
    captured = {}
    hook = mixer.register_forward_hook(lambda module, args, output: captured.update(x=args[0], out=output))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    scan = layer_scan_inputs(model, layer, **batch)
    torch.testing.assert_close(scan.u, mixer_scan_inputs(mixer, captured["x"]).u)
    alpha = hidden_attention_from_scan(scan.delta.double(), scan.A.double(), scan.B.double(), scan.C.double(),
                                       reduce="none", target_block=4, source_block=3, channel_block=32)
    y = torch.einsum("bdts,bds->bdt", alpha, scan.u.double()) + scan.D.double()[None, :, None] * scan.u.double()
    y = y * F.silu(scan.gate.double())
    rebuilt = mixer.out_proj(y.transpose(1, 2).to(mixer.out_proj.weight.dtype))
    assert relative_error(rebuilt, captured["out"]) <= 1e-5


def test_sequence_row_becomes_model_inputs():
    batch = ehr_batch(length=6, seed=3)
    row = {name: value[0].numpy() for name, value in batch.items()} | {"subject_id": 5, "split": "train"}
    inputs = sequence_inputs(row)
    assert set(inputs) == set(batch)
    for name, value in inputs.items():
        assert value.shape == (1, 6) and torch.equal(value, batch[name].to(value.dtype))
    assert inputs["input_ids"].dtype == torch.long and inputs["ages"].dtype == torch.float32
    with pytest.raises(KeyError, match="visit_orders"):
        sequence_inputs({k: v for k, v in row.items() if k != "visit_orders"})


def test_model_hidden_attention_matches_bruteforce_and_ignores_left_padding():
    model = tiny_backbone(seed=2)
    batch = ehr_batch(length=10, seed=4)
    alpha = hidden_attention(model, layer=0, target_block=3, source_block=4, **batch)
    scan = layer_scan_inputs(model, 0, **batch)
    want = hidden_attention_bruteforce(scan.delta, scan.A, scan.B, scan.C).mean(1)
    assert alpha.shape == (1, 10, 10)
    assert relative_error(alpha, want) <= 1e-5
    pad = 3
    padded = {k: F.pad(v, (pad, 0)) for k, v in batch.items()}
    mask = torch.ones_like(padded["input_ids"])
    mask[:, :pad] = 0
    padded_alpha = hidden_attention(model, layer=0, attention_mask=mask, **padded)
    assert torch.all(padded_alpha[:, :, :pad] == 0)  # padding is never attended to
    torch.testing.assert_close(padded_alpha[:, pad:, pad:], alpha, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="out of range"):
        hidden_attention(model, layer=5, **batch)
    # Dropout never reaches the attention, and the model's mode is given back.
    model.embeddings.dropout.p = 0.5
    model.train()
    torch.testing.assert_close(hidden_attention(model, layer=0, **batch), alpha)
    assert model.training


def test_visit_aggregation_and_heatmap(tmp_path):
    orders = np.array([0, 1, 1, 1, 2, 2, 3])
    assert visit_spans(orders) == [(0, 0, 1), (1, 1, 4), (2, 4, 6), (3, 6, 7)]
    alpha = np.tril(np.arange(49, dtype=float).reshape(7, 7))
    by_visit, visits = attention_by_visit(alpha, orders)
    assert visits == [0, 1, 2, 3]
    assert by_visit[1, 1] == alpha[1:4, 1:4].sum() and by_visit[3, 2] == alpha[6, 4:6].sum()
    assert by_visit.sum() == pytest.approx(alpha.sum())
    mean_by_visit, _ = attention_by_visit(alpha, orders, how="mean")
    assert mean_by_visit[1, 1] == pytest.approx(alpha[1:4, 1:4].sum() / 6)  # 6 causal pairs in a 3-token visit
    assert mean_by_visit[3, 2] == pytest.approx(alpha[6, 4:6].mean()) and mean_by_visit[0, 1] == 0
    for by in (False, True):
        fig = plot_hidden_attention(alpha, orders, by_visit=by)
        images = [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == "hidden-attention"]
        assert len(images) == 1 and images[0].get_array().shape == ((4, 4) if by else (7, 7))
        path = save_heatmap(fig, tmp_path / f"attention_{by}.png")
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="visit orders"):
        plot_hidden_attention(alpha[:5, :5], orders)
