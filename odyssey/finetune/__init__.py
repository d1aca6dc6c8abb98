"""Multitask prompted finetuning (MTF) of EHRMamba, evaluation against baselines, and reports.

In a notebook::

    from odyssey.finetune import finetune, evaluate
    result = finetune(pretrained="run", data="seq", labels="labels", out="ft", tasks=["mortality_30d"])
    result.model, result.tuning_auroc
    report = evaluate(model="ft", data="seq", labels="labels", out="eval")
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .data import FinetuneDataError, TaskSpec
from .evaluate import EvaluateConfig
from .evaluate import evaluate as _evaluate
from .train import FinetuneConfig, FinetuneResult, load_finetuned
from .train import finetune as _finetune


def finetune(config: FinetuneConfig | None = None, callbacks: list | None = None, **fields: Any) -> FinetuneResult:
    """Finetune on a config object or on its fields as keywords (see `FinetuneConfig`)."""
    return _finetune(config if config is not None else FinetuneConfig(**fields), callbacks=callbacks)


def evaluate(config: EvaluateConfig | None = None, **fields: Any) -> dict[str, Any]:
    """Evaluate on a config object or on its fields as keywords (see `EvaluateConfig`); returns the report."""
    return _evaluate(config if config is not None else EvaluateConfig(**fields))


__all__ = [
    "EvaluateConfig",
    "FinetuneConfig",
    "FinetuneDataError",
    "FinetuneResult",
    "TaskSpec",
    "evaluate",
    "finetune",
    "load_finetuned",
]


class _CallablePackage(types.ModuleType):
    """`odyssey.finetune(...)` (the issue's API) and `odyssey.finetune.evaluate(...)` both work: the
    package is also the function."""

    def __call__(self, config: FinetuneConfig | None = None, callbacks: list | None = None, **fields: Any):
        return finetune(config, callbacks, **fields)


sys.modules[__name__].__class__ = _CallablePackage
