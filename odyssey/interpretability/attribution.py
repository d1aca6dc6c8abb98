"""Integrated gradients of a task head's logit, per token, and their sums per event, visit, code and family.

The path runs in the space of the concept (word) embeddings, with captum's `LayerIntegratedGradients`
on `model.get_input_embeddings()`. The baseline input is the same sequence with every *event* token
replaced by `[PAD]` (whose embedding row `padding_idx` keeps at zero), while special tokens (`[CLS]`,
`[VS]`, `[VE]`, `[REG]`), time gaps and task prompts keep their ids, and every token keeps its type,
time, age, visit order and segment. So the baseline is "the same timeline with the facts blanked
out": the structure the head relies on (where the prompt is, visit boundaries, elapsed time) is
held fixed, and the attributions share out F(input) - F(baseline) among the facts only. Structural
tokens get exactly zero (their input equals their baseline).

F is the logit (before the sigmoid) of one output of the example's task: logits add up, so
completeness (sum of attributions = F(input) - F(baseline)) holds on the scale the head is linear in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl
import torch

from odyssey.tokenizer import TokenType
from odyssey.tokenizer.binning import BIN_SEPARATOR
from odyssey.tokenizer.build import word_of

# Token types that are structure, not facts: they keep their embedding in the baseline and get no score.
STRUCTURAL_TYPES = frozenset({TokenType.PAD, TokenType.SPECIAL, TokenType.TIME_GAP, TokenType.TASK})
MODEL_INPUTS = ("input_ids", "token_type_ids", "ages", "times", "visit_orders", "visit_segments")
CODE_SEPARATOR = "//"
# ICD codes group into chapters/categories by their first three characters (I50.9 -> I50, 4280 -> 428).
ICD_VOCABULARIES = frozenset({"ICD10CM", "ICD9CM", "ICD10PCS", "ICD9PROC"})
ICD_CATEGORY_CHARS = 3
DEFAULT_STEPS = 32
# Interpolated inputs per forward pass on CPU: at 2,048 tokens (tiny model, 2 cores) 8 ran 2.1 s for 32 steps
# against 2.4 s for 16 and 3.4 s for all 32 at once (benchmarks/explain_cpu.py). GPUs take all steps at once.
CPU_BATCH = 8
# Logit differences below this are not worth refining: completeness is judged relative to max(|diff|, floor).
COMPLETENESS_FLOOR = 1e-3


@dataclass
class TokenAttributions:
    """Per-token integrated gradients of one output for one prompted input."""

    scores: np.ndarray  # (L,) float64: attribution of each token (summed over the hidden dimension)
    event_mask: np.ndarray  # (L,) bool: tokens that were blanked in the baseline
    logit: float  # F(input)
    baseline_logit: float  # F(baseline)
    convergence_delta: float  # sum(scores) - (logit - baseline_logit), captum's completeness error
    n_steps: int

    @property
    def probability(self) -> float:
        return float(1.0 / (1.0 + np.exp(-self.logit)))


def event_mask_of(token_type_ids: np.ndarray) -> np.ndarray:
    """True where a token stands for a fact (an event), False for structure (specials, gaps, prompts, padding)."""
    structural = np.array([int(t) for t in STRUCTURAL_TYPES])
    return ~np.isin(np.asarray(token_type_ids), structural)


def _tensors(inputs: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    missing = [name for name in MODEL_INPUTS if name not in inputs]
    if missing:
        raise ValueError(f"model input lacks the columns {missing}")
    dtypes = {"input_ids": torch.long, "token_type_ids": torch.long, "visit_orders": torch.long,
              "visit_segments": torch.long, "ages": torch.float32, "times": torch.float32}
    return {name: torch.as_tensor(np.asarray(inputs[name]), dtype=dtypes[name], device=device)[None, :]
            for name in MODEL_INPUTS}


def integrated_gradients(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    task_index: int,
    output: int = 0,
    n_steps: int = DEFAULT_STEPS,
    internal_batch_size: int | None = None,
    pad_token_id: int | None = None,
    tolerance: float | None = None,
    max_steps: int = 1024,
) -> TokenAttributions:
    """Integrated gradients of output `output` of task `task_index` for one prompted input (a row of arrays).

    `inputs` holds `MODEL_INPUTS` as 1-D arrays (e.g. `odyssey.finetune.data.prompt_input(...)`).
    `internal_batch_size` bounds how many of the `n_steps` interpolated inputs go through the model at
    once (default: `CPU_BATCH` on CPU, all on a GPU). With `tolerance`, the step count doubles (up to
    `max_steps`) until |sum of attributions - (F(input) - F(baseline))| <= tolerance * max(|F(input) -
    F(baseline)|, COMPLETENESS_FLOOR): a model whose output jumps along the path needs more steps.
    The model is put in eval mode (no dropout) for the duration.
    """
    from captum.attr import LayerIntegratedGradients

    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    width = int(model.config.task_outputs[task_index])
    if not 0 <= output < width:
        raise ValueError(f"task {model.config.task_names[task_index]!r} has {width} outputs; output {output} is out of range")
    device = next(model.parameters()).device
    tensors = _tensors(inputs, device)
    events = event_mask_of(inputs["token_type_ids"])
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    baseline_ids = tensors["input_ids"].masked_fill(torch.as_tensor(events, device=device)[None, :], int(pad))
    side = tuple(tensors[name] for name in MODEL_INPUTS[1:])
    task = torch.tensor([task_index], dtype=torch.long, device=device)

    def logit_of(input_ids, token_type_ids, ages, times, visit_orders, visit_segments, task_index):
        result = model(input_ids=input_ids, task_index=task_index, token_type_ids=token_type_ids, ages=ages,
                       times=times, visit_orders=visit_orders, visit_segments=visit_segments, return_dict=True)
        return result.logits[:, output]

    was_training = model.training
    model.eval()
    try:
        ig = LayerIntegratedGradients(logit_of, model.get_input_embeddings())
        with torch.no_grad():
            logit = float(logit_of(tensors["input_ids"], *side, task)[0])
            baseline_logit = float(logit_of(baseline_ids, *side, task)[0])
        allowed = None if tolerance is None else tolerance * max(abs(logit - baseline_logit), COMPLETENESS_FLOOR)
        steps = n_steps
        while True:
            batch = internal_batch_size or (CPU_BATCH if device.type == "cpu" else steps)
            attributions, delta = ig.attribute(
                tensors["input_ids"], baselines=baseline_ids, additional_forward_args=(*side, task),
                n_steps=steps, internal_batch_size=min(batch, steps), return_convergence_delta=True,
            )
            scores = attributions[0].detach().double().sum(dim=-1).cpu().numpy()
            error = abs(scores.sum() - (logit - baseline_logit))
            if allowed is None or error <= allowed or steps * 2 > max_steps:
                break
            steps *= 2
    finally:
        model.train(was_training)
    return TokenAttributions(scores=scores, event_mask=events, logit=logit, baseline_logit=baseline_logit,
                             convergence_delta=float(delta.reshape(-1)[0]), n_steps=steps)


# ----- aggregation -----------------------------------------------------------------------------------


def _as_datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else np.datetime64(value, "us").astype(datetime)


def code_and_bin(word: str, binned_words: Mapping[str, str]) -> tuple[str, int | None]:
    """The MEDS code of a vocabulary word and its value bin (`LOINC//2160-0_3` -> (`LOINC//2160-0`, 3))."""
    base, separator, index = word.rpartition(BIN_SEPARATOR)
    if separator and index.isdigit() and base in binned_words:
        return binned_words[base], int(index)
    return word, None


def code_family(code: str) -> str:
    """The code's vocabulary (`ICD10CM//I50.9` -> `ICD10CM`); codes without a `//` are their own family."""
    vocabulary, separator, _ = code.partition(CODE_SEPARATOR)
    return vocabulary if separator else code


def code_category(code: str) -> str:
    """ICD codes: vocabulary and first three characters, dot removed (`ICD10CM//I50.9` -> `ICD10CM//I50`); else the code."""
    vocabulary, separator, value = code.partition(CODE_SEPARATOR)
    if separator and vocabulary in ICD_VOCABULARIES:
        return f"{vocabulary}{CODE_SEPARATOR}{value.replace('.', '')[:ICD_CATEGORY_CHARS]}"
    return code


def token_table(row: Mapping[str, Any], scores: np.ndarray, tokenizer) -> pl.DataFrame:
    """One row per token of a prompted input: position, word, code, value bin, type, visit, time, score, is_event."""
    ids = np.asarray(row["input_ids"])
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size != ids.size:
        raise ValueError(f"{scores.size} scores for a row of {ids.size} tokens")
    binned_words = {word_of(code): code for code in tokenizer.bins}
    words = [tokenizer.id_to_token(int(i)) for i in ids]
    codes, bins = zip(*(code_and_bin(w, binned_words) for w in words), strict=True) if words else ((), ())
    types = np.asarray(row["token_type_ids"]).astype(np.int64)
    return pl.DataFrame({
        "position": np.arange(ids.size),
        "token": words,
        "code": list(codes),
        "value_bin": pl.Series(list(bins), dtype=pl.Int64),
        "token_type": [TokenType(int(t)).name for t in types],
        "visit": np.asarray(row["visit_orders"]).astype(np.int64),
        "time": pl.Series([_as_datetime(t) for t in row["event_times"]], dtype=pl.Datetime("us")),
        "score": scores,
        "is_event": event_mask_of(types),
    })


def _grouped(events: pl.DataFrame, keys: Sequence[str], first: Sequence[str] = ()) -> pl.DataFrame:
    return (events.group_by(list(keys), maintain_order=True)
            .agg(pl.col("score").sum(), pl.len().alias("tokens"), *[pl.col(c).first() for c in first])
            .sort(pl.col("score").abs(), descending=True, maintain_order=True))


def aggregate(table: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Event-token scores summed per event (time, code), visit, code, code category and code family.

    Every frame's `score` column sums to the total over event tokens (structural tokens score zero).
    Rows are sorted by |score|, largest first.
    """
    events = table.filter(pl.col("is_event")).with_columns(
        pl.col("code").map_elements(code_family, return_dtype=pl.String).alias("family"),
        pl.col("code").map_elements(code_category, return_dtype=pl.String).alias("category"),
    )
    visits = (events.group_by("visit", maintain_order=True)
              .agg(pl.col("score").sum(), pl.len().alias("tokens"), pl.col("time").min().alias("start"),
                   pl.col("time").max().alias("end"))
              .sort("visit"))
    return {
        "events": _grouped(events, ["time", "code"], ["token_type", "value_bin", "visit", "family"]),
        "visits": visits,
        "codes": _grouped(events, ["code"], ["token_type", "family"]),
        "categories": _grouped(events, ["category"], ["family"]),
        "families": _grouped(events, ["family"]),
    }


def bin_range(tokenizer, code: str, value_bin: int | None) -> str | None:
    """The value range of a bin in words (`<= 1.1`, `1.1 to 1.6`, `> 2.3`), from the tokenizer's cut points.

    Bin k holds values above k cut points (`odyssey.tokenizer.binning.bin_index`).
    """
    breaks = tokenizer.bins.get(code)
    if value_bin is None or not breaks:
        return None
    if value_bin <= 0:
        return f"<= {breaks[0]:.4g}"
    if value_bin >= len(breaks):
        return f"> {breaks[-1]:.4g}"
    return f"{breaks[value_bin - 1]:.4g} to {breaks[value_bin]:.4g}"


def describe_events(events: pl.DataFrame, tokenizer, descriptions: Mapping[str, str], top_k: int) -> list[dict]:
    """The `top_k` events with the largest |score| in plain words: description, date, value range, direction."""
    out = []
    for event in events.head(top_k).iter_rows(named=True):
        value_range = bin_range(tokenizer, event["code"], event["value_bin"])
        text = descriptions.get(event["code"]) or event["code"]
        if value_range is not None:
            text = f"{text}: value in bin {event['value_bin'] + 1} of {len(tokenizer.bins[event['code']]) + 1} ({value_range})"
        out.append({
            "time": event["time"].isoformat(sep=" ", timespec="minutes") if event["time"] else None,
            "code": event["code"],
            "description": text,
            "type": event["token_type"].lower(),
            "visit": int(event["visit"]),
            "score": float(event["score"]),
            "direction": "raises" if event["score"] > 0 else "lowers",
        })
    return out


__all__ = [
    "COMPLETENESS_FLOOR",
    "CPU_BATCH",
    "DEFAULT_STEPS",
    "STRUCTURAL_TYPES",
    "TokenAttributions",
    "aggregate",
    "bin_range",
    "code_and_bin",
    "code_category",
    "code_family",
    "describe_events",
    "event_mask_of",
    "integrated_gradients",
    "token_table",
]
