"""`odyssey forecast`: sampled futures at each labelled prediction time, next-visit metrics, zero-shot risks.

Output folder (written atomically):
- `futures.parquet`: one row per generated token: `subject_id`, `prediction_time`, `sample`, `position`
  (0-based within the future), `token`, `time` (UTC, tz-naive), `token_type` (a `TokenType` name),
  `visit` (1 = the first generated visit).
- `risks.parquet`: per prediction time and task, the share of futures with the task's outcome
  (`predicted_boolean_probability`) next to the label (`boolean_value`), in the MEDS prediction schema.
- `report.json`: settings, counts, next-visit recall@k / precision@k, zero-shot AUROC per task.
- `plots/forecast_<i>.png|svg` (with `meds`): timelines of the first prediction times with their futures,
  named by position, never by subject id.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from odyssey.config import StageConfig
from odyssey.io import atomic_output_dir, write_json
from odyssey.pipelines import schema as S
from odyssey.tokenizer import EHRTokenizer, SpecialTokens, TokenType, as_row, cut_at, load_sequences, truncate

from .generate import Futures, History, generate, load_generator
from .metrics import ranked_codes, recall_precision_at, risk_auroc, share_with_outcome
from .rules import SequenceRules, outcome_token_ids

REPORT = "report.json"
FUTURES = "futures.parquet"
RISKS = "risks.parquet"
PLOTS = "plots"
HISTORIES_PER_BATCH = {"cpu": 8, "cuda": 128}
FUTURES_SCHEMA = pa.schema([
    pa.field(S.SUBJECT_ID, pa.int64()), pa.field("prediction_time", pa.timestamp("us")),
    pa.field("sample", pa.int32()), pa.field("position", pa.int32()), pa.field("token", pa.large_string()),
    pa.field("time", pa.timestamp("us")), pa.field("token_type", pa.large_string()), pa.field("visit", pa.int32()),
])  # a GPU step costs about the same for 128 rows as for 8
TOKENIZER_SUBDIR = "tokenizer"
LABELS_FILE = "labels.parquet"
PREDICTION_TIME = "prediction_time"
BOOLEAN_VALUE = "boolean_value"
PROBABILITY = "predicted_boolean_probability"
OUTCOMES = ("death", "admission")
_MICROSECONDS_PER_DAY = 86_400 * 1_000_000


class ForecastConfig(StageConfig):
    """Settings of `odyssey forecast` (configs/forecast.yaml); CLI flags override fields."""

    model: Path | None = Field(None, description="pretraining run folder (or its model/ folder)")
    data: Path | None = Field(None, description="sequences folder from `odyssey tokenize`")
    labels: Path | None = Field(None, description="labels folder from `odyssey labels`")
    out: Path | None = Field(None, description="output folder: futures.parquet, risks.parquet, report.json")
    split: str = Field(S.HELD_OUT_SPLIT, description="subjects whose prediction times are forecast")
    samples: int = Field(16, ge=1, description="futures sampled per prediction time (K)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus: sample among the most likely tokens of this mass")
    temperature: float = Field(1.0, ge=0, description="softmax temperature; 0 takes the most likely token")
    max_visits: int = Field(2, ge=1, description="generated visits per future (V)")
    max_tokens: int = Field(256, ge=1, description="generated tokens per future at most")
    max_subjects: int | None = Field(None, ge=1, description="forecast this many subjects of the split (seeded draw)")
    context_length: int = Field(2048, ge=8, description="history tokens read before generating (most recent)")
    histories_per_batch: int | None = Field(
        None, ge=1, description="prediction times sampled together (default: 8 on CPU, 128 on CUDA)")
    risks: dict[str, Literal["death", "admission"]] = Field(
        default_factory=lambda: {"mortality_30d": "death", "readmission_30d": "admission"},
        description="task -> outcome token its zero-shot risk looks for",
    )
    horizon_days: float = Field(30.0, gt=0, description="an outcome counts when this close after the prediction time")
    inpatient_class: str = Field("IMP", description="encounter class of an admission (ENCOUNTER_START//IMP)")
    top_k: list[int] = Field(default_factory=lambda: [5, 10, 20], description="k of next-visit recall@k / precision@k")
    allow_unknown: bool = Field(False, description="let futures hold [UNK] (a rare code of unknown kind)")
    resamples: int = Field(1000, ge=1, description="bootstrap resamples (subjects) of the AUROC intervals")
    device: Literal["cpu", "cuda"] = "cpu"
    meds: Path | None = Field(None, description="MEDS folder: draws `plots` timelines with their futures")
    plots: int = Field(3, ge=0, description="timelines drawn when `meds` is given (first prediction times)")
    seed: int = 0
    progress_bar: bool = True

    @field_validator("top_k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError("top_k needs at least one k >= 1")
        return sorted(set(value))


@dataclass
class IndexPoint:
    """One prediction time of one subject, with its history and the real next visit's codes."""

    subject_id: int
    prediction_time: np.datetime64
    history: History
    next_codes: set[str] | None  # None: no visit followed

    @property
    def anchor(self) -> np.datetime64:
        """When the history's last token happened: generated times count from here."""
        return np.datetime64(self.history.row["event_times"][-1], "us")


def read_labels(labels_dir: Path, tasks: Sequence[str]) -> dict[str, pl.DataFrame]:
    """`LABEL_DIR/<task>/labels.parquet` of each task that has one; an error when none has."""
    found = {}
    for task in tasks:
        path = labels_dir / task / LABELS_FILE
        if path.is_file():
            frame = pl.read_parquet(path, columns=[S.SUBJECT_ID, PREDICTION_TIME, BOOLEAN_VALUE])
            found[task] = frame.with_columns(pl.col(PREDICTION_TIME).cast(pl.Datetime("us")))
    if not found:
        raise FileNotFoundError(
            f"{labels_dir}: no labels for the tasks {list(tasks)} (expected {labels_dir}/<task>/{LABELS_FILE}; "
            "run `odyssey labels`)"
        )
    return found


def _next_visit_codes(row: dict[str, Any], cut: dict[str, Any], codes: list[str | None]) -> set[str] | None:
    following = int(cut["visit_orders"].max()) + 1
    in_visit = row["visit_orders"] == following
    if not in_visit.any():
        return None
    return {c for c in (codes[i] for i in row["input_ids"][in_visit]) if c is not None}


def index_points(config: ForecastConfig, tokenizer_codes: list[str | None], labels: dict[str, pl.DataFrame]
                 ) -> tuple[list[IndexPoint], dict[str, int]]:
    """The split's prediction times (from every task's labels) with their cut, truncated histories."""
    sequences = load_sequences(config.data, config.split)
    times = pl.concat([f.select(S.SUBJECT_ID, PREDICTION_TIME) for f in labels.values()]).unique()
    subjects = np.sort(np.intersect1d(sequences[S.SUBJECT_ID].to_numpy(), times[S.SUBJECT_ID].to_numpy()))
    if config.max_subjects is not None and subjects.size > config.max_subjects:
        chosen = np.random.default_rng(config.seed).choice(subjects, config.max_subjects, replace=False)
        subjects = np.sort(chosen)
    if not subjects.size:
        raise ValueError(f"{config.labels}: no labelled prediction time of a {config.split!r} subject in {config.data}")
    wanted = times.filter(pl.col(S.SUBJECT_ID).is_in(subjects.tolist())).sort(S.SUBJECT_ID, PREDICTION_TIME)
    by_subject = {r[S.SUBJECT_ID]: r for r in sequences.filter(pl.col(S.SUBJECT_ID).is_in(subjects.tolist()))
                  .iter_rows(named=True)}
    points, counts = [], {"prediction_times": wanted.height, "no_history": 0}
    for subject_id, prediction_time in wanted.iter_rows():
        row = as_row(by_subject[subject_id])
        when = np.datetime64(prediction_time, "us")
        cut = cut_at(row, when)
        if cut is None:
            counts["no_history"] += 1
            continue
        points.append(IndexPoint(subject_id, when, History(truncate(cut, config.context_length)),
                                 _next_visit_codes(row, cut, tokenizer_codes)))
    return points, counts


def _futures_frame(points: Sequence[IndexPoint], futures: Futures, tokenizer: EHRTokenizer,
                   rules: SequenceRules) -> pl.DataFrame:
    """One row per generated token; times in float64 from the history's last token (exact gap days)."""
    gap_days = rules.gap_days.cpu().numpy().astype(np.float64)
    counts = np.array([len(t) for t in futures.tokens], dtype=np.int64)
    of_row = np.repeat(np.arange(len(counts)), counts)
    point_of_row = futures.history[of_row]
    tokens = np.concatenate(futures.tokens).astype(np.int64)
    row_starts = np.repeat(np.cumsum(counts) - counts, counts)
    gaps = np.cumsum(gap_days[tokens])
    elapsed_days = gaps - np.concatenate([[0.0], gaps])[row_starts]  # cumulative gap days within each future
    anchors = np.array([p.anchor for p in points], dtype="datetime64[us]")[point_of_row]
    last_orders = np.array([int(p.history.row["visit_orders"][-1]) for p in points])[point_of_row]
    words = pl.Series([tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)], dtype=pl.String)
    type_names = pl.Series([TokenType(t).name if t in TokenType._value2member_map_ else None
                            for t in range(max(TokenType) + 1)], dtype=pl.String)
    return pl.DataFrame({
        S.SUBJECT_ID: np.array([p.subject_id for p in points], dtype=np.int64)[point_of_row],
        PREDICTION_TIME: np.array([p.prediction_time for p in points], dtype="datetime64[us]")[point_of_row],
        "sample": futures.sample[of_row].astype(np.int32),
        "position": (np.arange(tokens.size) - row_starts).astype(np.int32),
        "token": words.gather(tokens),
        "time": anchors + np.round(elapsed_days * _MICROSECONDS_PER_DAY).astype("timedelta64[us]"),
        "token_type": type_names.gather(np.concatenate(futures.token_types).astype(np.int64)),
        "visit": (np.concatenate(futures.visit_orders) - last_orders).astype(np.int32),
    })


class _Scores:
    """Per prediction time, as batches of futures come: zero-shot risks and next-visit recall/precision."""

    def __init__(self, config: ForecastConfig, rules: SequenceRules, outcome_ids: dict[str, int | None]):
        self.config, self.rules, self.outcome_ids = config, rules, outcome_ids
        self.risks: dict[str, list[float]] = {outcome: [] for outcome in OUTCOMES}
        self.next_visit: dict[int, list[tuple[float, float]]] = {k: [] for k in config.top_k}
        self.generated = self.short_of_visits = 0

    def add(self, batch: Sequence[IndexPoint], futures: Futures) -> None:
        self.generated += sum(len(t) for t in futures.tokens)
        self.short_of_visits += sum(
            int((t == SpecialTokens.REG).sum() < self.config.max_visits) for t in futures.tokens)
        for index, point in enumerate(batch):
            rows = np.flatnonzero(futures.history == index)
            tokens = [futures.tokens[r] for r in rows]
            times = [futures.times[r] for r in rows]
            reference = float(futures.reference_times[rows[0]])
            for outcome, token_id in self.outcome_ids.items():
                self.risks[outcome].append(np.nan if token_id is None else share_with_outcome(
                    tokens, times, reference, token_id, self.config.horizon_days))
            if point.next_codes:
                first_visit = int(point.history.row["visit_orders"][-1]) + 1
                in_first = [futures.tokens[r][futures.visit_orders[r] == first_visit] for r in rows]
                codes = self.rules.codes
                ranked = ranked_codes([[codes[i] for i in ids if codes[i] is not None] for ids in in_first])
                for k in self.config.top_k:
                    self.next_visit[k].append(recall_precision_at(ranked, point.next_codes, k))

    def next_visit_means(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for position, name in enumerate(("recall", "precision")):
            for k, pairs in self.next_visit.items():
                out[f"{name}@{k}"] = float(np.mean([pair[position] for pair in pairs])) if pairs else None
        return out

    def zero_shot(self, points: Sequence[IndexPoint], labels: dict[str, pl.DataFrame]
                  ) -> tuple[dict[str, Any], pl.DataFrame]:
        """Per task: AUROC of the risks against its labels (or why not), and the risks next to the labels."""
        keys = pl.DataFrame({
            S.SUBJECT_ID: [p.subject_id for p in points],
            PREDICTION_TIME: np.array([p.prediction_time for p in points], dtype="datetime64[us]"),
            **self.risks,
        }, schema_overrides={outcome: pl.Float64 for outcome in OUTCOMES})
        results, frames = {}, []
        for task, outcome in self.config.risks.items():
            if task not in labels:
                results[task] = {"unavailable": f"no {task}/{LABELS_FILE} in {self.config.labels}"}
                continue
            if self.outcome_ids[outcome] is None:
                results[task] = {"unavailable": _missing_outcome_reason(outcome, self.config.inpatient_class)}
                continue
            scored = keys.join(labels[task], on=[S.SUBJECT_ID, PREDICTION_TIME], how="inner")
            frames.append(scored.select(S.SUBJECT_ID, PREDICTION_TIME, pl.lit(task).alias("task"),
                                        pl.col(outcome).alias(PROBABILITY), BOOLEAN_VALUE))
            results[task] = {"outcome": outcome, **risk_auroc(
                scored[S.SUBJECT_ID].to_numpy(), scored[BOOLEAN_VALUE].to_numpy(), scored[outcome].to_numpy(),
                self.config.resamples, self.config.seed)}
        empty = pl.DataFrame(schema={S.SUBJECT_ID: pl.Int64, PREDICTION_TIME: pl.Datetime("us"), "task": pl.String,
                                     PROBABILITY: pl.Float64, BOOLEAN_VALUE: pl.Boolean})
        return results, pl.concat(frames) if frames else empty


def _check_paths(config: ForecastConfig) -> None:
    for name in ("model", "data", "labels", "out"):
        if getattr(config, name) is None:
            raise ValueError(f"forecast needs --{name}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if config.meds is not None and not (Path(config.meds) / S.DATA_DIR).is_dir():
        raise FileNotFoundError(f"{config.meds}: no {S.DATA_DIR}/ folder (the MEDS dataset of `odyssey ingest`)")


def forecast(config: ForecastConfig) -> dict[str, Any]:
    """Run the stage (see the module docstring); returns the report."""
    started = time.perf_counter()
    _check_paths(config)
    tokenizer = EHRTokenizer.from_pretrained(Path(config.data) / TOKENIZER_SUBDIR)
    model = load_generator(config.model, tokenizer, config.device)
    rules = SequenceRules(tokenizer, allow_unknown=config.allow_unknown, device=config.device)
    labels = read_labels(Path(config.labels), list(config.risks))
    points, counts = index_points(config, rules.codes, labels)
    scores = _Scores(config, rules, outcome_token_ids(tokenizer, config.inpatient_class))
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    per_batch = config.histories_per_batch or HISTORIES_PER_BATCH[config.device]
    plotted: list[pl.DataFrame] = []  # futures of the first prediction times, for the timelines
    loaded = time.perf_counter()
    # Futures stream to one parquet file batch by batch: a large held-out set never sits in memory.
    with atomic_output_dir(config.out) as staging:
        with tqdm(total=len(points), desc="forecast", unit="time", disable=not config.progress_bar) as bar, \
                pq.ParquetWriter(staging / FUTURES, FUTURES_SCHEMA) as writer:
            for begin in range(0, len(points), per_batch):
                batch = points[begin: begin + per_batch]
                futures = generate(model, [p.history for p in batch], rules, config.samples, config.max_visits,
                                   config.max_tokens, config.top_p, config.temperature, generator)
                frame = _futures_frame(batch, futures, tokenizer, rules)
                writer.write_table(frame.to_arrow().cast(FUTURES_SCHEMA))
                if config.meds is not None and begin < config.plots:
                    plotted.append(frame)
                scores.add(batch, futures)
                bar.update(len(batch))
        sampled = time.perf_counter()
        zero_shot, risks = scores.zero_shot(points, labels)
        risks.write_parquet(staging / RISKS)
        report = {
            "settings": config.model_dump(mode="json"),
            "subjects": len({p.subject_id for p in points}),
            "prediction_times": counts["prediction_times"],
            "prediction_times_without_history": counts["no_history"],
            "prediction_times_forecast": len(points),
            "prediction_times_with_next_visit": len(scores.next_visit[config.top_k[0]]),
            "generated_tokens": scores.generated,
            "futures_short_of_max_visits": scores.short_of_visits,
            "next_visit": scores.next_visit_means(),
            "zero_shot": zero_shot,
            "seconds": {"load": loaded - started, "sample": sampled - loaded},
            "tokens_per_second": scores.generated / max(sampled - loaded, 1e-9),
        }
        if config.meds is not None and config.plots:
            report["plots"] = _plots(config, points, pl.concat(plotted), staging / PLOTS)
        report["seconds"]["total"] = time.perf_counter() - started
        write_json(staging / REPORT, report)
    return report


def _plots(config: ForecastConfig, points: Sequence[IndexPoint], futures: pl.DataFrame, folder: Path) -> list[str]:
    from .plots import plot_forecast

    folder.mkdir()
    written = []
    for index, point in enumerate(points[: config.plots]):
        when = point.prediction_time.astype("datetime64[us]").item()
        paths = plot_forecast(config.meds, futures, point.subject_id, when, folder / f"forecast_{index}")
        written += [str(Path(PLOTS) / p.name) for p in paths]
    return written


def _missing_outcome_reason(outcome: str, inpatient_class: str) -> str:
    if outcome == "death":
        return (f"{S.DEATH_CODE} is not a token of this tokenizer (configs/tokenize.yaml excludes it by default; "
                f"tokenize with exclude_codes: [{S.BIRTH_CODE}] to forecast death)")
    code = S.make_code(S.ENCOUNTER_START_PREFIX, inpatient_class)
    return f"{code} is not a token of this tokenizer (encounter_class_tokens: true keeps it)"
