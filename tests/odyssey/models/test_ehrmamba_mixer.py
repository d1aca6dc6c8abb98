"""Our mixer against transformers' MambaMixer (the numerical oracle) and its own recurrent step path."""

import pytest
import torch
from transformers.models.mamba.modeling_mamba import MambaMixer

from odyssey.models import EHRMambaConfig, EHRMambaForPretraining
from odyssey.models.mixer import EHRMambaMixer

MIXER_PARAMETER_NAMES = {
    "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
    "A_log", "D", "out_proj.weight",
}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """|ours - theirs| / |theirs|; a zero reference (A's gradient at length 1) must be matched exactly."""
    difference = (ours - theirs).norm().item()
    scale = theirs.norm().item()
    return difference / scale if scale > 0 else difference


def make_pair(seed: int = 0):
    torch.manual_seed(seed)
    config = EHRMambaConfig.from_size("tiny", hidden_size=32, vocab_size=50)
    ours = EHRMambaForPretraining(config).backbone.layers[0].mixer.float()
    theirs = MambaMixer(config.to_mamba_config(), layer_idx=0).float()
    # Perturb D and A_log away from their constant inits so every parameter matters.
    with torch.no_grad():
        ours.D.add_(0.3 * torch.randn_like(ours.D))
        ours.A_log.add_(0.2 * torch.randn_like(ours.A_log))
    missing = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours, theirs


def test_parameter_names_match_transformers():
    ours, theirs = make_pair()
    assert set(ours.state_dict()) == set(theirs.state_dict()) == MIXER_PARAMETER_NAMES
    for name, tensor in theirs.state_dict().items():
        assert tensor.shape == ours.state_dict()[name].shape


@pytest.mark.parametrize("length", [1, 5, 37, 130])  # 130 crosses the torch scan's chunk boundaries
def test_outputs_and_gradients_match_transformers_slow_path(length):
    ours, theirs = make_pair(seed=length)
    torch.manual_seed(100 + length)
    x = torch.randn(2, length, 32)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert relative_error(y_ours, y_theirs) <= 1e-5
    weight = torch.randn_like(y_theirs)
    (y_ours * weight).sum().backward()
    (y_theirs * weight).sum().backward()
    assert relative_error(x_ours.grad, x_theirs.grad) <= 1e-5
    theirs_params = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        assert relative_error(parameter.grad, theirs_params[name].grad) <= 1e-5, name


def test_attention_mask_matches_transformers():
    ours, theirs = make_pair(seed=3)
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    assert relative_error(ours(x, attention_mask=mask), theirs(x, attention_mask=mask)) <= 1e-5


def test_step_path_reproduces_the_parallel_scan():
    ours, _ = make_pair(seed=7)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        full = ours(x)
        state = ours.empty_state(3)
        steps = torch.stack([ours.step(x[:, t], state) for t in range(11)], dim=1)
        _, prefill_state = ours(x, return_state=True)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.ssm_state, prefill_state.ssm_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.conv_state, prefill_state.conv_state)


def test_prefill_then_steps_equals_one_pass():
    ours, _ = make_pair(seed=8)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        full = ours(x)
        head, state = ours(x[:, :2], return_state=True)  # shorter than the conv window
        tail = torch.stack([ours.step(x[:, t], state) for t in range(2, 10)], dim=1)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=1e-5, atol=1e-6)


def test_inactive_rows_keep_their_state():
    ours, _ = make_pair(seed=9)
    state = ours.empty_state(2)
    with torch.no_grad():
        ours.step(torch.randn(2, 32), state)
        before = (state.conv_state.clone(), state.ssm_state.clone())
        ours.step(torch.randn(2, 32), state, active=torch.tensor([True, False]))
    assert torch.equal(state.conv_state[1], before[0][1]) and torch.equal(state.ssm_state[1], before[1][1])
    assert not torch.equal(state.ssm_state[0], before[1][0])


def test_mixer_is_the_one_in_the_model():
    model = EHRMambaForPretraining(EHRMambaConfig.from_size("tiny", vocab_size=20))
    assert all(isinstance(block.mixer, EHRMambaMixer) for block in model.backbone.layers)
