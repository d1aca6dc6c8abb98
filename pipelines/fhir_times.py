"""FHIR date / dateTime / instant strings -> microseconds since the epoch in UTC, vectorised.

Rules (documented in docs/ingest.md):
- A value with a timezone offset is converted to UTC; `Z` is UTC. A dateTime without an offset (FHIR
  forbids it when a time is given, but exports contain it) is taken as UTC.
- A partial value names a period: `2150` a year, `2150-03` a month, `2150-03-04` a day. An event is
  placed at the LAST microsecond of that period, because the fact is only certain to be known by then;
  placing it earlier would let it leak into predictions made inside the period.
- A birth date names a period too; birth is placed at the first day of its middle (the best estimate
  of age): `2090` -> 2090-07-02, `2090-02` -> 2090-02-15, `2090-02-03` -> 2090-02-03.
- Anything else (wrong shape, impossible date) is null, and the resource carrying it is rejected.
Parsing happens on whole columns (polars), not string by string, because it is on the hot path.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%:z"
# The form exports almost always use, to the second with an offset or Z. Arrow's ISO-8601 parser reads it
# ~15x faster than polars' strptime with an offset; other forms keep the polars path.
_SECONDS_WITH_OFFSET = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:Z|[+-][0-9]{2}:[0-9]{2})$"
_UTC_US = pa.timestamp("us", tz="UTC")
_MICROSECOND = pl.duration(microseconds=1)


def _date(text: pl.Expr) -> pl.Expr:
    return text.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us"))


def _epoch_us(value: pl.Expr) -> pl.Expr:
    return value.dt.epoch("us")


def fhir_time_us(raw: pl.Expr, birth: pl.Expr | bool = False) -> pl.Expr:
    """Int64 microseconds since 1970-01-01 UTC, or null where `raw` is not a FHIR date/time.

    `birth` (a boolean expression or constant) switches partial dates from "end of period" to "middle".
    """
    birth = pl.lit(birth) if isinstance(birth, bool) else birth
    length = raw.str.len_bytes()
    year_start = _date(raw + "-01-01")
    month_start = _date(raw + "-01")
    day_start = _date(raw)
    year_end = year_start.dt.offset_by("1y")
    month_end = month_start.dt.offset_by("1mo")
    day_end = day_start.dt.offset_by("1d")
    with_offset = (
        pl.when(raw.str.ends_with("Z"))
        .then(raw.str.strip_suffix("Z") + "+00:00")
        .when(raw.str.contains(r"[+-]\d\d:\d\d$"))
        .then(raw)
        .otherwise(raw + "+00:00")
    )
    instant = with_offset.str.to_datetime(_DATETIME_FORMAT, strict=False, time_unit="us", time_zone="UTC")

    def middle(start: pl.Expr, end: pl.Expr) -> pl.Expr:
        return (start + (end - start) / 2).dt.truncate("1d")

    value = (
        pl.when(length == 4)
        .then(pl.when(birth).then(middle(year_start, year_end)).otherwise(year_end - _MICROSECOND))
        .when(length == 7)
        .then(pl.when(birth).then(middle(month_start, month_end)).otherwise(month_end - _MICROSECOND))
        .when(length == 10)
        .then(pl.when(birth).then(day_start).otherwise(day_end - _MICROSECOND))
        .when(length > 10)
        .then(instant.dt.replace_time_zone(None))
    )
    return _epoch_us(value)


def _seconds_with_offset_us(values: pl.Series) -> pl.Series | None:
    """Microseconds of the values of the exact form `YYYY-MM-DDThh:mm:ss(Z|+hh:mm)`, null for the others;
    None when Arrow refuses a value of that form (a leap second, an impossible date): the caller then
    parses the whole column the polars way. Where both parse a value, they agree (tested)."""
    if values.null_count() == len(values):
        return values.cast(pl.Int64)
    text = values.to_arrow()
    shaped = values.str.contains(_SECONDS_WITH_OFFSET)
    if not shaped.all():
        text = pc.if_else(shaped.to_arrow(), text, pa.scalar(None, text.type))
    try:
        parsed = pc.cast(text, _UTC_US)
    except pa.ArrowInvalid:
        return None
    return pl.from_arrow(parsed.cast(pa.int64()))


def with_fhir_times(frame: pl.DataFrame, raw: str, out: str, birth: str | None = None) -> pl.DataFrame:
    """Add column `out` = fhir_time_us(`raw`), trying the common full-offset forms on their own first."""
    fast = _seconds_with_offset_us(frame.get_column(raw))
    if fast is None:
        frame = frame.with_columns(_offset_form_us(pl.col(raw)).alias(out))
    else:
        frame = frame.with_columns(fast.alias(out))
    if frame.select((pl.col(raw).is_not_null() & pl.col(out).is_null()).any()).item():
        general = fhir_time_us(pl.col(raw), pl.col(birth) if birth else False)
        frame = frame.with_columns(pl.coalesce(out, _offset_form_us(pl.col(raw)), general).alias(out))
    return frame


def _offset_form_us(raw: pl.Expr) -> pl.Expr:
    """`YYYY-MM-DDThh:mm:ss[.f]+hh:mm` by polars' strptime (null for other forms)."""
    return (
        raw.str.to_datetime(_DATETIME_FORMAT, strict=False, time_unit="us", time_zone="UTC")
        .dt.replace_time_zone(None).dt.epoch("us")
    )


def parse_fhir_times(values: list[str | None], birth: bool = False) -> list[int | None]:
    """Convenience for a few values (tests, small tools); the pipeline works on columns."""
    frame = pl.DataFrame({"raw": values, "birth": [birth] * len(values)}, schema={"raw": pl.String, "birth": pl.Boolean})
    return with_fhir_times(frame, "raw", "us", "birth")["us"].to_list()
