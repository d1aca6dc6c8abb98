"""Autoregressive futures from EHRMamba: the history is read once, then one recurrent step per token.

Each history goes through the parallel scan once (`use_cache=True`), its recurrent state
(`EHRMambaCache`: per layer the conv window and the SSM state) is copied into K rows, and the K futures
are sampled together, one token per step for every row, with the model's O(1) recurrent step
(`EHRMambaModel` with `cache=`). Several histories share one batch of steps. Side inputs of the sampled
tokens come from `SequenceRules` (the tokenizer's grammar run forwards).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from odyssey.io import read_json
from odyssey.models import EHRMambaCache, EHRMambaConfig, EHRMambaForPretraining
from odyssey.models.mixer import MixerState
from odyssey.tokenizer import EHRTokenizer, SpecialTokens

from .rules import RowState, SequenceRules, has_birth_ages

MODEL_SUBDIR = "model"  # `odyssey pretrain` and `odyssey finetune` write their model here
TOKENIZER_SUBDIR = "tokenizer"
CONFIG_FILE = "config.json"
PRETRAINING_ARCHITECTURE = "EHRMambaForPretraining"
INPUT_COLUMNS = ("input_ids", "token_type_ids", "ages", "times", "visit_orders", "visit_segments")
_FLOAT_COLUMNS = ("ages", "times")


class ForecastModelError(ValueError):
    """The model folder cannot generate with these sequences (missing, no next-token head, other tokenizer)."""


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A pretraining or finetuning run folder, or its `model/` folder -> the folder with config.json."""
    path = Path(path)
    for candidate in (path, path / MODEL_SUBDIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} here or in {path / MODEL_SUBDIR} (an `odyssey pretrain` run?)")


def load_generator(path: str | os.PathLike, tokenizer: EHRTokenizer, device: str | torch.device = "cpu"
                   ) -> EHRMambaForPretraining:
    """The model with its next-token head, checked against `tokenizer`, in eval mode on `device`.

    A finetuned task model has no head of its own; it generates when its head is tied to the concept
    embeddings (`tie_word_embeddings`, the default), since the pretraining head was exactly that matrix.
    """
    model_dir = resolve_model_dir(path)
    config = EHRMambaConfig.from_pretrained(model_dir)
    if config.vocab_size != tokenizer.vocab_size:
        raise ForecastModelError(
            f"{model_dir}: the model has a vocabulary of {config.vocab_size} tokens but the sequences' tokenizer "
            f"has {tokenizer.vocab_size}; forecast with sequences made by the model's tokenizer"
        )
    saved = model_dir / TOKENIZER_SUBDIR
    if saved.is_dir() and EHRTokenizer.from_pretrained(saved).get_vocab() != tokenizer.get_vocab():
        raise ForecastModelError(f"{model_dir}: the model's tokenizer ({saved}) differs from the sequences' tokenizer")
    architectures = read_json(model_dir / CONFIG_FILE).get("architectures") or []
    if PRETRAINING_ARCHITECTURE not in architectures and not config.tie_word_embeddings:
        raise ForecastModelError(
            f"{model_dir}: a {architectures or 'model'} without a next-token head (its word embeddings are not "
            "tied); forecast with the pretraining run"
        )
    model = EHRMambaForPretraining.from_pretrained(model_dir)
    return model.to(device).eval()


@dataclass
class History:
    """One prompt for generation: a cut, truncated sequence row (numpy columns, `odyssey.tokenizer` rows)."""

    row: Mapping[str, Any]

    def tensors(self, device) -> dict[str, torch.Tensor]:
        return {c: torch.as_tensor(np.asarray(self.row[c]), device=device)[None].to(
            torch.float32 if c in _FLOAT_COLUMNS else torch.long) for c in INPUT_COLUMNS}


@dataclass
class Futures:
    """Generated tokens of rows (history index, sample): per row arrays of equal length."""

    history: np.ndarray  # (rows,) index into the histories given
    sample: np.ndarray  # (rows,)
    columns: list[dict[str, np.ndarray]]  # per row: the generated tokens' model inputs (`INPUT_COLUMNS`)
    reference_times: np.ndarray  # (rows,) the history's last token time (days), where the future starts

    @property
    def tokens(self) -> list[np.ndarray]:
        return [c["input_ids"] for c in self.columns]

    @property
    def times(self) -> list[np.ndarray]:
        """Days since the subject's first visit (the tokenizer's `times`)."""
        return [c["times"] for c in self.columns]

    @property
    def visit_orders(self) -> list[np.ndarray]:
        return [c["visit_orders"] for c in self.columns]

    @property
    def token_types(self) -> list[np.ndarray]:
        return [c["token_type_ids"] for c in self.columns]


def sample_top_p(logits: torch.Tensor, top_p: float, temperature: float, generator: torch.Generator | None
                 ) -> torch.Tensor:
    """One token per row from `logits` (rows, vocab; -inf = forbidden): nucleus sampling at `temperature`.

    Keeps the most likely tokens until their probability reaches `top_p` (at least one), renormalises
    and draws. `temperature == 0` takes the most likely token (greedy).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    kept = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept[:, 0] = sorted_probs[:, 0]
    choice = torch.multinomial(kept, 1, generator=generator)
    return order.gather(1, choice)[:, 0]


def repeat_cache(caches: Sequence[EHRMambaCache], samples: int) -> EHRMambaCache:
    """One cache of len(caches) * samples rows: each single-row cache repeated `samples` times, in order."""
    layers = []
    for per_history in zip(*(c.layers for c in caches), strict=True):
        layers.append(MixerState(
            conv_state=torch.cat([s.conv_state.expand(samples, -1, -1) for s in per_history]).contiguous(),
            ssm_state=torch.cat([s.ssm_state.expand(samples, -1, -1) for s in per_history]).contiguous(),
        ))
    last_times = torch.cat([c.last_times.expand(samples) for c in caches]).contiguous()
    return EHRMambaCache(layers=layers, last_times=last_times, seen_tokens=max(c.seen_tokens for c in caches))


@torch.no_grad()
def prefill(model: EHRMambaForPretraining, history: History, device) -> tuple[torch.Tensor, EHRMambaCache]:
    """Read a history once in parallel: the next-token logits after its last token and its state."""
    out = model(**history.tensors(device), use_cache=True)
    return out.logits[0, -1].float(), out.cache


@torch.no_grad()
def generate(
    model: EHRMambaForPretraining,
    histories: Sequence[History],
    rules: SequenceRules,
    samples: int,
    max_visits: int,
    max_tokens: int,
    top_p: float = 0.95,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    step_logits: list[torch.Tensor] | None = None,
) -> Futures:
    """`samples` futures per history, each ending after `max_visits` generated visits or `max_tokens` tokens.

    `step_logits`, when given, receives the raw (unmasked) logits of every step, (rows, vocab) each.
    """
    if samples < 1 or max_visits < 1 or max_tokens < 1:
        raise ValueError("samples, max_visits and max_tokens must be at least 1")
    device = next(model.parameters()).device
    first_logits, caches = [], []
    for history in histories:
        logits, cache = prefill(model, history, device)
        first_logits.append(logits.expand(samples, -1))
        caches.append(cache)
    cache = repeat_cache(caches, samples)
    logits = torch.cat(first_logits)

    def last(column: str, dtype) -> torch.Tensor:
        values = [np.asarray(h.row[column])[-1] for h in histories]
        return torch.as_tensor(np.repeat(np.asarray(values), samples), dtype=dtype, device=device)

    has_age = torch.as_tensor(np.repeat([has_birth_ages(h.row["ages"]) for h in histories], samples), device=device)
    state: RowState = rules.initial_state(
        last("input_ids", torch.long), last("token_type_ids", torch.long), last("times", torch.float32),
        last("ages", torch.float32), last("visit_orders", torch.long), has_age,
    )
    reference_times = state.time.cpu().numpy().copy()
    rows = len(histories) * samples
    record: dict[str, list[torch.Tensor]] = {c: [] for c in INPUT_COLUMNS}
    active_steps: list[torch.Tensor] = []
    while not bool(state.done.all()):
        if step_logits is not None:
            step_logits.append(logits.clone())
        tokens = sample_top_p(rules.mask(logits, state.phase), top_p, temperature, generator)
        active = ~state.done
        tokens = torch.where(active, tokens, torch.full_like(tokens, int(SpecialTokens.PAD)))
        before = _snapshot(state)
        inputs = rules.advance(state, tokens)
        _restore_inactive(state, before, active)
        for column in record:
            record[column].append(inputs[column])
        active_steps.append(active)
        state.done = state.done | (state.visits_done >= max_visits) | (state.tokens_done >= max_tokens)
        if bool(state.done.all()):
            break
        step = {c: inputs[c][:, None] for c in INPUT_COLUMNS}
        logits = model(**step, attention_mask=active.long()[:, None], cache=cache).logits[:, -1].float()
    kept = torch.stack(active_steps, dim=1).cpu().numpy()  # (rows, steps)
    columns = {c: torch.stack(v, dim=1).cpu().numpy() for c, v in record.items()}
    return Futures(
        history=np.repeat(np.arange(len(histories)), samples), sample=np.tile(np.arange(samples), len(histories)),
        columns=[{c: values[r][kept[r]] for c, values in columns.items()} for r in range(rows)],
        reference_times=reference_times,
    )


def _snapshot(state: RowState) -> dict[str, torch.Tensor]:
    return {name: getattr(state, name).clone() for name in ("phase", "time", "age", "visit_order", "visits_done",
                                                             "tokens_done")}


def _restore_inactive(state: RowState, before: dict[str, torch.Tensor], active: torch.Tensor) -> None:
    """Finished rows keep their state (the padding fed to them is no token of theirs)."""
    for name, value in before.items():
        setattr(state, name, torch.where(active, getattr(state, name), value))
