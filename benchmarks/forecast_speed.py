"""Generation cost: carrying the recurrent state (one prefill, then O(1) steps) against re-reading the
whole history for every generated token, on a random EHRMamba of a named size.

    python benchmarks/forecast_speed.py --size tiny --lengths 512 2048 8192 --samples 8 --new-tokens 32

Prints one JSON line per history length: milliseconds per generated token (all K rows) both ways and
the ratio. CPU uses one torch thread; `--device cuda` times with synchronisation.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from odyssey.models import EHRMambaConfig, EHRMambaForPretraining
from odyssey.models.mixer import MixerState
from odyssey.models.modeling_ehrmamba import EHRMambaCache

VOCAB = 4096


def history(length: int, rows: int, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(40, VOCAB, (rows, length), generator=generator)
    times = torch.arange(length, dtype=torch.float32).expand(rows, -1) * 0.1
    return {"input_ids": ids.to(device), "token_type_ids": torch.full_like(ids, 5).to(device),
            "ages": (60 + times / 365.25).to(device), "times": times.to(device),
            "visit_orders": (torch.arange(length) // 50 + 1).expand(rows, -1).to(device),
            "visit_segments": torch.ones_like(ids).to(device)}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def with_state(model, inputs, samples, new_tokens, device) -> float:
    out = model(**inputs, use_cache=True)
    cache = out.cache
    cache = EHRMambaCache([MixerState(s.conv_state.expand(samples, -1, -1).contiguous(),
                                      s.ssm_state.expand(samples, -1, -1).contiguous()) for s in cache.layers],
                          cache.last_times.expand(samples).contiguous(), cache.seen_tokens)
    step = {k: v[:1, -1:].expand(samples, 1).contiguous() for k, v in inputs.items()}
    sync(device)
    started = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(**step, cache=cache).logits[:, -1]
        step["input_ids"] = logits.argmax(-1, keepdim=True)
    sync(device)
    return (time.perf_counter() - started) / new_tokens


@torch.no_grad()
def rereading(model, inputs, samples, new_tokens, device) -> float:
    rows = {k: v.expand(samples, -1).contiguous() for k, v in inputs.items()}
    sync(device)
    started = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(**rows).logits[:, -1]
        rows = {k: torch.cat([v, (logits.argmax(-1, keepdim=True) if k == "input_ids" else v[:, -1:])], dim=1)
                for k, v in rows.items()}
    sync(device)
    return (time.perf_counter() - started) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reread-tokens", type=int, default=8, help="re-read steps timed (they are slow)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = EHRMambaForPretraining(EHRMambaConfig.from_size(args.size, vocab_size=VOCAB)).to(device).eval()
    for length in args.lengths:
        inputs = history(length, 1, device)
        with_state(model, inputs, args.samples, 2, device)  # warm-up
        state_s = with_state(model, inputs, args.samples, args.new_tokens, device)
        reread_s = rereading(model, inputs, args.samples, args.reread_tokens, device)
        print(json.dumps({"size": args.size, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          "history": length, "samples": args.samples, "ms_per_token_state": 1e3 * state_s,
                          "ms_per_token_reread": 1e3 * reread_s, "speedup": reread_s / state_s}), flush=True)


if __name__ == "__main__":
    main()
