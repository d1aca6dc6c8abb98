"""Triton selective scan against the float64 reference, on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before the kernels are decorated; if another test module imported them
first (compiled mode), they are reloaded here.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreter_guard import make_guard, reload_for_interpreter  # noqa: E402

from odyssey.kernels import triton_scan, triton_scan_kernels  # noqa: E402
from odyssey.kernels.reference import selective_scan_reference  # noqa: E402
from odyssey.kernels.step import selective_state_update  # noqa: E402

reload_for_interpreter(triton_scan_kernels, triton_scan)

# Triton imported compiled before this module (another test folder first): rerun this file in a child
_interpreted_only, test_module_in_fresh_process = make_guard(__file__)

FP32_TOL = 1e-5
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
SEQ_BACKWARD = {"fwd_variant": "seq", "bwd_variant": "seq"}


def rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    assert torch.isfinite(ours).all(), "non-finite values (an unwritten or poisoned element?)"
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(
    batch=2,
    dim=8,
    length=17,
    d_state=4,
    groups=0,
    with_z=True,
    with_D=True,
    with_bias=True,
    dtype=torch.float32,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    bc = (batch, d_state, length) if groups == 0 else (batch, groups, d_state, length)
    inputs = {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": torch.randn(batch, dim, length, generator=gen) * 0.5,
        "A": -torch.rand(dim, d_state, generator=gen) * 2 - 0.1,
        "B": torch.randn(*bc, generator=gen),
        "C": torch.randn(*bc, generator=gen),
        "D": torch.randn(dim, generator=gen) if with_D else None,
        "z": torch.randn(batch, dim, length, generator=gen) if with_z else None,
        "delta_bias": torch.randn(dim, generator=gen) * 0.5 if with_bias else None,
    }
    for key in ("u", "delta", "B", "C", "z"):
        if inputs[key] is not None:
            inputs[key] = inputs[key].to(dtype)
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def grads_of(outputs, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen).double()).sum() for o in outputs)
    present = [k for k in NAMES if inputs[k] is not None]
    return dict(zip(present, torch.autograd.grad(loss, [inputs[k] for k in present]), strict=True))


def compare(inputs, softplus=True, tol=FP32_TOL, last_state=True):
    """Ours against the reference run on float64 copies of the same input values (no rounding of its own)."""
    args = [inputs[k] for k in NAMES]
    ours = triton_scan.selective_scan_triton(*args, delta_softplus=softplus, return_last_state=last_state)
    exact = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref = selective_scan_reference(*[exact[k] for k in NAMES], delta_softplus=softplus,
                                   return_last_state=last_state)
    ours, ref = (ours, ref) if last_state else ((ours,), (ref,))
    assert ours[0].dtype == inputs["u"].dtype
    for o, r in zip(ours, ref, strict=True):
        assert o.shape == r.shape
        assert rel_err(o, r) <= tol
    g_ours, g_ref = grads_of(ours, inputs), grads_of(ref, exact)
    for name in g_ref:
        assert g_ours[name].dtype == inputs[name].dtype, name
        assert rel_err(g_ours[name], g_ref[name]) <= tol, name


@pytest.mark.parametrize("length", [1, 17, 64, 65, 127, 300])
def test_matches_reference_across_chunk_boundaries(length):
    compare(make_inputs(length=length, seed=length))


def record_state_slots(monkeypatch) -> list:
    """The chunk-state slots each forward call allocates (the states tensor's second dimension), in call order."""
    slots = []
    forward = triton_scan._forward

    def recording(*args, **kwargs):
        result = forward(*args, **kwargs)
        slots.append(result[2].shape[1])
        return result

    monkeypatch.setattr(triton_scan, "_forward", recording)
    return slots


@pytest.mark.parametrize("variant,kept_states", [("state_loop", 2), ("seq", 0)])
def test_forward_without_gradients_keeps_no_chunk_states(variant, kept_states, monkeypatch):
    """Under no_grad nothing is saved for a backward: the state-loop forward's chunk carry uses two
    slots in turn (300 steps: five chunks, so each slot is rewritten), the sequential one none (its
    carry stays in registers), with the same outputs and last state as a differentiated call."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"fwd_variant": variant})
    inputs = make_inputs(dim=8, d_state=4, length=300, seed=31)
    args = [inputs[k] for k in NAMES]
    slots = record_state_slots(monkeypatch)
    with torch.no_grad():
        out, last = triton_scan.selective_scan_triton(*args, delta_softplus=True, return_last_state=True)
    kept_out, kept_last = triton_scan.selective_scan_triton(*args, delta_softplus=True, return_last_state=True)
    assert slots == [kept_states, 5]
    assert torch.equal(out, kept_out.detach()) and torch.equal(last, kept_last.detach())
    exact = [t.detach().double() if t is not None else None for t in args]
    assert rel_err(out, selective_scan_reference(*exact, delta_softplus=True)) <= FP32_TOL


@pytest.mark.parametrize("length,every,kept_slots", [pytest.param(300, 2, 4, marks=pytest.mark.slow), (300, 4, 5),
                                                      (130, 4, 4), (64, 4, 4)])
def test_states_kept_every_few_chunks(length, every, kept_slots, monkeypatch):
    """The state-loop forward keeps every `states_every`-th chunk's start state (plus one group's scratch slots)
    and the backward recomputes the others from it: the reference's outputs, last state and every gradient.
    300 steps are 5 chunks (groups 0-3, 4 at 4: the last group one chunk; 0-1, 2-3, 4 at 2), 130 are 3 (one
    group, entered at its last, short chunk), 64 one."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"fwd_variant": "state_loop", "bwd_variant": "state_loop",
                                                          "states_every": every})
    slots = record_state_slots(monkeypatch)
    compare(make_inputs(batch=1, dim=8, d_state=5, length=length, groups=2, seed=length + every))
    assert slots == [kept_slots]


def test_states_every_defaults_to_large_states_on_the_state_loops(monkeypatch):
    """Kept every 4 chunks where both state loops run at d_state > 16 (v19: d_state 64's peak memory), every
    chunk at 16; refused by name with the sequential backward, which reads every chunk's state."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {})
    assert triton_scan.scan_config(64, 1536, rows=32 * 1536, multiprocessors=132).states_every == 4
    assert triton_scan.scan_config(16, 64).states_every == 1
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"fwd_variant": "state_loop"})
    assert triton_scan.scan_config(16, 64).states_every == 1
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {**SEQ_BACKWARD, "states_every": 2})
    with pytest.raises(ValueError, match="states_every"):
        triton_scan.scan_config(16, 64)


@pytest.mark.parametrize("length,d_state,split,prefetch,segments",
                         [(1, 16, 1, True, 1), (17, 16, 2, False, 1), (65, 5, 4, True, 1),
                          pytest.param(140, 16, 1, False, 1, marks=pytest.mark.slow),
                          pytest.param(130, 13, 2, True, 1, marks=pytest.mark.slow),
                          pytest.param(140, 16, 1, False, 2, marks=pytest.mark.slow),
                          (100, 16, 2, True, 4), (1, 16, 1, False, 4),
                          pytest.param(150, 7, 4, False, 8, marks=pytest.mark.slow)])
def test_sequential_forward_matches_reference(length, d_state, split, prefetch, segments, monkeypatch):
    """The sequential forward (a channel's 16 padded states on 1, 2 or 4 lanes, 8-step blocks, time cut
    into pieces of whole chunks: more pieces than chunks leaves some empty) at lengths that end inside
    a block and a chunk, under the backward's gradients."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"fwd_variant": "seq", "seq_split": split,
                                                          "seq_prefetch": prefetch, "seq_segments": segments})
    compare(make_inputs(dim=8, d_state=d_state, length=length, groups=2, seed=length))


def record_launches(monkeypatch, kernel: str, run: bool) -> list:
    """Replace the kernel `triton_scan.<kernel>` by a recorder of (programs along axis 1, launch keywords), which
    also launches the real kernel when `run`."""
    launches = []
    real = getattr(triton_scan, kernel)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid[1], kwargs))
                return real[grid](*args, **kwargs) if run else None
            return launch

    monkeypatch.setattr(triton_scan, kernel, Recorder())
    return launches


@pytest.mark.parametrize("length,pieces,parts", [(150, 2, 8), (300, 4, 4), pytest.param(300, 4, 2, marks=pytest.mark.slow),
                                                 pytest.param(150, 2, 2, marks=pytest.mark.slow)])
def test_sequential_forward_first_pass_in_parts(length, pieces, parts, monkeypatch):
    """The forward's first pass in parts of each piece of time, a program each (the last piece's parts idle, a
    part past the sequence's end adds nothing), combined by the second pass: the reference's outputs and last
    state (the backward reads the second pass's states, as without parts). Pieces of 128 steps at lengths 150 and
    300 (the last piece shorter, at 300 one piece fewer than asked for)."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"fwd_variant": "seq", "seq_segments": pieces,
                                                          "seq_first_pass_parts": parts})
    launches = record_launches(monkeypatch, "_fwd_seq_kernel", run=True)
    inputs = [value.detach() if value is not None else None
              for value in make_inputs(dim=8, d_state=16, length=length, groups=2, seed=length + parts).values()]
    out, last = triton_scan.selective_scan_triton(*inputs, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = selective_scan_reference(*[v.double() if v is not None else None for v in inputs],
                                                 delta_softplus=True, return_last_state=True)
    assert rel_err(out, ref_out) <= FP32_TOL and rel_err(last, ref_last) <= FP32_TOL
    used = -(-length // 128)  # the pieces of 128 steps the sequence needs
    assert [(k["PHASE"], k["SEGMENTS"], k["PARTS"], programs) for programs, k in launches[:2]] == [
        (1, used * parts, parts, 2 * used * parts), (2, used, parts, 2 * used)]


def test_first_pass_defaults_where_the_forward_runs_in_pieces(monkeypatch):
    """The pretraining benchmark's 16k scan on an H200 (4 x 1,536 rows, 132 multiprocessors) runs its forward in
    pieces of time, with the first pass in 8 parts a piece and softplus's fast log there (v18); a shorter chunk
    keeps parts of whole 8-step blocks, and short pieces fewer parts (none under 256 steps)."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {})
    cfg = triton_scan.scan_config(16, 1536, rows=4 * 1536, multiprocessors=132, dense_length=16384)
    assert (cfg.fwd_variant, cfg.seq_segments, cfg.seq_first_pass_parts, cfg.approx_log_first_pass) == (
        "seq", 8, 8, True)
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"chunk": 16})
    assert triton_scan.scan_config(16, 1536, rows=4 * 1536, multiprocessors=132,
                                   dense_length=16384).seq_first_pass_parts == 2
    for length, pieces, parts in ((8192, 8, 4), (2048, 8, 1), (300, 2, 1)):
        monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"seq_segments": pieces})
        assert triton_scan.scan_config(16, 1536, rows=4 * 1536, multiprocessors=132,
                                       dense_length=length).seq_first_pass_parts == parts


def test_first_pass_parts_must_divide_a_chunks_blocks(monkeypatch):
    """Parts of whole 8-step blocks of a 64-step chunk: 1, 2, 4 or 8; another count is refused by name."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"fwd_variant": "seq", "seq_first_pass_parts": 3})
    with pytest.raises(ValueError, match="seq_first_pass_parts"):
        triton_scan.scan_config(16, 64)


def test_first_pass_softplus_log_choice_reaches_only_the_first_pass(monkeypatch):
    """`approx_log_first_pass` gives lg2.approx (GPU only: inline PTX) to the first pass over pieces of time and
    leaves the second pass's softplus as `approx_log_fwd` says; recorded at the launches, nothing run."""
    launches = record_launches(monkeypatch, "_fwd_seq_kernel", run=False)
    monkeypatch.setattr(triton_scan, "_interpreting", lambda: False)  # as on a GPU
    monkeypatch.setattr(triton_scan, "_check_device", lambda *tensors: None)
    inputs = make_inputs(dim=8, d_state=16, length=300, groups=2, seed=3)
    for first_pass, expected in ((True, [(1, True), (2, False)]), (False, [(1, False), (2, False)])):
        monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"fwd_variant": "seq", "seq_segments": 2,
                                                              "approx_log_first_pass": first_pass})
        launches.clear()
        with torch.no_grad():
            triton_scan.selective_scan_triton(*[inputs[k] for k in NAMES], delta_softplus=True)
        assert [(k["PHASE"], k["APPROX_LOG"]) for _, k in launches] == expected


def test_backward_first_pass_register_cap(monkeypatch):
    """`seq_bwd_first_pass_maxnreg` caps the backward's first pass over pieces of time (the adjoint alone) on its
    own; the second pass keeps `seq_bwd_maxnreg` (168 with g-hat), as does the first without it."""
    inputs = make_inputs(dim=32, d_state=16, length=200, seed=4)
    for cap, expected in ((64, [(1, 64), (2, 168)]), (None, [(1, 168), (2, 168)])):
        monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {**SEQ_BACKWARD, "seq_bwd_segments": 2,
                                                              "seq_bwd_first_pass_maxnreg": cap})
        launches = record_launches(monkeypatch, "_bwd_seq_kernel", run=False)
        out = triton_scan.selective_scan_triton(*[inputs[k] for k in NAMES], delta_softplus=True)
        torch.autograd.grad(out.sum(), inputs["u"])
        assert [(k["PHASE"], k["maxnreg"]) for _, k in launches] == expected
        monkeypatch.undo()


@pytest.mark.parametrize("length,d_state,groups,dim,split,options",
                         [(1, 16, 0, 32, 1, {}), (17, 5, 2, 64, 1, {}), (65, 16, 0, 32, 1, {"with_z": False}),
                          (1, 16, 0, 16, 2, {}), (17, 5, 2, 32, 2, {}), (70, 16, 0, 16, 2, {"with_z": False}),
                          (64, 7, 0, 32, 2, {"with_D": False, "with_bias": False}),
                          (70, 16, 2, 32, 2, {"config": {"seq_bwd_bc_ahead": False, "seq_bwd_ghat": False,
                                                            "seq_bwd_row_strides": False}}),
                          (66, 7, 2, 32, 2, {"config": {"seq_bwd_share": False, "seq_bwd_row_strides": True}}),
                          pytest.param(64, 7, 0, 32, 1, {"with_D": False, "with_bias": False}, marks=pytest.mark.slow),
                          pytest.param(130, 16, 3, 96, 1, {}, marks=pytest.mark.slow),
                          pytest.param(130, 16, 3, 48, 2, {}, marks=pytest.mark.slow)])
def test_sequential_backward_matches_reference(length, d_state, groups, dim, split, options, monkeypatch):
    """The sequential backward (a channel a thread or on 2 lanes, 4-step blocks recomputed from per-block
    checkpoints, dB / dC summed across the warp's channels; B / C rows read a step ahead; on 2 lanes the per-channel
    work split between them and the adjoint carried as g-hat, or not) at lengths ending inside
    a block and a chunk,
    with and without the optional inputs and the last state's gradient. Its cross-lane sums run as inline
    PTX on the GPU only (checked there by `odyssey.kernels.check_variant`); here their plain-sum stand-in."""
    inputs = {key: value for key, value in options.items() if key != "config"}
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {**SEQ_BACKWARD, "seq_bwd_split": split,
                                                          **options.get("config", {})})
    calls = []
    real = triton_scan._backward_seq
    monkeypatch.setattr(triton_scan, "_backward_seq", lambda *a, **k: calls.append(1) or real(*a, **k))
    compare(make_inputs(dim=dim, d_state=d_state, length=length, groups=groups, seed=length, **inputs))
    assert calls == [1]


def test_sequential_backward_follows_the_sequential_forward():
    """It reads the sequential forward's padded states and sums dB / dC over a warp's channels of one group
    (32 / split, 2 lanes a channel by default). Where its programs are few it runs in pieces of time of its own:
    768 at b8/L16384 in 8 pieces stay within 4 waves of 1,584 (132 multiprocessors); 3,072 at b32/L2048
    fill 1.9 waves and run in one piece."""
    def backward_config(cpg=64, **overrides):
        triton_scan.CONFIG_OVERRIDES.clear()
        triton_scan.CONFIG_OVERRIDES.update(overrides)
        try:
            return triton_scan.scan_config(16, cpg)
        finally:
            triton_scan.CONFIG_OVERRIDES.clear()

    def backward(cpg=64, **overrides):
        return backward_config(cpg, **overrides).bwd_variant

    assert backward(**SEQ_BACKWARD) == "seq"
    assert backward(fwd_variant="state_loop", bwd_variant="seq") == "state_loop"
    assert backward(**SEQ_BACKWARD, cpg=8) == "state_loop"
    assert backward(**SEQ_BACKWARD, cpg=16, seq_bwd_split=1) == "state_loop"
    s1 = triton_scan.scan_config(16, 1536, rows=32 * 1536, multiprocessors=132, dense_length=2048)
    assert (s1.fwd_variant, s1.bwd_variant, s1.seq_bwd_split, s1.seq_bwd_segments) == ("seq", "seq", 2, 1)
    s2 = triton_scan.scan_config(16, 1536, rows=8 * 1536, multiprocessors=132, dense_length=16384)
    assert (s2.fwd_variant, s2.seq_segments, s2.bwd_variant, s2.seq_bwd_segments) == ("seq", 4, "seq", 8)
    # every piece keeps two chunks; per-row lengths or packed sequences are never cut
    assert triton_scan.scan_config(16, 1536, rows=8 * 1536, multiprocessors=132, dense_length=256).seq_bwd_segments == 2
    assert triton_scan.scan_config(16, 1536, rows=32 * 1536, multiprocessors=132).seq_bwd_segments == 1
    assert triton_scan.scan_config(64, 1536, rows=32 * 1536, multiprocessors=132).bwd_variant == "state_loop"
    # softplus's lg2.approx in the backward kernels only (the forward's measured slower with it); B / C rows a
    # step ahead in one piece of time only
    assert (s1.approx_log, s1.approx_log_fwd) == (True, False)
    assert (s1.seq_bwd_bc_ahead, s2.seq_bwd_bc_ahead) == (True, False)
    # the per-channel work split between a channel's two lanes (with two lanes a channel), with it the adjoint
    # carried as g-hat under a 168-register cap (its compile without one takes 246), and the B / C rows' strides as
    # constants: in one piece of time and in pieces
    for config in (s1, s2):
        assert (config.seq_bwd_share, config.seq_bwd_ghat, config.seq_bwd_maxnreg) == (True, True, 168)
        assert config.seq_bwd_row_strides
    unshared = backward_config(seq_bwd_split=1)
    assert (unshared.seq_bwd_share, unshared.seq_bwd_ghat, unshared.seq_bwd_maxnreg) == (False, False, None)


@pytest.mark.parametrize("overrides", [{"fwd_variant": "seq"}, {"fwd_variant": "seq", "seq_segments": 2},
                                       {"fwd_variant": "state_loop"}])
def test_forward_allocates_one_output(overrides, monkeypatch):
    """Peak memory: a forward without gradients allocates one tensor of u's size (the output), nothing
    else of that size (v10-v12 allocated a second, unused output: forward peak 396 MiB against 202)."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", overrides)
    inputs = make_inputs(dim=8, d_state=16, length=130, seed=7)
    big = []
    for name in ("empty", "empty_like", "zeros", "zeros_like", "empty_strided"):
        original = getattr(torch, name)

        def recording(*args, _original=original, **kwargs):
            made = _original(*args, **kwargs)
            if made.numel() >= inputs["u"].numel():
                big.append(tuple(made.shape))
            return made

        monkeypatch.setattr(torch, name, recording)
    with torch.no_grad():
        triton_scan.selective_scan_triton(*[inputs[k] for k in NAMES], delta_softplus=True)
    assert big == [tuple(inputs["u"].shape)]


@pytest.mark.parametrize("groups,with_z", [(2, False), (4, True)])
def test_grouped_B_C(groups, with_z):
    compare(make_inputs(dim=8, length=65, groups=groups, with_z=with_z, seed=groups))


def test_without_optional_inputs_or_softplus():
    inputs = make_inputs(length=65, with_z=False, with_D=False, with_bias=False)
    with torch.no_grad():
        inputs["delta"].abs_()  # without softplus delta is used as is: keep steps positive like a real model
    compare(inputs, softplus=False, last_state=False)


@pytest.mark.parametrize(
    "dim,d_state,groups",
    [(5, 5, 0), pytest.param(6, 32, 3, marks=pytest.mark.slow), (4, 3, 2)],
)
def test_odd_dims_and_state_sizes(dim, d_state, groups):
    compare(make_inputs(dim=dim, d_state=d_state, length=70, groups=groups, seed=dim))


def test_bfloat16_inputs():
    inputs = make_inputs(length=65, dtype=torch.bfloat16)
    compare(inputs, tol=5e-3)


def test_channels_last_layout_is_read_without_copy():
    base = make_inputs(length=65)
    inputs = dict(base)
    for key in ("u", "delta", "z"):  # (batch, L, dim) storage seen as (batch, dim, L), as a model produces
        inputs[key] = base[key].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert inputs["u"].stride(1) == 1
    compare(inputs)
    out = triton_scan.selective_scan_triton(*[inputs[k] for k in NAMES], delta_softplus=True)
    assert out.stride() == inputs["u"].stride()


@pytest.mark.parametrize("overrides,dim", [({}, 8), (SEQ_BACKWARD, 32)])
def test_poisoned_outputs_are_all_written(overrides, dim, monkeypatch):
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", dict(overrides))
    real_empty_like, real_empty = torch.empty_like, torch.empty

    def poisoned_empty_like(t, *args, **kwargs):
        out = real_empty_like(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    compare(make_inputs(dim=dim, length=127, groups=2, seed=5))


def _row(inputs, b, length):
    """Row b's first `length` steps as a batch of one."""
    row = {}
    for key, value in inputs.items():
        if value is None or key in ("A", "D", "delta_bias"):
            row[key] = value
        else:
            row[key] = value[b : b + 1, ..., :length]
    return row


@pytest.mark.parametrize("forward,dim", [({"fwd_variant": "state_loop"}, 8), ({"fwd_variant": "seq", "seq_split": 2}, 8),
                                         (SEQ_BACKWARD, 64),
                                         ({"fwd_variant": "state_loop", "bwd_variant": "state_loop", "states_every": 2}, 8)])
def test_varlen_per_row_lengths(forward, dim, monkeypatch):
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", forward)
    inputs = make_inputs(batch=4, dim=dim, length=70, groups=2, seed=3)
    lengths = torch.tensor([65, 1, 0, 30])
    args = [inputs[k] for k in NAMES]
    out, last = triton_scan.selective_scan_varlen_triton(
        *args, delta_softplus=True, return_last_state=True, seq_lens=lengths
    )
    gen = torch.Generator().manual_seed(9)
    w_out, w_last = torch.randn(out.shape, generator=gen), torch.randn(last.shape, generator=gen)
    present = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad((out * w_out).sum() + (last * w_last).sum(), [inputs[k] for k in present])
    grads = dict(zip(present, grads, strict=True))

    ref_loss = 0.0
    for b, n in enumerate(lengths.tolist()):
        row = _row(inputs, b, n)
        ref_out, ref_last = selective_scan_reference(
            *[row[k] for k in NAMES], delta_softplus=True, return_last_state=True
        )
        assert rel_err(out[b : b + 1, :, :n], ref_out) <= FP32_TOL
        assert rel_err(last[b : b + 1], ref_last) <= FP32_TOL
        assert (out[b, :, n:] == 0).all()
        ref_loss = ref_loss + (ref_out * w_out[b : b + 1, :, :n]).sum() + (ref_last * w_last[b : b + 1]).sum()
    ref_grads = dict(zip(present, torch.autograd.grad(ref_loss, [inputs[k] for k in present]), strict=True))
    for name in present:
        assert rel_err(grads[name], ref_grads[name]) <= FP32_TOL, name
    for b, n in enumerate(lengths.tolist()):
        for name in ("u", "delta", "z", "B", "C"):
            assert (grads[name][b, ..., n:] == 0).all(), name


@pytest.mark.parametrize("forward,dim", [({"fwd_variant": "state_loop"}, 8), ({"fwd_variant": "seq", "seq_split": 4}, 8),
                                         (SEQ_BACKWARD, 32),
                                         ({"fwd_variant": "state_loop", "bwd_variant": "state_loop", "states_every": 2}, 8)])
def test_varlen_packed_cu_seqlens(forward, dim, monkeypatch):
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", forward)
    lengths = [64, 3, 70]
    total = sum(lengths) + 5  # a tail that belongs to no sequence
    inputs = make_inputs(batch=1, dim=dim, length=total, seed=4)
    cu = torch.tensor([0, 64, 67, 137])
    args = [inputs[k] for k in NAMES]
    out, last = triton_scan.selective_scan_varlen_triton(
        *args, delta_softplus=True, return_last_state=True, cu_seqlens=cu
    )
    assert last.shape == (3, dim, 4)
    gen = torch.Generator().manual_seed(2)
    w_out, w_last = torch.randn(out.shape, generator=gen), torch.randn(last.shape, generator=gen)
    present = [k for k in NAMES if inputs[k] is not None]
    grads = dict(
        zip(
            present,
            torch.autograd.grad((out * w_out).sum() + (last * w_last).sum(), [inputs[k] for k in present]),
            strict=True,
        )
    )
    ref_loss = 0.0
    for i in range(3):
        start, end = int(cu[i]), int(cu[i + 1])
        piece = {
            k: (v[..., start:end] if v is not None and k not in ("A", "D", "delta_bias") else v)
            for k, v in inputs.items()
        }
        ref_out, ref_last = selective_scan_reference(
            *[piece[k] for k in NAMES], delta_softplus=True, return_last_state=True
        )
        assert rel_err(out[..., start:end], ref_out) <= FP32_TOL
        assert rel_err(last[i : i + 1], ref_last) <= FP32_TOL
        ref_loss = ref_loss + (ref_out * w_out[..., start:end]).sum() + (ref_last * w_last[i : i + 1]).sum()
    assert (out[..., 137:] == 0).all()
    ref_grads = dict(zip(present, torch.autograd.grad(ref_loss, [inputs[k] for k in present]), strict=True))
    for name in present:
        assert rel_err(grads[name], ref_grads[name]) <= FP32_TOL, name


def test_varlen_argument_errors():
    inputs = make_inputs(batch=2, length=10)
    args = [inputs[k] for k in NAMES]
    with pytest.raises(ValueError, match="exactly one"):
        triton_scan.selective_scan_varlen_triton(*args)
    with pytest.raises(ValueError, match="batch 1"):
        triton_scan.selective_scan_varlen_triton(*args, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match=r"\[0, L=10\]"):
        triton_scan.selective_scan_varlen_triton(*args, seq_lens=torch.tensor([4, 11]))


def test_shape_errors_name_the_input():
    inputs = make_inputs(length=10)
    args = [inputs[k] for k in NAMES]
    with pytest.raises(ValueError, match="delta"):
        triton_scan.selective_scan_triton(args[0], args[1][..., :5], *args[2:])
    with pytest.raises(ValueError, match="groups"):
        bad_B = torch.randn(2, 3, 4, 10)
        triton_scan.selective_scan_triton(*args[:3], bad_B, bad_B, *args[5:])
    with pytest.raises(ValueError, match="d_state"):
        triton_scan.selective_scan_triton(args[0], args[1], torch.zeros(8, 300), *args[3:])


@pytest.mark.parametrize("groups", [0, 2])
def test_state_update_matches_torch_step_and_scan(groups):
    batch, dim, d_state, length = 2, 8, 5, 6
    inputs = {
        k: (v.detach() if v is not None else None)
        for k, v in make_inputs(batch, dim, length, d_state, groups=groups, seed=8).items()
    }
    state = torch.zeros(batch, dim, d_state)
    torch_state = torch.zeros(batch, dim, d_state)
    steps = []
    for t in range(length):
        step = {k: inputs[k][..., t] for k in ("u", "delta", "B", "C", "z")}
        y = triton_scan.selective_state_update_triton(
            state,
            step["u"],
            step["delta"],
            inputs["A"],
            step["B"],
            step["C"],
            inputs["D"],
            step["z"],
            dt_bias=inputs["delta_bias"],
            dt_softplus=True,
        )
        y_torch = selective_state_update(
            torch_state,
            step["u"],
            step["delta"],
            inputs["A"],
            step["B"],
            step["C"],
            inputs["D"],
            step["z"],
            dt_bias=inputs["delta_bias"],
            dt_softplus=True,
        )
        assert rel_err(y, y_torch) <= FP32_TOL
        steps.append(y)
    assert rel_err(state, torch_state) <= FP32_TOL
    ref_out, ref_last = selective_scan_reference(
        *[inputs[k] for k in NAMES], delta_softplus=True, return_last_state=True
    )
    assert rel_err(torch.stack(steps, -1), ref_out) <= FP32_TOL
    assert rel_err(state, ref_last) <= FP32_TOL


def test_state_update_shape_errors():
    state = torch.zeros(2, 8, 4)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="dt"):
        triton_scan.selective_state_update_triton(
            state, x, torch.randn(2, 7), torch.zeros(8, 4), torch.randn(2, 4), torch.randn(2, 4)
        )


@pytest.mark.parametrize(
    "overrides",
    [pytest.param({"fwd_variant": "seq"}, marks=pytest.mark.slow),
     {"bwd_stages": 3, "fwd_stages": 2, "block_d_bwd": 4, "warps_bwd": 2},
     {"adjoint": 0, "pair": 1, "block_d_bwd": 8},
     pytest.param({"adjoint": 1, "one_exp": True}, marks=pytest.mark.slow),
     {"adjoint": 4, "reduce_dbc": False},
     pytest.param({"bc_f32": False, "unmasked_bwd": False, "bwd_stages": 2, "warps_fwd": 4, "block_d_fwd": 8},
                  marks=pytest.mark.slow),
     {"adjoint": 5},
     {"fwd_end_tile": True},
     pytest.param({"fwd_variant": "tile3d", "bwd_variant": "two_pass"}, marks=pytest.mark.slow),
     pytest.param({"fwd_variant": "seq", "bwd_variant": "two_pass", "chunk": 32}, marks=pytest.mark.slow)],
    ids=["seq", "pipelined_bwd", "v6_reverse_scan_adjoint", "one_exp_adjoint",
         "reversed_C_copy_per_row_dbc", "v7_backward", "source_flipped_as_a_tile", "forward_end_states_per_chunk",
         "tile3d_two_pass",
         "seq_two_pass_chunk32"],
)
def test_every_kernel_variant_matches_reference(overrides, monkeypatch):
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", dict(overrides))
    compare(make_inputs(dim=8, d_state=5, length=130, groups=2, seed=11))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, 5e-3)])
def test_full_tiles_without_masks_and_float32_B_C(dtype, tol, monkeypatch):
    """Length a whole number of chunks, channel tiles dividing dim, an even d_state: the state loops
    load without masks (`unmasked`), from B and C converted to float32 once (`bc_f32`)."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES",
                        {"bc_f32": True, "unmasked_fwd": True, "unmasked_bwd": True, "block_d_fwd": 4})
    assert triton_scan._full_tiles(triton_scan._dense_sequences(2, 128, "cpu"), 8, 4, 64, 4, 2)
    inputs = make_inputs(batch=1, dim=8, d_state=4, length=128, groups=2, dtype=dtype, seed=21)
    compare(inputs, tol=tol)
    B_grad = grads_of([triton_scan.selective_scan_triton(*[inputs[k] for k in NAMES], delta_softplus=True)],
                      inputs)["B"]
    assert B_grad.dtype == dtype  # dB comes back in B's dtype, not the float32 copy's


def test_capped_four_channel_backward_at_a_larger_state():
    """d_state 20 (padded to 32) takes the 4-channel 1-warp backward since v8: padded state rows
    must stay out of dA."""
    config = triton_scan.scan_config(20, 4)
    assert (config.block_d_bwd, config.warps_bwd, config.adjoint) == (4, 1, 5)
    compare(make_inputs(batch=1, dim=4, d_state=20, length=65, seed=20))


def test_full_tiles_needs_whole_chunks_tiles_and_pairs():
    dense = triton_scan._dense_sequences(2, 128, "cpu")
    assert not triton_scan._full_tiles(triton_scan._dense_sequences(2, 130, "cpu"), 8, 4, 64, 4, 2)
    assert not triton_scan._full_tiles(dense, 6, 4, 64, 4, 2)  # a channel tile past dim
    assert not triton_scan._full_tiles(dense, 8, 4, 64, 5, 2)  # an odd d_state in pairs
    varlen = triton_scan._varlen_sequences(2, 128, "cpu", torch.tensor([128, 128]), None, None)
    assert not triton_scan._full_tiles(varlen, 8, 4, 64, 4, 2)


def test_lane_flip_only_where_the_tile_layout_is_known(monkeypatch):
    """The inline-PTX flip needs compiled code, the 1-warp 4-channel tiles and 16-byte aligned,
    time-contiguous rows; anything else falls back to tl.flip."""
    flip = {"lane_flip": True, "bwd_variant": "state_loop"}  # the state-loop backward's flips
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", flip)
    config = triton_scan.scan_config(16, 1536, rows=32 * 1536, multiprocessors=132)
    u = torch.zeros(2, 16, 128, dtype=torch.bfloat16)
    assert not triton_scan._lane_flip_safe(config, u)  # the interpreter is on in this module
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(triton_scan, "LANE_FLIP_TRITON", (triton_scan.triton.__version__,))
    assert triton_scan._lane_flip_safe(config, u, None)
    assert not triton_scan._lane_flip_safe(config, u.transpose(1, 2).contiguous().transpose(1, 2))
    assert not triton_scan._lane_flip_safe(config, torch.zeros(2, 16, 129, dtype=torch.bfloat16)[..., 1:])
    assert not triton_scan._lane_flip_safe(config, u, u.float())  # float32 rows: another tile layout
    # rows 16-byte aligned but a stride Triton cannot specialise as divisible by 16: unvectorised loads
    assert not triton_scan._lane_flip_safe(config, torch.zeros(2, 16, 136, dtype=torch.bfloat16))
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {**flip, "adjoint": 1})
    assert not triton_scan._lane_flip_safe(triton_scan.scan_config(16, 1536, rows=32 * 1536, multiprocessors=132), u)
    monkeypatch.setattr(triton_scan, "LANE_FLIP_TRITON", ("0.0.",))  # layouts not read for this version
    assert not triton_scan._lane_flip_safe(config, u)


def test_overrides_from_the_environment():
    env = triton_scan.OVERRIDES_ENV
    assert triton_scan.overrides_from_env({}) == {}
    assert triton_scan.overrides_from_env({env: '{"lane_flip": true, "maxnreg": 96}'}) == {"lane_flip": True,
                                                                                          "maxnreg": 96}
    with pytest.raises(ValueError, match="not valid JSON"):
        triton_scan.overrides_from_env({env: "{lane_flip: 1}"})
    with pytest.raises(ValueError, match="ScanConfig fields"):
        triton_scan.overrides_from_env({env: '{"no_such_field": 1}'})


def test_backward_register_cap_keeps_the_last_wave_full(monkeypatch):
    """4-channel state-loop backward programs: 16 resident per multiprocessor (cap 128) unless that leaves
    the last wave mostly empty; then 12 (cap 168). 132 multiprocessors, dim 1536, d_state 16."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"bwd_variant": "state_loop"})
    config = triton_scan.scan_config(16, 1536, rows=32 * 1536, multiprocessors=132)
    assert (config.block_d_bwd, config.warps_bwd, config.bwd_maxnreg, config.adjoint) == (4, 1, 128, 5)
    # the sequential forward since v10: 32 channels a 1-warp program
    assert (config.fwd_variant, config.block_d_fwd, config.warps_fwd) == ("seq", 32, 1)
    # batch 8: 3,072 programs fill 1.45 waves of 2,112 slots but 1.94 waves of 1,584
    long_rows = triton_scan.scan_config(16, 1536, rows=8 * 1536, multiprocessors=132)
    assert long_rows.bwd_maxnreg == 168
    # and 2.9 warps per multiprocessor are too few for the sequential forward, unless time is cut into
    # pieces: a dense batch of 16,384 steps in 4 (programs fill one wave of 12 per multiprocessor)
    assert (long_rows.fwd_variant, long_rows.block_d_fwd) == ("state_loop", 4)
    pieces = triton_scan.scan_config(16, 1536, rows=8 * 1536, multiprocessors=132, dense_length=16384)
    assert (pieces.fwd_variant, pieces.seq_segments) == ("seq", 4)
    assert triton_scan.scan_config(16, 1536, rows=4 * 1536, multiprocessors=132, dense_length=16384).seq_segments == 8
    assert triton_scan.scan_config(16, 1536, rows=32 * 1536, multiprocessors=132, dense_length=2048).seq_segments == 1
    # too short to cut: every piece keeps two chunks
    assert triton_scan.scan_config(16, 1536, rows=8 * 1536, multiprocessors=132, dense_length=256).seq_segments == 2
    assert triton_scan.scan_config(32, 1536, rows=32 * 1536, multiprocessors=132).fwd_variant == "state_loop"
    assert triton_scan._wave_fill(3072, 1584) == pytest.approx(3072 / 3168)
    # since v8 d_state 64 too; larger states keep 4-warp programs and no cap
    config64 = triton_scan.scan_config(64, 1536, rows=32 * 1536, multiprocessors=132)
    assert (config64.block_d_bwd, config64.warps_bwd, config64.bwd_maxnreg, config64.bwd_stages) == (4, 1, 128, 1)
    assert (config64.block_d_fwd, config64.warps_fwd) == (16, 4)
    config128 = triton_scan.scan_config(128, 1536, rows=32 * 1536, multiprocessors=132)
    assert (config128.warps_bwd, config128.bwd_maxnreg, config128.bwd_stages) == (4, None, 2)


def test_approximate_log_goes_to_the_kernels_it_was_measured_for(monkeypatch):
    """lg2.approx is inline PTX: never under the interpreter; on the GPU the backward kernels take approx_log and
    the forward ones approx_log_fwd (kernels/NOTES.md v14)."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {})
    config = triton_scan.scan_config(16, 1536, rows=32 * 1536, multiprocessors=132, dense_length=2048)
    assert not triton_scan._approx_log(config) and not triton_scan._approx_log(config, forward=True)
    monkeypatch.setattr(triton_scan, "_interpreting", lambda: False)
    assert triton_scan._approx_log(config) and not triton_scan._approx_log(config, forward=True)
    swapped = dataclasses.replace(config, approx_log=False, approx_log_fwd=True)
    assert not triton_scan._approx_log(swapped) and triton_scan._approx_log(swapped, forward=True)


def test_gpu_check_script_runs_its_cases(monkeypatch):
    """`python -m odyssey.kernels.check_variant` (run on the GPU before timing a variant): dense, grouped and
    per-row-length cases against the float64 reference pass, and a wrong gradient fails."""
    from odyssey.kernels import check_variant

    monkeypatch.setattr(check_variant, "CASES", [(2, 32, 19, 16, 0, False), (3, 32, 20, 5, 2, True)])
    assert check_variant.check(SEQ_BACKWARD, device="cpu")
    real = triton_scan._backward_seq

    def wrong_dA(*args, **kwargs):
        du, ddelta, dA, *rest = real(*args, **kwargs)
        return (du, ddelta, dA * 1.01, *rest)

    monkeypatch.setattr(triton_scan, "_backward_seq", wrong_dA)
    monkeypatch.setattr(check_variant, "CASES", [(2, 32, 19, 16, 0, False)])
    assert not check_variant.check(SEQ_BACKWARD, device="cpu")


@pytest.mark.parametrize("length,pieces,split,forward_pieces,config",
                         [(130, 2, 2, 1, {}), (200, 4, 1, 2, {}),
                          pytest.param(130, 2, 2, 1, {"seq_bwd_share": False, "seq_bwd_row_strides": False},
                                       marks=pytest.mark.slow),
                          pytest.param(200, 4, 2, 1, {"seq_bwd_ghat": False}, marks=pytest.mark.slow),
                          pytest.param(130, 2, 1, 1, {}, marks=pytest.mark.slow),
                          pytest.param(256, 4, 2, 4, {}, marks=pytest.mark.slow)])
def test_sequential_backward_in_time_pieces(length, pieces, split, forward_pieces, config, monkeypatch):
    """Time cut into pieces of whole chunks for the sequential backward: a first pass gives every piece but
    the first its adjoint from zero and its carry exponent, the second starts each piece from the later
    pieces' results (last piece shorter; the last state's gradient enters at the end)."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {**SEQ_BACKWARD, "seq_bwd_split": split,
                                                          "seq_bwd_segments": pieces, "seq_segments": forward_pieces,
                                                          **config})
    compare(make_inputs(dim=32, d_state=16, length=length, seed=length + pieces))


def test_many_pieces_of_time_for_a_long_single_sequence(monkeypatch):
    """A batch of one long sequence: more than 8 pieces of time where each keeps 2,048 steps (v20: at 65,536
    steps 32 pieces, which also brings both sequential kernels in); the batches measured at 16,384 steps keep
    theirs."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {})

    def config(batch, length):
        cfg = triton_scan.scan_config(16, 1536, rows=batch * 1536, multiprocessors=132, dense_length=length)
        return cfg.fwd_variant, cfg.seq_segments, cfg.bwd_variant, cfg.seq_bwd_segments

    assert config(1, 65536) == ("seq", 32, "seq", 32)
    assert config(4, 16384) == ("seq", 8, "seq", 8) and config(8, 16384) == ("seq", 4, "seq", 8)
    assert config(1, 16384) == ("state_loop", 8, "state_loop", 8)
    assert config(1, 24576)[1] == 8  # 16 pieces would be 1,536 steps each
    # pieces of 512 steps where rows are few (a SWEEP row, not the default): one 16,384-step sequence on the
    # sequential kernels, 32 pieces each way; the batches measured keep their counts
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {"few_rows_min_piece_steps": 512})
    assert config(1, 16384) == ("seq", 32, "seq", 32) and config(2, 16384) == ("seq", 16, "seq", 16)
    assert config(1, 65536) == ("seq", 32, "seq", 32)
    assert config(4, 16384) == ("seq", 8, "seq", 8) and config(8, 16384) == ("seq", 4, "seq", 8)


@pytest.mark.slow
def test_sixteen_pieces_of_time_each_way(monkeypatch):
    """16 pieces of 64 steps in the sequential forward and backward (their combines loop over every earlier or
    later piece) against the reference (~25 s on the interpreter)."""
    monkeypatch.setattr(triton_scan, "CONFIG_OVERRIDES", {**SEQ_BACKWARD, "seq_segments": 16, "seq_bwd_segments": 16})
    compare(make_inputs(batch=1, dim=32, d_state=16, length=1000, seed=16))
