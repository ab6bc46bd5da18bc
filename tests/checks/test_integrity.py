"""Integrity suites against real PostgreSQL: identical copies pass; each kind of damage is caught and named."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from checks import IntegrityReport, run_integrity_checks
from drplan.clients import PgTarget
from drplan.plan import Integrity
from drplan.results import Status
from tests.checks.conftest import PASSWORD, TARGET_TIME, Cluster

INTEGRITY = Integrity(tables=["users", "orders"], heartbeat_table="drplan_heartbeat", row_count_tolerance=0.05)


@pytest.fixture(scope="module")
def source(pg_cluster: Cluster) -> PgTarget:
    return pg_cluster.clone("source")


@pytest.fixture
def restored(pg_cluster: Cluster) -> PgTarget:
    return pg_cluster.clone("restored")


def check(restored: PgTarget, source: PgTarget, integrity: Integrity = INTEGRITY) -> IntegrityReport:
    report = run_integrity_checks(source, restored, integrity, TARGET_TIME)
    assert PASSWORD not in report.model_dump_json()
    return report


def not_passed(report: IntegrityReport) -> dict[str, Status]:
    return {c.name: c.status for c in report.checks if not c.passed}


def observed(report: IntegrityReport, name: str) -> str:
    return next(c.observed for c in report.checks if c.name == name)


def test_identical_copies_pass_every_check(source: PgTarget, restored: PgTarget, pg_cluster: Cluster,
                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        report = check(restored, source)
    assert report.status is Status.passed, report.markdown()
    assert report.errors == []
    assert {c.name for c in report.checks} == {
        "users: table exists", "users: columns and types", "users: row count", "users: primary key unique",
        "users: not null: id", "users: not null: email", "users: not null: name", "users: not null: created_at",
        "users: not null: updated_at", "users: no rows after target time: updated_at",
        "orders: table exists", "orders: columns and types", "orders: row count", "orders: primary key unique",
        "orders: not null: id", "orders: not null: user_id", "orders: not null: amount", "orders: not null: status",
        "orders: not null: created_at", "orders: not null: updated_at", "orders: foreign key orders_user_id_fkey",
        "orders: no rows after target time: updated_at",
        "drplan_heartbeat: table exists", "drplan_heartbeat: columns and types",
        "drplan_heartbeat: no rows after target time: ts",
    }  # fmt: skip
    assert observed(report, "orders: row count") == "400 rows"
    assert observed(report, "users: columns and types") == "5 columns match"
    assert PASSWORD not in caplog.text
    assert pg_cluster.sessions_end("source", "restored"), "connections left open (they would block dropping the copy)"
    markdown = report.markdown()
    assert markdown.startswith("| table | check | status |")
    assert "| orders | foreign key orders_user_id_fkey | passed |" in markdown


def test_a_copy_whose_newest_heartbeat_is_older_than_t_minus_the_rpo_fails(source: PgTarget, restored: PgTarget,
                                                                           pg_cluster: Cluster) -> None:
    rpo = timedelta(minutes=5)
    beat = "INSERT INTO drplan_heartbeat (ts, source) VALUES ('{}', 'primary')"
    pg_cluster.run(restored, beat.format((TARGET_TIME - timedelta(minutes=20)).isoformat()))
    report = run_integrity_checks(source, restored, INTEGRITY, TARGET_TIME, rpo)
    assert not_passed(report) == {"drplan_heartbeat: heartbeat near target time: ts": Status.failed}
    assert observed(report, "drplan_heartbeat: heartbeat near target time: ts") == (
        "2024-01-01 03:40:00+00:00 (newest heartbeat)")
    pg_cluster.run(restored, beat.format((TARGET_TIME - timedelta(minutes=1)).isoformat()))
    assert run_integrity_checks(source, restored, INTEGRITY, TARGET_TIME, rpo).status is Status.passed


def test_rows_newer_than_target_time_are_an_overshoot(source: PgTarget, restored: PgTarget,
                                                      pg_cluster: Cluster) -> None:
    late = TARGET_TIME + timedelta(seconds=30)
    pg_cluster.run(restored, f"UPDATE orders SET updated_at = '{late.isoformat()}' WHERE id IN (5, 6)",
                f"INSERT INTO drplan_heartbeat (ts, source) VALUES ('{late.isoformat()}', 'primary')")  # fmt: skip
    report = check(restored, source)
    assert not_passed(report) == {"orders: no rows after target time: updated_at": Status.failed,
                                  "drplan_heartbeat: no rows after target time: ts": Status.failed}
    assert observed(report, "orders: no rows after target time: updated_at") == \
        f"2 rows after the target time, e.g. {late.isoformat()}"  # fmt: skip


def test_naive_timestamp_column_is_compared_as_utc(source: PgTarget, restored: PgTarget, pg_cluster: Cluster) -> None:
    for target in (source, restored):
        pg_cluster.run(target, "CREATE TABLE IF NOT EXISTS events (id int PRIMARY KEY, updated_at timestamp NOT NULL)",
                    "TRUNCATE events", "INSERT INTO events VALUES (1, '2024-01-01 03:59:59')")  # fmt: skip
    pg_cluster.run(restored, "INSERT INTO events VALUES (2, '2024-01-01 04:00:01')")
    report = check(restored, source, INTEGRITY.model_copy(update={"tables": ["events"], "row_count_tolerance": 1}))
    assert not_passed(report) == {"events: no rows after target time: updated_at": Status.failed}


def test_missing_table(source: PgTarget, restored: PgTarget, pg_cluster: Cluster) -> None:
    pg_cluster.run(restored, "DROP TABLE orders")
    report = check(restored, source)
    assert not_passed(report) == {"orders: table exists": Status.failed}
    assert not any(c.table == "orders" for c in report.checks if c.check != "table exists")


def test_orphan_order_breaks_the_foreign_key(source: PgTarget, restored: PgTarget, pg_cluster: Cluster) -> None:
    pg_cluster.run(restored, "ALTER TABLE orders DROP CONSTRAINT orders_user_id_fkey",
                "UPDATE orders SET user_id = 999999 WHERE id = 3")  # fmt: skip
    report = check(restored, source)
    assert not_passed(report) == {"orders: foreign key orders_user_id_fkey": Status.failed}
    assert observed(report, "orders: foreign key orders_user_id_fkey") == "1 rows without parent, e.g. user_id=999999"


def test_duplicate_primary_key(source: PgTarget, restored: PgTarget, pg_cluster: Cluster) -> None:
    pg_cluster.run(restored, "ALTER TABLE users DROP CONSTRAINT users_pkey CASCADE",
                "INSERT INTO users SELECT id, 'twin@example.test', name, created_at, updated_at FROM users "
                "WHERE id = 7")  # fmt: skip
    report = check(restored, source)
    assert not_passed(report) == {"users: primary key unique": Status.failed}
    assert observed(report, "users: primary key unique").startswith("2 duplicate rows, e.g. 7")


def test_null_in_a_not_null_column(source: PgTarget, restored: PgTarget, pg_cluster: Cluster) -> None:
    pg_cluster.run(restored, "ALTER TABLE users ALTER COLUMN name DROP NOT NULL",
                "UPDATE users SET name = NULL WHERE id = 2")
    report = check(restored, source)
    assert not_passed(report) == {"users: not null: name": Status.failed,
                                  "users: columns and types": Status.failed}
    assert observed(report, "users: not null: name") == "1 NULLs"
    assert observed(report, "users: columns and types") == "name: NOT NULL dropped"


def test_row_count_beyond_tolerance(source: PgTarget, restored: PgTarget, pg_cluster: Cluster) -> None:
    pg_cluster.run(restored, "DELETE FROM orders WHERE id > 370")  # 30 of 400 gone: 7.5% > 5%
    report = check(restored, source)
    assert not_passed(report) == {"orders: row count": Status.failed}
    row_count = next(c for c in report.checks if c.name == "orders: row count")
    assert (row_count.expectation, row_count.observed) == ("380..420 rows (source 400 ± 5%)", "370 rows")


def test_changed_column_type(source: PgTarget, restored: PgTarget, pg_cluster: Cluster) -> None:
    pg_cluster.run(restored, "ALTER TABLE orders ALTER COLUMN amount TYPE text")
    report = check(restored, source)
    assert not_passed(report) == {"orders: columns and types": Status.failed}
    assert observed(report, "orders: columns and types") == "amount: numeric(12,2) → text"


def test_metric_error_is_an_error_not_a_failure(source: PgTarget, restored: PgTarget) -> None:
    report = check(restored, source, INTEGRITY.model_copy(update={"timestamp_column": "modified_at"}))
    assert not_passed(report) == {"users: no rows after target time: modified_at": Status.error,
                                  "orders: no rows after target time: modified_at": Status.error}
    assert report.status is Status.error
    assert len(report.errors) == 2 and all('"modified_at"' in e and "does not exist" in e for e in report.errors)


def test_unreachable_copy_is_an_error(source: PgTarget, pg_cluster: Cluster) -> None:
    gone = PgTarget("gone", "127.0.0.1", 1, "restored", pg_cluster.credentials)
    report = check(gone, source)
    assert report.status is Status.error
    assert [c.name for c in report.checks] == ["(all): run the checks"]
    assert report.errors[0].startswith("(all): run the checks: gone (127.0.0.1:1/restored): cannot connect")

