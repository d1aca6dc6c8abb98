"""`selective_scan`: one entry point, several backends.

Backends (all share the signature of mamba-ssm's `selective_scan_fn`):

- `torch`: the chunked PyTorch scan (`kernels/chunked.py`); any device, differentiable.
- `reference`: the float64 sequential loop (`kernels/reference.py`); slow, for tests.
- `triton`: the project's Triton kernels (`odyssey.kernels.triton_scan`), imported only when needed.
- `mamba_ssm`: mamba-ssm's CUDA kernel, only when asked for and installed.
- `auto` (default): `triton` for CUDA tensors when that module imports, otherwise `torch`.

The environment variable ODYSSEY_SCAN_BACKEND (one of the names above) replaces the `auto`
choice for every call that does not name a backend, e.g. `ODYSSEY_SCAN_BACKEND=torch` to rule out
the Triton kernels on a GPU. A backend named in the call is always used as named.

`selective_state_update` (one recurrent step, for decoding) has two backends, `torch`
(`kernels/step.py`) and `triton` (`selective_state_update_triton` in the same Triton module), chosen
the same way; a forced `reference` or `mamba_ssm` scan backend steps with `torch`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from .chunked import selective_scan_chunked
from .mamba_ssm_backend import load_mamba_ssm_scan
from .reference import selective_scan_reference
from .step import selective_state_update as selective_state_update_torch

ENV_VAR = "ODYSSEY_SCAN_BACKEND"
BACKENDS = ("torch", "reference", "triton", "mamba_ssm")
TRITON_MODULE = "odyssey.kernels.triton_scan"
TRITON_FUNCTION = "selective_scan_triton"
TRITON_STEP_FUNCTION = "selective_state_update_triton"
STEP_BACKENDS = ("torch", "triton")


class ScanBackendUnavailable(RuntimeError):
    """A backend that was asked for cannot run here (not installed, failed to import)."""


_loaded: dict[str, Callable | Exception] = {}


def _load_triton() -> Callable:
    module = importlib.import_module(TRITON_MODULE)
    return getattr(module, TRITON_FUNCTION)


def _load_triton_step() -> Callable:
    module = importlib.import_module(TRITON_MODULE)
    return getattr(module, TRITON_STEP_FUNCTION)


_LOADERS: dict[str, Callable[[], Callable]] = {
    "torch": lambda: selective_scan_chunked,
    "reference": lambda: selective_scan_reference,
    "triton": _load_triton,
    "mamba_ssm": load_mamba_ssm_scan,
    "torch step": lambda: selective_state_update_torch,
    "triton step": _load_triton_step,
}


def get_backend(name: str) -> Callable:
    """The function of backend `name` ("triton", or "triton step" for the one-step update).

    Raises ScanBackendUnavailable with the reason if it cannot load.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {('auto', *BACKENDS)}")
    if name not in _loaded:
        try:
            _loaded[name] = _LOADERS[name]()
        except Exception as exc:  # an optional backend may fail in many ways; keep the reason
            _loaded[name] = exc
    found = _loaded[name]
    if isinstance(found, Exception):
        raise ScanBackendUnavailable(
            f"scan backend {name!r} is unavailable: {type(found).__name__}: {found}"
        ) from found
    return found


def backend_available(name: str) -> bool:
    try:
        get_backend(name)
    except ScanBackendUnavailable:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend a call with `backend` on tensors on `device` runs."""
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={forced!r} is not a scan backend; choose one of {BACKENDS}")
            return forced
        if device.type == "cuda" and backend_available("triton"):
            return "triton"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {('auto', *BACKENDS)}")
    return backend


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Raise ValueError naming the argument whose shape breaks the selective-scan contract."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim, N) with dim={dim}, got shape {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, BC in (("B", B), ("C", C)):
        if BC.dim() not in (3, 4) or BC.shape[0] != batch or tuple(BC.shape[-2:]) != (n_state, length):
            raise ValueError(
                f"{name} must be (batch, N, L) or (batch, G, N, L) with batch={batch}, N={n_state}, "
                f"L={length}, got shape {tuple(BC.shape)}"
            )
        if BC.dim() == 4 and dim % BC.shape[1]:
            raise ValueError(f"dim {dim} is not divisible by the {BC.shape[1]} groups of {name}")
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and tuple(vector.shape) != (dim,):
            raise ValueError(f"{name} must be (dim,) = ({dim},), got shape {tuple(vector.shape)}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
):
    """Mamba-1 selective scan with the semantics and shapes of mamba-ssm's `selective_scan_fn`.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,). Returns out (u's dtype), or (out, last_state (batch, dim, N) float32).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    scan = get_backend(resolve_backend(backend, u.device))
    return scan(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )


def resolve_step_backend(backend: str, device: torch.device) -> str:
    """Name of the backend (`torch` or `triton`) a `selective_state_update` call runs."""
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            return "triton" if resolve_backend("auto", device) == "triton" else "torch"
        if device.type == "cuda" and backend_available("triton step"):
            return "triton"
        return "torch"
    if backend not in STEP_BACKENDS:
        raise ValueError(
            f"unknown state-update backend {backend!r}; choose one of {('auto', *STEP_BACKENDS)}"
        )
    return backend


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Advance `state` (batch, dim, N) by one step in place; return y (batch, dim). See `kernels/step.py`.

    x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N) or (batch, G, N); D, dt_bias: (dim,).
    """
    step = get_backend(f"{resolve_step_backend(backend, state.device)} step")
    return step(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
