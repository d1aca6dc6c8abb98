"""`odyssey demo`: the whole pipeline on a synthetic cohort, from nothing to a trained model.

Stages: synth -> ingest -> tokenize -> labels -> pretrain -> finetune -> evaluate -> explain. Each stage
writes into its own folder under OUT and prints its summary (the evaluation's AUROC table, the top events
behind one held-out patient's mortality risk); the last lines say where everything is (demo_report.json).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from odyssey.cli._common import user_errors

DEFAULT_TASKS = Path(__file__).resolve().parents[2] / "configs" / "tasks.yaml"


def run_demo(out: Path, patients: int, seed: int, device: str, pretrain_steps: int, tasks: Path = DEFAULT_TASKS,
             finetune_steps: int = 800) -> dict:
    """Run every stage; returns {stage: {"dir": ..., "seconds": ...}} (also written as demo_report.json)."""
    from odyssey.finetune import evaluate, finetune
    from odyssey.interpretability.explain import explain
    from odyssey.io import write_json
    from odyssey.pipelines.ingest import ingest_fhir
    from odyssey.pipelines.labels import make_labels
    from odyssey.pipelines.synth import synthesize
    from odyssey.tokenizer.tokenize import tokenize
    from odyssey.training.pretrain import PretrainConfig, pretrain

    if not tasks.is_file():  # before anything is replaced or written
        raise FileNotFoundError(f"{tasks}: task definitions not found (pass --tasks configs/tasks.yaml)")
    if device == "cpu":
        import torch

        # a tiny model's ops are too small to share between threads: one thread is several times faster
        torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    dirs = {name: out / name for name in ("fhir", "meds", "sequences", "labels", "pretrain", "finetune", "evaluate", "explain")}
    previous = [path for path in dirs.values() if path.exists()]
    if previous:  # a rerun starts over: pretraining would otherwise refuse a folder with checkpoints
        typer.echo(f"replacing the previous demo's {', '.join(p.name for p in previous)} in {out}")
        for path in previous:
            shutil.rmtree(path)
    stages: dict[str, dict] = {}

    def stage(name: str, work) -> None:
        typer.secho(f"\n== {name} ==", bold=True)
        started = time.perf_counter()
        summary = work()
        stages[name] = {"dir": str(dirs[name]), "seconds": round(time.perf_counter() - started, 1)}
        typer.echo(summary)

    stage("fhir", lambda: _describe_synth(synthesize(patients, dirs["fhir"], seed=seed, progress=True)))
    stage("meds", lambda: ingest_fhir([dirs["fhir"]], dirs["meds"], show_progress=True).summary())
    stage("sequences", lambda: tokenize(dirs["meds"], dirs["sequences"]).summary())
    stage("labels", lambda: make_labels(dirs["meds"], tasks, dirs["labels"]).summary())
    config = PretrainConfig(data=dirs["sequences"], out=dirs["pretrain"], max_steps=pretrain_steps,
                            eval_steps=max(1, pretrain_steps // 2), save_steps=pretrain_steps,
                            context_length=512, batch_size=8, learning_rate=2e-3,
                            precision="auto" if device == "cuda" else "fp32")
    stage("pretrain", lambda: _describe_pretrain(pretrain(config)))
    stage("finetune", lambda: _describe_finetune(finetune(
        pretrained=dirs["pretrain"], data=dirs["sequences"], labels=dirs["labels"], out=dirs["finetune"],
        max_steps=finetune_steps, context_length=512, batch_size=16, learning_rate=2e-3,
        precision="auto" if device == "cuda" else "fp32")))
    stage("evaluate", lambda: _describe_evaluation(evaluate(
        model=dirs["finetune"], data=dirs["sequences"], labels=dirs["labels"], out=dirs["evaluate"],
        truth=dirs["fhir"] / "truth.parquet", meds=dirs["meds"], resamples=200), dirs["evaluate"]))
    subject, when = _patient_to_explain(dirs["meds"], dirs["labels"])
    stage("explain", lambda: explain(dirs["finetune"], dirs["sequences"], "mortality_30d", subject, dirs["explain"],
                                     meds_dir=dirs["meds"], prediction_time=when).summary())
    write_json(out / "demo_report.json", stages)
    return stages


def _patient_to_explain(meds_dir: Path, labels_dir: Path):
    """A held-out patient who died within 30 days of a discharge (else any held-out label), and that time."""
    import polars as pl

    from odyssey.pipelines import schema

    held_out = pl.read_parquet(meds_dir / schema.SPLITS_FILE).filter(pl.col("split") == schema.HELD_OUT_SPLIT)
    labels = pl.read_parquet(labels_dir / "mortality_30d" / "labels.parquet").join(held_out, on=schema.SUBJECT_ID)
    if labels.is_empty():
        raise ValueError(f"{labels_dir}: no held-out mortality_30d label to explain")
    row = labels.sort(["boolean_value", schema.SUBJECT_ID, "prediction_time"], descending=[True, False, False]).row(
        0, named=True)
    return row[schema.SUBJECT_ID], row["prediction_time"]


def _describe_finetune(result) -> str:
    aurocs = ", ".join(f"{name} {value:.3f}" for name, value in sorted(result.tuning_auroc.items()))
    return f"tuning AUROC: {aurocs}"


def _describe_evaluation(report: dict, folder: Path) -> str:
    """The report's first table (AUROC of every model next to the oracle); the rest stays in report.md."""
    text = (folder / "report.md").read_text()
    tables = [block for block in text.split("\n## ") if block.startswith("AUROC")]
    return ("## " + tables[0].strip() if tables else text[:3000]) + f"\n\nfull report: {folder / 'report.md'}"


def _describe_synth(report) -> str:
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report.__dict__)
    resources = data.get("resources_total") or sum(data.get("resources", {}).values())
    return f"{data.get('patients', '?')} synthetic patients, {resources:,} FHIR resources"


def _describe_pretrain(result) -> str:
    return (f"{result.parameters:,} parameters, {result.steps} steps: tuning loss {result.tuning_loss:.3f} "
            f"(perplexity {result.tuning_perplexity:.1f}), {result.tokens_per_second:,.0f} tokens/s")


def demo(
    patients: Annotated[int, typer.Option("--patients", help="synthetic patients")] = 1000,
    out: Annotated[Path, typer.Option("--out", help="folder for every stage's output")] = Path("demo_out"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    pretrain_steps: Annotated[int, typer.Option("--pretrain-steps", help="optimizer steps of the tiny model")] = 300,
    tasks: Annotated[Path, typer.Option("--tasks", help="task definitions")] = DEFAULT_TASKS,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", help="optimizer steps of finetuning")] = 800,
) -> None:
    """Run the whole pipeline (synth ... evaluate) on a synthetic cohort; print the metrics and where results are."""
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("--device must be cpu or cuda")
    with user_errors():
        stages = run_demo(out, patients, seed, device, pretrain_steps, tasks, finetune_steps)
    typer.secho("\n== done ==", bold=True)
    for name, info in stages.items():
        typer.echo(f"  {name:<10} {info['seconds']:>7.1f} s   {info['dir']}")
    typer.echo(f"  report: {out / 'demo_report.json'}")
    typer.echo(f"  metrics: {out / 'evaluate' / 'report.md'}; reliability plots: {out / 'evaluate' / 'plots'}/")
    typer.echo(f"  explained patient: {out / 'explain' / 'top_events.md'}, {out / 'explain' / 'timeline.png'} (.svg)")


def register(app: typer.Typer) -> None:
    app.command(name="demo")(demo)
