"""Selective scan: Triton kernels, PyTorch reference and chunked scan, dispatch, benchmarks."""

from .dispatch import (
    BACKENDS,
    ENV_VAR,
    ScanBackendUnavailable,
    resolve_backend,
    resolve_step_backend,
    selective_scan,
    selective_state_update,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "ScanBackendUnavailable",
    "resolve_backend",
    "resolve_step_backend",
    "selective_scan",
    "selective_state_update",
]
