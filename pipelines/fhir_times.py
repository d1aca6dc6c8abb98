"""FHIR date/dateTime/instant strings -> microseconds since the epoch, in UTC.

Rules (documented in docs/ingest.md):
- A value with a timezone offset is converted to UTC; `Z` is UTC. A dateTime without an offset (FHIR
  forbids it when a time is given, but exports contain it) is taken as UTC.
- A partial value names a period: `2150` a year, `2150-03` a month, `2150-03-04` a day. An event is
  placed at the LAST microsecond of that period, because the fact is only certain to be known by then;
  placing it earlier would let it leak into predictions made inside the period.
- A birth date names a period too; birth is placed at its MIDDLE (the best estimate of age).
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_DAY_US = 86_400_000_000


class FhirTimeError(ValueError):
    """A date/time string that is not a FHIR date, dateTime or instant."""


def _period(value: str) -> tuple[int, int]:
    """(first microsecond, last microsecond) of a partial date `YYYY`, `YYYY-MM` or `YYYY-MM-DD`."""
    try:
        parts = [int(p) for p in value.split("-")]
        if len(parts) == 1 and len(value) == 4:
            start, end = datetime(parts[0], 1, 1, tzinfo=UTC), datetime(parts[0] + 1, 1, 1, tzinfo=UTC)
        elif len(parts) == 2 and len(value) == 7:
            year, month = parts
            days = calendar.monthrange(year, month)[1]
            start = datetime(year, month, 1, tzinfo=UTC)
            end = start + timedelta(days=days)
        elif len(parts) == 3 and len(value) == 10:
            start = datetime(parts[0], parts[1], parts[2], tzinfo=UTC)
            end = start + timedelta(days=1)
        else:
            raise ValueError
    except (ValueError, calendar.IllegalMonthError) as exc:
        raise FhirTimeError(f"not a FHIR date: {value!r}") from exc
    first = (start - _EPOCH) // _US
    return first, (end - _EPOCH) // _US - 1


def parse_event_time(value: object) -> int:
    """Microseconds since the epoch (UTC) for an event time; partial dates go to the period's end."""
    if not isinstance(value, str):
        raise FhirTimeError(f"a date/time must be a string, got {type(value).__name__}")
    if len(value) <= 10:
        return _period(value)[1]
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise FhirTimeError(f"not a FHIR dateTime: {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // _US


def parse_birth_date(value: object) -> int:
    """Microseconds since the epoch for a birth date: the middle of the period it names."""
    if isinstance(value, str) and len(value) <= 10:
        first, last = _period(value)
        if len(value) == 10:
            return first
        return first + (last - first) // 2 // _DAY_US * _DAY_US
    return parse_event_time(value)
