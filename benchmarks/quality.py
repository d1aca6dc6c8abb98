"""Quality benchmark (issue 6): per-task held-out AUROC of MTF EHRMamba next to the oracle and the baselines.

Runs the whole pipeline on a synthetic cohort and writes EVAL_DIR/report.md and report.json:

    synth -> ingest -> tokenize -> labels -> pretrain -> finetune (MTF, all tasks; and from scratch)
          -> finetune (GPT-style transformer at 512 and 2,048 tokens, from scratch)
          -> finetune (single-task, one model per task, optional) -> evaluate (+ baselines, oracle from truth)

    python benchmarks/quality.py --patients 20000 --work /data/quality             # the issue's benchmark
    python benchmarks/quality.py --patients 600 --work /tmp/q --smoke               # minutes on a CPU
    python benchmarks/quality.py ... --few-shot 16,64,256                           # label-efficiency columns

Targets (issue 6): within 0.02 AUROC of the oracle on each task, above every baseline. Record the table
and the machine in benchmarks/RESULTS.md. Steps whose output exists are skipped (rerun with --fresh).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

TASKS = ["mortality_30d", "los_7d", "readmission_30d", "conditions"]
REPO = Path(__file__).resolve().parents[1]


def _step(name: str, done: Path, fresh: bool, run) -> float:
    if done.exists() and not fresh:
        print(f"[skip] {name}: {done} exists")
        return 0.0
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    print(f"[done] {name} in {seconds:.1f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--work", type=Path, required=True, help="folder for every stage's output")
    parser.add_argument("--model-size", default="small", help="EHRMamba size for pretraining (tiny, small, base)")
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--pretrain-steps", type=int, default=5000)
    parser.add_argument("--finetune-epochs", type=float, default=3.0)
    parser.add_argument("--single-task", action="store_true", help="also finetune one model per task")
    parser.add_argument("--few-shot", default="", help="label-efficiency: comma-separated k, e.g. 16,64,256 "
                        "(MTF on k examples per task, from pretrained and from scratch)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, short runs (checks the script)")
    parser.add_argument("--fresh", action="store_true", help="redo steps whose output exists")
    args = parser.parse_args()

    from odyssey.finetune import evaluate, finetune
    from odyssey.pipelines.ingest import ingest_fhir
    from odyssey.pipelines.labels import make_labels
    from odyssey.pipelines.synth import synthesize
    from odyssey.tokenizer import tokenize
    from odyssey.training.pretrain import PretrainConfig, pretrain

    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    fhir, meds, seq, labels = work / "fhir", work / "meds", work / "seq", work / "labels"
    size = "tiny" if args.smoke else args.model_size
    context = 256 if args.smoke else args.context_length
    pretrain_steps = 20 if args.smoke else args.pretrain_steps
    finetune_fields = dict(context_length=context, epochs=0.2 if args.smoke else args.finetune_epochs,
                           progress_bar=True)
    timings = {
        "synth": _step("synth", fhir / "truth.parquet", False, lambda: synthesize(args.patients, fhir, seed=0)),
        "ingest": _step("ingest", meds / "metadata", False, lambda: ingest_fhir(fhir, meds)),
        "tokenize": _step("tokenize", seq / "sequences", False, lambda: tokenize(meds, seq)),
        "labels": _step("labels", labels / "tasks.json", False,
                        lambda: make_labels(meds, REPO / "configs" / "tasks.yaml", labels)),
        "pretrain": _step("pretrain", work / "run" / "model", False, lambda: pretrain(PretrainConfig.load(
            REPO / "configs" / "pretrain.yaml", data=seq, out=work / "run", model_size=size,
            context_length=context, max_steps=pretrain_steps))),
        "finetune_mtf": _step("finetune (MTF)", work / "ft_mtf" / "model", False, lambda: finetune(
            pretrained=work / "run", data=seq, labels=labels, out=work / "ft_mtf", tasks=TASKS, **finetune_fields)),
        "finetune_scratch": _step("finetune (MTF, from scratch)", work / "ft_scratch" / "model", False,
                                  lambda: finetune(data=seq, labels=labels, out=work / "ft_scratch", tasks=TASKS,
                                                   model_size=size, **finetune_fields)),
    }
    compare = {"ehrmamba_mtf_scratch": work / "ft_scratch"}
    for gpt_context in (512, 2048):  # the transformer baseline at two context lengths (from scratch)
        gpt_context = min(gpt_context, context) if args.smoke else gpt_context
        out = work / f"ft_gpt_{gpt_context}"
        timings[f"finetune_gpt_{gpt_context}"] = _step(
            f"finetune (GPT, {gpt_context} tokens)", out / "model", False,
            lambda o=out, c=gpt_context: finetune(data=seq, labels=labels, out=o, tasks=TASKS, model_size=size,
                                                  architecture="gpt", **{**finetune_fields, "context_length": c}))
        compare[f"gpt_{gpt_context}"] = out
    for k in [int(v) for v in args.few_shot.split(",") if v.strip()]:
        for origin, pretrained in (("pretrained", work / "run"), ("scratch", None)):
            out = work / f"ft_k{k}_{origin}"
            timings[f"finetune_k{k}_{origin}"] = _step(
                f"finetune (k={k}, {origin})", out / "model", False,
                lambda o=out, p=pretrained, k=k: finetune(pretrained=p, data=seq, labels=labels, out=o, tasks=TASKS,
                                                           model_size=size, few_shot_k=k, **finetune_fields))
            compare[f"ehrmamba_k{k}_{origin}"] = out
    if args.single_task:
        for task in TASKS:
            out = work / f"ft_single_{task}"
            timings[f"finetune_{task}"] = _step(f"finetune ({task} only)", out / "model", False, lambda t=task, o=out:
                                                finetune(pretrained=work / "run", data=seq, labels=labels, out=o,
                                                         tasks=[t], **finetune_fields))
            compare[f"ehrmamba_single_{task}"] = out
    started = time.perf_counter()
    report = evaluate(model=work / "ft_mtf", data=seq, labels=labels, out=work / "eval", truth=fhir / "truth.parquet",
                      meds=meds, compare=compare)
    timings["evaluate"] = time.perf_counter() - started
    summary = {"patients": args.patients, "model_size": size, "context_length": context,
               "machine": platform.platform(), "processor": platform.processor(), "seconds": timings,
               "report": str(work / "eval" / "report.md")}
    (work / "quality_summary.json").write_text(json.dumps(summary, indent=2))
    print((work / "eval" / "report.md").read_text())
    print(json.dumps({name: entry["models"]["ehrmamba_mtf"]["auroc"]["value"]
                      for name, entry in report["outputs"].items()}, indent=2))


if __name__ == "__main__":
    main()
