"""Whether a module of Triton kernels can run on a tensor: CUDA, or the CPU interpreter (TRITON_INTERPRET=1)
as the tests use it, and the module imports (Triton present and working)."""

from __future__ import annotations

import importlib
import os

import torch


def triton_kernels_usable(x: torch.Tensor, module: str) -> bool:
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        importlib.import_module(module)
    except Exception:  # Triton missing or broken: the torch paths still work
        return False
    return True
