"""Special, time-gap and task tokens with fixed ids, and the token-type enum.

Ids are fixed by the order of `SpecialTokens`: code never spells an id, it names a member
(`SpecialTokens.CLS`). Code tokens follow the specials (and any extra task tokens a config adds).

Time-gap tokens (placed between `[REG]` of one visit and `[VS]` of the next, see `gap_token`):

| whole days between visits | token |
|---|---|
| 0-6, 7-13, 14-20, 21-27 | `[W_0]`, `[W_1]`, `[W_2]`, `[W_3]` |
| 28-59 | `[M_1]` (a gap of 28 or 29 days is "about a month") |
| 60-89, ..., 330-359 | `[M_2]` ... `[M_11]` (month = 30 days, rounded down) |
| 360-365 | `[M_12]` |
| 366 and more | `[LT]` (over a year) |
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class TokenType(IntEnum):
    """What a token stands for; stored per token as `token_type_ids` (int8)."""

    PAD = 0
    SPECIAL = 1  # [CLS] [VS] [VE] [REG] [UNK] [MASK]
    CONDITION = 2
    PROCEDURE = 3
    MEDICATION = 4
    LAB = 5
    VITAL = 6
    TIME_GAP = 7
    TASK = 8
    DEMOGRAPHIC = 9  # static rows such as GENDER//female
    ENCOUNTER = 10  # encounter class at visit start, e.g. ENCOUNTER_START//IMP
    OBSERVATION = 11  # any other observation


class SpecialTokens(IntEnum):
    """Special tokens; the value is the token id. `.token` gives the string, e.g. `[W_0]`."""

    PAD = 0
    UNK = 1
    CLS = 2
    VS = 3
    VE = 4
    REG = 5
    MASK = 6
    W_0 = 7
    W_1 = 8
    W_2 = 9
    W_3 = 10
    M_1 = 11
    M_2 = 12
    M_3 = 13
    M_4 = 14
    M_5 = 15
    M_6 = 16
    M_7 = 17
    M_8 = 18
    M_9 = 19
    M_10 = 20
    M_11 = 21
    M_12 = 22
    LT = 23
    MOR_1M = 24  # task: death within a month of discharge
    LOS_1W = 25  # task: stay of a week or more
    REA_1M = 26  # task: readmission within a month
    C0 = 27  # task: condition groups, in the order of configs/tasks.yaml
    C1 = 28
    C2 = 29
    C3 = 30
    C4 = 31
    C5 = 32

    @property
    def token(self) -> str:
        return f"[{self.name}]"


WEEK_TOKENS = (SpecialTokens.W_0, SpecialTokens.W_1, SpecialTokens.W_2, SpecialTokens.W_3)
MONTH_TOKENS = tuple(SpecialTokens[f"M_{k}"] for k in range(1, 13))
TIME_GAP_TOKENS = (*WEEK_TOKENS, *MONTH_TOKENS, SpecialTokens.LT)
TASK_TOKENS = (
    SpecialTokens.MOR_1M,
    SpecialTokens.LOS_1W,
    SpecialTokens.REA_1M,
    *(SpecialTokens[f"C{k}"] for k in range(6)),
)
# Tokens that open or close a visit; a truncated sequence starts at a visit boundary.
VISIT_TOKENS = (SpecialTokens.VS, SpecialTokens.VE, SpecialTokens.REG)

DAYS_PER_WEEK = 7
DAYS_PER_MONTH = 30
WEEK_GAP_LIMIT_DAYS = DAYS_PER_WEEK * len(WEEK_TOKENS)  # 28: from here on gaps count in months
LONG_GAP_AFTER_DAYS = 365  # more whole days than this: [LT]


def special_token_type(token: SpecialTokens) -> TokenType:
    if token in TIME_GAP_TOKENS:
        return TokenType.TIME_GAP
    if token in TASK_TOKENS:
        return TokenType.TASK
    if token is SpecialTokens.PAD:
        return TokenType.PAD
    return TokenType.SPECIAL


def gap_token(days: int) -> SpecialTokens:
    """The time-gap token for a gap of `days` whole days (see the module table)."""
    if days < 0:
        raise ValueError(f"a gap between visits cannot be negative, got {days} days")
    if days < WEEK_GAP_LIMIT_DAYS:
        return WEEK_TOKENS[days // DAYS_PER_WEEK]
    if days <= LONG_GAP_AFTER_DAYS:
        months = min(max(days // DAYS_PER_MONTH, 1), len(MONTH_TOKENS))
        return MONTH_TOKENS[months - 1]
    return SpecialTokens.LT


def gap_token_ids(days: np.ndarray) -> np.ndarray:
    """Vectorised `gap_token` over an integer array of whole days (int32 token ids)."""
    days = np.asarray(days, dtype=np.int64)
    if (days < 0).any():
        raise ValueError("a gap between visits cannot be negative")
    weeks = np.asarray(WEEK_TOKENS, dtype=np.int32)[np.minimum(days // DAYS_PER_WEEK, len(WEEK_TOKENS) - 1)]
    month_index = np.clip(days // DAYS_PER_MONTH, 1, len(MONTH_TOKENS)) - 1
    months = np.asarray(MONTH_TOKENS, dtype=np.int32)[month_index]
    ids = np.where(days < WEEK_GAP_LIMIT_DAYS, weeks, months)
    return np.where(days > LONG_GAP_AFTER_DAYS, np.int32(SpecialTokens.LT), ids).astype(np.int32)
