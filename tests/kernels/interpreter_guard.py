"""Run a Triton-interpreter test module in a fresh process when Triton was imported compiled first.

The interpreter only takes effect for functions decorated after TRITON_INTERPRET=1 is set, Triton's
own library (tl.sum, tl.sigmoid, ...) included. When pytest collects a module that imports Triton in
compiled mode before an interpreted test module (e.g. `pytest tests/odyssey tests/kernels`), the
interpreted kernels fail on the first library call. Such a module then skips its tests in this process
and runs its whole file again in a child process where the interpreter is on from the start.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import triton.language.standard as triton_standard
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

FRESH_PROCESS_TEST = "test_module_in_fresh_process"
FRESH_PROCESS_TIMEOUT_S = 900


def interpreter_active() -> bool:
    return isinstance(triton_standard.sigmoid, InterpretedFunction)


def reload_for_interpreter(kernels, *users) -> None:
    """Reload the Triton kernels module `kernels`, then the modules `users` that bound its functions, when its
    kernels were decorated compiled (imported before TRITON_INTERPRET=1 was set in this process)."""
    if any(isinstance(value, JITFunction) for value in vars(kernels).values()):
        for module in (kernels, *users):
            importlib.reload(module)


def make_guard(module_file: str):
    """(autouse fixture, test function) for an interpreted test module; bind both to module names."""

    @pytest.fixture(autouse=True)
    def _interpreted_only(request):
        if not interpreter_active() and request.node.originalname != FRESH_PROCESS_TEST:
            pytest.skip(f"Triton was imported in compiled mode first; {FRESH_PROCESS_TEST} runs this file")

    def test_module_in_fresh_process():
        if interpreter_active():
            pytest.skip("the Triton interpreter is active in this process")
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module_file],
            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
            timeout=FRESH_PROCESS_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    return _interpreted_only, test_module_in_fresh_process
