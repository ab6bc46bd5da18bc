"""Request validation shared by the runbooks: the drill's target time within the restorable window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from drplan.errors import DrplanError
from flows.shared.requests import choose_target_time, validate_request
from tasks.targets import RestorableWindow

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_target_time_choice():
    window = RestorableWindow(earliest=NOW - timedelta(hours=2), latest=NOW)
    assert choose_target_time(window, None, None, timedelta(minutes=1)) == NOW - timedelta(minutes=1)
    assert choose_target_time(window, NOW - timedelta(hours=1), None, timedelta(minutes=1)) == NOW - timedelta(hours=1)
    for _ in range(20):
        picked = choose_target_time(window, None, timedelta(minutes=30), timedelta(minutes=1))
        assert NOW - timedelta(minutes=31) <= picked <= NOW - timedelta(minutes=1)
    with pytest.raises(DrplanError, match="outside the restorable window"):
        choose_target_time(window, NOW - timedelta(hours=3), None, timedelta(minutes=1))
    with pytest.raises(DrplanError, match="shorter than the target margin"):
        choose_target_time(RestorableWindow(earliest=NOW, latest=NOW), None, None, timedelta(minutes=1))


@pytest.mark.parametrize("blank", ["", "  ", "\t"])
def test_an_empty_target_time_is_refused_not_taken_as_latest(blank):
    with pytest.raises(DrplanError, match=r"^the target time is empty; give an ISO 8601 time with a zone"):
        validate_request("plans/sandbox.yaml", "devonn-postgres", blank, None)
