"""Visits from encounters.

- An encounter spans the earliest to the latest time of its rows (ENCOUNTER_START at the period start,
  ENCOUNTER_END at the period end, plus any of its events outside the period).
- Encounters that overlap or touch (next start <= latest end so far) merge into one visit.
- An event without an encounter joins the visit whose span contains its time. Otherwise it falls in an
  outpatient visit: all such events of one subject on one calendar day (UTC) form one visit, spanning
  their first to last time. Such a day-visit that overlaps a hospital visit merges with it.
- Visits are numbered 1, 2, ... per subject in time order (`visit_order`).
"""

from __future__ import annotations

import polars as pl

from odyssey.pipelines import schema as S

VISIT_START = "visit_start"
VISIT_END = "visit_end"
VISIT_ORDER = "visit_order"


def merge_intervals(intervals: pl.LazyFrame) -> pl.LazyFrame:
    """Merge overlapping or touching [visit_start, visit_end] spans per subject."""
    return (
        intervals.sort(S.SUBJECT_ID, VISIT_START)
        .with_columns(pl.col(VISIT_END).cum_max().shift(1).over(S.SUBJECT_ID).alias("_reach"))
        .with_columns(
            (pl.col("_reach").is_null() | (pl.col(VISIT_START) > pl.col("_reach")))
            .cum_sum()
            .over(S.SUBJECT_ID)
            .alias("_group")
        )
        .group_by(S.SUBJECT_ID, "_group")
        .agg(pl.col(VISIT_START).min(), pl.col(VISIT_END).max())
        .drop("_group")
    )


def _containing_visit(rows: pl.LazyFrame, visits: pl.LazyFrame, columns: list[str]) -> pl.LazyFrame:
    """`rows` with the span of the latest visit starting at or before each row's time (may not contain it).

    `rows` must be sorted by time within each subject (MEDS order); their order is kept.
    """
    return rows.join_asof(
        visits.select(S.SUBJECT_ID, *columns).sort(S.SUBJECT_ID, VISIT_START),
        left_on=S.TIME,
        right_on=VISIT_START,
        by=S.SUBJECT_ID,
        strategy="backward",
        check_sortedness=False,
    )


def build_visits(encounter_rows: pl.LazyFrame, orphan_rows: pl.LazyFrame) -> pl.LazyFrame:
    """Visits (`subject_id`, `visit_order`, `visit_start`, `visit_end`).

    `encounter_rows`: timed rows with an `encounter_id`; `orphan_rows`: timed rows without one.
    """
    encounters = encounter_rows.group_by(S.SUBJECT_ID, S.ENCOUNTER_ID).agg(
        pl.col(S.TIME).min().alias(VISIT_START), pl.col(S.TIME).max().alias(VISIT_END)
    )
    hospital = merge_intervals(encounters.drop(S.ENCOUNTER_ID))
    outside = _containing_visit(
        orphan_rows.select(S.SUBJECT_ID, S.TIME), hospital, [VISIT_START, VISIT_END]
    ).filter(pl.col(VISIT_END).is_null() | (pl.col(VISIT_END) < pl.col(S.TIME)))
    day_visits = outside.group_by(S.SUBJECT_ID, pl.col(S.TIME).dt.date().alias("_day")).agg(
        pl.col(S.TIME).min().alias(VISIT_START), pl.col(S.TIME).max().alias(VISIT_END)
    )
    merged = merge_intervals(pl.concat([hospital, day_visits.drop("_day")], how="vertical_relaxed"))
    return merged.sort(S.SUBJECT_ID, VISIT_START).with_columns(
        (pl.int_range(pl.len()).over(S.SUBJECT_ID) + 1).cast(pl.Int32).alias(VISIT_ORDER)
    )


def assign_visits(rows: pl.LazyFrame, visits: pl.LazyFrame) -> pl.LazyFrame:
    """Attach `visit_order` to timed `rows`; every row lies inside one visit by construction."""
    return _containing_visit(rows, visits, [VISIT_START, VISIT_ORDER]).drop(VISIT_START)
