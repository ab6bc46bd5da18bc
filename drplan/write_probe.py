"""The write probe: a client that keeps writing through a failover and says what it saw.

A thread INSERTs one row (sequence number, client time) into a scratch table every `interval` (100 ms) through the
connection `target()` names, re-read at every reconnect (a probe that follows the application's Secret moves with
every cutover), and reconnects after any error. At the end: the longest span without a committed write (the
downtime a client saw) and the rows it saw committed that the database then lacks (rows lost). The table is
drplan's own, `drplan_write_probe_<stamp>`, created at the start and dropped at the end; one a killed run left is
dropped by the next probe once older than `sweep_after`. No other table is touched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from types import TracebackType

import psycopg
from psycopg import sql
from pydantic import BaseModel

from drplan.clients import PgTarget
from drplan.errors import DrplanError, first_line
from drplan.timeutil import STAMP, format_duration, parse_stamp, utcnow

PREFIX = "drplan_write_probe_"
CONNECT_TIMEOUT = 2
TCP_USER_TIMEOUT_MS = 3000
"""A write to a server that vanished without a reset fails after this, instead of hanging."""
FIRST_WRITE_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class ProbeResult(BaseModel):
    table: str
    started_at: datetime
    finished_at: datetime
    attempts: int
    committed: int
    errors: int
    last_error: str | None = None
    downtime_seconds: float
    """The longest span without a committed write: from a commit to the next one (or to the end)."""
    outage_from: datetime
    outage_to: datetime
    lost: list[int]
    """Sequence numbers of rows whose commit the client saw that the database lacks at the end."""
    dropped: bool = True

    @property
    def resumed(self) -> bool:
        """Rows were committed again after the longest outage (it did not last until the end)."""
        return self.outage_to < self.finished_at

    @property
    def summary(self) -> str:
        shown = ", ".join(map(str, self.lost[:5])) + ("..." if len(self.lost) > 5 else "")
        lost = f"{len(self.lost)} rows lost" + (f" (seq {shown})" if self.lost else "")
        left = "" if self.dropped else f"; scratch table {self.table} left (the next probe drops it)"
        return (f"downtime {format_duration(timedelta(seconds=self.downtime_seconds))} ({_clock(self.outage_from)} "
                f"to {_clock(self.outage_to)}); {lost} of {self.committed} committed ({self.errors} failed "
                f"writes){left}")


class WriteProbe:
    """`with WriteProbe(target) as probe:` writes until the block ends; then `probe.result` (None when the block
    raised). Entering creates the table and waits for the first committed row (refused when none commits)."""

    def __init__(self, target: Callable[[], PgTarget], *, interval: float = 0.1,
                 sweep_after: timedelta = timedelta(hours=1)):
        self.target, self.interval, self.sweep_after = target, interval, sweep_after
        self.table = PREFIX + utcnow().strftime(STAMP)
        self.result: ProbeResult | None = None
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._write, name=self.table, daemon=True)
        self._commits: list[tuple[int, float]] = []
        self._attempts = self._errors = 0
        self._last_error: str | None = None
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> WriteProbe:
        try:
            with self._connect() as conn:
                _sweep(conn, self.sweep_after)
                conn.execute(sql.SQL("CREATE TABLE {} (seq bigint PRIMARY KEY, client_at timestamptz NOT NULL, "
                                     "written_at timestamptz NOT NULL DEFAULT now())").format(self._name))
        except psycopg.Error as exc:
            raise DrplanError(f"write probe: cannot create its table {self.table}: {first_line(exc)}; check that "
                              "the database accepts writes") from None
        self._started = (utcnow(), time.monotonic())
        self._thread.start()
        if not self._first.wait(FIRST_WRITE_TIMEOUT):
            self._halt()
            self._drop()
            raise DrplanError(f"write probe: no row committed within {FIRST_WRITE_TIMEOUT:g}s "
                              f"({self._last_error or 'no answer'}); check that the database accepts writes")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        stopped = self._halt()
        try:
            if exc_type is None:
                self.result = self._judge(stopped, self._missing())
        finally:
            dropped = self._drop()
            if self.result is not None:
                self.result.dropped = dropped

    @property
    def committed(self) -> int:
        """Rows committed so far."""
        return len(self._commits)

    @property
    def errors(self) -> int:
        """Writes failed so far."""
        return self._errors

    @property
    def _name(self) -> sql.Identifier:
        return sql.Identifier(self.table)

    def _connect(self) -> psycopg.Connection:
        return self.target().connect(timeout=CONNECT_TIMEOUT, autocommit=True,
                                     tcp_user_timeout=TCP_USER_TIMEOUT_MS)

    def _write(self) -> None:
        insert = sql.SQL("INSERT INTO {} (seq, client_at) VALUES (%s, %s)").format(self._name)
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._attempts += 1
            seq = self._attempts
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self._conn.execute(insert, (seq, utcnow()))
                self._commits.append((seq, time.monotonic()))
                self._first.set()
            except Exception as exc:  # noqa: BLE001 - any failure is what the client sees: count it, reconnect
                self._errors += 1
                self._last_error = first_line(exc)
                self._close()
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(next_at - time.monotonic())
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _halt(self) -> float:
        """Stop writing; returns when it stopped (monotonic). A write stuck past STOP_TIMEOUT is cancelled."""
        stopped = time.monotonic()
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive() and (conn := self._conn) is not None:
            conn.cancel_safe()
            self._thread.join(STOP_TIMEOUT)
        return stopped

    def _missing(self) -> list[int]:
        with self._connect() as conn:
            found = {row[0] for row in conn.execute(sql.SQL("SELECT seq FROM {}").format(self._name))}
        return sorted(seq for seq, _ in self._commits if seq not in found)

    def _judge(self, stopped: float, lost: list[int]) -> ProbeResult:
        started_utc, started = self._started
        times = [at for _, at in self._commits] + [stopped]
        gap, at = max((b - a, a) for a, b in zip(times, times[1:], strict=False))

        def utc(mono: float) -> datetime:
            return started_utc + timedelta(seconds=mono - started)

        return ProbeResult(table=self.table, started_at=started_utc, finished_at=utc(stopped),
                           attempts=self._attempts, committed=len(self._commits), errors=self._errors,
                           last_error=self._last_error, downtime_seconds=gap, outage_from=utc(at),
                           outage_to=utc(at + gap), lost=lost)

    def _drop(self) -> bool:
        try:
            with self._connect() as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._name))
        except (DrplanError, psycopg.Error):
            return False
        return True


def _sweep(conn: psycopg.Connection, older_than: timedelta) -> list[str]:
    """Drop the probe tables of killed runs (their stamp older than `older_than`); returns their names."""
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                        "AND tablename LIKE %s", [PREFIX.replace("_", r"\_") + "%"]).fetchall()
    cutoff = utcnow() - older_than
    old = [name for (name,) in rows if (stamp := parse_stamp(name.removeprefix(PREFIX))) is not None and stamp < cutoff]
    for name in old:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
    return old




def _clock(at: datetime) -> str:
    return f"{at:%H:%M:%S}.{at.microsecond // 1000:03d}Z"
