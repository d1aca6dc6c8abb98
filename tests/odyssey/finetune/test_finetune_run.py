"""Finetune and evaluate end to end on the shared cohort (CLI and Python API), the shuffled-label leakage
alarm, and the checks that stop bad input before training."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import typer
import yaml
from finetune_helpers import TINY_MODEL, shuffle_labels
from transformers import TrainerCallback
from typer.testing import CliRunner

from odyssey.cli import evaluate as evaluate_cli
from odyssey.cli import finetune as finetune_cli
from odyssey.finetune import FinetuneConfig, FinetuneDataError, evaluate, finetune, load_finetuned
from odyssey.finetune.evaluate import PRIMARY
from odyssey.models import EHRMambaConfig, EHRMambaForPretraining
from odyssey.training.pretrain import NonFiniteLossError

TASKS = "mortality_30d,los_7d,readmission_30d,conditions"
OUTPUTS = 9  # three binary tasks and six condition groups
TRAINING = dict(model=TINY_MODEL, context_length=32, batch_size=16, max_steps=20, learning_rate=3e-3,
                scan_backend="torch", progress_bar=False, logging_steps=10)


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    finetune_cli.register(app)
    evaluate_cli.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "finetune.yaml"
    path.write_text(yaml.safe_dump(TRAINING))
    return path


@pytest.fixture(scope="module")
def evaluated(cohort, cli, config_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    finetuned = cli("finetune", "--config", config_file, "--data", cohort.seq, "--labels", cohort.labels,
                    "--tasks", TASKS, "--out", root / "ft")
    assert finetuned.exit_code == 0, finetuned.output
    evaluated = cli("evaluate", "--model", root / "ft", "--data", cohort.seq, "--labels", cohort.labels,
                    "--out", root / "eval", "--truth", cohort.truth, "--meds", cohort.meds,
                    "--baselines", "logistic_regression,gradient_boosting", "--no-progress")
    assert evaluated.exit_code == 0, evaluated.output
    return root, finetuned.output, evaluated.output


def test_finetune_cli_writes_a_model_that_serves_every_task(evaluated):
    root, output, _ = evaluated
    assert "from scratch" in output and "tuning AUROC" in output
    report = json.loads((root / "ft" / "finetune_report.json").read_text())
    assert report["steps"] == TRAINING["max_steps"]
    assert report["tasks"] == TASKS.split(",")
    assert len(report["tuning_auroc"]) == OUTPUTS
    model, specs = load_finetuned(root / "ft")
    assert [s.name for s in specs] == TASKS.split(",")
    assert model.config.task_outputs == [1, 1, 1, 6]
    assert (root / "ft" / "model" / "tokenizer" / "tokenizer.json").is_file()


def test_evaluate_report_has_every_metric_with_intervals(evaluated):
    root, _, output = evaluated
    report = json.loads((root / "eval" / "report.json").read_text())
    assert report["models"] == [PRIMARY, "logistic_regression", "gradient_boosting"]
    assert len(report["outputs"]) == OUTPUTS
    for name, entry in report["outputs"].items():
        assert entry["n"] > 100 and 0 < entry["positives"] < entry["n"], name
        for model, metrics in entry["models"].items():
            for metric in ("auroc", "auprc", "f1", "brier", "ece"):
                m = metrics[metric]
                assert m["low"] <= m["value"] <= m["high"], (name, model, metric)
            assert 0 < metrics["threshold"] < 1
        assert set(entry["subgroups"]) == {"sex", "age_band", "history_tokens"}
        assert sum(g["n"] for g in entry["subgroups"]["sex"].values()) == entry["n"]
        # Every held-out admission of a synthetic cohort has a truth row; the oracle beats chance.
        assert entry["oracle"]["matched"] == entry["n"]
        assert entry["oracle"]["auroc"]["value"] > 0.6, name
        assert (root / "eval" / entry["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Bag-of-codes logistic regression finds the planted signal of the mortality task.
    assert report["outputs"]["mortality_30d"]["models"]["logistic_regression"]["auroc"]["value"] > 0.6
    markdown = (root / "eval" / "report.md").read_text()
    assert f"| output | n | positives | {PRIMARY} | logistic_regression | gradient_boosting | oracle |" in markdown
    assert "| mortality_30d |" in output  # the CLI prints the comparison table


def test_predictions_follow_the_meds_prediction_schema(evaluated, cohort):
    root, _, _ = evaluated
    report = json.loads((root / "eval" / "report.json").read_text())
    table = pq.read_table(root / "eval" / "predictions" / PRIMARY / "conditions_diabetes.parquet")
    assert table.column_names[:3] == ["subject_id", "prediction_time", "boolean_value"]
    assert "predicted_boolean_probability" in table.column_names
    assert str(table.schema.field("prediction_time").type) == "timestamp[us]"
    assert table.num_rows == report["outputs"]["conditions_diabetes"]["n"]
    probabilities = table["predicted_boolean_probability"].to_numpy()
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    labels = pl.read_parquet(cohort.labels / "conditions" / "labels.parquet")
    merged = pl.from_arrow(table).join(labels, on=["subject_id", "prediction_time"])
    assert merged.height == table.num_rows and (merged["boolean_value"] == merged["diabetes"]).all()


SHUFFLES = 3


def test_shuffled_labels_give_chance_auroc(cohort, tmp_path):
    """Leakage alarm: labels permuted within each task carry no signal, so held-out AUROC must be chance.

    A pipeline that let a label reach the model's input (or the baseline's features) would score well
    here. One shuffle's mean over the nine outputs has a standard error of about 0.015-0.02 on this
    cohort; the mean over three shuffles about 0.01, so 0.50 +/- 0.03 is a three-sigma band.
    """
    aurocs: dict[str, list[float]] = {PRIMARY: [], "logistic_regression": []}
    for seed in range(SHUFFLES):
        shuffled = shuffle_labels(cohort.labels, tmp_path / f"shuffled{seed}", seed=seed)
        finetune(data=cohort.seq, labels=shuffled, out=tmp_path / f"ft{seed}", **{**TRAINING, "seed": seed})
        report = evaluate(model=tmp_path / f"ft{seed}", data=cohort.seq, labels=shuffled,
                          out=tmp_path / f"eval{seed}", baselines=["logistic_regression"], resamples=10,
                          progress_bar=False)
        assert len(report["outputs"]) == OUTPUTS
        for model, values in aurocs.items():
            values += [entry["models"][model]["auroc"]["value"] for entry in report["outputs"].values()]
    for model, values in aurocs.items():
        assert np.mean(values) == pytest.approx(0.5, abs=0.03), (model, np.round(values, 3))


@pytest.fixture(scope="module")
def pretrained_run(cohort, tmp_path_factory):
    """A pretraining run folder as `odyssey pretrain` lays it out (model/ with the tokenizer copy)."""
    run = tmp_path_factory.mktemp("pretrained")
    vocab = len(json.loads((cohort.seq / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    config = EHRMambaConfig.from_size("tiny", **TINY_MODEL, vocab_size=vocab, scan_backend="torch")
    EHRMambaForPretraining(config).save_pretrained(run / "model")
    shutil.copytree(cohort.seq / "tokenizer", run / "model" / "tokenizer")
    return run


def test_finetune_from_a_pretrained_run_few_shot(cohort, pretrained_run, cli, config_file, tmp_path):
    result = cli("finetune", "--config", config_file, "--pretrained", pretrained_run, "--data", cohort.seq,
                 "--labels", cohort.labels, "--tasks", "mortality_30d,los_7d", "--few-shot-k", 16,
                 "--max-steps", 2, "--out", tmp_path / "ft")
    assert result.exit_code == 0, result.output
    assert "(pretrained)" in result.output
    report = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())
    assert report["examples"]["train"] == {"mortality_30d": 16, "los_7d": 16}
    assert report["from_pretrained"] is True


class _HeadAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weight = model.classifier.weight.detach().clone()


def test_backbone_learning_rate_sets_the_backbone_apart_from_the_head(cohort, pretrained_run, tmp_path):
    """At backbone rate 0 the saved backbone is the pretrained one bit for bit while the head trains; at a
    positive rate the backbone moves too."""
    from safetensors.torch import load_file

    pretrained = load_file(pretrained_run / "model" / "model.safetensors")
    settings = {k: v for k, v in TRAINING.items() if k != "model"} | {"max_steps": 6}
    moved = {}
    for rate in (0.0, 1e-3):
        out, head = tmp_path / f"ft_{rate}", _HeadAtStart()
        finetune(data=cohort.seq, labels=cohort.labels, out=out, pretrained=pretrained_run,
                 tasks=["mortality_30d", "conditions"], backbone_learning_rate=rate, callbacks=[head], **settings)
        tuned = load_file(out / "model" / "model.safetensors")
        shared = [k for k in tuned if k in pretrained]
        assert len(shared) > 10
        moved[rate] = max(float((tuned[k] - pretrained[k]).abs().max()) for k in shared)
        assert float((tuned["classifier.weight"] - head.weight).abs().max()) > 1e-3  # the head trained
    assert moved[0.0] == 0.0
    assert moved[1e-3] > 1e-4


def test_checkpoint_with_another_vocabulary_stops_before_training(cohort, pretrained_run, cli, config_file,
                                                                  tmp_path):
    other = tmp_path / "other"
    shutil.copytree(pretrained_run, other)
    config = json.loads((other / "model" / "config.json").read_text())
    config["vocab_size"] += 7
    (other / "model" / "config.json").write_text(json.dumps(config))
    result = cli("finetune", "--config", config_file, "--pretrained", other, "--data", cohort.seq,
                 "--labels", cohort.labels, "--out", tmp_path / "ft")
    assert result.exit_code == 2
    assert "vocabulary of" in result.output and "pretraining tokenizer" in result.output
    assert not (tmp_path / "ft").exists()


def test_checkpoint_with_a_different_tokenizer_stops_before_training(cohort, pretrained_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(pretrained_run, other)
    path = other / "model" / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 40][:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two codes swapped
    path.write_text(json.dumps(tokenizer))
    with pytest.raises(FinetuneDataError, match="tokenizer differs"):
        finetune(pretrained=other, data=cohort.seq, labels=cohort.labels, out=tmp_path / "ft", **TRAINING)


def test_unknown_task_stops_the_cli(cohort, cli, config_file, tmp_path):
    result = cli("finetune", "--config", config_file, "--data", cohort.seq, "--labels", cohort.labels,
                 "--tasks", "mortality_30d,sepsis_7d", "--out", tmp_path / "ft")
    assert result.exit_code == 2
    assert "unknown task(s) sepsis_7d" in result.output


@pytest.mark.slow
def test_a_label_written_in_the_input_is_learned(cohort, tmp_path):
    """The counterpart of the alarm: when the label is a function of the input (the subject's sex, a
    header token that truncation keeps), the pipeline learns it, so chance AUROC above means no signal,
    not a model that cannot learn. About 25 s on one CPU thread."""
    target = tmp_path / "labels"
    shutil.copytree(cohort.labels, target)
    female = json.loads((cohort.seq / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]["GENDER//female"]
    from odyssey.tokenizer import load_sequences

    sex = load_sequences(cohort.seq).select(
        "subject_id", pl.col("input_ids").list.slice(0, 4).list.contains(female).alias("female"))
    path = target / "mortality_30d" / "labels.parquet"
    labels = pl.read_parquet(path).join(sex, on="subject_id", how="left", maintain_order="left")
    labels.with_columns(pl.col("female").alias("boolean_value")).drop("female").write_parquet(path)
    result = finetune(data=cohort.seq, labels=target, out=tmp_path / "ft", tasks=["mortality_30d", "los_7d"],
                      **{**TRAINING, "model": {"hidden_size": 64, "num_hidden_layers": 2}, "max_steps": 500})
    assert result.tuning_auroc["mortality_30d"] > 0.95


def test_eval_steps_keep_the_best_model_on_tuning(cohort, tmp_path):
    result = finetune(data=cohort.seq, labels=cohort.labels, out=tmp_path / "ft", tasks=["los_7d", "readmission_30d"],
                      **{**TRAINING, "max_steps": 12, "eval_steps": 4})
    report = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())
    history = report["model_selection"]["history"]
    assert [h["step"] for h in history] == [4, 8, 12]
    best = max(history, key=lambda h: h["tuning_mean_auroc"])
    assert report["model_selection"]["best_step"] == best["step"]
    # The returned (and saved) model is the best one: its tuning AUROC is the best seen.
    assert np.mean(list(result.tuning_auroc.values())) == pytest.approx(best["tuning_mean_auroc"], abs=1e-9)


class _SleepAt(TrainerCallback):
    def __init__(self, step: int, seconds: float):
        self.step, self.seconds = step, seconds

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            time.sleep(self.seconds)


def test_a_time_budget_stops_training_and_scores_the_stop(cohort, tmp_path):
    """Past `max_train_minutes` training ends at that step (not at max_steps), the tuning split is scored
    there, and the best checkpoint seen is the one saved."""
    result = finetune(FinetuneConfig(data=cohort.seq, labels=cohort.labels, out=tmp_path / "ft",
                                     tasks=["los_7d", "readmission_30d"],
                                     **{**TRAINING, "max_steps": 40, "eval_steps": 4, "max_train_minutes": 0.05}),
                      callbacks=[_SleepAt(6, 3.2)])
    report = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())
    stopped = report["stopped_by_time_budget_at_step"]
    assert stopped is not None and stopped <= 6 and result.steps == stopped == result.stopped_by_time_budget_at_step
    steps = [h["step"] for h in report["model_selection"]["history"]]
    assert steps[-1] == stopped and len(steps) == len(set(steps))
    best = max(report["model_selection"]["history"], key=lambda h: h["tuning_mean_auroc"])
    assert np.mean(list(result.tuning_auroc.values())) == pytest.approx(best["tuning_mean_auroc"], abs=1e-9)


class _PoisonClassifierAfter(TrainerCallback):
    """Sets the head's bias to NaN after `step` optimizer steps: the next loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.classifier.bias.fill_(float("nan"))


def test_a_nan_loss_stops_training_before_anything_is_saved(cohort, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 4: the training loss is nan"):
        finetune(FinetuneConfig(data=cohort.seq, labels=cohort.labels, out=tmp_path / "ft", tasks=["los_7d"],
                                **{**TRAINING, "max_steps": 8}), callbacks=[_PoisonClassifierAfter(3)])
    assert not (tmp_path / "ft" / "model").exists()


def test_a_model_with_nan_weights_stops_evaluation(evaluated, cohort, tmp_path):
    root, _, _ = evaluated
    broken = tmp_path / "broken"
    shutil.copytree(root / "ft", broken)
    model, specs = load_finetuned(broken)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    model.save_pretrained(broken / "model")
    with pytest.raises(ValueError, match=r"broken: \d+ of \d+ tuning examples of mortality_30d get a non-finite"):
        evaluate(model=root / "ft", data=cohort.seq, labels=cohort.labels, out=tmp_path / "eval",
                 compare={"broken": broken}, baselines=[], progress_bar=False, resamples=10)
    assert not (tmp_path / "eval").exists()


def test_every_model_is_scored_on_long_histories(evaluated, cohort, tmp_path):
    """The long-history table scores each model on the examples with more than N tokens known at the
    prediction time; recomputed here from the written predictions and the examples' history lengths."""
    from odyssey.finetune import metrics as M
    from odyssey.finetune.train import load_inputs

    root, _, _ = evaluated
    min_tokens = 64
    report = evaluate(model=root / "ft", data=cohort.seq, labels=cohort.labels, out=tmp_path / "eval",
                      baselines=["logistic_regression"], progress_bar=False, resamples=20,
                      long_history_tokens=min_tokens)
    entry = report["outputs"]["mortality_30d"]["long_history"]
    held = load_inputs(cohort.seq, cohort.labels, ["mortality_30d"], ("held_out",)).examples["held_out"]
    long = pl.DataFrame({"subject_id": held.subject_id, "prediction_time": held.prediction_time,
                         "tokens": held.known_tokens}).filter(pl.col("tokens") > min_tokens)
    assert entry["min_tokens"] == min_tokens and entry["n"] == long.height
    assert 0 < long.height < report["outputs"]["mortality_30d"]["n"]
    assert set(entry["models"]) == {PRIMARY, "logistic_regression"}
    for model in entry["models"]:
        predictions = pl.read_parquet(tmp_path / "eval" / "predictions" / model / "mortality_30d.parquet")
        scored = predictions.join(long, on=["subject_id", "prediction_time"], how="inner")
        assert scored.height == entry["n"]
        expected = M.auroc(scored["boolean_value"].to_numpy().astype(float),
                           scored["predicted_boolean_probability"].to_numpy(), np.ones((1, scored.height)))[0]
        assert entry["models"][model]["value"] == pytest.approx(expected, abs=1e-9)
    assert "## Long histories (more than 64 tokens before the prediction time, AUROC)" in (
        tmp_path / "eval" / "report.md").read_text()
    bands = report["outputs"]["mortality_30d"]["subgroups"]["history_tokens"]
    assert sum(g["n"] for g in bands.values()) == report["outputs"]["mortality_30d"]["n"]


def test_the_in_context_table_keeps_histories_up_to_its_bound(evaluated, cohort, tmp_path):
    from odyssey.finetune.train import load_inputs

    root, _, _ = evaluated
    min_tokens, max_tokens = 32, 96
    report = evaluate(model=root / "ft", data=cohort.seq, labels=cohort.labels, out=tmp_path / "eval",
                      baselines=[], progress_bar=False, resamples=20, long_history_tokens=min_tokens,
                      long_history_max_tokens=max_tokens)
    entry = report["outputs"]["mortality_30d"]["long_history_in_context"]
    tokens = load_inputs(cohort.seq, cohort.labels, ["mortality_30d"], ("held_out",)).examples["held_out"].known_tokens
    assert (entry["min_tokens"], entry["max_tokens"]) == (min_tokens, max_tokens)
    assert entry["n"] == int(((tokens > min_tokens) & (tokens <= max_tokens)).sum())
    assert 0 < entry["n"] < report["outputs"]["mortality_30d"]["long_history"]["n"]
    assert "## Long histories (33 to 96 tokens, inside the model's context, before the prediction time, AUROC)" in (
        tmp_path / "eval" / "report.md").read_text()
