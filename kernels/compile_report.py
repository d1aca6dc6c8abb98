"""Compile the scan kernels for sm_90 on a machine without a GPU and report what the hardware will run.

Prints, per kernel configuration: registers, spill/stack bytes (ptxas), and counts of the instructions
that bound the scan (ex2 on the special-function unit, warp shuffles, reductions/atomics to global
memory and their widths, barriers). This is how kernels/NOTES.md reads layouts and register use
before spending GPU time:

    python -m odyssey.kernels.compile_report                       # the backward and forward, defaults
    python -m odyssey.kernels.compile_report --bwd-variant onexp   # one variant
    python -m odyssey.kernels.compile_report --ptx-out /tmp/bwd.ptx

Strides along time are specialized to 1 and the other integers declared divisible by 16, as they are
for the dense, time-contiguous calls the model makes.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from odyssey.kernels import triton_scan_kernels as kernels

SM90 = GPUTarget("cuda", 90, 32)
# integer arguments that are 1 in the dense channel-major layout (time stride, state stride of A)
UNIT_STRIDES = ("su_l", "sdt_l", "sz_l", "sdo_l", "so_l", "sdu_l", "sddt_l", "sdz_l", "sB_l", "sC_l",
                "sdB_l", "sdC_l", "sCr_l", "sA_n", "ss_n", "sl_n", "sg_n")
FLOAT32_POINTERS = ("A_ptr", "D_ptr", "bias_ptr", "states_ptr", "last_ptr", "dlast_ptr", "carry_ptr",
                    "dA_ptr", "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr", "gstates_ptr")
INT32_POINTERS = ("seq_batch_ptr", "seq_start_ptr", "seq_len_ptr")
PTX_PATTERNS = {
    "ex2": r"\bex2\.approx",
    "shfl": r"\bshfl\.sync",
    "red.global": r"\bred\.(?:relaxed\.)?(?:gpu\.)?global",
    "atom.global": r"\batom\.(?:\w+\.)*global",
    "bar.sync": r"\bbar\.sync|\bbarrier\.sync",
    "ld.global": r"\bld\.global",
    "st.global": r"\bst\.global",
    "cp.async": r"\bcp\.async\.(?:ca|cg)",
}


def _signature(fn, constexprs: dict) -> tuple[dict, dict, dict]:
    signature, attrs, consts = {}, {}, dict(constexprs)
    for param in fn.params:  # constexpr parameters left out take their defaults
        if param.is_constexpr and param.name not in consts and param.has_default:
            consts[param.name] = param.default
    for index, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in UNIT_STRIDES:
            consts[name] = 1
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            element = "fp32" if name in FLOAT32_POINTERS else "i32" if name in INT32_POINTERS else "bf16"
            signature[name] = "*" + element
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs, consts


def compile_sm90(fn, constexprs: dict, num_warps: int, num_stages: int = 3):
    signature, attrs, consts = _signature(fn, constexprs)
    source = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=SM90, options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_usage(ptx: str) -> str:
    """ptxas' own resource line (registers, stack, spills) for the PTX Triton produced."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        result = subprocess.run([str(ptxas), "-arch=sm_90", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True)
    lines = [line.split("info    : ")[-1] for line in result.stderr.splitlines() if "Used" in line or "spill" in line]
    return "; ".join(lines)


def count_instructions(ptx: str) -> Counter:
    counts = Counter()
    for name, pattern in PTX_PATTERNS.items():
        counts[name] = len(re.findall(pattern, ptx))
    for width in re.findall(r"\bred\.[\w.]*?(v\d)\.f32", ptx):
        counts[f"red {width}"] += 1
    return counts


def report(label: str, fn, constexprs: dict, num_warps: int, ptx_out: str | None = None) -> dict:
    compiled = compile_sm90(fn, constexprs, num_warps)
    ptx = compiled.asm["ptx"]
    if ptx_out:
        Path(ptx_out).write_text(ptx)
    counts = count_instructions(ptx)
    usage = ptxas_usage(ptx)
    print(f"{label}: {usage}")
    print("   static PTX counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v))
    return {"label": label, "usage": usage, "counts": dict(counts)}


COMMON = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "VARLEN": False}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-n", type=int, default=16)
    parser.add_argument("--bwd-variant", default=None, help="state_loop, onexp, ... (default: all)")
    parser.add_argument("--bwd-channels", type=int, default=8)
    parser.add_argument("--bwd-warps", type=int, default=1)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--pair", type=int, default=1)
    parser.add_argument("--ptx-out", default=None)
    args = parser.parse_args(argv)
    bwd = {**COMMON, "HAS_DLAST": False, "BLOCK_D": args.bwd_channels, "BLOCK_N": args.block_n, "CHUNK": 64,
           "STAGES": args.stages}
    variants = {"state_loop": (kernels._bwd_state_loop_kernel, {})}
    for name, (fn, extra) in getattr(kernels, "BWD_STATE_LOOP_VARIANTS", {}).items():
        variants[name] = (fn, extra)
    for name, (fn, extra) in variants.items():
        if args.bwd_variant and name != args.bwd_variant:
            continue
        constexprs = {**bwd, **{k: v for k, v in extra.items() if k in fn.arg_names}}
        if "PAIR" in fn.arg_names:
            constexprs["PAIR"] = args.pair
        report(f"bwd {name} {args.bwd_channels}ch x {args.bwd_warps}w N{args.block_n}", fn, constexprs,
               args.bwd_warps, args.ptx_out)
    if args.bwd_variant is None:
        fwd = {**COMMON, "STORE_STATES": True, "STORE_LAST": True, "BLOCK_D": 16, "BLOCK_N": args.block_n,
               "CHUNK": 64, "PAIR": 1, "STAGES": args.stages}
        report(f"fwd state_loop 16ch x 4w N{args.block_n}", kernels._fwd_state_loop_kernel, fwd, 4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
