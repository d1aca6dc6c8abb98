"""`selective_state_update`: token-by-token stepping reproduces the full scan and continues it.

The chunk step (`conv_chunk`, `selective_chunk`: several tokens of pooled rows per launch) is checked
against the whole-sequence conv and scan, and its Triton kernels against its torch path, on CPU under
the Triton interpreter.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from interpreter_guard import make_guard  # noqa: E402

from odyssey.kernels import selective_scan, selective_state_update, step  # noqa: E402
from odyssey.kernels.causal_conv import causal_conv1d_torch  # noqa: E402
from odyssey.kernels.reference import selective_scan_reference  # noqa: E402

# Triton imported compiled before this module (another test folder first): rerun this file in a child
_interpreted_only, test_module_in_fresh_process = make_guard(__file__)


@pytest.fixture(autouse=True)
def _kernels_built_interpreted():
    """The chunk kernels are defined on first use; make sure that happens with the interpreter on."""
    from triton.runtime.interpreter import InterpretedFunction

    built = step._triton_kernels.get("conv")
    if built is not None and not isinstance(built, InterpretedFunction):
        step._triton_kernels.clear()


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


# ---- the chunk step over pooled rows ----

BACKENDS = ["torch", "triton"]


def chunk_inputs(rows=3, count=6, dim=40, taps=4, n_state=6, rank=5, pool=7, seed=0):
    """Token-major views as the mixer passes them (slices of wider projection outputs)."""
    gen = torch.Generator().manual_seed(seed)
    xz = torch.randn(rows, count, 2 * dim, generator=gen)
    projected = torch.randn(rows, count, rank + 2 * n_state, generator=gen)
    low, B, C = projected.split([rank, n_state, n_state], dim=-1)
    return {
        "x": xz[..., :dim], "z": xz[..., dim:], "low": low * 0.5, "B": B, "C": C,
        "conv_states": torch.randn(pool, dim, taps, generator=gen),
        "ssm_states": torch.randn(pool, dim, n_state, generator=gen),
        "weight": torch.randn(dim, 1, taps, generator=gen) * 0.5,
        "conv_bias": torch.randn(dim, generator=gen) * 0.1,
        "dt_weight": torch.randn(dim, rank, generator=gen) * 0.3,
        "dt_bias": torch.randn(dim, generator=gen) * 0.3,
        "A_log": torch.randn(dim, n_state, generator=gen) * 0.5,
        "D": torch.randn(dim, generator=gen),
    }


def run_chunk(inputs, slots, active, save_after, backend, with_d=True, with_z=True):
    """conv_chunk then selective_chunk on copies of the pools; returns (y, conv pool, ssm pool)."""
    conv_states, ssm_states = inputs["conv_states"].clone(), inputs["ssm_states"].clone()
    u = step.conv_chunk(inputs["x"], conv_states, slots, active, inputs["weight"], inputs["conv_bias"],
                        save_after, backend=backend)
    y = step.selective_chunk(ssm_states, slots, u, inputs["low"], inputs["dt_weight"], inputs["dt_bias"],
                             inputs["A_log"], inputs["B"], inputs["C"], inputs["D"] if with_d else None,
                             inputs["z"] if with_z else None, active, save_after, backend=backend)
    return y, conv_states, ssm_states


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_from_zero_state_equal_the_whole_sequence(backend):
    """Two chunks continuing pool rows give the whole-sequence conv + scan outputs and its last state."""
    inputs = chunk_inputs(rows=2, count=9, seed=1)
    inputs["conv_states"].zero_()
    inputs["ssm_states"].zero_()
    slots = torch.tensor([4, 1])
    x = inputs["x"].transpose(1, 2)
    u = causal_conv1d_torch(x, inputs["weight"], inputs["conv_bias"])
    delta = (inputs["low"] @ inputs["dt_weight"].t()).transpose(1, 2)
    whole, last = selective_scan_reference(
        u, delta, -torch.exp(inputs["A_log"]), inputs["B"].transpose(1, 2), inputs["C"].transpose(1, 2),
        D=inputs["D"], z=inputs["z"].transpose(1, 2), delta_bias=inputs["dt_bias"], delta_softplus=True,
        return_last_state=True,
    )
    conv_states, ssm_states = inputs["conv_states"], inputs["ssm_states"]
    outputs = []
    for start, end in ((0, 5), (5, 9)):
        part = {**inputs, **{k: inputs[k][:, start:end] for k in ("x", "z", "low", "B", "C")},
                "conv_states": conv_states, "ssm_states": ssm_states}
        y, conv_states, ssm_states = run_chunk(part, slots, torch.ones(2, end - start, dtype=torch.int32),
                                               end - start, backend)
        outputs.append(y)
    assert rel_err(torch.cat(outputs, dim=1).transpose(1, 2), whole) <= 1e-5
    assert rel_err(ssm_states[slots], last) <= 1e-5
    assert rel_err(conv_states[slots], x[..., -4:]) == 0  # the window holds the last 4 conv inputs
    untouched = torch.ones(7, dtype=torch.bool)
    untouched[slots] = False
    assert conv_states[untouched].abs().max() == 0 and ssm_states[untouched].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_after_save_after_continue_unsaved(backend):
    """The pool keeps the state after the events; the trailing tokens read it but never write it."""
    inputs = chunk_inputs(seed=2)
    slots, active = torch.tensor([0, 3, 5]), torch.ones(3, 6, dtype=torch.int32)
    y, conv_states, ssm_states = run_chunk(inputs, slots, active, 4, backend)
    events = {**inputs, **{k: inputs[k][:, :4] for k in ("x", "z", "low", "B", "C")}}
    y_events, conv_events, ssm_events = run_chunk(events, slots, active[:, :4], 4, backend)
    torch.testing.assert_close(y[:, :4], y_events, rtol=0, atol=0)
    torch.testing.assert_close(conv_states, conv_events, rtol=0, atol=0)
    torch.testing.assert_close(ssm_states, ssm_events, rtol=0, atol=0)


@pytest.mark.parametrize("taps", [4, 3, 2])
@pytest.mark.parametrize(("with_d", "with_z"), [(True, True), (False, False)])
def test_triton_chunk_matches_torch_with_padding(taps, with_d, with_z):
    """Padding tokens inside and after the events; a padding row shares a real row's slot."""
    inputs = chunk_inputs(rows=4, taps=taps, seed=taps)
    slots = torch.tensor([5, 2, 0, 5])
    active = torch.tensor([[1, 1, 0, 1, 1, 1],
                           [1, 0, 0, 0, 1, 1],
                           [0, 0, 0, 0, 1, 1],  # no events: its slot must stay as it was
                           [0, 0, 0, 0, 0, 0]], dtype=torch.int32)  # a padding row on slot 5
    want = run_chunk(inputs, slots, active, 4, "torch", with_d, with_z)
    got = run_chunk(inputs, slots, active, 4, "triton", with_d, with_z)
    for ours, theirs in zip(got, want, strict=True):
        assert rel_err(ours, theirs) <= 1e-5
    assert torch.equal(got[1][[0, 1, 3, 4, 6]], inputs["conv_states"][[0, 1, 3, 4, 6]])
    assert torch.equal(got[2][[0, 1, 3, 4, 6]], inputs["ssm_states"][[0, 1, 3, 4, 6]])
    assert not torch.equal(got[2][5], inputs["ssm_states"][5])
    assert got[0][~active.bool()].abs().max() == 0  # padding outputs are zero


def test_chunk_shapes_are_checked():
    inputs = chunk_inputs()
    with pytest.raises(ValueError, match="slots must be"):
        step.conv_chunk(inputs["x"], inputs["conv_states"], torch.tensor([0, 1]), torch.ones(3, 6),
                        inputs["weight"])
    with pytest.raises(ValueError, match="save_after"):
        step.conv_chunk(inputs["x"], inputs["conv_states"], torch.tensor([0, 1, 2]), torch.ones(3, 6),
                        inputs["weight"], save_after=7)
    with pytest.raises(ValueError, match="A_log must be"):
        step.selective_chunk(inputs["ssm_states"], torch.tensor([0, 1, 2]), inputs["x"], inputs["low"],
                             inputs["dt_weight"], inputs["dt_bias"], inputs["A_log"][:, :3], inputs["B"],
                             inputs["C"], None, None, torch.ones(3, 6))


def test_scorer_on_triton_kernels_matches_torch():
    """The whole incremental-scoring pass with the Triton chunk kernels (interpreted) against torch."""
    from odyssey.models import EHRMambaConfig, EHRMambaForTaskClassification, EHRMambaScorer

    torch.manual_seed(0)
    config = EHRMambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=8,
                            time_embedding_size=8, scan_backend="torch", task_names=["risk"], task_outputs=[2],
                            task_prompt_ids=[[24, 25]], task_token_type=8)
    model = EHRMambaForTaskClassification(config).eval()
    rng = np.random.default_rng(0)
    length = 30
    times = np.concatenate([[0.0, 0.0], np.cumsum(rng.exponential(2.0, length))]).astype(np.float32)
    history = {"input_ids": np.concatenate([[24, 25], rng.integers(30, 50, length)]),
               "token_type_ids": np.concatenate([[8, 8], rng.integers(1, 8, length)]),
               "ages": (60 + times / 365.25).astype(np.float32), "times": times,
               "visit_orders": np.arange(length + 2) // 5, "visit_segments": 1 + (np.arange(length + 2) // 5) % 2}
    torch_scorer, triton_scorer = EHRMambaScorer(model, "risk"), EHRMambaScorer(model, "risk")
    triton_scorer.step_backend = "triton"
    for start, end in ((0, 20), (20, 21), (21, 25), (25, 32)):
        chunk = {k: v[start:end] for k, v in history.items()}
        np.testing.assert_allclose(triton_scorer.update("p", chunk), torch_scorer.update("p", chunk), rtol=1e-5)
    for mine, theirs in zip(triton_scorer.state("p").layers, torch_scorer.state("p").layers, strict=True):
        assert rel_err(mine.ssm_state, theirs.ssm_state) <= 1e-5
