"""The one status vocabulary: a skipped part neither fails nor errors a report."""

from __future__ import annotations

from drplan.results import Status, overall


def test_skipped_exits_0_and_never_hides_a_worse_status():
    assert Status.skipped.exit_code == 0
    assert overall([Status.passed, Status.skipped]) is Status.passed
    assert overall([Status.skipped, Status.failed]) is Status.failed
    assert overall([Status.skipped, Status.no_data]).exit_code == 1
