"""The write probe against a real throwaway PostgreSQL: it reconnects after a dropped connection and an outage,
measures the outage as its downtime, finds rows missing afterwards, drops its own table and the old ones of killed
runs, and is refused on a database that takes no writes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import psycopg
import pytest
from pydantic import SecretStr

from drplan.clients import DbCredentials, PgTarget
from drplan.errors import DrplanError
from drplan.timeutil import utcnow
from drplan.write_probe import PREFIX, WriteProbe
from sandbox.launchers import throwaway_postgres
from tests.helpers import wait_for

PASSWORD = "probe-secret"
CREDENTIALS = DbCredentials("postgres", SecretStr(PASSWORD))


@pytest.fixture(scope="module")
def postgres_port() -> Iterator[int]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (initdb refuses root)")
    with throwaway_postgres(PASSWORD) as port:
        with admin(port) as conn:
            conn.execute("CREATE DATABASE probe")
            conn.execute("CREATE DATABASE readonly")
            conn.execute("ALTER DATABASE readonly SET default_transaction_read_only = on")
        yield port


def admin(port: int, dbname: str = "postgres") -> psycopg.Connection:
    return PgTarget("admin", "127.0.0.1", port, dbname, CREDENTIALS).connect(autocommit=True)


def probe_tables(port: int) -> list[str]:
    with admin(port, "probe") as conn:
        return [name for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE %s "
                                                 "ORDER BY 1", [PREFIX + "%"])]


def target(port: int, dbname: str = "probe"):
    return lambda: PgTarget(f"test/{dbname}", "127.0.0.1", port, dbname, CREDENTIALS)


def cut_off(port: int, allow: bool) -> None:
    """Let no client into the probe's database (its sessions ended), or let them in again."""
    with admin(port) as conn:
        conn.execute(f"ALTER DATABASE probe ALLOW_CONNECTIONS {'true' if allow else 'false'}")
        if not allow:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'probe'")


def test_a_dropped_connection_is_reconnected_and_every_committed_row_is_found(postgres_port):
    with WriteProbe(target(postgres_port)) as probe:
        assert probe_tables(postgres_port) == [probe.table]
        wait_for(lambda: probe.committed >= 5, 30, "five committed rows")
        with admin(postgres_port) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'probe'")
        wait_for(lambda: probe.errors >= 1, 30, "the write on the ended session to fail")
        resumed = probe.committed
        wait_for(lambda: probe.committed >= resumed + 5, 30, "five rows after the reconnect")
    result = probe.result
    assert result.lost == [] and result.committed >= 10 and result.errors >= 1
    assert result.attempts == result.committed + result.errors
    assert 0 < result.downtime_seconds < float("inf")
    assert result.dropped and probe_tables(postgres_port) == []
    assert "0 rows lost of" in result.summary


def test_an_outage_is_the_downtime_and_rows_missing_afterwards_are_lost(postgres_port):
    with WriteProbe(target(postgres_port)) as probe:
        wait_for(lambda: probe.committed >= 5, 30, "five committed rows")
        cut_off(postgres_port, allow=False)
        cut = utcnow()  # no commit from here...
        try:
            wait_for(lambda: probe.errors >= 20, 30, "twenty failed writes")
        finally:
            allowed = utcnow()  # ...to here
            cut_off(postgres_port, allow=True)
        resumed = probe.committed
        wait_for(lambda: probe.committed >= resumed + 5, 30, "five rows after the outage")
        with admin(postgres_port, "probe") as conn:
            conn.execute(f'DELETE FROM "{probe.table}" WHERE seq IN (2, 3)')
    result = probe.result
    assert result.lost == [2, 3]
    assert "2 rows lost (seq 2, 3)" in result.summary
    assert result.outage_from <= cut and result.outage_to >= allowed  # the longest span without a commit
    assert result.resumed
    assert (result.outage_to - result.outage_from).total_seconds() == pytest.approx(result.downtime_seconds)
    assert "cannot connect" in result.last_error or "terminat" in result.last_error
    assert probe_tables(postgres_port) == []


def test_old_tables_of_killed_probes_are_dropped_and_nothing_else(postgres_port):
    kept = [f"{PREFIX}notes", f"{PREFIX}29990101t000000000000z"]
    with admin(postgres_port, "probe") as conn:
        for name in [f"{PREFIX}20200101t000000000000z", *kept]:
            conn.execute(f'CREATE TABLE "{name}" (n int)')
    with WriteProbe(target(postgres_port)):
        pass
    assert probe_tables(postgres_port) == sorted(kept)
    with admin(postgres_port, "probe") as conn:
        for name in kept:
            conn.execute(f'DROP TABLE "{name}"')


def test_a_database_that_takes_no_writes_is_refused_before_writing(postgres_port):
    probe = WriteProbe(target(postgres_port, "readonly"))
    with pytest.raises(DrplanError, match=r"^write probe: cannot create its table drplan_write_probe_\S+: .*read-only"):
        probe.__enter__()
    assert probe.result is None and probe.committed == 0
