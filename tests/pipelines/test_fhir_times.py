"""FHIR date/time parsing rules: UTC, partial dates at the end of their period, births mid-period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from odyssey.pipelines.fhir_times import _offset_form_us, fhir_time_us, parse_fhir_times, with_fhir_times

EPOCH = datetime(1970, 1, 1)


def as_datetime(us: int | None) -> datetime | None:
    return None if us is None else EPOCH + timedelta(microseconds=us)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2150-03-04T10:00:00-05:00", datetime(2150, 3, 4, 15)),
        ("2150-03-04T15:00:00Z", datetime(2150, 3, 4, 15)),
        ("2150-03-04T10:00:00.123+01:00", datetime(2150, 3, 4, 9, 0, 0, 123000)),
        ("2150-03-04T10:00:00", datetime(2150, 3, 4, 10)),  # no offset: taken as UTC
        ("2150", datetime(2150, 12, 31, 23, 59, 59, 999999)),
        ("2150-02", datetime(2150, 2, 28, 23, 59, 59, 999999)),
        ("2152-02", datetime(2152, 2, 29, 23, 59, 59, 999999)),
        ("2150-03-04", datetime(2150, 3, 4, 23, 59, 59, 999999)),
    ],
)
def test_event_times(raw, expected):
    assert as_datetime(parse_fhir_times([raw])[0]) == expected


@pytest.mark.parametrize("raw", ["21500", "2150-13", "2150-02-30", "x", "2150-03-04Tfoo", "2150-03-04T25:00:00Z", ""])
def test_invalid_values_are_null(raw):
    assert parse_fhir_times([raw]) == [None]


def test_birth_dates_go_to_the_middle_of_their_period():
    got = [as_datetime(v) for v in parse_fhir_times(["2090", "2090-02", "2090-02-03"], birth=True)]
    assert got == [datetime(2090, 7, 2), datetime(2090, 2, 15), datetime(2090, 2, 3)]


@given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 12, 31)),
       st.integers(-14 * 60, 14 * 60).map(lambda m: m - m % 15))
def test_any_offset_datetime_matches_python(moment, offset_minutes):
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    tz = UTC if offset_minutes == 0 else timezone(timedelta(minutes=offset_minutes))
    raw = moment.replace(tzinfo=tz).isoformat(timespec="milliseconds")
    expected = moment.replace(tzinfo=tz).astimezone(UTC).replace(tzinfo=None)
    assert as_datetime(parse_fhir_times([raw])[0]) == expected


_DIGITS = st.text("0123456789", min_size=2, max_size=2)
_SHAPED = st.builds(
    lambda y, mo, d, h, mi, s, tail: f"{y}-{mo}-{d}T{h}:{mi}:{s}{tail}",
    st.sampled_from(["0000", "1900", "2000", "2150", "9999"]) | st.text("0123456789", min_size=4, max_size=4),
    st.sampled_from(["01", "02", "12", "13", "00"]) | _DIGITS,
    st.sampled_from(["28", "29", "30", "31", "00"]) | _DIGITS,
    st.sampled_from(["00", "23", "24"]) | _DIGITS,
    st.sampled_from(["00", "59", "60"]) | _DIGITS,
    st.sampled_from(["00", "59", "60", "61"]) | _DIGITS,
    st.sampled_from(["Z", "", "+0500", "+05", ".123Z", ".1234Z", ".12+05"])
    | st.builds(lambda sign, h, m: f"{sign}{h}:{m}", st.sampled_from("+-"), _DIGITS, _DIGITS),
)


@given(st.lists(_SHAPED | st.none() | st.text("0123456789-T:+Z. ", max_size=26), max_size=40), st.booleans())
def test_arrow_fast_form_agrees_with_the_polars_rules(values, birth):
    """Values of the common `...Thh:mm:ss+hh:mm` form are read by Arrow's ISO parser; every value, of any
    form, must get the time the polars rules give it (a whole-column fallback covers what Arrow refuses)."""
    frame = pl.DataFrame({"raw": values, "birth": [birth] * len(values)}, schema={"raw": pl.String, "birth": pl.Boolean})
    expected = frame.select(pl.coalesce(_offset_form_us(pl.col("raw")), fhir_time_us(pl.col("raw"), pl.col("birth"))))
    got = with_fhir_times(frame, "raw", "us", "birth")["us"]
    assert got.to_list() == expected.to_series().to_list()


def test_a_column_arrow_refuses_falls_back_to_polars():
    values = ["2150-03-04T10:00:60-05:00", "2150-03-04T10:00:00-05:00"]  # a leap second: Arrow refuses it
    assert [as_datetime(v) for v in parse_fhir_times(values)] == [datetime(2150, 3, 4, 15, 1), datetime(2150, 3, 4, 15)]
