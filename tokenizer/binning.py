"""Per-code quantile bins for numeric values, fitted on the train split only.

A code with numeric values gets `n_bins - 1` cut points at the quantiles 1/n, 2/n, ...; equal cut
points collapse, so a code whose values barely vary gets fewer bins. A value goes to bin
`k = number of cut points strictly below it` (0-based), and becomes the token `CODE_k`
(`bin_token`), e.g. `LOINC//2160-0_3`. Rows of a binned code without a value keep the bare code.
"""

from __future__ import annotations

import polars as pl

from odyssey.pipelines import schema as S

BIN_SEPARATOR = "_"
BREAKS = "breaks"  # list[f64] column of cut points, ascending and distinct


def bin_token(code: str, index: int) -> str:
    return f"{code}{BIN_SEPARATOR}{index}"


def fit_bins(values: pl.LazyFrame, n_bins: int, min_count: int) -> pl.DataFrame:
    """Cut points per code from `values` (`code`, `numeric_value`): a frame `code`, `breaks`.

    Codes with fewer than `min_count` numeric values, or no spread, get no bins.
    """
    quantiles = [k / n_bins for k in range(1, n_bins)]
    value = pl.col(S.NUMERIC_VALUE).cast(pl.Float64)
    fitted = (
        values.filter(pl.col(S.NUMERIC_VALUE).is_not_null() & pl.col(S.NUMERIC_VALUE).is_not_nan())
        .group_by(S.CODE)
        .agg(
            pl.len().alias("_count"),
            pl.concat_list([value.quantile(q, interpolation="linear") for q in quantiles]).alias(BREAKS)
            if quantiles
            else pl.lit([], pl.List(pl.Float64)).alias(BREAKS),
        )
        .filter(pl.col("_count") >= min_count)
        .with_columns(pl.col(BREAKS).list.unique().list.sort())
        .filter(pl.col(BREAKS).list.len() > 0)
        .select(S.CODE, BREAKS)
        .sort(S.CODE)
        .collect()
    )
    return fitted


def bin_index(value: pl.Expr, breaks: pl.Expr, max_breaks: int) -> pl.Expr:
    """Bin of `value` given a `breaks` list column (null where the code has no bins or no value)."""
    if max_breaks == 0:
        return pl.lit(None, pl.Int32)
    above = [
        (value.cast(pl.Float64) > breaks.list.get(j, null_on_oob=True)).fill_null(False).cast(pl.Int32)
        for j in range(max_breaks)
    ]
    return pl.when(breaks.is_not_null() & value.is_not_null() & value.is_not_nan()).then(
        pl.sum_horizontal(above)
    )
