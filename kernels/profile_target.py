"""A few forward+backward calls of the Triton scan at one benchmark shape, for a profiler to attach to.

    ncu --kernel-name regex:'_(fwd|bwd)_state_loop_kernel' --launch-skip 2 --launch-count 2 \
        --section WarpStateStats --section SchedulerStats \
        python3 -P -m odyssey.kernels.profile_target --shape b32_L2048_N16 --overrides '{"adjoint": 0}'

The first call compiles the kernels; skip its launches (--launch-skip) so the profile shows warm ones.
"""

from __future__ import annotations

import argparse
import json

import torch

from odyssey.kernels import triton_scan
from odyssey.kernels.bench import SHAPES, make_inputs, run_scan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="b32_L2048_N16", choices=sorted(SHAPES))
    parser.add_argument("--overrides", default="{}", help="JSON dict of triton_scan.ScanConfig fields")
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args(argv)
    triton_scan.CONFIG_OVERRIDES.update(json.loads(args.overrides))
    shape = SHAPES[args.shape]
    device = torch.device("cuda")
    inputs = make_inputs(shape, torch.bfloat16, device, seed=3)
    dout = torch.randn(shape.batch, shape.dim, shape.length, device=device, dtype=torch.bfloat16)
    for _ in range(args.calls):
        run_scan(triton_scan.selective_scan_triton, inputs, dout)
    torch.cuda.synchronize()
    print(f"{args.calls} forward+backward calls at {shape.name} with {triton_scan.CONFIG_OVERRIDES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
