"""Forecast quality on a synthetic cohort: synth -> ingest -> tokenize (death kept) -> labels -> pretrain ->
`odyssey forecast`, then the zero-shot AUROCs next to the oracle AUROC of `truth.parquet` on the same
prediction times.

    python benchmarks/forecast_quality.py --out /tmp/fq --patients 1000 --pretrain-steps 400 --samples 16

CPU by default with one torch thread (the 2-core dev box); `--device cuda` on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl
import torch

TASKS = Path(__file__).resolve().parents[1] / "configs" / "tasks.yaml"


def oracle_auroc(fhir: Path, meds: Path, risks: pl.DataFrame, task: str) -> float | None:
    """AUROC of the truth file's Bayes-optimal probability on the forecast's prediction times."""
    from sklearn.metrics import roc_auc_score

    truth = pl.read_parquet(fhir / "truth.parquet")
    subject_map = pl.read_parquet(meds / "metadata" / "subject_map.parquet")
    fhir_column = next(c for c in subject_map.columns if c != "subject_id")
    truth = truth.join(subject_map.rename({fhir_column: "patient_fhir_id"}), on="patient_fhir_id")
    truth = truth.select("subject_id", pl.col("discharge_time").cast(pl.Datetime("us")).alias("prediction_time"),
                         pl.col(f"{task}_probability").alias("oracle"))
    mine = risks.filter(pl.col("task") == task).join(truth, on=["subject_id", "prediction_time"], how="inner")
    if mine["boolean_value"].n_unique() < 2:
        return None
    return float(roc_auc_score(mine["boolean_value"].to_numpy(), mine["oracle"].to_numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-visits", type=int, default=2)
    parser.add_argument("--max-subjects", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="processes for synth and ingest")
    parser.add_argument("--batch-size", type=int, default=8, help="pretraining sequences per step")
    parser.add_argument("--histories-per-batch", type=int, default=8, help="prediction times sampled together")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)

    import odyssey
    from odyssey.tokenizer import TokenizeConfig

    root, timings = args.out, {}
    started = time.perf_counter()
    if not (root / "labels").is_dir():
        odyssey.synthesize(args.patients, root / "fhir", seed=0, workers=args.workers)
        odyssey.ingest_fhir([root / "fhir"], root / "meds", workers=args.workers)
        odyssey.tokenize(root / "meds", root / "seq", TokenizeConfig(exclude_codes=["MEDS_BIRTH"]), progress=False)
        odyssey.make_labels(root / "meds", TASKS, root / "labels", progress=False)
    timings["data"] = time.perf_counter() - started
    if not (root / "pretrain" / "model").is_dir():
        odyssey.pretrain(odyssey.PretrainConfig(
            data=root / "seq", out=root / "pretrain", max_steps=args.pretrain_steps, model_size=args.model_size,
            eval_steps=args.pretrain_steps, save_steps=args.pretrain_steps, context_length=args.context_length,
            batch_size=args.batch_size, progress_bar=False, precision="auto" if args.device == "cuda" else "fp32"))
    timings["pretrain"] = time.perf_counter() - started - timings["data"]
    report = odyssey.forecast(model=root / "pretrain", data=root / "seq", labels=root / "labels",
                              out=root / "forecast", samples=args.samples, max_visits=args.max_visits,
                              max_subjects=args.max_subjects, device=args.device, progress_bar=False,
                              context_length=args.context_length, histories_per_batch=args.histories_per_batch)
    risks = pl.read_parquet(root / "forecast" / "risks.parquet")
    summary = {
        "settings": vars(args) | {"out": str(args.out)},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (1 thread)",
        "timings_seconds": timings | {"forecast": report["seconds"]["total"]},
        "prediction_times": report["prediction_times_forecast"],
        "tokens_per_second": report["tokens_per_second"],
        "next_visit": report["next_visit"],
        "zero_shot": {task: {"auroc": r.get("value"), "low": r.get("low"), "high": r.get("high"),
                             "n": r.get("n"), "oracle_auroc": oracle_auroc(root / "fhir", root / "meds", risks, task)}
                      for task, r in report["zero_shot"].items() if "unavailable" not in r},
    }
    print(json.dumps(summary, indent=2))
    (root / "forecast_quality.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
