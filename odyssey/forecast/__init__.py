"""Forecasting: sampled future visits from a pretrained EHRMamba, carrying the recurrent state.

In a notebook::

    import odyssey
    report = odyssey.forecast(model="pretrain", data="seq", labels="labels", out="fc", samples=16)
    report["next_visit"]["recall@10"], report["zero_shot"]["mortality_30d"]["value"]

Lower level: `load_generator`, `generate` (K futures per history from one prefill), `SequenceRules`
(side inputs and the grammar of generated tokens).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .generate import ForecastModelError, Futures, History, generate, load_generator, sample_top_p
from .rules import Phase, SequenceRules, gap_days_table
from .run import ForecastConfig
from .run import forecast as _forecast


def forecast(config: ForecastConfig | None = None, **fields: Any) -> dict[str, Any]:
    """Run `odyssey forecast` on a config object or on its fields as keywords; returns the report."""
    return _forecast(config if config is not None else ForecastConfig(**fields))


__all__ = [
    "ForecastConfig",
    "ForecastModelError",
    "Futures",
    "History",
    "Phase",
    "SequenceRules",
    "forecast",
    "gap_days_table",
    "generate",
    "load_generator",
    "sample_top_p",
]


class _CallablePackage(types.ModuleType):
    """`odyssey.forecast(...)` and `odyssey.forecast.generate(...)` both work: the package is the function."""

    def __call__(self, config: ForecastConfig | None = None, **fields: Any) -> dict[str, Any]:
        return forecast(config, **fields)


sys.modules[__name__].__class__ = _CallablePackage
