"""Odyssey: EHR foundation models on Mamba, from FHIR exports to explained predictions.

Public API entry points are imported lazily so that `import odyssey` stays cheap and
the `pipelines` / `tokenizer` / `kernels` packages can use `odyssey.io` without cycles.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "ingest_fhir": ("odyssey.pipelines.ingest", "ingest_fhir"),
    "ingest_meds": ("odyssey.pipelines.meds_check", "ingest_meds"),
    "IngestReport": ("odyssey.pipelines.report", "IngestReport"),
    "synthesize": ("odyssey.pipelines.synth", "synthesize"),
    "tokenize": ("odyssey.tokenizer.tokenize", "tokenize"),
    "make_labels": ("odyssey.pipelines.labels", "make_labels"),
    "pretrain": ("odyssey.training.pretrain", "pretrain"),
    "PretrainConfig": ("odyssey.training.pretrain", "PretrainConfig"),
    "finetune": ("odyssey.finetune", None),  # a package that is also callable: odyssey.finetune(...)
    "evaluate": ("odyssey.finetune", "evaluate"),
    "EHRTokenizer": ("odyssey.tokenizer.ehr_tokenizer", "EHRTokenizer"),
    "explain": ("odyssey.interpretability.explain", "explain"),
    "forecast": ("odyssey.forecast", None),  # a package that is also callable: odyssey.forecast(...)
    "ExplainReport": ("odyssey.interpretability.explain", "ExplainReport"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        loaded = import_module(module)
        return loaded if attr is None else getattr(loaded, attr)
    raise AttributeError(f"module 'odyssey' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
