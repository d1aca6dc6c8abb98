"""MEDS events → one token sequence per subject (vectorised with polars; see docs/tokens.md).

    [CLS] static... [VS] events [VE] [REG] <gap> [VS] events [VE] [REG] ...

- `[CLS]` and static tokens (GENDER//..., time null in MEDS) open the sequence.
- Each visit (see `visits`) is `[VS]`, its events, `[VE]`, `[REG]`. Events are ordered by time, then by
  event type (`EVENT_TYPE_ORDER`), then by token. `ENCOUNTER_START//<class>` tokens sit right after
  `[VS]`; ENCOUNTER_END rows, `MEDS_DEATH` and `MEDS_BIRTH` never become tokens (configurable).
- `<gap>` before every visit but the first: the time-gap token for the whole days between the previous
  visit's end and this visit's start (`vocab.gap_token`).

Per token: `token_type_ids` (`TokenType`), `ages` (years since MEDS_BIRTH at the token's time; 0 when
the subject has no birth row), `times` (days since the subject's first visit start), `visit_orders`
(0 for [CLS] and static tokens, else the visit number; a gap token takes the visit it opens),
`visit_segments` (1, 2, 1, ... by visit for events; 0 for specials, gaps and static tokens) and
`event_times` (when the fact became available: `issued` when present under `availability: issued`,
else `time`; `[CLS]` and static tokens: the first visit start; `[VS]` and a gap: the visit start;
`[VE]` and `[REG]`: the visit end).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from odyssey.pipelines import schema as S
from odyssey.tokenizer.binning import BIN_SEPARATOR, BREAKS, bin_index
from odyssey.tokenizer.config import TokenizeConfig
from odyssey.tokenizer.visits import VISIT_END, VISIT_ORDER, VISIT_START, assign_visits, build_visits
from odyssey.tokenizer.vocab import (
    DAYS_PER_MONTH,
    DAYS_PER_WEEK,
    LONG_GAP_AFTER_DAYS,
    MONTH_TOKENS,
    WEEK_GAP_LIMIT_DAYS,
    SpecialTokens,
    TokenType,
)

# Output columns (the sequences contract).
INPUT_IDS = "input_ids"
TOKEN_TYPE_IDS = "token_type_ids"
AGES = "ages"
TIMES = "times"
VISIT_ORDERS = "visit_orders"
VISIT_SEGMENTS = "visit_segments"
EVENT_TIMES = "event_times"
SPLIT = "split"
LIST_COLUMNS = (INPUT_IDS, TOKEN_TYPE_IDS, AGES, TIMES, VISIT_ORDERS, VISIT_SEGMENTS, EVENT_TIMES)

TOKEN_TYPE_BY_EVENT: dict[str, TokenType] = {
    S.EventType.CONDITION: TokenType.CONDITION,
    S.EventType.PROCEDURE: TokenType.PROCEDURE,
    S.EventType.MEDICATION: TokenType.MEDICATION,
    S.EventType.LAB: TokenType.LAB,
    S.EventType.VITAL: TokenType.VITAL,
    S.EventType.OBSERVATION: TokenType.OBSERVATION,
    S.EventType.DEMOGRAPHIC: TokenType.DEMOGRAPHIC,
    S.EventType.ENCOUNTER_START: TokenType.ENCOUNTER,
    S.EventType.ENCOUNTER_END: TokenType.ENCOUNTER,
}
# Within one time stamp of a visit: the encounter class first, then what was found, done, given, measured.
EVENT_TYPE_ORDER: tuple[S.EventType, ...] = (
    S.EventType.ENCOUNTER_START,
    S.EventType.CONDITION,
    S.EventType.PROCEDURE,
    S.EventType.MEDICATION,
    S.EventType.LAB,
    S.EventType.VITAL,
    S.EventType.OBSERVATION,
    S.EventType.DEMOGRAPHIC,
    S.EventType.ENCOUNTER_END,
)

# Slots order the tokens of one visit: gap, [VS], events, [VE], [REG]. Visit 0 holds [CLS] and static tokens.
_SLOT_GAP, _SLOT_VS, _SLOT_EVENT, _SLOT_VE, _SLOT_REG = range(5)
_SLOT_CLS, _SLOT_STATIC = _SLOT_GAP, _SLOT_VS
_MICROSECONDS_PER_DAY = 86_400 * 1_000_000
_DAYS_PER_YEAR = 365.25
_NO_VISIT = 0
_SEGMENT_SPECIAL = 0

TOKEN = "_token"
TOKEN_ID = "_token_id"
TOKEN_TYPE = "_token_type"
AVAILABLE = "_available"
_RANK = "_rank"
_SLOT = "_slot"


def token_string(code: pl.Expr) -> pl.Expr:
    """A code as a vocabulary word: whitespace becomes `_` (the tokenizer splits on whitespace)."""
    return code.str.replace_all(r"\s", "_")


def excluded(config: TokenizeConfig) -> pl.Expr:
    """True for rows that never become tokens under `config`."""
    prefixes = list(config.exclude_prefixes)
    if not config.encounter_class_tokens:
        prefixes.append(S.ENCOUNTER_START_PREFIX)
    code = pl.col(S.CODE)
    hit = code.is_in(list(config.exclude_codes))
    for prefix in prefixes:
        hit = hit | (code == prefix) | code.str.starts_with(prefix + S.CODE_SEPARATOR)
    if not config.static_tokens:
        hit = hit | pl.col(S.TIME).is_null()
    return hit


def token_type_of(event_type: pl.Expr) -> pl.Expr:
    mapping = {str(k): int(v) for k, v in TOKEN_TYPE_BY_EVENT.items()}
    return event_type.replace_strict(mapping, default=int(TokenType.OBSERVATION), return_dtype=pl.Int8)


def _event_rank(event_type: pl.Expr) -> pl.Expr:
    mapping = {str(t): rank for rank, t in enumerate(EVENT_TYPE_ORDER)}
    return event_type.replace_strict(mapping, default=len(EVENT_TYPE_ORDER), return_dtype=pl.Int8)


def gap_token_id(days: pl.Expr) -> pl.Expr:
    """Polars twin of `vocab.gap_token` on whole days (int32 ids)."""
    weeks = pl.lit(int(SpecialTokens.W_0)) + days // DAYS_PER_WEEK
    months = pl.lit(int(SpecialTokens.M_1)) + days.floordiv(DAYS_PER_MONTH).clip(1, len(MONTH_TOKENS)) - 1
    return (
        pl.when(days < WEEK_GAP_LIMIT_DAYS)
        .then(weeks)
        .when(days <= LONG_GAP_AFTER_DAYS)
        .then(months)
        .otherwise(pl.lit(int(SpecialTokens.LT)))
        .cast(pl.Int32)
    )


def event_tokens(
    events: pl.LazyFrame, vocab: pl.LazyFrame, bins: pl.LazyFrame, max_breaks: int
) -> pl.LazyFrame:
    """Add `_token` (word, binned when the code has bins and a value) and `_token_id` ([UNK] if unknown)."""
    word = token_string(pl.col(S.CODE))
    binned = events.join(bins, on=S.CODE, how="left").with_columns(
        bin_index(pl.col(S.NUMERIC_VALUE), pl.col(BREAKS), max_breaks).alias("_bin")
    )
    with_word = binned.with_columns(
        pl.when(pl.col("_bin").is_not_null())
        .then(pl.concat_str([word, pl.lit(BIN_SEPARATOR), pl.col("_bin").cast(pl.String)]))
        .otherwise(word)
        .alias(TOKEN)
    ).drop(BREAKS, "_bin")
    return with_word.join(vocab, on=TOKEN, how="left").with_columns(
        pl.col(TOKEN_ID).fill_null(int(SpecialTokens.UNK)).cast(pl.Int32)
    )


@dataclass
class ChunkCounts:
    """What one chunk contributed (summed into the TokenizeReport)."""

    events: int = 0
    tokens: int = 0
    subjects: int = 0
    subjects_without_events: int = 0
    subjects_without_birth: int = 0
    unknown_tokens: int = 0
    visits: int = 0


def build_sequences(
    events: pl.LazyFrame,
    vocab: pl.LazyFrame,
    bins: pl.LazyFrame,
    max_breaks: int,
    splits: pl.DataFrame | None,
    config: TokenizeConfig,
) -> tuple[pl.DataFrame, ChunkCounts]:
    """Sequences (one row per subject, list columns) for the subjects in `events`."""
    rows = events.select(
        S.SUBJECT_ID, S.TIME, S.CODE, S.NUMERIC_VALUE, S.ENCOUNTER_ID, S.EVENT_TYPE, S.ISSUED
    ).collect()
    counts = ChunkCounts(events=rows.height)
    births = (
        rows.lazy()
        .filter(pl.col(S.CODE) == S.BIRTH_CODE)
        .group_by(S.SUBJECT_ID)
        .agg(pl.col(S.TIME).min().alias("_birth"))
    )
    timed = rows.lazy().filter(pl.col(S.TIME).is_not_null())
    tokens_in = rows.lazy().filter(~excluded(config))
    visit_defining = timed.filter(~pl.col(S.CODE).is_in([S.BIRTH_CODE, S.DEATH_CODE]))
    token_rows = tokens_in.filter(pl.col(S.TIME).is_not_null())
    visits = build_visits(
        visit_defining.filter(pl.col(S.ENCOUNTER_ID).is_not_null()).select(
            S.SUBJECT_ID, S.ENCOUNTER_ID, S.TIME
        ),
        token_rows.filter(pl.col(S.ENCOUNTER_ID).is_null()).select(S.SUBJECT_ID, S.TIME),
    ).collect()
    counts.visits = visits.height
    first_visit = visits.lazy().group_by(S.SUBJECT_ID).agg(pl.col(VISIT_START).min().alias("_t0"))

    available = pl.col(S.TIME)
    if config.availability == "issued":
        available = pl.coalesce(pl.col(S.ISSUED), pl.col(S.TIME))
    visit_events = (
        event_tokens(assign_visits(token_rows, visits.lazy()), vocab, bins, max_breaks)
        .with_columns(
            pl.lit(_SLOT_EVENT, pl.Int8).alias(_SLOT),
            _event_rank(pl.col(S.EVENT_TYPE)).alias(_RANK),
            token_type_of(pl.col(S.EVENT_TYPE)).alias(TOKEN_TYPE),
            available.alias(AVAILABLE),
        )
        .select(
            S.SUBJECT_ID,
            VISIT_ORDER,
            _SLOT,
            S.TIME,
            _RANK,
            TOKEN,
            S.NUMERIC_VALUE,
            TOKEN_ID,
            TOKEN_TYPE,
            AVAILABLE,
        )
    )
    static = (
        event_tokens(tokens_in.filter(pl.col(S.TIME).is_null()), vocab, bins, max_breaks)
        .join(first_visit, on=S.SUBJECT_ID, how="inner")
        .with_columns(
            pl.lit(_NO_VISIT, pl.Int32).alias(VISIT_ORDER),
            pl.lit(_SLOT_STATIC, pl.Int8).alias(_SLOT),
            pl.col("_t0").alias(S.TIME),
            pl.lit(0, pl.Int8).alias(_RANK),
            token_type_of(pl.col(S.EVENT_TYPE)).alias(TOKEN_TYPE),
            pl.col("_t0").alias(AVAILABLE),
        )
        .select(visit_events.collect_schema().names())
    )

    def special(
        frame: pl.LazyFrame, slot: int, at: str, token_id: pl.Expr, token_type: TokenType
    ) -> pl.LazyFrame:
        return frame.select(
            S.SUBJECT_ID,
            pl.col(VISIT_ORDER),
            pl.lit(slot, pl.Int8).alias(_SLOT),
            pl.col(at).alias(S.TIME),
            pl.lit(0, pl.Int8).alias(_RANK),
            pl.lit(None, pl.String).alias(TOKEN),
            pl.lit(None, pl.Float32).alias(S.NUMERIC_VALUE),
            token_id.cast(pl.Int32).alias(TOKEN_ID),
            pl.lit(int(token_type), pl.Int8).alias(TOKEN_TYPE),
            pl.col(at).alias(AVAILABLE),
        )

    visit_frame = visits.lazy().with_columns(pl.col(VISIT_END).shift(1).over(S.SUBJECT_ID).alias("_prev_end"))
    gaps = visit_frame.filter(pl.col("_prev_end").is_not_null()).with_columns(
        ((pl.col(VISIT_START) - pl.col("_prev_end")).dt.total_microseconds() // _MICROSECONDS_PER_DAY).alias(
            "_days"
        )
    )
    cls = first_visit.with_columns(pl.lit(_NO_VISIT, pl.Int32).alias(VISIT_ORDER))
    parts = [
        special(cls, _SLOT_CLS, "_t0", pl.lit(int(SpecialTokens.CLS)), TokenType.SPECIAL),
        static,
        special(gaps, _SLOT_GAP, VISIT_START, gap_token_id(pl.col("_days")), TokenType.TIME_GAP),
        special(visit_frame, _SLOT_VS, VISIT_START, pl.lit(int(SpecialTokens.VS)), TokenType.SPECIAL),
        visit_events,
        special(visit_frame, _SLOT_VE, VISIT_END, pl.lit(int(SpecialTokens.VE)), TokenType.SPECIAL),
        special(visit_frame, _SLOT_REG, VISIT_END, pl.lit(int(SpecialTokens.REG)), TokenType.SPECIAL),
    ]
    years = pl.lit(_DAYS_PER_YEAR * _MICROSECONDS_PER_DAY)
    token_frame = (
        pl.concat(parts, how="vertical")
        .join(first_visit, on=S.SUBJECT_ID, how="inner")
        .join(births, on=S.SUBJECT_ID, how="left")
        .sort(S.SUBJECT_ID, VISIT_ORDER, _SLOT, S.TIME, _RANK, TOKEN, S.NUMERIC_VALUE, nulls_last=False)
        .with_columns(
            ((pl.col(S.TIME) - pl.col("_birth")).dt.total_microseconds() / years)
            .fill_null(0.0)
            .cast(pl.Float32)
            .alias(AGES),
            ((pl.col(S.TIME) - pl.col("_t0")).dt.total_microseconds() / _MICROSECONDS_PER_DAY)
            .cast(pl.Float32)
            .alias(TIMES),
            pl.when(pl.col(_SLOT) == _SLOT_EVENT)
            .then(2 - pl.col(VISIT_ORDER) % 2)
            .otherwise(_SEGMENT_SPECIAL)
            .cast(pl.Int8)
            .alias(VISIT_SEGMENTS),
        )
    )
    sequences = (
        token_frame.group_by(S.SUBJECT_ID, maintain_order=True)
        .agg(
            pl.col(TOKEN_ID).alias(INPUT_IDS),
            pl.col(TOKEN_TYPE).alias(TOKEN_TYPE_IDS),
            pl.col(AGES),
            pl.col(TIMES),
            pl.col(VISIT_ORDER).alias(VISIT_ORDERS),
            pl.col(VISIT_SEGMENTS),
            pl.col(AVAILABLE).alias(EVENT_TIMES),
            pl.col("_birth").is_null().any().alias("_no_birth"),
            (pl.col(TOKEN_ID) == int(SpecialTokens.UNK)).sum().alias("_unknown"),
        )
        .collect()
    )
    all_subjects = rows.select(pl.col(S.SUBJECT_ID).n_unique()).item()
    counts.subjects = sequences.height
    counts.subjects_without_events = all_subjects - sequences.height
    counts.subjects_without_birth = int(sequences["_no_birth"].sum())
    counts.unknown_tokens = int(sequences["_unknown"].sum())
    counts.tokens = int(sequences[INPUT_IDS].list.len().sum())
    if splits is not None:
        sequences = sequences.join(splits, on=S.SUBJECT_ID, how="left")
    else:
        sequences = sequences.with_columns(pl.lit(config.train_split).alias(SPLIT))
    return sequences.select(S.SUBJECT_ID, SPLIT, *LIST_COLUMNS), counts
