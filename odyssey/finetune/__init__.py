"""Multitask prompted finetuning (MTF) of EHRMamba, evaluation against baselines, and reports."""
