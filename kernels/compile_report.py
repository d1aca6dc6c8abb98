"""Compile the scan kernels for sm_90 on a machine without a GPU and report what the hardware will run.

For each kernel configuration: registers and stack (spill) bytes from the cubin, and SASS instruction
counts for the whole kernel and for its innermost loop that holds exp2 (the backward's and forward's
loop over the state index): shuffles, MUFU (exp2, reciprocals), FP32 arithmetic, shared-memory and
local-memory (spill) traffic. This is how kernels/NOTES.md reads layouts and register use before
spending GPU time:

    python -m odyssey.kernels.compile_report                          # backward and forward, as launched
    python -m odyssey.kernels.compile_report --kernel bwd --set ADJOINT=0 --set BLOCK_D=8 --maxnreg 0
    python -m odyssey.kernels.compile_report --kernel bwd --set ADJOINT=5 --set LANE_FLIP=True
    python -m odyssey.kernels.compile_report --kernel fwd --maxnreg 96 --dump /tmp/fwd.sass

The code Triton generates depends on its version: the GPU machine runs Triton 3.6, so to see what it
runs, install that version beside the venv (`pip install --no-deps --target DIR triton==3.6.0`) and
put DIR first on PYTHONPATH. Strides along time are specialized to 1 and the other integers declared
divisible by 16, as they are for the dense, time-contiguous calls the model makes.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from odyssey.kernels import causal_conv_kernels, triton_seq_backward
from odyssey.kernels import triton_scan_kernels as kernels

SM90 = GPUTarget("cuda", 90, 32)
# integer arguments that are 1 in the dense channel-major layout (time stride, state stride of A)
UNIT_STRIDES = ("su_l", "sdt_l", "sz_l", "sdo_l", "so_l", "sdu_l", "sddt_l", "sdz_l", "sB_l", "sC_l",
                "sdB_l", "sdC_l", "sCr_l", "sA_n", "ss_n", "sl_n", "sg_n", "sx_l", "sg_l", "sdx_l", "sm_l", "sw_k")
FLOAT32_POINTERS = ("A_ptr", "D_ptr", "bias_ptr", "states_ptr", "last_ptr", "dlast_ptr", "carry_ptr",
                    "dA_ptr", "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr", "gstates_ptr")
INT32_POINTERS = ("seq_batch_ptr", "seq_start_ptr", "seq_len_ptr")
COMMON = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "VARLEN": False,
          "BLOCK_N": 16, "CHUNK": 64, "STAGES": 2}
KERNELS = {  # name: (kernel, constexprs, warps, register cap, float32 pointers) as triton_scan (v8)
    # launches them at b32/L2048/d_state 16: the backward capped at 128 registers, unpipelined,
    # unmasked, on float32 copies of B and C; the forward in 1-warp programs of 4 channels
    "bwd": (kernels._bwd_state_loop_kernel,
            {**COMMON, "HAS_DLAST": False, "BLOCK_D": 4, "ADJOINT": 3, "STAGES": 1, "FULL": True, "APPROX_LOG": True},
            1, 128,
            ("B_ptr", "C_ptr")),
    "fwd": (kernels._fwd_state_loop_kernel,
            {**COMMON, "STORE_STATES": True, "STORE_LAST": True, "BLOCK_D": 4, "PAIR": 2}, 1, None, ()),
    # the sequential forward (v10): 32 channels a warp, B and C from time-major float32 copies
    "seq": (kernels._fwd_seq_kernel,
            {key: COMMON[key] for key in ("HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "VARLEN", "CHUNK")}
            | {"STORE_STATES": True, "STORE_LAST": True, "BLOCK_D": 32, "PREFETCH_L1": True}, 1, None, ("A2_ptr", "BT_ptr", "CT_ptr")),
    # the sequential backward: 16 channels a warp on 2 lanes each, lane sums of dB/dC by inline PTX shuffles, B / C
    # rows a step ahead (one piece of time); softplus's lg2.approx in the backward kernels only (v14)
    "seqbwd": (triton_seq_backward._bwd_seq_kernel,
               {key: COMMON[key] for key in ("HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "VARLEN", "CHUNK")}
               | {"HAS_DLAST": False, "LANE_ASM": True, "SPLIT": 2, "APPROX_LOG": True, "BC_AHEAD": True}, 1, None,
               ("A2_ptr", "BT_ptr", "CT_ptr", "ckpt_ptr", "dBC_ptr")),
    # the conv's forward (tiles of 32 channels x 64 steps, 4 warps) and backward (a channel a thread), as the lean
    # mixer calls them (bias, SiLU, no mask)
    "convfwd": (causal_conv_kernels._causal_conv_fwd_kernel,
                {"HAS_BIAS": True, "HAS_MASK": False, "SILU": True, "WIDE": False, "BLOCK_D": 32, "BLOCK_T": 64}, 4,
                None, ("w_ptr", "mask_ptr")),
    "convbwd": (causal_conv_kernels._causal_conv_bwd_seq_kernel,
                {"HAS_BIAS": True, "HAS_MASK": False, "SILU": True, "WIDE": False, "SPAN": 512}, 1, None,
                ("w_ptr", "mask_ptr", "dw_ptr")),
}
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+((?:@!?U?P[T\d]\s+)?)([A-Z][A-Z0-9_.]*)([^;]*);")
REPORTED = ("SHFL", "MUFU", "FFMA", "FMUL", "FADD", "LDS", "LDSM", "STS", "LDL", "STL", "BAR", "REDG")


def _signature(fn, constexprs: dict, fp32_pointers: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
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
            element = "fp32" if name in FLOAT32_POINTERS + fp32_pointers else "i32" if name in INT32_POINTERS else "bf16"
            signature[name] = "*" + element
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs, consts


def compile_sm90(fn, constexprs: dict, num_warps: int, maxnreg: int | None = None,
                 fp32_pointers: tuple[str, ...] = ()):
    signature, attrs, consts = _signature(fn, constexprs, fp32_pointers)
    options = {"num_warps": num_warps}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs), target=SM90, options=options)


def _cuda_tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cubin_report(cubin: bytes) -> tuple[str, str]:
    """(cuobjdump's resource line, the SASS listing) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_cuda_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_cuda_tool("cuobjdump"), "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout
    resources = next((line.strip() for line in usage.splitlines() if "REG:" in line), "")
    return resources.split(" SHARED")[0], sass


def count_sass(sass: str) -> tuple[Counter, Counter]:
    """Opcode counts of the whole kernel and of its smallest loop that contains MUFU (exp2)."""
    lines = [(int(addr, 16), op.split(".")[0], rest) for addr, _, op, rest in SASS_LINE.findall(sass)]
    loops = []
    for addr, op, rest in lines:
        target = re.search(r"0x[0-9a-f]+", rest) if op == "BRA" else None
        if target and int(target.group(0), 16) < addr:
            loops.append((int(target.group(0), 16), addr))
    inner: list[str] | None = None
    for low, high in loops:
        body = [op for addr, op, _ in lines if low <= addr <= high]
        if "MUFU" in body and (inner is None or len(body) < len(inner)):
            inner = body
    return Counter(op for _, op, _ in lines), Counter(inner or [])


def _summary(counts: Counter) -> str:
    return f"{sum(counts.values())} instr, " + ", ".join(f"{op} {counts[op]}" for op in REPORTED if counts[op])


def report(kernel: str, overrides: dict, maxnreg: int | None = None, dump: str | None = None,
           fp32_pointers: tuple[str, ...] | None = None) -> dict:
    """maxnreg / fp32_pointers None: as the kernel is launched (KERNELS); 0 / (): no cap, all bf16."""
    fn, defaults, warps, default_cap, default_fp32 = KERNELS[kernel]
    maxnreg = default_cap if maxnreg is None else (maxnreg or None)
    fp32_pointers = default_fp32 if fp32_pointers is None else fp32_pointers
    constexprs = {**defaults, **overrides}
    warps = constexprs.pop("num_warps", warps)
    compiled = compile_sm90(fn, constexprs, warps, maxnreg, fp32_pointers)
    resources, sass = cubin_report(compiled.asm["cubin"])
    if dump:
        Path(dump).write_text(sass)
    total, loop = count_sass(sass)
    fp32 = f" fp32 {','.join(fp32_pointers)}" if fp32_pointers else ""
    print(f"{kernel} {overrides or 'defaults'} warps {warps} maxnreg {maxnreg}{fp32} (Triton {triton.__version__}): "
          f"{resources}")
    print(f"   inner loop: {_summary(loop)}")
    print(f"   kernel:     {_summary(total)}")
    return {"kernel": kernel, "overrides": overrides, "resources": resources, "loop": dict(loop),
            "total": dict(total)}


def _parse_set(items: list[str]) -> dict:
    values = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            values[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise SystemExit(f"--set {item!r}: the value must be a Python literal ({exc})") from exc
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=sorted(KERNELS), action="append",
                        help="bwd, fwd, seq, seqbwd, convfwd and/or convbwd (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a kernel constexpr (e.g. BLOCK_D=8, ADJOINT=0) or num_warps")
    parser.add_argument("--maxnreg", type=int, default=None, help="register cap (0: none; default: as launched)")
    parser.add_argument("--dump", default=None, help="write the SASS listing here (one kernel)")
    parser.add_argument("--fp32", default=None, metavar="B_ptr,C_ptr",
                        help="pointer arguments compiled as float32 instead of bf16 ('' for none; default: as "
                             "launched, i.e. B and C for the backward)")
    args = parser.parse_args(argv)
    overrides = _parse_set(args.set)
    for kernel in args.kernel or sorted(KERNELS):
        fp32 = None if args.fp32 is None else tuple(filter(None, args.fp32.split(",")))
        report(kernel, overrides, args.maxnreg, args.dump, fp32)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
