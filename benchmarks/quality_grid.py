"""Several quality experiments at once on one machine, a GPU (or a few) each (issue 6).

A plan (YAML) names pretraining runs and finetuned models over one cohort. Each phase starts its
`benchmarks/quality.py` processes together, each with its own GPUs, its own `--out` folder and log and its
share of the CPU threads, waits for them and prints their summaries. A phase fits one device call; the
phases share `--work`, so they run on one warm machine in order:

    python3 -P benchmarks/quality_grid.py --plan benchmarks/plans/seeds.yaml --out $OUT --phase data
    python3 -P benchmarks/quality_grid.py --plan benchmarks/plans/seeds.yaml --out $OUT --phase pretrain
    ... --phase finetune, then --phase evaluate

A plan:

    common: [--work, /tmp/qwork, --device, cuda, --context-length, "16384"]  # every process's flags
    pretrain:
      pre_a: {gpus: [0], args: [--pretrain-steps, "6500"]}        # --pretrain-name pre_a
      pre_b: {gpus: [1, 2], args: [--pretrain-steps, "6500"]}     # two GPUs: --pretrain-gpus 2 (torchrun)
    finetune:
      ft_a: {gpu: 0, pretrain: pre_a, args: [--finetune-steps, "4000"]}  # --mtf-name ft_a
    evaluate: {gpu: 0, primary: ft_a, compare: {ehrmamba_mtf_b: ft_b}, args: [--gpt-contexts, "512"]}

An entry's `args` come after the phase's own flags, so they win (e.g. `--skip single evaluate` to also train
the GPT baselines in a finetune entry). Run I in benchmarks/RESULTS.md is this, typed by hand.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

QUALITY = Path(__file__).resolve().with_name("quality.py")
PHASES = ("data", "pretrain", "finetune", "evaluate")
STOP_GRACE_SECONDS = 15
SUMMARY_MARKERS = ("[done]", "steps in", "tuning loss", "pretrained ", "Error", "error:")


class PlanError(ValueError):
    """A plan that cannot run (the message names the entry and the problem)."""


@dataclass
class Job:
    name: str
    gpus: list[int]
    flags: list[str]


def _strings(values, where: str) -> list[str]:
    if not isinstance(values, list):
        raise PlanError(f"{where}: expected a list of flags, got {type(values).__name__}")
    return [str(v) for v in values]


def _gpus(entry: dict, where: str) -> list[int]:
    gpus = entry.get("gpus", [entry["gpu"]] if "gpu" in entry else None)
    if not isinstance(gpus, list) or not gpus or not all(isinstance(g, int) and g >= 0 for g in gpus):
        raise PlanError(f"{where}: give `gpu: N` or `gpus: [N, ...]` (device indices)")
    return gpus


def jobs(plan: dict, phase: str, out: Path) -> list[Job]:
    """The processes of one phase of `plan`, with their flags for benchmarks/quality.py."""
    common = _strings(plan.get("common", []), "common")
    if phase == "data":
        return [Job("data", [], [*common, "--out", str(out / "data"), "--stop-after", "data"])]
    if phase == "pretrain":
        result = []
        for name, entry in (plan.get("pretrain") or {}).items():
            gpus = _gpus(entry, f"pretrain.{name}")
            distributed = ["--pretrain-gpus", str(len(gpus))] if len(gpus) > 1 else []
            result.append(Job(name, gpus, [*common, "--out", str(out / name), "--pretrain-name", name,
                                           "--stop-after", "pretrain", *distributed,
                                           *_strings(entry.get("args", []), f"pretrain.{name}.args")]))
        return result
    pretraining = set(plan.get("pretrain") or {})
    finetuning = set(plan.get("finetune") or {})
    shared = sorted(pretraining & finetuning | (pretraining | finetuning) & {"data", "evaluate"})
    if shared:
        raise PlanError(f"names {shared} are used twice (each names a folder and a log under --out)")
    if phase == "finetune":
        result = []
        for name, entry in (plan.get("finetune") or {}).items():
            if entry.get("pretrain") not in pretraining:
                raise PlanError(f"finetune.{name}: `pretrain` must name one of the plan's pretraining runs "
                                f"{sorted(pretraining)}, got {entry.get('pretrain')!r}")
            result.append(Job(name, _gpus(entry, f"finetune.{name}"),
                              [*common, "--out", str(out / name), "--pretrain-name", entry["pretrain"],
                               "--mtf-name", name, "--skip", "single", "gpt", "evaluate",
                               *_strings(entry.get("args", []), f"finetune.{name}.args")]))
        return result
    if phase == "evaluate":
        entry = plan.get("evaluate") or {}
        finetuned = plan.get("finetune") or {}
        named = [entry.get("primary"), *(entry.get("compare") or {}).values()]
        unknown = [n for n in named if n not in finetuned]
        if unknown:
            raise PlanError(f"evaluate: {unknown} are not finetune entries of the plan ({sorted(finetuned)})")
        primary = entry["primary"]
        compare = [f"{report}={folder}" for report, folder in (entry.get("compare") or {}).items()]
        return [Job("evaluate", _gpus(entry, "evaluate"),
                    [*common, "--out", str(out / "evaluate"), "--pretrain-name", finetuned[primary]["pretrain"],
                     "--mtf-name", primary, "--skip", "single", *(["--compare", *compare] if compare else []),
                     *_strings(entry.get("args", []), "evaluate.args")])]
    raise PlanError(f"unknown phase {phase!r}; choose one of {PHASES}")


def _stop(process: subprocess.Popen) -> int:
    """Stop a job's process group: SIGTERM first (torchrun then stops its workers, which run in sessions of
    their own), SIGKILL after a grace period."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def run_phase(phase_jobs: list[Job], out: Path, timeout: float | None) -> int:
    """Start every job at once, wait, print each one's summary lines; the number of jobs that failed."""
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // len(phase_jobs))
    running = []
    for job in phase_jobs:
        env = dict(os.environ)
        if job.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.gpus))
        command = [sys.executable, "-u", "-P", str(QUALITY), *job.flags, "--threads", str(threads)]
        log = open(out / f"{job.name}.log", "w")  # noqa: SIM115 - closed after the process ends
        print(f"[{job.name}] GPUs {job.gpus or '-'}: {' '.join(command[3:])}", flush=True)
        # a session of its own: the time limit stops the job's torchrun workers with it
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        running.append((job, process, log))
    deadline = None if timeout is None else time.monotonic() + timeout
    failed = 0
    for job, process, log in running:
        try:
            code = process.wait(None if deadline is None else max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = _stop(process)
            print(f"[{job.name}] stopped by the phase's time limit ({timeout:.0f} s)", flush=True)
        log.close()
        failed += code != 0
        lines = (out / f"{job.name}.log").read_text(errors="replace").replace("\r", "\n").splitlines()
        for line in lines:
            if any(marker in line for marker in SUMMARY_MARKERS) and "it/s]" not in line:
                print(f"[{job.name}] {line.strip()}", flush=True)
        print(f"[{job.name}] exit {code}", flush=True)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, required=True, help="the plan (YAML)")
    parser.add_argument("--phase", choices=PHASES, required=True)
    parser.add_argument("--out", type=Path, required=True, help="each process's --out folder and log go here")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop the phase's processes after this many seconds (a device call's limit)")
    args = parser.parse_args()
    try:
        plan = yaml.safe_load(args.plan.read_text()) or {}
        if not isinstance(plan, dict):
            raise PlanError("a plan is a mapping (common, pretrain, finetune, evaluate)")
        phase_jobs = jobs(plan, args.phase, args.out)
    except (OSError, yaml.YAMLError, PlanError, KeyError) as error:
        sys.exit(f"{args.plan}: {error}")
    if not phase_jobs:
        sys.exit(f"{args.plan}: no {args.phase} entries")
    sys.exit(1 if run_phase(phase_jobs, args.out, args.timeout) else 0)


if __name__ == "__main__":
    main()
