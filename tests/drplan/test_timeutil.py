from datetime import UTC, datetime, timedelta

import pytest

from drplan.timeutil import format_duration, parse_duration, parse_utc


@pytest.mark.parametrize("text,expected", [
    ("30s", timedelta(seconds=30)), ("5m", timedelta(minutes=5)), ("1h", timedelta(hours=1)),
    ("24h", timedelta(days=1)), ("7d", timedelta(days=7)), ("1.5h", timedelta(minutes=90)), (90, timedelta(seconds=90)),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5 minutes", "", "m5", "-5m", "0s", True])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_utc_requires_a_zone():
    assert parse_utc("2026-11-26T14:02:00Z") == datetime(2026, 11, 26, 14, 2, tzinfo=UTC)
    assert parse_utc("2026-11-26T16:02:00+02:00") == datetime(2026, 11, 26, 14, 2, tzinfo=UTC)
    with pytest.raises(ValueError, match="has no time zone; add one, e.g. 2026-11-26T14:02:00Z"):
        parse_utc("2026-11-26T14:02:00")
    with pytest.raises(ValueError, match="is not an ISO 8601 time"):
        parse_utc("yesterday")


def test_format_duration():
    formatted = [format_duration(timedelta(seconds=s)) for s in (4.2, 187, 7500, 273600)]
    assert formatted == ["4.2s", "3m07s", "2h05m", "3d04h"]
    assert format_duration(None) == "-"
