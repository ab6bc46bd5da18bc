"""RPO arithmetic: age against objective, backup exposure, report status and exit codes."""

from datetime import UTC, datetime, timedelta

import pytest

from drplan import rpo
from drplan.results import Status

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
FIVE_MIN = timedelta(minutes=5)


def test_age_within_objective_is_met_and_at_the_limit_too():
    m = rpo.age_of("db", "database", "heartbeat", NOW - timedelta(seconds=42), FIVE_MIN, NOW)
    assert (m.status, m.age) == (Status.passed, timedelta(seconds=42))
    assert rpo.age_of("db", "database", "hb", NOW - FIVE_MIN, FIVE_MIN, NOW).status is Status.passed


def test_age_beyond_objective_is_breached():
    m = rpo.age_of("db", "database", "WAL archive", NOW - FIVE_MIN - timedelta(seconds=1), FIVE_MIN, NOW)
    assert m.status is Status.failed and m.age == timedelta(minutes=5, seconds=1)


def test_nothing_found_is_a_breach_with_the_reason():
    m = rpo.age_of("db", "database", "base backup", None, FIVE_MIN, NOW, missing="no completed base backup")
    assert m.status is Status.failed and m.age is None and m.detail == "no completed base backup"


def test_future_timestamp_counts_as_zero_and_reports_skew():
    m = rpo.age_of("db", "database", "hb", NOW + timedelta(seconds=3), FIVE_MIN, NOW)
    assert m.age == timedelta(0) and m.status is Status.passed and "clock skew 3.0s" in m.detail


def test_naive_timestamp_is_refused():
    with pytest.raises(ValueError, match="naive timestamp"):
        rpo.age_of("db", "database", "hb", datetime(2026, 11, 26, 11, 0), FIVE_MIN, NOW)


def test_exposure_is_zero_while_nothing_changed_after_the_backup():
    backup = NOW - timedelta(hours=3)
    m = rpo.exposure("data", "file_storage", "trail", backup, backup - timedelta(minutes=1), FIVE_MIN, NOW)
    assert (m.status, m.age) == (Status.passed, timedelta(0))


def test_exposure_is_the_backup_age_once_live_changed():
    backup = NOW - timedelta(minutes=20)
    m = rpo.exposure("data", "file_storage", "trail", backup, NOW - timedelta(minutes=1), timedelta(minutes=15), NOW)
    assert (m.status, m.age) == (Status.failed, timedelta(minutes=20))
    none = rpo.exposure("data", "file_storage", "trail", None, NOW, timedelta(minutes=15), NOW)
    assert none.status is Status.failed and none.detail == "no backup found"


def test_report_exit_codes():
    met = rpo.age_of("a", "database", "hb", NOW, FIVE_MIN, NOW)
    breach = rpo.age_of("b", "database", "hb", NOW - timedelta(hours=1), FIVE_MIN, NOW)
    err = rpo.error("c", "database", "hb", FIVE_MIN, ConnectionError("c/primary: cannot connect\nmore"))
    assert err.detail == "c/primary: cannot connect"

    def report(*ms):
        return rpo.RpoReport(plan="p", started_at=NOW, finished_at=NOW, measurements=list(ms))

    assert report(met).exit_code == 0
    assert report(met, breach).exit_code == 1
    assert report(met, breach, err).exit_code == 2
    assert report(met, breach, err).summary == "1 met, 1 breached, 1 errors"
    assert "| b | database | hb |" in report(breach).markdown()
