"""Interpretability: what an EHRMamba model looks at (hidden attention of its selective scans)."""

from .attention_plot import attention_by_visit, plot_hidden_attention, save_heatmap, visit_spans
from .hidden_attention import (
    ScanInputs,
    hidden_attention,
    hidden_attention_bruteforce,
    hidden_attention_from_scan,
    layer_scan_inputs,
    mixer_scan_inputs,
    sequence_inputs,
)

__all__ = [
    "ScanInputs",
    "attention_by_visit",
    "hidden_attention",
    "hidden_attention_bruteforce",
    "hidden_attention_from_scan",
    "layer_scan_inputs",
    "mixer_scan_inputs",
    "plot_hidden_attention",
    "save_heatmap",
    "sequence_inputs",
    "visit_spans",
]
