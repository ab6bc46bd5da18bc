"""The sandbox's self-managed PostgreSQL: a primary archiving to the barman-cloud archive, streaming replicas and
the heartbeat writer, on top of the restore engine's local servers (`drplan.pgserver`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from drplan import processes
from drplan.pgserver import HOST, PG_BIN, VENV_BIN, LocalPostgres, PostgresError


class SandboxPostgres(LocalPostgres):
    """Primary and replicas of one sandbox database, archiving WAL with barman-cloud to S3."""

    def check_wal_archive_empty(self) -> None:
        """Refuse to point a new cluster at a prefix that already holds WAL (wal-archive would overwrite it)."""
        proc = self._run(
            [VENV_BIN / "barman-cloud-check-wal-archive", *self._cloud_args(), self.destination, self.server_name],
            "barman-cloud-check-wal-archive",
            check=False,
        )
        if proc.returncode == 1:
            raise PostgresError(
                f"WAL archive {self.destination}{self.server_name} already holds WAL of another cluster; refusing "
                "to archive a new cluster over it: use another server_name or prefix, or delete that archive"
            )
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["(no output)"]
            raise PostgresError(f"cannot check WAL archive {self.destination}{self.server_name}: {lines[-1]}")

    def up_primary(self, member: str, port: int) -> None:
        """Create (initdb) and start a primary archiving to S3; a running member is left alone."""
        self.ports[member] = port
        if self._pid(member):
            return
        self._prepare()
        if not (self.data_dir(member) / "PG_VERSION").exists():
            self.check_wal_archive_empty()
            self._initdb(member)
        self._start(member, port)

    def up_throwaway(self, member: str, port: int, settings: dict[str, str]) -> None:
        """Create and start a server that never archives, with extra server `settings` (for tests and
        benchmarks: no durability needed, so initdb does not sync)."""
        self.ports[member] = port
        self._prepare()
        self._initdb(member, "--no-sync")
        self._start(member, port, recovery={"archive_mode": "off", **settings})

    def _initdb(self, member: str, *options: str) -> None:
        """initdb with the superuser's password (from a 0600 file, never argv) and TCP-only scram access."""
        data = self.data_dir(member)
        pwfile = self.root / f".{member}.pwfile"
        self._write_private(pwfile, self._password + "\n")
        try:
            self._run(
                [PG_BIN / "initdb", "-D", data, "-U", self.superuser, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                 "--data-checksums", "--encoding=UTF8", "--no-locale", "--no-instructions", *options],
                f"initdb {member}",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        self._write_private(
            data / "pg_hba.conf",
            f"host all all {HOST}/32 scram-sha-256\nhost replication all {HOST}/32 scram-sha-256\n",
        )

    def up_replica(self, member: str, port: int, primary_port: int) -> None:
        """Clone the primary with pg_basebackup (if not yet done) and start a streaming standby."""
        self.ports[member] = port
        if self._pid(member):
            return
        self._prepare()
        if not (self.data_dir(member) / "PG_VERSION").exists():
            self._clone(member, HOST, primary_port)
        self._start(member, port)

    def start_heartbeat(
        self, member: str, *, interval: float = 5.0, source: str | None = None, table: str = "drplan_heartbeat"
    ) -> processes.Tracked:
        """Start the heartbeat writer against `member` as tracked process `heartbeat-<member>`."""
        argv = [
            sys.executable, "-m", "drplan.heartbeat", "--host", HOST, "--port", str(self._port(member)),
            "--dbname", self.dbname, "--user", self.superuser, "--table", table, "--interval", str(interval),
            "--source", source or member, "--status-file", heartbeat_mark(self.state_dir, member),
        ]  # fmt: skip
        env = {**os.environ, "PGPASSWORD": self._password, "PYTHONUNBUFFERED": "1"}
        return processes.start(self.state_dir, f"heartbeat-{member}", argv, env=env)

    def stop_heartbeat(self, member: str) -> bool:
        return processes.stop(self.state_dir, f"heartbeat-{member}")


def heartbeat_mark(state_dir: Path, member: str) -> Path:
    """The file the heartbeat writer of `member` touches after every row it commits."""
    return state_dir / "logs" / f"heartbeat-{member}.last"


def heartbeat_state(state_dir: Path, member: str, interval: float) -> str:
    """`writing (last row 0.8s ago)`; RuntimeError when its last row is older than three intervals (or none)."""
    try:
        age = time.time() - heartbeat_mark(state_dir, member).stat().st_mtime
    except FileNotFoundError:
        raise RuntimeError("not writing: no row written yet") from None
    if age > max(3 * interval, 5):
        raise RuntimeError(f"not writing: last row {age:.0f}s ago")
    return f"writing (last row {age:.1f}s ago)"
