"""PostgreSQL tasks: read what a server knows about its own recoverability."""

from __future__ import annotations

import time
from datetime import datetime

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel, SecretStr

from drplan.clients import PgTarget
from drplan.errors import DrplanError
from drplan.logs import run_logger


class ArchiverStatus(BaseModel):
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None

    @property
    def failing(self) -> bool:
        """The newest attempt failed: archiving is stuck until someone fixes it."""
        return self.last_failed_time is not None and (
            self.last_archived_time is None or self.last_failed_time > self.last_archived_time
        )


def read_newest_heartbeat(target: PgTarget, table: str) -> datetime | None:
    """Newest heartbeat row in `table`: the age of the newest data this copy holds."""
    with target.connect() as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]
        if not exists:
            raise DrplanError(f"{target.label}: heartbeat table {table} does not exist; create it or fix "
                              "databases[].integrity.heartbeat_table")
        newest = conn.execute(sql.SQL("SELECT max(ts) FROM {}").format(sql.Identifier(table))).fetchone()[0]
    run_logger().info("%s newest heartbeat %s", target.label, newest)
    return newest


@task(retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def read_archiver_status(target: PgTarget) -> ArchiverStatus:
    """pg_stat_archiver of the primary: what it archived last and whether archiving is failing."""
    with target.connect() as conn:
        row = conn.execute(
            "SELECT last_archived_wal, last_archived_time, failed_count, last_failed_wal, last_failed_time"
            " FROM pg_stat_archiver"
        ).fetchone()
    status = ArchiverStatus(
        last_archived_wal=row[0], last_archived_time=row[1], failed_count=row[2],
        last_failed_wal=row[3], last_failed_time=row[4],
    )
    run_logger().info("%s archiver: last %s at %s, failing=%s", target.label,
                          status.last_archived_wal, status.last_archived_time, status.failing)
    return status


@task(retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def is_in_recovery(target: PgTarget) -> bool:
    """True for a standby (streaming replica), False for a primary."""
    with target.connect() as conn:
        return conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]


@task(cache_policy=NO_CACHE)
def promote_standby(target: PgTarget, wait_seconds: int = 60) -> bool:
    """`pg_promote()` a streaming replica and wait until it accepts writes; False if it already is a primary."""
    with target.connect(autocommit=True) as conn:
        if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
            run_logger().info("%s is already a primary; not promoting", target.label)
            return False
        if not conn.execute("SELECT pg_promote(true, %s)", (wait_seconds,)).fetchone()[0]:
            raise DrplanError(f"{target.label}: pg_promote did not finish within {wait_seconds}s; check its server log")
    run_logger().warning("%s promoted to primary", target.label)
    return True


read_newest_heartbeat_task = task(read_newest_heartbeat, retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)


class Position(BaseModel):
    """Where a primary's history ends: its WAL position and, up to `at`, how many heartbeat rows it holds."""

    lsn: str
    at: datetime
    heartbeats: int


def read_position(target: PgTarget, table: str) -> Position:
    """The primary's current WAL position and its heartbeat rows up to now (read after its fence: final)."""
    with target.connect() as conn:
        lsn, at = conn.execute("SELECT pg_current_wal_lsn()::text, now()").fetchone()
        count = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE ts <= %s").format(sql.Identifier(table)),
                             (at,)).fetchone()[0]
    return Position(lsn=lsn, at=at, heartbeats=count)


def wait_replayed(target: PgTarget, lsn: str, timeout: float, poll: float = 0.2) -> str:
    """Wait until the standby has replayed up to `lsn`; returns its replay position. Refuses after `timeout`."""
    deadline = time.monotonic() + timeout
    with target.connect() as conn:
        conn.autocommit = True
        while True:
            replayed, done = conn.execute("SELECT pg_last_wal_replay_lsn()::text, "
                                          "pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()
            if done:
                return replayed
            if time.monotonic() > deadline:
                raise DrplanError(f"{target.label} replayed WAL up to {replayed} only, not the primary's last "
                                  f"{lsn}, within {timeout:.0f}s; promoting it would lose writes")
            time.sleep(poll)


def count_heartbeats(target: PgTarget, table: str, until: datetime) -> int:
    with target.connect() as conn:
        return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE ts <= %s").format(sql.Identifier(table)),
                            (until,)).fetchone()[0]


def set_role_password(target: PgTarget, role: str, password: SecretStr) -> None:
    """ALTER ROLE `role` PASSWORD, sent as a SCRAM-SHA-256 verifier computed here (libpq's PQencryptPasswordConn):
    the password itself never reaches the server, so no statement log, pg_stat_statements or error message can
    hold it; statement logging is also switched off for the transaction where the role may do so."""
    with target.connect() as conn:
        verifier = conn.pgconn.encrypt_password(password.get_secret_value().encode(), role.encode(),
                                                b"scram-sha-256").decode()
        with conn.transaction():
            for setting in ("log_statement", "log_min_duration_statement"):
                try:
                    with conn.transaction():
                        conn.execute(sql.SQL("SET LOCAL {} = {}").format(
                            sql.Identifier(setting), sql.Literal("none" if setting == "log_statement" else -1)))
                except psycopg.errors.InsufficientPrivilege:
                    pass  # not a superuser (RDS): the verifier is all a log could show
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier)))
    run_logger().info("%s: new password set for role %s", target.label, role)


def end_sessions_of(target: PgTarget, role: str) -> int:
    """Terminate the client sessions of `role` other than this one (a session opened with a compromised password
    outlives the password change); replication connections are left alone. Returns how many were ended."""
    with target.connect() as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'", (role,)).fetchall()
    return sum(1 for (ended,) in rows if ended)


def login_refused(target: PgTarget) -> tuple[bool, str]:
    """Whether the server refuses `target`'s credentials: (True, its reason) or (False, what happened instead)."""
    try:
        with target.connect(timeout=5) as conn:
            conn.execute("SELECT 1")
    except DrplanError as exc:
        reason = str(exc).partition("cannot connect: ")[2].partition(";")[0] or str(exc)
        return "password authentication failed" in reason, reason
    return False, f"logged in as {target.credentials.username}"
