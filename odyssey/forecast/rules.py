"""The tokenizer's sequence rules, turned around to derive a generated token's side inputs.

A stored sequence is `[CLS] static.. [VS] e e [VE] [REG] <gap> [VS] e [VE] [REG] ...` (docs/tokens.md).
Generation follows the same grammar, one phase at a time, and only tokens the grammar allows next are
sampled (all others get a logit of -inf):

| phase | allowed next | what the token sets |
|---|---|---|
| after `[REG]` | a time-gap token | visit order + 1, time + the gap's days, age + the same time |
| after a gap | `[VS]` | |
| after `[VS]` | an event token | |
| in a visit | an event token or `[VE]` | |
| after `[VE]` | `[REG]` | closes the visit (one more generated visit) |

Never sampled: `[PAD]`, `[CLS]`, `[MASK]`, `[UNK]` (unless asked for), task tokens, static
(demographic) tokens. Side inputs follow `tokenizer/build.py`: an event's token type is its vocabulary
category, its visit segment 2 - order % 2; specials and gaps have segment 0; a gap takes the order of
the visit it opens. Generated visits have no duration (the model never says how long a stay lasts), so
every token of a visit carries the visit's start time, and the next gap counts from it.

A gap token stands for a range of whole days (`odyssey.tokenizer.gap_token`); time advances by the
middle of that range (`[W_1]`, 7-13 days: 10.5 days) and by the range's start for the open-ended `[LT]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from odyssey.pipelines import schema as S
from odyssey.tokenizer import EHRTokenizer, SpecialTokens, TokenType, gap_token
from odyssey.tokenizer.binning import BIN_SEPARATOR
from odyssey.tokenizer.build import word_of
from odyssey.tokenizer.vocab import LONG_GAP_AFTER_DAYS, TIME_GAP_TOKENS

DAYS_PER_YEAR = 365.25  # the tokenizer's age unit (tokenizer/build.py)
SEGMENT_OF_SPECIALS = 0
# Token types that never stand for a generated event.
NOT_EVENT_TYPES = (TokenType.PAD, TokenType.SPECIAL, TokenType.TIME_GAP, TokenType.TASK, TokenType.DEMOGRAPHIC)


class Phase(IntEnum):
    """Where a sequence stands in the grammar (what the last token was)."""

    AFTER_REG = 0
    AFTER_GAP = 1
    AFTER_VS = 2
    IN_VISIT = 3
    AFTER_VE = 4


def visit_segment(visit_order: torch.Tensor) -> torch.Tensor:
    """Events alternate segments 1, 2, 1, ... by visit (tokenizer/build.py)."""
    return 2 - visit_order % 2


def gap_days_table() -> dict[int, float]:
    """Days a time-gap token advances the clock: the middle of its whole-day range ([LT]: its start)."""
    ranges: dict[int, list[int]] = {}
    for days in range(LONG_GAP_AFTER_DAYS + 2):
        ranges.setdefault(int(gap_token(days)), []).append(days)
    table = {}
    for token in TIME_GAP_TOKENS:
        days = ranges[int(token)]
        # Whole days d cover real gaps in [d, d + 1): the range [first, last + 1) has this middle.
        table[int(token)] = float(days[0]) if token is SpecialTokens.LT else (days[0] + days[-1] + 1) / 2
    return table


def phase_after(token_id: int, token_type: int) -> Phase:
    """The phase a sequence is in after `token_id` (any real token of a stored or generated sequence)."""
    if token_id == SpecialTokens.REG:
        return Phase.AFTER_REG
    if token_id == SpecialTokens.VS:
        return Phase.AFTER_VS
    if token_id == SpecialTokens.VE:
        return Phase.AFTER_VE
    if token_type == TokenType.TIME_GAP:
        return Phase.AFTER_GAP
    if token_id == SpecialTokens.CLS or token_type == TokenType.DEMOGRAPHIC:
        raise ValueError("a history must hold at least one visit before a future can follow it")
    return Phase.IN_VISIT


@dataclass
class RowState:
    """Per generated row (batch dimension): grammar phase and the side inputs of its last token."""

    phase: torch.Tensor  # long
    time: torch.Tensor  # float32 days since the subject's first visit
    age: torch.Tensor  # float32 years (0 for subjects without a birth row, as the tokenizer writes)
    has_age: torch.Tensor  # bool
    visit_order: torch.Tensor  # long
    visits_done: torch.Tensor  # long, generated visits closed by [REG]
    tokens_done: torch.Tensor  # long, generated tokens
    done: torch.Tensor  # bool


class SequenceRules:
    """Per-vocabulary lookups: token types, allowed tokens per phase, gap days, event codes."""

    def __init__(self, tokenizer: EHRTokenizer, allow_unknown: bool = False, device: torch.device | str = "cpu"):
        size = tokenizer.vocab_size
        self.vocab_size = size
        self.token_types = torch.tensor(tokenizer.token_types, dtype=torch.long, device=device)
        events = ~torch.isin(self.token_types, torch.tensor([int(t) for t in NOT_EVENT_TYPES], device=device))
        events[SpecialTokens.UNK] = allow_unknown
        gaps = torch.zeros(size, dtype=torch.bool, device=device)
        gaps[[int(t) for t in TIME_GAP_TOKENS]] = True
        allowed = torch.zeros(len(Phase), size, dtype=torch.bool, device=device)
        allowed[Phase.AFTER_REG] = gaps
        allowed[Phase.AFTER_GAP, SpecialTokens.VS] = True
        allowed[Phase.AFTER_VS] = events
        allowed[Phase.IN_VISIT] = events
        allowed[Phase.IN_VISIT, SpecialTokens.VE] = True
        allowed[Phase.AFTER_VE, SpecialTokens.REG] = True
        self.allowed = allowed
        self.is_event = events
        self.gap_days = torch.zeros(size, dtype=torch.float32, device=device)
        for token, days in gap_days_table().items():
            self.gap_days[token] = days
        self.codes = event_codes(tokenizer)

    def mask(self, logits: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """`logits` (rows, vocab) with every token the grammar forbids after `phase` set to -inf."""
        return logits.masked_fill(~self.allowed[phase], float("-inf"))

    def initial_state(self, last_ids, last_types, last_times, last_ages, last_orders, has_age) -> RowState:
        """The state after each history's last token (1-D tensors, one entry per row)."""
        phases = [phase_after(int(i), int(t)) for i, t in zip(last_ids.tolist(), last_types.tolist(), strict=True)]
        device = last_times.device
        zeros = torch.zeros(len(phases), dtype=torch.long, device=device)
        return RowState(
            phase=torch.tensor([int(p) for p in phases], dtype=torch.long, device=device),
            time=last_times.float().clone(), age=last_ages.float().clone(), has_age=has_age.bool().clone(),
            visit_order=last_orders.long().clone(), visits_done=zeros.clone(), tokens_done=zeros.clone(),
            done=torch.zeros(len(phases), dtype=torch.bool, device=device),
        )

    def advance(self, state: RowState, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Append `tokens` (rows,) to every row: update `state` in place, return the tokens' side inputs."""
        is_gap = self.token_types[tokens] == TokenType.TIME_GAP
        days = torch.where(is_gap, self.gap_days[tokens], torch.zeros_like(state.time))
        state.time = state.time + days
        state.age = torch.where(state.has_age, state.age + days / DAYS_PER_YEAR, state.age)
        state.visit_order = state.visit_order + is_gap.long()
        event = self.is_event[tokens]
        segments = torch.where(event, visit_segment(state.visit_order), torch.full_like(tokens, SEGMENT_OF_SPECIALS))
        phase = torch.full_like(tokens, int(Phase.IN_VISIT))
        phase = torch.where(tokens == SpecialTokens.REG, int(Phase.AFTER_REG), phase)
        phase = torch.where(tokens == SpecialTokens.VS, int(Phase.AFTER_VS), phase)
        phase = torch.where(tokens == SpecialTokens.VE, int(Phase.AFTER_VE), phase)
        state.phase = torch.where(is_gap, int(Phase.AFTER_GAP), phase)
        state.visits_done = state.visits_done + (tokens == SpecialTokens.REG).long()
        state.tokens_done = state.tokens_done + 1
        return {
            "input_ids": tokens, "token_type_ids": self.token_types[tokens], "ages": state.age.clone(),
            "times": state.time.clone(), "visit_orders": state.visit_order.clone(), "visit_segments": segments,
        }


def event_codes(tokenizer: EHRTokenizer) -> list[str | None]:
    """Per token id: the code an event token stands for (a value bin `CODE_k` counts as `CODE`), else None.

    `[UNK]` and the tokens of `NOT_EVENT_TYPES` stand for no code.
    """
    binned = {word_of(code) for code in tokenizer.bins}
    skipped = {int(t) for t in NOT_EVENT_TYPES}
    codes: list[str | None] = []
    for token_id, token_type in enumerate(tokenizer.token_types):
        if token_type in skipped or token_id == SpecialTokens.UNK:
            codes.append(None)
            continue
        word = tokenizer.id_to_token(token_id)
        base, separator, index = word.rpartition(BIN_SEPARATOR)
        codes.append(base if separator and index.isdigit() and base in binned else word)
    return codes


def outcome_token_ids(tokenizer: EHRTokenizer, inpatient_class: str) -> dict[str, int | None]:
    """Ids of the tokens zero-shot risks look for: death and the start of an inpatient stay (None: absent)."""
    return {
        "death": tokenizer.token_to_id(word_of(S.DEATH_CODE)),
        "admission": tokenizer.token_to_id(word_of(S.make_code(S.ENCOUNTER_START_PREFIX, inpatient_class))),
    }


def has_birth_ages(ages: np.ndarray) -> bool:
    """The tokenizer writes age 0 everywhere for a subject without a birth row; then ages stay 0."""
    return bool(np.any(np.asarray(ages) != 0))
