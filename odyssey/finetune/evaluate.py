"""`odyssey.finetune.evaluate(config)`: held-out metrics of a finetuned model next to baselines.

For every task output, on the held_out split: AUROC, AUPRC, F1 at the threshold that maximises F1 on
the tuning split, Brier score and expected calibration error, each with a 95% bootstrap interval
(resampling subjects), a breakdown by sex and age band, a reliability plot, and the oracle AUROC when
the cohort's `truth.parquet` (from `odyssey synth`) is given. Every model is scored on the same
examples with the same resamples.

Output folder (`out`):
- `predictions/<model>/<output>.parquet`: MEDS prediction schema (`subject_id`, `prediction_time`,
  `boolean_value`, `predicted_boolean_probability`) for meds-evaluation;
- `plots/<output>_reliability.png`; `report.json`; `report.md`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator
from tqdm import tqdm

from odyssey.config import StageConfig
from odyssey.io import atomic_output_dir, read_json

from . import baselines as B
from . import metrics as M
from .data import PREDICTION_TIME, SUBJECT_ID, TaskDataset, TaskExamples, TaskSpec, check_both_classes
from .report import write_report
from .train import (
    MODEL,
    REPORT,
    check_tokenizer_match,
    load_finetuned,
    load_inputs,
    predict,
)

PRIMARY = "ehrmamba_mtf"
AGE_BANDS = ((0, 40, "<40"), (40, 65, "40-64"), (65, 80, "65-79"), (80, 200, "80+"))
HISTORY_BANDS = ((1, 513, "<=512"), (513, 2049, "513-2048"), (2049, 16385, "2049-16384"), (16385, np.inf, ">16384"))
GENDER_PREFIX = "GENDER//"
SUBJECT_MAP_FILE = "metadata/subject_map.parquet"
DEFAULT_CONTEXT_LENGTH = 2048
PREDICTION_SCHEMA = pa.schema([
    pa.field("subject_id", pa.int64(), nullable=False),
    pa.field("prediction_time", pa.timestamp("us"), nullable=False),
    pa.field("boolean_value", pa.bool_()),
    pa.field("predicted_boolean_value", pa.bool_()),
    pa.field("predicted_boolean_probability", pa.float64()),
])


class EvaluateConfig(StageConfig):
    """Settings of `odyssey evaluate`; CLI flags override fields."""

    model: Path | None = Field(None, description="finetuning output folder (FT_DIR)")
    data: Path | None = Field(None, description="sequences folder from `odyssey tokenize`")
    labels: Path | None = Field(None, description="labels folder from `odyssey labels`")
    out: Path | None = Field(None, description="evaluation output folder")
    truth: Path | None = Field(None, description="truth.parquet of `odyssey synth` (oracle AUROC)")
    meds: Path | None = Field(None, description="MEDS folder (its subject_map links truth to subjects)")
    compare: dict[str, Path] = Field(default_factory=dict, description="more finetuned models: name -> FT_DIR")
    baselines: list[str] = Field(default_factory=lambda: list(B.BASELINES))
    context_length: int | None = Field(None, ge=8, description="default: the finetuning run's")
    batch_size: int = Field(32, ge=1)
    device: str = Field("auto", description="where models predict: auto (cuda when available), cpu, cuda, cuda:1")
    resamples: int = Field(1000, ge=10)
    long_history_tokens: int = Field(
        2048, ge=1, description="every model is also scored on examples with more tokens than this before the "
        "prediction time (issue 6: signal beyond a 2,048-token window)")
    long_history_max_tokens: int | None = Field(
        None, ge=1, description="a second long-history table keeps the examples with at most this many tokens "
        "(default: the model's context length), where the model sees the whole history")
    seed: int = 0
    progress_bar: bool = True

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(B.BASELINES))
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {sorted(B.BASELINES)}")
        return value


@dataclass
class OutputSet:
    """One task output's held-out examples: labels, subjects, times and per-model probabilities."""

    name: str
    labels: np.ndarray
    subject_id: np.ndarray
    prediction_time: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    history_tokens: np.ndarray  # tokens known at the prediction time, before any truncation
    tuning_labels: np.ndarray
    probabilities: dict[str, np.ndarray]
    tuning_probabilities: dict[str, np.ndarray]


def metric_table(y: np.ndarray, p: np.ndarray, weights: np.ndarray, threshold: float) -> dict[str, Any]:
    """AUROC, AUPRC, F1 at `threshold`, Brier and ECE, each with its bootstrap interval."""
    return {
        "auroc": M.with_interval(M.auroc, y, p, weights),
        "auprc": M.with_interval(M.auprc, y, p, weights),
        "f1": M.with_interval(M.f1_at(threshold), y, p, weights),
        "brier": M.with_interval(M.brier, y, p, weights),
        "ece": M.with_interval(M.ece, y, p, weights),
        "threshold": threshold,
    }


def subject_sex(store, tokenizer) -> dict[int, str]:
    """Sex per subject from its static `GENDER//...` token (\"unknown\" without one)."""
    gender_ids = {i: tokenizer.id_to_token(i)[len(GENDER_PREFIX):] for i in range(len(tokenizer))
                  if tokenizer.id_to_token(i).startswith(GENDER_PREFIX)}
    result = {}
    for subject, row in zip(store.subject_ids, store.rows, strict=True):
        found = [gender_ids[int(t)] for t in row["input_ids"][:8] if int(t) in gender_ids]
        result[int(subject)] = found[0] if found else "unknown"
    return result


def ages_at_prediction(store, examples: TaskExamples) -> np.ndarray:
    ages = np.zeros(len(examples))
    for i in range(len(examples)):
        row = store.rows[int(examples.row[i])]
        known = np.flatnonzero(row["event_times"] <= examples.prediction_time[i])
        ages[i] = float(row["ages"][known[-1]]) if known.size else np.nan
    return ages


def band(values: np.ndarray, bands) -> np.ndarray:
    """Each value's band name from (low, high, name) rows, low <= value < high; "unknown" outside all."""
    names = np.full(len(values), "unknown", dtype=object)
    for low, high, name in bands:
        names[(values >= low) & (values < high)] = name
    return names


def subgroup_metrics(output: OutputSet, model: str, threshold: float, resamples: int, seed: int) -> dict[str, Any]:
    """Per sex, age band and history length: counts and the metrics (with intervals) of `model`."""
    groups: dict[str, Any] = {}
    for kind, values in (("sex", output.sex), ("age_band", band(output.age, AGE_BANDS)),
                         ("history_tokens", band(output.history_tokens, HISTORY_BANDS))):
        groups[kind] = {}
        for value in sorted(set(values.tolist())):
            keep = values == value
            y, p = output.labels[keep], output.probabilities[model][keep]
            entry: dict[str, Any] = {"n": int(keep.sum()), "positives": int(y.sum())}
            if 0 < y.sum() < len(y):
                weights = M.bootstrap_weights(output.subject_id[keep], resamples, seed)
                entry.update(metric_table(y, p, weights, threshold))
            groups[kind][value] = entry
    return groups


def long_history_metrics(output: OutputSet, min_tokens: int, resamples: int, seed: int,
                         oracle: np.ndarray | None, max_tokens: int | None = None) -> dict[str, Any]:
    """AUROC of every model (and the oracle) on the examples with more than `min_tokens` (and at most
    `max_tokens`) tokens of history."""
    keep = output.history_tokens > min_tokens
    if max_tokens is not None:
        keep &= output.history_tokens <= max_tokens
    y = output.labels[keep]
    entry: dict[str, Any] = {"min_tokens": int(min_tokens), "max_tokens": max_tokens, "n": int(keep.sum()),
                             "positives": int(y.sum()), "models": {}}
    if not 0 < y.sum() < len(y):
        return entry
    weights = M.bootstrap_weights(output.subject_id[keep], resamples, seed)
    for model, p in output.probabilities.items():
        entry["models"][model] = M.with_interval(M.auroc, y, p[keep], weights)
    if oracle is not None and np.isfinite(oracle[keep]).all():
        entry["oracle"] = M.with_interval(M.auroc, y, oracle[keep], weights)
    return entry


def oracle_probabilities(truth: Path, meds: Path | None, spec: TaskSpec, examples: TaskExamples,
                         output_column: int) -> np.ndarray | None:
    """Truth probability of each example's outcome (NaN where no truth row matches); None if not in truth."""
    if meds is None:
        raise ValueError("--truth needs --meds (the MEDS folder whose subject_map links truth rows to subjects)")
    subject_map = Path(meds) / SUBJECT_MAP_FILE
    if not subject_map.is_file():
        raise FileNotFoundError(f"{subject_map}: missing; needed to join {truth} to subjects")
    column = (f"{spec.name}_probability" if spec.kind == "binary"
              else f"condition_{spec.outputs[output_column]}_probability")
    frame = pl.read_parquet(truth)
    if column not in frame.columns or spec.prediction_time is None:
        return None
    anchor = {"admission": "admit_time", "discharge": "discharge_time"}[spec.prediction_time["anchor"]]
    offset = pl.duration(microseconds=round(float(spec.prediction_time.get("offset_hours", 0.0)) * 3_600_000_000))
    mapping = pl.read_parquet(subject_map).rename({"fhir_id": "patient_fhir_id"})
    truth_rows = (frame.join(mapping, on="patient_fhir_id", how="inner")
                  .select(pl.col(SUBJECT_ID), (pl.col(anchor).cast(pl.Datetime("us")) + offset).alias(PREDICTION_TIME),
                          pl.col(column).alias("oracle"))
                  .unique([SUBJECT_ID, PREDICTION_TIME], keep="first"))
    keys = pl.DataFrame({SUBJECT_ID: examples.subject_id,
                         PREDICTION_TIME: examples.prediction_time.astype("datetime64[us]")})
    joined = keys.join(truth_rows, on=[SUBJECT_ID, PREDICTION_TIME], how="left", maintain_order="left")
    return joined["oracle"].fill_null(np.nan).to_numpy().astype(np.float64)


def reliability_plot(output: OutputSet, path: Path) -> None:
    """Observed frequency against mean predicted probability per bin, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for model, probabilities in output.probabilities.items():
        curve = M.reliability_curve(output.labels, probabilities)
        axis.plot(curve["predicted"], curve["observed"], marker="o", markersize=3, label=model)
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed frequency",
             title=f"{output.name} (held_out)")
    axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_predictions(path: Path, output: OutputSet, model: str, threshold: float) -> None:
    probabilities = output.probabilities[model]
    table = pa.table({
        "subject_id": pa.array(output.subject_id, pa.int64()),
        "prediction_time": pa.array(output.prediction_time.astype("datetime64[us]"), pa.timestamp("us")),
        "boolean_value": pa.array(output.labels.astype(bool)),
        "predicted_boolean_value": pa.array(probabilities >= threshold),
        "predicted_boolean_probability": pa.array(probabilities, pa.float64()),
    }, schema=PREDICTION_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _context_length(config: EvaluateConfig, model_path: Path) -> int:
    if config.context_length is not None:
        return config.context_length
    report = Path(model_path) / REPORT
    if report.is_file():
        return int(read_json(report).get("config", {}).get("context_length", DEFAULT_CONTEXT_LENGTH))
    return DEFAULT_CONTEXT_LENGTH


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def _model_probabilities(path: Path, config: EvaluateConfig, inputs, specs: Sequence[TaskSpec],
                         pad_id: int) -> dict[str, np.ndarray]:
    """Probabilities of a finetuned model for tuning and held_out, in the layout of `specs`."""
    model, own_specs = load_finetuned(path)
    model.to(_device(config.device))
    check_tokenizer_match(Path(path) / MODEL if (Path(path) / MODEL).is_dir() else Path(path), config.data)
    own = {s.name: i for i, s in enumerate(own_specs)}
    width = max(len(s.outputs) for s in specs)
    out = {}
    for split in ("tuning", "held_out"):
        examples = inputs.examples[split]
        probabilities = np.full((len(examples), width), np.nan)
        for task_index, spec in enumerate(specs):
            if spec.name not in own:
                continue  # a single-task model: only its own task
            members = np.flatnonzero(examples.task_index == task_index)
            subset = examples.subset(members)
            subset.task_index = np.full(len(members), own[spec.name], dtype=np.int64)
            dataset = TaskDataset(inputs.store, subset, own_specs, _context_length(config, path))
            predicted = predict(model, dataset, pad_id, config.batch_size)[:, : len(spec.outputs)]
            if not np.isfinite(predicted).all():
                raise ValueError(f"{path}: {int((~np.isfinite(predicted)).any(axis=1).sum())} of {len(members)} "
                                 f"{split} examples of {spec.name} get a non-finite probability; the model's "
                                 "weights are not finite (a diverged training run?)")
            probabilities[members, : len(spec.outputs)] = predicted
        out[split] = probabilities
    return out


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate `config.model` (and `compare` models and baselines) on held_out; write `config.out`."""
    for name in ("model", "data", "labels", "out"):
        if getattr(config, name) is None:
            raise ValueError(f"evaluate needs `{name}`")
    started = time.perf_counter()
    _, specs = load_finetuned(config.model)
    inputs = load_inputs(config.data, config.labels, None, ("train", "tuning", "held_out"), specs=specs)
    for split in ("tuning", "held_out"):
        check_both_classes(inputs.examples[split], specs, split)
    pad_id = inputs.tokenizer.pad_token_id

    models = {PRIMARY: Path(config.model), **config.compare}
    in_context_tokens = config.long_history_max_tokens or _context_length(config, config.model)
    probabilities: dict[str, dict[str, np.ndarray]] = {}
    steps = list(models) + list(config.baselines)
    feature_cache: dict = {}
    progress = tqdm(steps, desc="evaluate", unit="model", disable=not config.progress_bar)
    for name in progress:
        progress.set_postfix_str(name)
        if name in models:
            probabilities[name] = _model_probabilities(models[name], config, inputs, specs, pad_id)
        else:
            probabilities[name] = B.fit_predict(
                B.BASELINES[name], inputs.store, specs, len(inputs.tokenizer), inputs.examples["train"],
                {"tuning": inputs.examples["tuning"], "held_out": inputs.examples["held_out"]}, config.seed,
                cache=feature_cache,
            )

    held, tuning = inputs.examples["held_out"], inputs.examples["tuning"]
    sex_of = subject_sex(inputs.store, inputs.tokenizer)
    ages = ages_at_prediction(inputs.store, held)
    results: dict[str, Any] = {}
    with atomic_output_dir(config.out) as staging:
        (staging / "plots").mkdir()
        for task_index, spec in enumerate(specs):
            for j, output_name in enumerate(spec.output_names()):
                keep = (held.task_index == task_index) & held.label_mask[:, j]
                tune = (tuning.task_index == task_index) & tuning.label_mask[:, j]
                output = OutputSet(
                    name=output_name, labels=held.labels[keep, j].astype(np.float64),
                    subject_id=held.subject_id[keep], prediction_time=held.prediction_time[keep], age=ages[keep],
                    sex=np.array([sex_of[int(s)] for s in held.subject_id[keep]], dtype=object),
                    history_tokens=held.known_tokens[keep],
                    tuning_labels=tuning.labels[tune, j].astype(np.float64),
                    probabilities={m: p["held_out"][keep, j] for m, p in probabilities.items()
                                   if np.isfinite(p["held_out"][keep, j]).all()},
                    tuning_probabilities={m: p["tuning"][tune, j] for m, p in probabilities.items()
                                          if np.isfinite(p["tuning"][tune, j]).all()},
                )
                weights = M.bootstrap_weights(output.subject_id, config.resamples, config.seed)
                entry: dict[str, Any] = {"task": spec.name, "n": int(keep.sum()),
                                         "positives": int(output.labels.sum()),
                                         "subjects": int(len(np.unique(output.subject_id))), "models": {}}
                for model_name, p in output.probabilities.items():
                    threshold = M.best_f1_threshold(output.tuning_labels, output.tuning_probabilities[model_name])
                    entry["models"][model_name] = metric_table(output.labels, p, weights, threshold)
                    write_predictions(staging / "predictions" / model_name / f"{output_name}.parquet", output,
                                      model_name, threshold)
                primary_threshold = entry["models"][PRIMARY]["threshold"]
                entry["subgroups"] = subgroup_metrics(output, PRIMARY, primary_threshold, config.resamples,
                                                      config.seed)
                oracle = None
                if config.truth is not None:
                    oracle = oracle_probabilities(config.truth, config.meds,
                                                  spec, held.subset(np.flatnonzero(keep)), j)
                    if oracle is not None:
                        matched = np.isfinite(oracle)
                        entry["oracle"] = {
                            "matched": int(matched.sum()),
                            "auroc": M.with_interval(M.auroc, output.labels[matched], oracle[matched],
                                                     weights[:, matched]),
                        }
                entry["long_history"] = long_history_metrics(output, config.long_history_tokens, config.resamples,
                                                             config.seed, oracle)
                if in_context_tokens > config.long_history_tokens:
                    entry["long_history_in_context"] = long_history_metrics(
                        output, config.long_history_tokens, config.resamples, config.seed, oracle,
                        max_tokens=in_context_tokens)
                reliability_plot(output, staging / "plots" / f"{output_name}_reliability.png")
                entry["plot"] = f"plots/{output_name}_reliability.png"
                results[output_name] = entry
        report = {
            "model": str(config.model), "data": str(config.data), "labels": str(config.labels),
            "split": "held_out", "threshold_split": "tuning", "resamples": config.resamples,
            "confidence": M.CONFIDENCE, "models": list(probabilities), "primary": PRIMARY,
            "outputs": results, "seconds": round(time.perf_counter() - started, 3),
            "config": config.model_dump(mode="json"),
        }
        write_report(staging, report)
    return report


def load_report(eval_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(eval_dir) / "report.json")
