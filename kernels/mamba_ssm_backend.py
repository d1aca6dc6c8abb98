"""The `mamba_ssm` backend: mamba-ssm's CUDA `selective_scan_fn`, used only when installed and asked for.

mamba-ssm's package `__init__` imports its CUDA extensions and model code (which may need libraries
that are absent), so we load only `mamba_ssm.ops.selective_scan_interface`, behind a bare parent
package when the real one has not been imported yet.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable

INTERFACE_MODULE = "mamba_ssm.ops.selective_scan_interface"


class MambaSsmUnavailable(ImportError):
    """mamba-ssm (with its compiled `selective_scan_cuda` extension) cannot be imported here."""


def load_mamba_ssm_scan() -> Callable:
    """Return mamba-ssm's `selective_scan_fn`, or raise MambaSsmUnavailable saying why."""
    bare = None
    if "mamba_ssm" not in sys.modules:
        try:
            spec = importlib.util.find_spec("mamba_ssm")
        except (ImportError, ValueError) as exc:
            raise MambaSsmUnavailable(f"mamba-ssm could not be located: {exc}") from exc
        if spec is None or not spec.submodule_search_locations:
            raise MambaSsmUnavailable(
                "mamba-ssm is not installed; install the `cuda` extra (pip install 'odyssey-ehr[cuda]') "
                "on a machine with CUDA, or use backend='torch' or 'triton'"
            )
        bare = types.ModuleType("mamba_ssm")
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = bare
    try:
        module = importlib.import_module(INTERFACE_MODULE)
    except Exception as exc:  # a missing CUDA extension raises ImportError, OSError or RuntimeError
        if bare is not None and sys.modules.get("mamba_ssm") is bare:
            del sys.modules["mamba_ssm"]  # drop our stand-in so a later real import is not blocked
        raise MambaSsmUnavailable(
            f"mamba-ssm is installed but {INTERFACE_MODULE} failed to import "
            f"({type(exc).__name__}: {exc}); its CUDA extension is probably not built for this machine"
        ) from exc
    return module.selective_scan_fn
