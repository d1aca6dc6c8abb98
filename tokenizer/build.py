"""MEDS events → one token sequence per subject (vectorised with polars; see docs/tokens.md).

    [CLS] static... [VS] events [VE] [REG] <gap> [VS] events [VE] [REG] ...

- `[CLS]` and static tokens (GENDER//..., time null in MEDS) open the sequence.
- Each visit (see `visits`) is `[VS]`, its events, `[VE]`, `[REG]`. Events are ordered by time, then by
  event type (`EVENT_TYPE_ORDER`), then by token id, then by input order. `ENCOUNTER_START//<class>`
  tokens sit right after `[VS]`; ENCOUNTER_END rows, `MEDS_DEATH` and `MEDS_BIRTH` never become tokens
  (configurable).
- `<gap>` before every visit but the first: the time-gap token for the whole days between the previous
  visit's end and this visit's start (`vocab.gap_token`).

Per token: `token_type_ids` (`TokenType`), `ages` (years since MEDS_BIRTH at the token's time; 0 when
the subject has no birth row), `times` (days since the subject's first visit start), `visit_orders`
(0 for [CLS] and static tokens, else the visit number; a gap token takes the visit it opens),
`visit_segments` (1, 2, 1, ... by visit for events; 0 for specials, gaps and static tokens) and
`event_times` (when the fact became available: `issued` when present (and not before `time`) under
`availability: issued`, else `time`; `[CLS]` and static tokens: the first visit start; `[VS]` and a gap:
the visit start; `[VE]` and `[REG]`: the visit end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl

from odyssey.pipelines import schema as S
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

_MICROSECONDS_PER_DAY = 86_400 * 1_000_000
_DAYS_PER_YEAR = 365.25
_NO_VISIT = 0
_SEGMENT_SPECIAL = 0

TOKEN_ID = "_token_id"
TOKEN_TYPE = "_token_type"
AVAILABLE = "_available"
_SLOT = "_slot"


_WHITESPACE = re.compile(r"\s")


def word_of(code: str) -> str:
    """A code as a vocabulary word: whitespace becomes `_` (the tokenizer splits on whitespace)."""
    return _WHITESPACE.sub("_", code)


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


_CODE_INDEX = "_code_index"


@dataclass(frozen=True)
class CodeTable:
    """Per distinct raw code of a chunk (index = position in `codes`): plain-word id, cut points, bin ids.

    Built by `EHRTokenizer.code_table`; ids are -1 where the word is not in the vocabulary, cut points NaN
    beyond a code's last one.
    """

    codes: list[str]
    bare_ids: np.ndarray  # int32 [n_codes]
    breaks: np.ndarray  # float64 [n_codes, max_breaks]
    bin_ids: np.ndarray  # int32 [n_codes, max_breaks + 1]
    has_bins: np.ndarray  # bool [n_codes]


def event_tokens(events: pl.LazyFrame, table: CodeTable) -> pl.LazyFrame:
    """Add `_token_id`: the binned word when the code has bins and a value, else the plain word, else [UNK].

    Vectorised as gathers from `table` by each row's code index (no string joins).
    """
    index = pl.col(_CODE_INDEX)
    value = pl.col(S.NUMERIC_VALUE).cast(pl.Float64)
    has_value = value.is_not_null() & value.is_not_nan() & pl.lit(pl.Series(table.has_bins)).gather(index)
    above = [
        (value > pl.lit(pl.Series(table.breaks[:, j])).gather(index)).fill_null(False).cast(pl.Int64)
        for j in range(table.breaks.shape[1])
    ]
    bin_of = pl.sum_horizontal(above) if above else pl.lit(0, pl.Int64)
    binned = pl.lit(pl.Series(table.bin_ids.ravel())).gather(index * table.bin_ids.shape[1] + bin_of)
    bare = pl.lit(pl.Series(table.bare_ids)).gather(index)
    token_id = pl.when(has_value).then(binned).otherwise(bare)
    token_id = pl.when(token_id < 0).then(pl.lit(int(SpecialTokens.UNK))).otherwise(token_id)
    if _CODE_INDEX not in events.collect_schema().names():
        events = events.with_columns(code_index(table))
    return events.with_columns(token_id.cast(pl.Int32).alias(TOKEN_ID))


def code_index(table: CodeTable) -> pl.Expr:
    """Each row's position in `table.codes` (int64): one string pass, then every code test is a gather."""
    return pl.col(S.CODE).cast(pl.Enum(table.codes)).to_physical().cast(pl.Int64).alias(_CODE_INDEX)


def excluded_code(code: str, config: TokenizeConfig) -> bool:
    """Python twin of `excluded` for one code (time-null rows aside)."""
    prefixes = list(config.exclude_prefixes)
    if not config.encounter_class_tokens:
        prefixes.append(S.ENCOUNTER_START_PREFIX)
    return code in config.exclude_codes or any(
        code == p or code.startswith(p + S.CODE_SEPARATOR) for p in prefixes
    )


def _code_flag(flags: list[bool]) -> pl.Expr:
    return pl.lit(pl.Series(flags, dtype=pl.Boolean)).gather(pl.col(_CODE_INDEX))


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


# Ordering key of a token (one int64, so one cheap sort): the run of equal (subject, time) event rows it
# belongs to, then a slot, then the token id. Slots place [CLS], static tokens, the gap and [VS] before
# the first run of a visit, events by type rank, and [VE] [REG] after its last run.
_TOKEN_ID_BITS = 24
_SLOT_BITS = 4
_SLOT_CLS, _SLOT_STATIC, _SLOT_GAP, _SLOT_VS, _SLOT_FIRST_EVENT = range(5)
_SLOT_VE, _SLOT_REG = 2**_SLOT_BITS - 2, 2**_SLOT_BITS - 1
MAX_VOCAB_SIZE = 2**_TOKEN_ID_BITS
_RUN = "_run"
_KEY = "_key"


def _key(run: pl.Expr, slot: pl.Expr | int, token_id: pl.Expr | int = 0) -> pl.Expr:
    slot = pl.lit(slot) if isinstance(slot, int) else slot
    token_id = pl.lit(token_id) if isinstance(token_id, int) else token_id
    return (
        run.cast(pl.Int64) * 2 ** (_SLOT_BITS + _TOKEN_ID_BITS)
        + slot.cast(pl.Int64) * 2**_TOKEN_ID_BITS
        + token_id.cast(pl.Int64)
    ).alias(_KEY)


def _in_key_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by `_key`, ties in their current order (input order: deterministic).

    The parts are each nearly in key order, so numpy's stable sort (timsort on int64) mostly merges runs.
    """
    return frame[np.argsort(frame[_KEY].to_numpy(), kind="stable")]


def build_sequences(
    events: pl.LazyFrame,
    codes: CodeTable,
    splits: pl.DataFrame | None,
    config: TokenizeConfig,
) -> tuple[pl.DataFrame, ChunkCounts]:
    """Sequences (one row per subject, list columns) for the subjects in `events`.

    `events` must keep each subject's rows together and sorted by time, static rows first (what
    `check_meds_dataset` guarantees). A visit none of whose rows becomes a token is left out.
    """
    rows = (
        events.select(S.SUBJECT_ID, S.TIME, S.CODE, S.NUMERIC_VALUE, S.ENCOUNTER_ID, S.EVENT_TYPE, S.ISSUED)
        .with_columns(code_index(codes))
        .collect()
    )
    counts = ChunkCounts(events=rows.height)
    is_birth = _code_flag([c == S.BIRTH_CODE for c in codes.codes])
    is_birth_or_death = _code_flag([c in (S.BIRTH_CODE, S.DEATH_CODE) for c in codes.codes])
    drop = _code_flag([excluded_code(c, config) for c in codes.codes])
    if not config.static_tokens:
        drop = drop | pl.col(S.TIME).is_null()
    births = rows.lazy().filter(is_birth).group_by(S.SUBJECT_ID).agg(pl.col(S.TIME).min().alias("_birth"))
    tokens_in = rows.lazy().filter(~drop)
    token_rows = tokens_in.filter(pl.col(S.TIME).is_not_null())
    visit_defining = rows.lazy().filter(
        pl.col(S.TIME).is_not_null() & pl.col(S.ENCOUNTER_ID).is_not_null() & ~is_birth_or_death
    )
    intervals = build_visits(
        visit_defining.select(S.SUBJECT_ID, S.ENCOUNTER_ID, S.TIME),
        token_rows.filter(pl.col(S.ENCOUNTER_ID).is_null()).select(S.SUBJECT_ID, S.TIME),
    ).collect()

    available = pl.col(S.TIME)
    if config.availability == "issued":
        # A result cannot be known before the fact it reports: an `issued` earlier than `time` counts as `time`.
        available = pl.max_horizontal(pl.col(S.ISSUED), pl.col(S.TIME))
    new_run = (pl.col(S.SUBJECT_ID) != pl.col(S.SUBJECT_ID).shift(1)) | (
        pl.col(S.TIME) != pl.col(S.TIME).shift(1)
    )
    in_order = token_rows.with_columns(
        new_run.fill_null(True).cum_sum().alias(_RUN)
    )  # before joins reorder rows
    # Token type and slot from the chunk's few distinct event types: gathers, not a string lookup per row.
    kinds = rows[S.EVENT_TYPE].unique().sort().to_list()
    kind_index = pl.col(S.EVENT_TYPE).cast(pl.Enum(kinds)).to_physical()
    kind_frame = pl.DataFrame({"_kind": kinds}).select(
        token_type_of(pl.col("_kind")).alias("_type"), _event_rank(pl.col("_kind")).alias("_rank")
    )
    visit_events = (
        event_tokens(assign_visits(in_order, intervals.lazy()), codes)
        .with_columns(
            pl.lit(kind_frame["_type"]).gather(kind_index).alias(TOKEN_TYPE),
            available.alias(AVAILABLE),
            (pl.lit(kind_frame["_rank"]).gather(kind_index) + _SLOT_FIRST_EVENT).alias(_SLOT),
        )
        .with_columns(_key(pl.col(_RUN), pl.col(_SLOT), pl.col(TOKEN_ID)))
        .select(S.SUBJECT_ID, VISIT_ORDER, _RUN, _KEY, S.TIME, TOKEN_ID, TOKEN_TYPE, AVAILABLE)
        .collect()
    )
    spans = visit_events.group_by(S.SUBJECT_ID, VISIT_ORDER).agg(
        pl.col(_RUN).min().alias("_first_run"), pl.col(_RUN).max().alias("_last_run")
    )
    visits = intervals.join(spans, on=[S.SUBJECT_ID, VISIT_ORDER], how="inner").sort(
        S.SUBJECT_ID, VISIT_ORDER
    )
    if visits.height != intervals.height:  # renumber around visits that hold no token
        renumbered = visits.with_columns(
            (pl.int_range(pl.len()).over(S.SUBJECT_ID) + 1).cast(pl.Int32).alias("_order")
        )
        visit_events = (
            visit_events.join(
                renumbered.select(S.SUBJECT_ID, VISIT_ORDER, "_order"),
                on=[S.SUBJECT_ID, VISIT_ORDER],
                maintain_order="left",
            )
            .drop(VISIT_ORDER)
            .rename({"_order": VISIT_ORDER})
        )
        visits = renumbered.drop(VISIT_ORDER).rename({"_order": VISIT_ORDER})
    counts.visits = visits.height
    visits = visits.with_columns(pl.col(VISIT_END).shift(1).over(S.SUBJECT_ID).alias("_prev_end"))
    first_visit = visits.filter(pl.col(VISIT_ORDER) == 1).select(
        S.SUBJECT_ID, pl.col(VISIT_START).alias("_t0"), pl.col("_first_run").alias("_subject_run")
    )

    def special(
        frame: pl.DataFrame, run: str, slot: int, at: str, token_id: pl.Expr, kind: TokenType
    ) -> pl.DataFrame:
        return frame.select(
            S.SUBJECT_ID,
            pl.col(VISIT_ORDER).cast(pl.Int32),
            pl.col(run).alias(_RUN),
            _key(pl.col(run), slot),
            pl.col(at).alias(S.TIME),
            token_id.cast(pl.Int32).alias(TOKEN_ID),
            pl.lit(int(kind), pl.Int8).alias(TOKEN_TYPE),
            pl.col(at).alias(AVAILABLE),
        )

    static = (
        event_tokens(tokens_in.filter(pl.col(S.TIME).is_null()), codes)
        .join(first_visit.lazy(), on=S.SUBJECT_ID, how="inner")
        .select(
            S.SUBJECT_ID,
            pl.lit(_NO_VISIT, pl.Int32).alias(VISIT_ORDER),
            pl.col("_subject_run").alias(_RUN),
            _key(pl.col("_subject_run"), _SLOT_STATIC, pl.col(TOKEN_ID)),
            pl.col("_t0").alias(S.TIME),
            TOKEN_ID,
            token_type_of(pl.col(S.EVENT_TYPE)).alias(TOKEN_TYPE),
            pl.col("_t0").alias(AVAILABLE),
        )
        .collect()
    )
    gaps = visits.filter(pl.col("_prev_end").is_not_null()).with_columns(
        ((pl.col(VISIT_START) - pl.col("_prev_end")).dt.total_microseconds() // _MICROSECONDS_PER_DAY).alias(
            "_days"
        )
    )
    cls = first_visit.with_columns(pl.lit(_NO_VISIT, pl.Int32).alias(VISIT_ORDER))
    parts = [
        special(cls, "_subject_run", _SLOT_CLS, "_t0", pl.lit(int(SpecialTokens.CLS)), TokenType.SPECIAL),
        static,
        special(
            gaps, "_first_run", _SLOT_GAP, VISIT_START, gap_token_id(pl.col("_days")), TokenType.TIME_GAP
        ),
        special(
            visits, "_first_run", _SLOT_VS, VISIT_START, pl.lit(int(SpecialTokens.VS)), TokenType.SPECIAL
        ),
        visit_events.select(static.columns),
        special(visits, "_last_run", _SLOT_VE, VISIT_END, pl.lit(int(SpecialTokens.VE)), TokenType.SPECIAL),
        special(visits, "_last_run", _SLOT_REG, VISIT_END, pl.lit(int(SpecialTokens.REG)), TokenType.SPECIAL),
    ]
    years = pl.lit(_DAYS_PER_YEAR * _MICROSECONDS_PER_DAY)
    subject_times = (
        first_visit.lazy().join(births, on=S.SUBJECT_ID, how="left").select(S.SUBJECT_ID, "_t0", "_birth")
    )
    slot = (pl.col(_KEY) // 2**_TOKEN_ID_BITS) % 2**_SLOT_BITS
    is_event = (slot >= _SLOT_FIRST_EVENT) & (slot < _SLOT_VE)
    token_frame = (
        _in_key_order(pl.concat([part.drop(_RUN) for part in parts], how="vertical"))
        .lazy()
        .join(subject_times, on=S.SUBJECT_ID, how="left", maintain_order="left")
        .with_columns(
            ((pl.col(S.TIME) - pl.col("_birth")).dt.total_microseconds() / years)
            .fill_null(0.0)
            .cast(pl.Float32)
            .alias(AGES),
            ((pl.col(S.TIME) - pl.col("_t0")).dt.total_microseconds() / _MICROSECONDS_PER_DAY)
            .cast(pl.Float32)
            .alias(TIMES),
            pl.when(is_event)
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
