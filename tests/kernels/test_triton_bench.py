"""The benchmark's float64 hand-written backward agrees with autograd through the reference scan."""

import pytest
import torch

from odyssey.kernels.bench import GRAD_NAMES, Shape, floors, make_inputs, pick_overrides, reference_fwd_bwd
from odyssey.kernels.reference import selective_scan_reference


@pytest.mark.parametrize("groups", [0, 2])
def test_reference_backward_matches_autograd(groups):
    shape = Shape("tiny", batch=2, length=23, dim=6, d_state=3)
    inputs = make_inputs(shape, torch.float32, "cpu", seed=groups, groups=groups)
    dout = torch.randn(shape.batch, shape.dim, shape.length, dtype=torch.float64)
    out, grads = reference_fwd_bwd(inputs, dout)

    leaves = {k: v.double().requires_grad_() for k, v in inputs.items()}
    ref = selective_scan_reference(*[leaves[k] for k in GRAD_NAMES], delta_softplus=True)
    ref_grads = torch.autograd.grad(ref, [leaves[k] for k in GRAD_NAMES], dout)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    for name, ref_grad in zip(GRAD_NAMES, ref_grads, strict=True):
        torch.testing.assert_close(grads[name], ref_grad, rtol=1e-10, atol=1e-12, msg=name)


def test_floors_count_every_tensor_once():
    shape = Shape("s", batch=2, length=10, dim=4, d_state=3)
    result = floors(shape, torch.bfloat16, bandwidth=1e12)
    # forward: u, delta, z read and out written (2 bytes each) plus B and C
    assert result["fwd_bytes"] == 4 * 80 * 2 + 2 * 2 * 3 * 10 * 2
    assert result["fwd_floor_ms"] == pytest.approx(result["fwd_bytes"] / 1e12 * 1e3)


def _row(overrides, fwd_bwd_ms, agreement=3e-5):
    return {"overrides": overrides, "agreement": agreement, "fwd_ms": 1.0, "fwd_bwd_ms": fwd_bwd_ms}


def test_pick_overrides_takes_the_fastest_row_that_agrees_and_loses_nowhere():
    fast_everywhere, fast_at_s1_only, wrong = {"a": 1}, {"b": 2}, {"c": 3}
    report = {"sweep": {
        "s1": [_row({}, 8.0), _row(fast_at_s1_only, 6.0), _row(fast_everywhere, 7.0), _row(wrong, 5.0, agreement=0.1),
               {"overrides": {"d": 4}, "error": "CompilationError"}],
        "s2": [_row({}, 17.0), _row(fast_at_s1_only, 18.0), _row(fast_everywhere, 17.1)],
    }}
    assert pick_overrides(report) == fast_everywhere  # 17.1 is within 1% of 17.0; 18.0 is not
    report["sweep"]["s2"][2]["fwd_bwd_ms"] = 17.5
    assert pick_overrides(report) == {}
    assert pick_overrides({"timings": {}}) == {}


def test_sweep_rows_name_real_shapes_and_config_fields():
    """A typo in a sweep row would only show as an error row on the GPU, after device time is spent."""
    from odyssey.kernels.bench import SHAPES, SWEEP
    from odyssey.kernels.triton_scan import ScanConfig

    fields = set(ScanConfig.__dataclass_fields__) | {"ranges"}
    for shape, rows in SWEEP.items():
        assert shape in SHAPES
        assert {} in rows, f"{shape}: the default row is the sweep's baseline"
        for overrides in rows:
            assert set(overrides) <= fields, f"{shape}: {sorted(set(overrides) - fields)}"


def test_sweep_rounds_time_the_rows_in_turn_and_report_medians(monkeypatch):
    """With rounds, every row that runs is timed once per round, rows in turn; a row that fails is reported once,
    untimed; each row carries the median of its rounds. A row wrong only at an odd length (as the first form of
    v16 was) disagrees."""
    from odyssey.kernels import bench

    class FakeScan:
        CONFIG_OVERRIDES: dict = {}

        @staticmethod
        def selective_scan_triton(*args, **kwargs):
            raise AssertionError("run_scan is replaced")

    def fake_run_scan(fn, inputs, dout):
        if FakeScan.CONFIG_OVERRIDES.get("broken"):
            raise RuntimeError("does not compile")
        wrong = FakeScan.CONFIG_OVERRIDES.get("wrong_at_odd_lengths") and inputs["u"].shape[-1] % 2
        out = torch.ones(2) * (2.0 if wrong else 1.0)
        return out, {name: torch.ones(2) for name in GRAD_NAMES}

    order, clock = [], iter([3.0, 9.0, 5.0, 1.0, 8.0, 5.0, 2.0, 7.0, 5.0])

    def fake_measure(fn, shape, dtype, device, reps_fwd, reps_bwd):
        order.append(dict(FakeScan.CONFIG_OVERRIDES))
        ms = next(clock)
        return {"fwd_ms": ms / 4, "fwd_bwd_ms": ms, "fwd_peak_mib": 10.0, "fwd_bwd_peak_mib": 20.0}

    monkeypatch.setattr(bench, "run_scan", fake_run_scan)
    monkeypatch.setattr(bench, "measure", fake_measure)
    shape = Shape("tiny", batch=1, length=4, dim=2, d_state=2)
    rows = bench.sweep_shape(FakeScan, shape, "cpu", [{}, {"broken": True}, {"fast": True},
                                                     {"wrong_at_odd_lengths": True}], rounds=3)
    assert rows[3]["agreement_full"] == 0.0 and rows[3]["agreement"] == rows[3]["agreement_odd_length"] > 0.5
    assert order[:2] == [{}, {"fast": True}] and order[::3] == [{}] * 3
    assert rows[0]["fwd_bwd_rounds_ms"] == [3.0, 1.0, 2.0] and rows[0]["fwd_bwd_ms"] == 2.0
    assert rows[2]["fwd_bwd_rounds_ms"] == [9.0, 8.0, 7.0] and rows[2]["fwd_ms"] == 2.0
    assert "error" in rows[1] and "fwd_bwd_ms" not in rows[1]
    assert rows[2]["agreement"] == 0.0 and FakeScan.CONFIG_OVERRIDES == {}
