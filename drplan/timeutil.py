"""Time helpers: everything is timezone-aware UTC; durations are written like `5m`, `1h`, `24h`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


STAMP = "%Y%m%dt%H%M%S%fz"
"""A UTC time inside a name: `20261202t125512123456z`, lower case, no dash (copies keep milliseconds only)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_stamp(text: str) -> datetime | None:
    """The UTC time `text` spells as a STAMP (to the millisecond or the microsecond); None when it is none."""
    try:
        return datetime.strptime(text, STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def parse_duration(value: str | int | float | timedelta) -> timedelta:
    """`90s`, `5m`, `1h`, `24h`, `7d` (or seconds as a number) -> timedelta; anything else is a ValueError."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 5m, 1h, 24h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 5m, 1h, 24h")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than zero; write e.g. 30s, 5m, 1h")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta | None) -> str:
    """Short human form: `4.2s`, `3m07s`, `2h05m`, `3d04h`."""
    if delta is None:
        return "-"
    seconds = delta.total_seconds()
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{sign}{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{sign}{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{sign}{days}d{hours:02d}h"


def parse_utc(value: str | datetime) -> datetime:
    """An ISO 8601 time with an explicit zone -> aware UTC datetime. A naive time is an error."""
    if isinstance(value, datetime):
        parsed = value
    else:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO 8601 time; write e.g. 2026-11-26T14:02:00Z"
            ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(
            f"{value!r} has no time zone; add one, e.g. {parsed.isoformat()}Z or {parsed.isoformat()}+00:00"
        )
    return parsed.astimezone(UTC)
