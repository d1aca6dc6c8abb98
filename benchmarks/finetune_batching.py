"""Finetuning speed of the batching choices (issue 6): whole random batches, random batches split into
sub-batches of similar length (at several `split_overhead_tokens`), and batches grouped by length.

Same cohort, model size, batch and steps for every variant, in one run, from scratch (speed does not depend
on the starting weights); a short untimed warm-up per context compiles the kernels first. Reports steps/s
per (context, variant) and writes JSON to `--out`:

    python3 -P benchmarks/finetune_batching.py --out $OUT/batching.json      # GPU machine, ~3 minutes
    python3 -P benchmarks/finetune_batching.py --out /tmp/b.json --patients 300 --contexts 512 --steps 10 --model-size tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ["mortality_30d", "los_7d", "readmission_30d", "conditions"]
VARIANTS = {  # name -> finetune settings
    "whole": {"group_by_length": False, "split_batches_by_length": False},
    "split_2048": {"group_by_length": False, "split_batches_by_length": True, "split_overhead_tokens": 2048},
    "split_8192": {"group_by_length": False, "split_batches_by_length": True, "split_overhead_tokens": 8192},
    "split_32768": {"group_by_length": False, "split_batches_by_length": True, "split_overhead_tokens": 32768},
    "grouped": {"group_by_length": True, "split_batches_by_length": False},
}


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--work", type=Path, default=None, help="cohort and runs (default: a temporary folder)")
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--contexts", default="2048,16384", help="comma-separated context lengths")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model-size", default="small")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    import torch

    from odyssey.finetune import finetune
    from odyssey.pipelines.ingest import ingest_fhir
    from odyssey.pipelines.labels import make_labels
    from odyssey.pipelines.synth import synthesize
    from odyssey.tokenizer import tokenize

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="odyssey-batching-"))
    fhir, meds, seq, labels = work / "fhir", work / "meds", work / "seq", work / "labels"
    workers = os.cpu_count() or 1
    if not (labels / "tasks.json").exists():
        synthesize(args.patients, fhir, seed=0, workers=workers)
        ingest_fhir([fhir], meds, workers=workers)
        tokenize(meds, seq)
        make_labels(meds, REPO / "configs" / "tasks.yaml", labels)
    common = dict(data=seq, labels=labels, tasks=TASKS, model_size=args.model_size, batch_size=args.batch_size,
                  precision="auto" if on_gpu else "fp32", progress_bar=False, logging_steps=10_000,
                  eval_steps=None, warmup_steps=0.05)
    report = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "patients": args.patients,
              "steps": args.steps, "batch_size": args.batch_size, "model_size": args.model_size, "runs": {}}
    for context in (int(c) for c in args.contexts.split(",")):
        finetune(out=work / f"warmup_{context}", context_length=context, max_steps=max(5, args.steps // 10),
                 **common, **VARIANTS["whole"])
        for name in args.variants.split(","):
            result = finetune(out=work / f"{name}_{context}", context_length=context, max_steps=args.steps,
                              **common, **VARIANTS[name])
            row = {"steps": result.steps, "train_seconds": result.train_seconds,
                   "steps_per_second": round(result.steps / result.train_seconds, 3),
                   "train_loss": round(result.train_loss, 4)}
            report["runs"][f"{context}/{name}"] = row
            print(f"context {context:6d} {name:12s} {row['steps_per_second']:7.2f} steps/s "
                  f"({row['train_seconds']:.1f} s, loss {row['train_loss']:.3f})", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
