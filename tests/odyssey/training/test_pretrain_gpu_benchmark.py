"""benchmarks/pretrain_gpu.py runs end to end at toy sizes on CPU (--smoke) and writes its JSON report."""

import importlib.util
from pathlib import Path

import pytest

from odyssey.io import read_json

SCRIPT = Path(__file__).parents[3] / "benchmarks" / "pretrain_gpu.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("pretrain_gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_a_complete_report(tmp_path):
    benchmark = load_benchmark()
    returned = benchmark.main(["--smoke", "--out", str(tmp_path)])
    report = read_json(tmp_path / benchmark.REPORT_NAME)
    assert report["models"].keys() == {"ehrmamba", "gpt"} == returned["models"].keys()
    mamba, gpt = report["models"]["ehrmamba"], report["models"]["gpt"]
    # GPT gets half the layers: one attention + MLP block holds about two Mamba blocks' parameters.
    assert gpt["layers"] == mamba["layers"] // 2
    assert 1.0 < mamba["block_parameters"] / gpt["block_parameters"] < 2.0
    assert mamba["parameters"] > mamba["block_parameters"]
    for entry in (mamba, gpt):
        assert [row["length"] for row in entry["by_length"]] == [64, 128]
        assert [row["batch"] for row in entry["by_length"]] == [4, 2]
        assert all(row["tokens_per_second"] > 0 and not row["out_of_memory"] for row in entry["by_length"])
        assert entry["batch_1"]["longest_length"] == 256 and entry["batch_1"]["search_capped"]
    assert set(report["ehrmamba_speedup"]) == {"64", "128"}
    assert report["scan_backend"] == "torch" and report["precision"] == "fp32"


def test_gradient_checkpointing_option_runs(tmp_path):
    benchmark = load_benchmark()
    report = benchmark.main(["--smoke", "--gradient-checkpointing", "--out", str(tmp_path)])
    assert report["settings"]["gradient_checkpointing"] is True
    assert all(not entry["by_length"][0]["out_of_memory"] for entry in report["models"].values())


def test_gpt_baseline_is_causal():
    import torch

    benchmark = load_benchmark()
    torch.manual_seed(0)
    model = benchmark.GPT(vocab=20, hidden=16, layers=1, heads=2).eval()
    ids = torch.randint(0, 20, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 20
    with torch.no_grad():
        hidden = [model.embed(x) + model.positions(10, x.device) for x in (ids, changed)]
        out = [model.blocks[0](h) for h in hidden]
    torch.testing.assert_close(out[0][:, :6], out[1][:, :6])
    assert not torch.allclose(out[0][:, 6:], out[1][:, 6:])


def test_compared_variants_and_profile_are_reported(tmp_path):
    benchmark = load_benchmark()
    report = benchmark.main(["--smoke", "--compare", "unfused:torch", "--profile", "--out", str(tmp_path)])
    assert {"ehrmamba", "gpt", "ehrmamba_unfused_torch"} <= report["models"].keys()
    variant = report["models"]["ehrmamba_unfused_torch"]
    # The same model in another layout: same parameters, timed at the same lengths.
    assert variant["parameters"] == report["models"]["ehrmamba"]["parameters"]
    assert all(row["tokens_per_second"] > 0 for row in variant["by_length"])
    profile = (tmp_path / benchmark.PROFILE_NAME).read_text()
    assert profile.count("=== ") == len(report["models"])


def test_a_bad_compare_spec_is_refused(tmp_path):
    benchmark = load_benchmark()
    with pytest.raises(SystemExit, match="LAYOUT:SCAN"):
        benchmark.main(["--smoke", "--compare", "sideways:torch", "--out", str(tmp_path)])
