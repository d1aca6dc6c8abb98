"""`odyssey forecast` end to end on a small synthetic cohort, its outputs recomputed from its own futures,
and its clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
import typer
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from odyssey.cli.forecast import register
from odyssey.forecast import gap_days_table
from odyssey.tokenizer import SpecialTokens

SAMPLES, VISITS, HORIZON_DAYS = 4, 2, 30.0


def cli():
    app = typer.Typer()
    register(app)
    app.command(name="unused")(lambda: None)  # two commands: typer keeps the subcommand name
    return app


def run(*args: str):
    return CliRunner().invoke(cli(), ["forecast", *args])


@pytest.fixture(scope="module")
def forecast_dir(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("fc") / "forecast"
    result = run("--model", str(cohort.pretrain), "--data", str(cohort.seq), "--labels", str(cohort.labels),
                 "--out", str(out), "--samples", str(SAMPLES), "--max-visits", str(VISITS), "--top-p", "0.9",
                 "--temperature", "1.0", "--seed", "3", "--no-progress", "--meds", str(cohort.meds), "--plots", "2")
    assert result.exit_code == 0, result.output
    assert "timelines:" in result.output
    assert "zero-shot mortality_30d: AUROC" in result.output and "next visit" in result.output
    return out


def test_outputs_are_consistent_with_the_futures(forecast_dir, cohort):
    report = json.loads((forecast_dir / "report.json").read_text())
    futures = pl.read_parquet(forecast_dir / "futures.parquet")
    assert futures.columns == ["subject_id", "prediction_time", "sample", "position", "token", "time", "token_type",
                               "visit"]
    per_time = futures.group_by("subject_id", "prediction_time").agg(pl.col("sample").n_unique().alias("k"))
    assert per_time["k"].to_list() == [SAMPLES] * per_time.height
    assert per_time.height == report["prediction_times_forecast"] > 0
    assert report["generated_tokens"] == futures.height
    assert futures["visit"].min() >= 0 and futures["visit"].max() <= VISITS
    forbidden = {t.token for t in (SpecialTokens.PAD, SpecialTokens.CLS, SpecialTokens.MASK, SpecialTokens.UNK)}
    assert not set(futures["token"].unique().to_list()) & forbidden

    # Every held-out labelled subject was forecast, and only held-out subjects.
    splits = pl.read_parquet(cohort.meds / "metadata" / "subject_splits.parquet")
    held_out = set(splits.filter(pl.col("split") == "held_out")["subject_id"].to_list())
    labels = pl.read_parquet(cohort.labels / "mortality_30d" / "labels.parquet")
    assert set(futures["subject_id"].unique().to_list()) <= held_out
    assert set(futures["subject_id"].unique().to_list()) >= set(labels["subject_id"].to_list()) & held_out - {None}

    # Zero-shot risks recomputed from futures.parquet: each sample's start is its first time minus its first gap.
    gap_days = {SpecialTokens(t).token: d for t, d in gap_days_table().items()}
    futures = futures.sort("subject_id", "prediction_time", "sample", "position")
    starts = futures.filter(pl.col("position") == 0).with_columns(
        (pl.col("time") - pl.duration(microseconds=pl.col("token").replace_strict(gap_days).mul(86_400e6).round()
                                      .cast(pl.Int64))).alias("start")
    ).select("subject_id", "prediction_time", "sample", "start")
    risks = pl.read_parquet(forecast_dir / "risks.parquet")
    for task, token in (("mortality_30d", "MEDS_DEATH"), ("readmission_30d", "ENCOUNTER_START//IMP")):
        hits = (
            futures.join(starts, on=["subject_id", "prediction_time", "sample"])
            .filter((pl.col("token") == token) & (pl.col("time") - pl.col("start") <= pl.duration(days=HORIZON_DAYS)))
            .select("subject_id", "prediction_time", "sample").unique()
            .group_by("subject_id", "prediction_time").len()
        )
        mine = risks.filter(pl.col("task") == task).join(hits, on=["subject_id", "prediction_time"], how="left")
        expected = mine["len"].fill_null(0).to_numpy() / SAMPLES
        assert np.allclose(mine["predicted_boolean_probability"].to_numpy(), expected)
        task_labels = pl.read_parquet(cohort.labels / task / "labels.parquet").filter(
            pl.col("subject_id").is_in(list(held_out)))
        assert mine.height == task_labels.height
        result = report["zero_shot"][task]
        if result["value"] is not None:
            assert result["value"] == pytest.approx(
                roc_auc_score(mine["boolean_value"].to_numpy(), mine["predicted_boolean_probability"].to_numpy()))

    # Next visit: top-k sets are nested, so recall grows with k; precision@k stays within [0, 1].
    nv = report["next_visit"]
    assert report["prediction_times_with_next_visit"] > 0
    assert 0 <= nv["recall@5"] <= nv["recall@10"] <= nv["recall@20"] <= 1
    assert all(0 <= nv[f"precision@{k}"] <= 1 for k in (5, 10, 20))


def test_timelines_of_the_first_prediction_times(forecast_dir):
    report = json.loads((forecast_dir / "report.json").read_text())
    assert sorted(report["plots"]) == ["plots/forecast_0.png", "plots/forecast_0.svg", "plots/forecast_1.png",
                                       "plots/forecast_1.svg"]
    assert (forecast_dir / "plots" / "forecast_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (forecast_dir / "plots" / "forecast_1.svg").read_text()
    assert "timeline:forecast-aggregate" in svg and "timeline:forecast-start" in svg


def test_same_seed_same_futures(cohort, tmp_path):
    common = ["--model", str(cohort.pretrain), "--data", str(cohort.seq), "--labels", str(cohort.labels),
              "--samples", "3", "--max-visits", "1", "--max-subjects", "4", "--no-progress"]
    for name in ("a", "b"):
        assert run(*common, "--out", str(tmp_path / name), "--seed", "7").exit_code == 0
    assert run(*common, "--out", str(tmp_path / "c"), "--seed", "8").exit_code == 0
    a, b, c = (pl.read_parquet(tmp_path / n / "futures.parquet") for n in "abc")
    assert a.equals(b) and not a.equals(c)
    assert a["subject_id"].n_unique() == 4


def test_python_api_and_a_finetuned_model(cohort, tmp_path):
    """`odyssey.forecast(...)` takes the config's fields; a task model generates through its tied head."""
    import odyssey
    from odyssey.models import EHRMambaForTaskClassification

    task_model = EHRMambaForTaskClassification.from_backbone(
        cohort.pretrain / "model", task_names=["mortality_30d"], task_outputs=[1],
        task_prompt_ids=[[int(SpecialTokens.MOR_1M)]])
    task_model.save_pretrained(tmp_path / "ft" / "model")
    report = odyssey.forecast(model=tmp_path / "ft", data=cohort.seq, labels=cohort.labels, out=tmp_path / "fc",
                              samples=2, max_visits=1, max_subjects=3, progress_bar=False)
    assert report["subjects"] == 3 and (tmp_path / "fc" / "futures.parquet").is_file()


def test_clear_errors(cohort, tmp_path):
    from odyssey.tokenizer import tokenize

    base = ["--data", str(cohort.seq), "--labels", str(cohort.labels), "--out", str(tmp_path / "out"), "--no-progress"]
    missing = run("--model", str(tmp_path / "nowhere"), *base)
    assert missing.exit_code == 2 and "no config.json" in missing.output

    # Sequences tokenized with the default settings (death excluded): one token fewer than the model knows.
    other = tmp_path / "seq_default"
    tokenize(cohort.meds, other, progress=False)
    mismatch = run("--model", str(cohort.pretrain), "--data", str(other), "--labels", str(cohort.labels),
                   "--out", str(tmp_path / "out"), "--no-progress")
    assert mismatch.exit_code == 2 and "vocabulary of" in mismatch.output and "tokenizer" in mismatch.output

    empty_labels = tmp_path / "labels"
    shutil.copytree(cohort.labels, empty_labels, ignore=shutil.ignore_patterns("mortality_30d", "readmission_30d"))
    no_labels = run("--model", str(cohort.pretrain), "--data", str(cohort.seq), "--labels", str(empty_labels),
                    "--out", str(tmp_path / "out"), "--no-progress")
    assert no_labels.exit_code == 2 and "no labels for the tasks" in no_labels.output
    assert not (tmp_path / "out").exists()  # nothing half-written

    no_meds = run("--model", str(cohort.pretrain), *base, "--meds", str(tmp_path / "nomeds"))
    assert no_meds.exit_code == 2 and "no data/ folder" in no_meds.output
    if not torch.cuda.is_available():
        no_gpu = run("--model", str(cohort.pretrain), *base, "--device", "cuda")
        assert no_gpu.exit_code == 2 and "no CUDA device" in no_gpu.output
