"""One-GPU pretraining speed: EHRMamba against a GPT-style transformer of about the same size (issue 4).

Both models train (forward + next-token loss + backward + AdamW step) on random tokens with the same
number of tokens per step, bf16 autocast on CUDA, in the same run:

- EHRMamba: `EHRMambaForPretraining` (embeddings, Mamba blocks with the `odyssey.kernels` scan, tied head);
- GPT: pre-norm transformer blocks (causal PyTorch SDPA attention, 4x GELU MLP) with half as many layers,
  since one GPT block holds about twice a Mamba block's parameters (`--gpt-layers` to change); the same
  token embedding and tied head; fixed sinusoidal positions (no table that caps the length).

Reports tokens/s and peak GPU memory per (model, length), and the longest length each trains at batch 1
(doubling until out of memory, up to `--max-length`). JSON goes to `$OUT/pretrain_gpu.json` (or --out).

`--mixer-layout` picks the EHRMamba mixer's layout (`auto`: the lean channel-major one on CUDA, see
odyssey/models/mixer.py); `--compare LAYOUT:SCAN ...` adds EHRMamba variants timed in the same run
(e.g. `unfused:auto` for the old layout, `lean:mamba_ssm` for mamba-ssm's scan inside the lean block),
reported as `ehrmamba_LAYOUT_SCAN`. `--profile` writes a per-kernel CUDA time table of one training
step of every model at the first length to `$OUT/pretrain_profile.txt`.

    python benchmarks/pretrain_gpu.py                     # on the GPU machine
    python benchmarks/pretrain_gpu.py --gradient-checkpointing   # longest lengths with recomputation
    python benchmarks/pretrain_gpu.py --compare unfused:auto lean:mamba_ssm --profile
    python benchmarks/pretrain_gpu.py --smoke --out /tmp  # toy sizes on CPU (what the tests run)
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.checkpoint  # noqa: E402
from torch import nn  # noqa: E402

from odyssey.io import write_json  # noqa: E402
from odyssey.kernels import resolve_backend  # noqa: E402
from odyssey.models import EHRMambaConfig, EHRMambaForPretraining, count_parameters  # noqa: E402

REPORT_NAME = "pretrain_gpu.json"
PROFILE_NAME = "pretrain_profile.txt"
PROFILE_ROWS = 30
LAYOUT_CHECK_TOLERANCE = 1e-4  # float32, different summation orders (Triton scan vs chunked torch scan)


class GPTBlock(nn.Module):
    """Pre-norm causal self-attention (SDPA, flash where available) + GELU MLP."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, hidden // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, hidden))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token embedding + sinusoidal positions -> blocks -> norm -> tied head, next-token loss."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, checkpointing: bool = False):
        super().__init__()
        self.checkpointing = checkpointing
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList([GPTBlock(hidden, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        self.hidden = hidden

    def positions(self, length: int, device) -> torch.Tensor:
        position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, self.hidden, 2, device=device) * (-math.log(10_000.0) / self.hidden))
        table = torch.zeros(length, self.hidden, device=device)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
        return table

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.positions(input_ids.shape[1], input_ids.device)
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.norm(x) @ self.embed.weight.t()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def build(kind: str, args, layout: str | None = None, scan_backend: str | None = None) -> nn.Module:
    if kind == "ehrmamba":
        config = EHRMambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                embedding_dropout=0.0, scan_backend=scan_backend or args.scan_backend)
        model = EHRMambaForPretraining(config)
        for block in model.backbone.layers:
            block.mixer.layout = layout or args.mixer_layout
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model
    return GPT(args.vocab, args.hidden, args.gpt_layers, args.heads, checkpointing=args.gradient_checkpointing)


def loss_of(kind: str, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    if kind == "ehrmamba":
        return model(input_ids, labels=input_ids).loss
    return model(input_ids, input_ids)


def train_steps(kind, model, optimizer, batch, length, steps, device, autocast_dtype, vocab) -> float:
    """Seconds for `steps` full optimizer steps (after the caller's warm-up)."""
    input_ids = torch.randint(1, vocab, (batch, length), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_of(kind, model, input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(kind, model, batch, length, args, device, autocast_dtype) -> dict:
    """Tokens/s and peak memory at (batch, length); `out_of_memory` instead when it does not fit."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        train_steps(kind, model, optimizer, batch, length, args.warmup, device, autocast_dtype, args.vocab)
        seconds = train_steps(kind, model, optimizer, batch, length, args.steps, device, autocast_dtype, args.vocab)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        torch.cuda.empty_cache()
        return {"batch": batch, "length": length, "out_of_memory": True}
    tokens = batch * length * args.steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    optimizer.zero_grad(set_to_none=True)
    return {
        "batch": batch, "length": length, "out_of_memory": False, "step_seconds": seconds / args.steps,
        "tokens_per_second": tokens / seconds, "peak_memory_bytes": peak,
    }


def longest_length(kind, model, args, device, autocast_dtype) -> dict:
    """Double the length at batch 1 from the smallest benchmark length until it fails or hits --max-length."""
    length, best = min(args.lengths), None
    while length <= args.max_length:
        result = measure(kind, model, 1, length, args, device, autocast_dtype)
        if result["out_of_memory"]:
            break
        best = result
        length *= 2
    return {"longest_length": best["length"] if best else None, "at_longest": best,
            "search_capped": best is not None and best["length"] * 2 > args.max_length}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for pretrain_gpu.json (default $OUT or .)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes that run in seconds on CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--tokens-per-step", type=int, default=65_536, help="batch = tokens_per_step / length")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8, help="EHRMamba layers")
    parser.add_argument("--gpt-layers", type=int, default=None, help="GPT layers (default: half of --layers)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=262_144, help="cap of the batch-1 length search")
    parser.add_argument("--scan-backend", default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each block in backward (both models): longer lengths fit")
    parser.add_argument("--models", nargs="+", default=["ehrmamba", "gpt"], choices=["ehrmamba", "gpt"])
    parser.add_argument("--mixer-layout", default="auto", choices=["auto", "lean", "unfused"])
    parser.add_argument("--compare", nargs="*", default=[], metavar="LAYOUT:SCAN",
                        help="extra EHRMamba variants, e.g. unfused:auto lean:mamba_ssm (no batch-1 search)")
    parser.add_argument("--profile", action="store_true", help=f"per-kernel table of one step -> {PROFILE_NAME}")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.vocab = 32, 2, 2, 64
        args.lengths, args.tokens_per_step, args.steps, args.warmup, args.max_length = [64, 128], 256, 1, 1, 256
    if args.gpt_layers is None:
        args.gpt_layers = max(1, args.layers // 2)
    return args


def variants(args) -> list[tuple[str, str, str | None, str | None]]:
    """(report key, model kind, mixer layout, scan backend) of every model timed, in order."""
    runs = [(kind, kind, None, None) for kind in args.models]
    for spec in args.compare:
        layout, _, scan = spec.partition(":")
        if layout not in ("auto", "lean", "unfused") or not scan:
            raise SystemExit(f"--compare takes LAYOUT:SCAN with LAYOUT in auto/lean/unfused, got {spec!r}")
        runs.append((f"ehrmamba_{layout}_{scan}", "ehrmamba", layout, scan))
    return runs


def profile_step(kind, model, batch, length, args, device, autocast_dtype) -> str:
    """Per-kernel table (CUDA time) of one full training step, after the caller's measurement warmed it up."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    train_steps(kind, model, optimizer, batch, length, 1, device, autocast_dtype, args.vocab)
    with profile(activities=activities, record_shapes=True) as prof:
        train_steps(kind, model, optimizer, batch, length, 1, device, autocast_dtype, args.vocab)
    optimizer.zero_grad(set_to_none=True)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    by_kernel = prof.key_averages().table(sort_by=sort_by, row_limit=PROFILE_ROWS, max_name_column_width=70)
    # the same by input shapes: which tensors the copies, casts and elementwise ops touch
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=f"self_{sort_by}", row_limit=PROFILE_ROWS, max_name_column_width=50, max_shapes_column_width=90)
    return f"{by_kernel}\n--- by input shapes ---\n{by_shape}"


# the reference path of layout_check runs torch's norm
REFERENCE_ENV = {"ODYSSEY_NORM_BACKEND": "torch"}


def layout_check(args, device, length: int = 1024, batch: int = 2) -> dict:
    """Before timing: two EHRMamba layers at the benchmark width, the timed path (lean layout: Triton conv,
    the timed scan backend, the Triton norm) against the reference (unfused layout, chunked torch scan,
    torch's norm), float32, logits and every parameter gradient; worst relative L2 error (the two differ
    only in summation order)."""
    torch.manual_seed(0)
    config = EHRMambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=2,
                            embedding_dropout=0.0)
    model = EHRMambaForPretraining(config).to(device)
    input_ids = torch.randint(1, args.vocab, (batch, length), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, : length // 4] = 0
    runs = {}
    for layout, scan in (("unfused", "torch"), ("lean", args.scan_backend)):
        for block in model.backbone.layers:
            block.mixer.layout, block.mixer.scan_backend = layout, scan
        model.zero_grad(set_to_none=True)
        saved = {key: os.environ.get(key) for key in REFERENCE_ENV}
        if layout == "unfused":
            os.environ.update(REFERENCE_ENV)
        try:
            out = model(input_ids, attention_mask=attention_mask,
                        labels=input_ids.masked_fill(attention_mask == 0, -100))
            out.loss.backward()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        runs[layout] = (out.logits.detach().double(),
                        {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None})
    (ref_logits, ref_grads), (logits, grads) = runs["unfused"], runs["lean"]
    errors = {"logits": ((logits - ref_logits).norm() / ref_logits.norm()).item()}
    for name, grad in ref_grads.items():
        errors[name] = ((grads[name] - grad).norm() / grad.norm().clamp_min(1e-30)).item()
    worst = max(errors, key=errors.get)
    return {"length": length, "batch": batch, "worst": worst, "worst_error": errors[worst], "errors": errors,
            "passed": errors[worst] <= LAYOUT_CHECK_TOLERANCE}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "precision": "bf16-autocast" if autocast_dtype else "fp32",
        "scan_backend": resolve_backend(args.scan_backend, device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {},
    }
    out = args.out or Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        report["layout_check"] = layout_check(args, device)
        check = report["layout_check"]
        print(f"layout check (timed path vs reference, fp32): worst {check['worst']} {check['worst_error']:.2e} "
              f"{'PASS' if check['passed'] else 'FAIL'}", flush=True)
    profiles = []
    for key, kind, layout, scan in variants(args):
        torch.manual_seed(0)
        model = build(kind, args, layout, scan).to(device)
        blocks = model.backbone.layers if kind == "ehrmamba" else model.blocks
        entry = {
            "parameters": count_parameters(model),
            "block_parameters": count_parameters(blocks),  # without embeddings and head
            "layers": args.layers if kind == "ehrmamba" else args.gpt_layers,
            "by_length": [],
        }
        if kind == "ehrmamba":
            mixer = blocks[0].mixer
            entry["mixer_layout"] = "lean" if mixer._lean(torch.empty(0, device=device)) else "unfused"
            entry["scan_backend"] = resolve_backend(mixer.scan_backend, device)
        for length in args.lengths:
            batch = max(1, args.tokens_per_step // length)
            entry["by_length"].append(measure(kind, model, batch, length, args, device, autocast_dtype))
            row = entry["by_length"][-1]
            speed = "OOM" if row["out_of_memory"] else f"{row['tokens_per_second']:,.0f} tokens/s"
            print(f"{key:28s} length {length:>7,} batch {batch:>3}: {speed}", flush=True)
        if args.profile:
            length = args.lengths[0]
            table = profile_step(kind, model, max(1, args.tokens_per_step // length), length, args, device,
                                 autocast_dtype)
            profiles.append(f"=== {key} (length {length}) ===\n{table}\n")
        if key in ("ehrmamba", "gpt"):
            entry["batch_1"] = longest_length(kind, model, args, device, autocast_dtype)
            print(f"{key:28s} longest length at batch 1: {entry['batch_1']['longest_length']}", flush=True)
        report["models"][key] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "gpt" in report["models"]:
        gpt_rows = report["models"]["gpt"]["by_length"]
        report["speedup_vs_gpt"] = {
            key: {
                str(m["length"]): (m["tokens_per_second"] / g["tokens_per_second"])
                if not (m["out_of_memory"] or g["out_of_memory"]) else None
                for m, g in zip(entry["by_length"], gpt_rows, strict=True)
            }
            for key, entry in report["models"].items() if key != "gpt"
        }
        if "ehrmamba" in report["speedup_vs_gpt"]:
            report["ehrmamba_speedup"] = report["speedup_vs_gpt"]["ehrmamba"]
        for key, ratios in report["speedup_vs_gpt"].items():
            shown = ", ".join(f"{length}: {'-' if r is None else f'{r:.2f}x'}" for length, r in ratios.items())
            print(f"{key:28s} vs GPT tokens/s: {shown}")
    if profiles:
        (out / PROFILE_NAME).write_text("".join(profiles))
    write_json(out / REPORT_NAME, report)
    print(f"report: {out / REPORT_NAME}")
    return report


if __name__ == "__main__":
    main()
