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


def use_triton(backend: str, env_var: str | None, what: str, x: torch.Tensor, module: str,
               auto_triton: bool = True) -> bool:
    """Whether a call asking for `backend` ("auto", "torch" or "triton"; "auto" first takes $env_var when one is named
    and set, as a benchmark's same-run baseline does) runs the Triton kernels of `module` on x. `auto` is Triton for
    CUDA tensors where the kernels run (and `auto_triton`), torch otherwise; an unknown name, or "triton" where the
    kernels cannot run, is refused naming `what`."""
    if backend == "auto" and env_var:
        backend = os.environ.get(env_var, "").strip() or "auto"
    if backend not in ("auto", "torch", "triton"):
        source = f" (argument or ${env_var})" if env_var else ""
        raise ValueError(f"unknown {what} backend {backend!r}{source}; choose one of ('auto', 'torch', 'triton')")
    if backend == "torch" or (backend == "auto" and not (auto_triton and x.is_cuda)):
        return False
    usable = triton_kernels_usable(x, module)
    if backend == "triton" and not usable:
        raise ValueError(f"the triton {what} needs CUDA tensors (or TRITON_INTERPRET=1) and Triton; got {x.device}")
    return usable
