"""The GPT baseline on a GPU: which attention path, precision and learning rate train it, and how well.

    python3 -P benchmarks/gpt_baseline_check.py --out $OUT/gpt --patients 5000 --steps 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ["mortality_30d", "los_7d", "readmission_30d", "conditions"]  # as benchmarks/quality.py


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptwork"))
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default="sdpa:bf16:1e-3,eager:bf16:1e-3,sdpa:fp32:1e-3",
                        help="attention:precision:learning_rate, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-steps", type=int, default=None)
    parser.add_argument("--group-by-length", action="store_true")
    args = parser.parse_args()
    import numpy as np
    import torch
    import transformers

    import odyssey.finetune.transformer as gpt_module
    from odyssey.finetune import finetune
    from odyssey.pipelines.ingest import ingest_fhir
    from odyssey.pipelines.labels import make_labels
    from odyssey.pipelines.synth import synthesize
    from odyssey.tokenizer import tokenize
    from odyssey.training.pretrain import NonFiniteLossError

    w = args.work
    fhir, meds, seq, labels = w / "fhir", w / "meds", w / "seq", w / "labels"
    started = time.perf_counter()
    if not (labels / "tasks.json").exists():
        synthesize(args.patients, fhir, seed=0, workers=16)
        ingest_fhir([fhir], meds, workers=16)
        tokenize(meds, seq)
        make_labels(meds, REPO / "configs" / "tasks.yaml", labels)
    results = {"data_seconds": round(time.perf_counter() - started, 1), "variants": {}}
    original = transformers.GPT2Config
    for variant in args.variants.split(","):
        attention, precision, learning_rate = variant.split(":")
        gpt_module.GPT2Config = lambda **kw: original(**kw, attn_implementation=attention)  # noqa: B023
        started = time.perf_counter()
        run = w / f"ft_{attention}_{precision}_{learning_rate}"
        entry: dict = {}
        try:
            result = finetune(data=seq, labels=labels, out=run, architecture="gpt",
                              tasks=TASKS, model_size="small", context_length=2048, max_steps=args.steps,
                              batch_size=args.batch_size, precision=precision, logging_steps=50,
                              progress_bar=False, warmup_steps=0.05, learning_rate=float(learning_rate),
                              eval_steps=args.eval_steps, group_by_length=args.group_by_length)
            history = json.loads((run / "finetune_report.json").read_text())["model_selection"]
            entry = {"steps": result.steps, "train_loss": result.train_loss, "selection": history,
                     "tuning_auroc": result.tuning_auroc,
                     "tuning_auroc_mean": float(np.mean([v for v in result.tuning_auroc.values() if v is not None]))}
        except NonFiniteLossError as error:
            entry = {"error": str(error)}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        results["variants"][variant] = entry
        print(variant, entry, flush=True)
    results["torch"] = torch.__version__
    results["transformers"] = transformers.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpt_baseline_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
