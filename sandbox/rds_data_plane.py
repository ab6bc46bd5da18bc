"""The sandbox's RDS data plane: every PostgreSQL instance in moto is backed by real PostgreSQL 18 servers, and the
RDS calls have their real effect (the RDS twin of the EKS node controller). It runs inside the moto process
(`sandbox.moto_server --rds-data-plane DIR`), hooked into moto's RDS backend:

- create_db_instance: initdb as the master user, the database DBName, WAL archiving (barman-cloud) to the
  sandbox's automated-backup bucket, Multi-AZ: a synchronous standby; then a base backup (`backing-up`);
- create_db_instance_read_replica (same or cross region): pg_basebackup through the source's endpoint, a
  streaming replica (no backups, as on RDS);
- promote_read_replica: pg_promote(), a new backup lineage and its first base backup, then `available`;
- reboot_db_instance(ForceFailover=True) on Multi-AZ: the primary stops (fast), the synchronous standby is
  promoted behind the same endpoint, a new standby is cloned; without ForceFailover a restart;
- stop / start / delete_db_instance: the servers stop, start, are removed;
- restore_db_instance_to_point_in_time (RestoreTime or UseLatestRestorableTime, refused outside the window):
  the restore engine (`LocalPostgres.restore`) from the source's archive, then its own archive and backup;
- create_db_snapshot: a real base backup; modify_db_instance: VpcSecurityGroupIds (groups without any ingress
  rule cut the endpoint off);
- describe_db_instances: Endpoint 127.0.0.1:<port> of a stable TCP endpoint (`EndpointProxy`) in front of the
  serving server; LatestRestorableTime and the automated backups' RestoreWindow from what the archive holds;
  CloudWatch AWS/RDS CPUUtilization, DatabaseConnections and ReplicaLag from the servers every few seconds.

Statuses follow the servers' progress (creating, backing-up, modifying, rebooting, stopping, stopped, starting,
deleting, failed). Any other mutating RDS action answers `InvalidAction` and is logged: nothing pretends success.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import psycopg
from psycopg import sql

from drplan import processes
from drplan.pgserver import free_port
from drplan.timeutil import utcnow
from sandbox.endpoint_proxy import EndpointProxy
from sandbox.postgres import SandboxPostgres

log = logging.getLogger("sandbox.rds")
BACKUP_BUCKET = "sandbox-rds-automated-backups"
SAMPLE_SECONDS = 1.0
METRIC_SECONDS = 5.0
WAL_SEGMENT = 16 * 1024 * 1024


@dataclass
class Backing:
    """The servers behind one RDS instance: the serving one (`active`), a Multi-AZ standby, its archive."""

    region: str
    identifier: str
    pg: SandboxPostgres
    endpoint: EndpointProxy
    active: str | None = None
    standby: str | None = None
    reachable: bool = True
    earliest: datetime | None = None
    latest: datetime | None = None
    samples: deque = field(default_factory=lambda: deque(maxlen=900))
    archived_end: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    cpu: tuple[int, float, float] | None = None
    """(postmaster pid, time, its CPU ticks) at the last metric sample."""

    def route(self) -> None:
        """Point the endpoint at the serving server, or refuse connections (stopped, cut off)."""
        up = self.active is not None and self.reachable and self.pg._pid(self.active) is not None
        self.endpoint.route(self.pg.ports[self.active] if up else None)


class DataPlane:
    def __init__(self, root: Path, os_user: str, endpoint_url: str, archive_timeout: int = 60):
        self.root, self.os_user, self.endpoint_url = root, os_user, endpoint_url
        self.archive_timeout = archive_timeout
        self.backings: dict[tuple[str, str], Backing] = {}
        self.jobs = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rds-job")
        self._bucket_ready = False
        self._clean_leftovers()
        threading.Thread(target=self._monitor, name="rds-monitor", daemon=True).start()

    def _clean_leftovers(self) -> None:
        """Servers of an earlier moto process: its instances are gone with it, so are they."""
        if self.root.is_dir():
            for name in processes.tracked_names(self.root):
                processes.stop(self.root, name)
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.root.chmod(0o755)

    # --- what moto asks ----------------------------------------------------------------------------------------

    def backing(self, instance: Any) -> Backing | None:
        return self.backings.get((instance.region, instance.db_instance_identifier))

    def latest_restorable_time(self, instance: Any) -> datetime | None:
        backing = self.backing(instance)
        return backing.latest if backing and instance.backup_retention_period else None

    def restore_window(self, instance: Any | None) -> dict[str, datetime] | None:
        """The automated backups' RestoreWindow: from the first base backup to the latest restorable time."""
        backing = self.backing(instance) if instance else None
        if not backing or backing.earliest is None or backing.latest is None:
            return None
        return {"EarliestTime": backing.earliest, "LatestTime": backing.latest}

    def new_backing(self, instance: Any, user: str, password: str) -> Backing:
        lineage = f"{instance.db_instance_identifier}-{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"
        pg = SandboxPostgres(
            self.root, os_user=self.os_user, superuser=user, password=password, dbname=instance.db_name or "postgres",
            endpoint_url=self.endpoint_url, aws_env=self._aws_env(instance.region),
            destination=f"s3://{BACKUP_BUCKET}/{instance.region}/", server_name=lineage,
            archive_timeout=self.archive_timeout,
        )
        backing = Backing(instance.region, instance.db_instance_identifier, pg,
                          EndpointProxy(instance.db_instance_identifier))
        instance.port = backing.endpoint.port
        self.backings[(instance.region, instance.db_instance_identifier)] = backing
        return backing

    def submit(self, instance: Any, status: str, what: str, work: Callable[[Backing], None]) -> None:
        """Set `status` now, run `work` in the background, then `available` (or `failed`, logged)."""
        backing = self.backing(instance)
        instance.status = status

        def run() -> None:
            with backing.lock:
                try:
                    work(backing)
                    if instance.status == status or instance.status == "backing-up":
                        instance.status = "available"
                    log.info("%s: %s done", instance.db_instance_identifier, what)
                except Exception as exc:  # noqa: BLE001 - the instance fails, as on RDS; the log says why
                    instance.status = "failed"
                    log.error("%s: %s failed: %s", instance.db_instance_identifier, what, exc)
        self.jobs.submit(run)

    # --- the work behind each call ---------------------------------------------------------------------------

    def create(self, instance: Any) -> None:
        self.new_backing(instance, instance.master_username, instance._master_user_password)
        if instance.multi_az:
            zone = instance.availability_zone
            instance.secondary_availability_zone = zone[:-1] + ("b" if zone.endswith("a") else "a")

        def work(b: Backing) -> None:
            self._ensure_bucket()
            b.active = self._member(b)
            b.pg.up_primary(b.active, free_port())
            if b.pg.dbname != "postgres":
                with b.pg.connect(b.active, "postgres") as conn:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(b.pg.dbname)))
            if instance.multi_az:
                self._add_standby(b)
            b.route()
            self._back_up(instance, b)
        self.submit(instance, "creating", "create", work)

    def replicate(self, replica: Any, source: Any) -> None:
        origin = self.backing(source)
        if origin is None:
            raise ValueError(f"{source.db_instance_identifier} has no data plane")
        self.new_backing(replica, origin.pg.superuser, origin.pg._password)
        replica.backup_retention_period = 0
        replica.multi_az = False

        def work(b: Backing) -> None:
            b.active = self._member(b)
            b.pg.up_replica(b.active, free_port(), origin.endpoint.port)
            b.route()
        self.submit(replica, "creating", "create read replica", work)

    def promote(self, instance: Any, retention: int | None) -> None:
        instance.backup_retention_period = retention or max(instance.backup_retention_period or 0, 1)

        def work(b: Backing) -> None:
            self._promote(b, b.active)
            self._back_up(instance, b)
        self.submit(instance, "modifying", "promote read replica", work)

    def reboot(self, instance: Any, force_failover: bool) -> None:
        def work(b: Backing) -> None:
            old = b.active
            b.endpoint.route(None)  # clients drop first: replicas keep only WAL the standby has too
            b.pg.stop(old)
            if not (force_failover and b.standby):
                b.pg._start(old, b.pg.ports[old])
                b.route()
                return
            b.active, b.standby = b.standby, None
            self._promote(b, b.active)
            b.route()
            instance.availability_zone, instance.secondary_availability_zone = (
                instance.secondary_availability_zone, instance.availability_zone)
            instance.status = "available"
            log.warning("%s: failed over from %s to %s", b.identifier, old, b.active)
            b.pg.remove(old)
            self._add_standby(b)
        self.submit(instance, "rebooting", "reboot" + (" with failover" if force_failover else ""), work)

    def stop(self, instance: Any) -> None:
        def work(b: Backing) -> None:
            b.endpoint.route(None)
            for member in (b.standby, b.active):
                if member:
                    b.pg.stop(member)
            instance.status = "stopped"
        self.submit(instance, "stopping", "stop", work)

    def start(self, instance: Any) -> None:
        def work(b: Backing) -> None:
            for member in (b.active, b.standby):
                if member and b.pg._pid(member) is None:
                    b.pg._start(member, b.pg.ports[member])
            b.route()
        self.submit(instance, "starting", "start", work)

    def delete(self, instance: Any) -> None:
        backing = self.backings.pop((instance.region, instance.db_instance_identifier), None)
        if backing is None:
            return

        def run() -> None:
            with backing.lock:
                backing.endpoint.close()
                for member in (backing.standby, backing.active):
                    if member:
                        backing.pg.remove(member)
                log.info("%s: deleted, servers removed", instance.db_instance_identifier)
        instance.status = "deleting"
        self.jobs.submit(run)

    def check_restore_time(self, source: Any, restore_time: datetime | None, use_latest: bool) -> datetime:
        """The time to restore to; ValueError (one line) when it is outside what the archive can restore."""
        b = self.backing(source)
        if b is None or not source.backup_retention_period or b.earliest is None or b.latest is None:
            raise ValueError(f"{source.db_instance_identifier} has no restorable backups yet")
        when = b.latest if use_latest or restore_time is None else restore_time
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        if not b.earliest < when <= b.latest:
            raise ValueError(f"restore time {when:%Y-%m-%dT%H:%M:%SZ} is outside the restorable window "
                             f"{b.earliest:%Y-%m-%dT%H:%M:%SZ} to {b.latest:%Y-%m-%dT%H:%M:%SZ}")
        return when

    def restore(self, instance: Any, source: Any, when: datetime) -> None:
        origin = self.backing(source)
        self.new_backing(instance, origin.pg.superuser, origin.pg._password)

        def work(b: Backing) -> None:
            member = self._member(b)
            port = free_port()
            origin.pg.restore(member, port, when, origin.pg.backup_for(when))
            origin.pg.stop(member)  # restarted below with its own archive, no recovery settings
            b.active, b.pg.ports[member] = member, port
            b.pg._prepare()
            b.pg.check_wal_archive_empty()
            b.pg._start(member, port)
            self._reset_sync(b, member)
            if instance.multi_az:
                self._add_standby(b)
            b.route()
            self._back_up(instance, b)
        self.submit(instance, "creating", f"restore to {when:%Y-%m-%dT%H:%M:%SZ}", work)

    def snapshot(self, instance: Any, snapshot: Any) -> None:
        b = self.backing(instance)
        if b is None:
            return
        snapshot.status = "creating"

        def run() -> None:
            with b.lock:
                try:
                    b.pg.base_backup(b.active)
                    snapshot.status = "available"
                except Exception as exc:  # noqa: BLE001 - the snapshot fails, as on RDS
                    snapshot.status = "failed"
                    log.error("snapshot %s failed: %s", snapshot.db_snapshot_identifier, exc)
        self.jobs.submit(run)

    def set_security_groups(self, instance: Any, open_to_clients: bool) -> None:
        b = self.backing(instance)
        if b is not None:
            b.reachable = open_to_clients
            b.route()

    # --- building blocks -------------------------------------------------------------------------------------

    def _member(self, b: Backing) -> str:
        return f"{b.region}-{b.identifier}-{uuid.uuid4().hex[:6]}"

    def _add_standby(self, b: Backing) -> None:
        """A synchronous standby in the other availability zone: commits wait until it has the WAL."""
        standby = self._member(b)
        b.pg.up_replica(standby, free_port(), b.pg.ports[b.active])
        b.standby = standby
        self._set_sync(b, b.active, standby)

    def _promote(self, b: Backing, member: str) -> None:
        with b.pg.connect(member, "postgres") as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                if not conn.execute("SELECT pg_promote(true, 60)").fetchone()[0]:
                    raise RuntimeError(f"pg_promote() of {member} did not finish within 60 s")
        self._reset_sync(b, member)

    def _reset_sync(self, b: Backing, member: str) -> None:
        """A server cloned from a Multi-AZ primary inherits its synchronous_standby_names: cleared, or its first
        write would wait forever for a standby it does not have."""
        self._set_sync(b, member, None)

    @staticmethod
    def _set_sync(b: Backing, member: str, standby: str | None) -> None:
        with b.pg.connect(member, "postgres") as conn:
            if standby:
                conn.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
                    sql.Literal(f'"{standby}"')))
            else:
                conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
            conn.execute("SELECT pg_reload_conf()")

    def _back_up(self, instance: Any, b: Backing) -> None:
        """`backing-up`: the first base backup of the instance's lineage, recorded as an automated snapshot."""
        if not instance.backup_retention_period:
            return
        instance.status = "backing-up"
        b.pg.base_backup(b.active)
        backups = [x for x in b.pg.list_backups() if x.status == "DONE" and x.end_time]
        b.earliest = b.earliest or backups[0].end_time
        instance.backend.create_auto_snapshot(instance.db_instance_identifier,
                                              f"rds:{instance.db_instance_identifier}-{utcnow():%Y-%m-%d-%H-%M-%S}")

    def _aws_env(self, region: str) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox", "AWS_DEFAULT_REGION": region,
                "AWS_ENDPOINT_URL": self.endpoint_url}

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=self.endpoint_url,
                          aws_access_key_id="sandbox", aws_secret_access_key="sandbox")
        with suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=BACKUP_BUCKET)
        self._bucket_ready = True

    # --- what the servers say: restorable window, metrics ------------------------------------------------------

    def _monitor(self) -> None:
        last_metrics = 0.0
        while True:
            time.sleep(SAMPLE_SECONDS)
            publish = utcnow().timestamp() - last_metrics >= METRIC_SECONDS
            for b in list(self.backings.values()):
                with suppress(Exception):  # a server starting, stopping or failing over: next round
                    self._observe(b, publish)
            if publish:
                last_metrics = utcnow().timestamp()

    def _observe(self, b: Backing, publish: bool) -> None:
        if b.active is None or b.pg._pid(b.active) is None:
            return
        with b.pg.connect(b.active, "postgres") as conn:
            in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            if not in_recovery and b.earliest is not None:
                conn.execute("SELECT pg_current_xact_id()")  # a commit record, like RDS's own heartbeat writes
                now, lsn, wal = conn.execute(
                    "SELECT now(), pg_current_wal_insert_lsn() - '0/0', last_archived_wal FROM pg_stat_archiver"
                ).fetchone()
                b.samples.append((now, int(lsn)))
                b.archived_end = max(b.archived_end, _segment_end(wal))
                b.latest = _latest_restorable(b.samples, b.archived_end) or b.latest
            if publish:
                self._publish(b, conn, in_recovery)

    def _publish(self, b: Backing, conn: psycopg.Connection, in_recovery: bool) -> None:
        from moto.cloudwatch.models import cloudwatch_backends
        from moto.core import DEFAULT_ACCOUNT_ID

        metrics = {"DatabaseConnections": float(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()[0] - 1)}
        metrics["CPUUtilization"] = self._cpu(b)
        if in_recovery:
            metrics["ReplicaLag"] = float(conn.execute(
                "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming') "
                "AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
                "ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) END").fetchone()[0])
        now = utcnow().replace(tzinfo=None)  # moto compares metric timestamps as naive UTC
        cloudwatch_backends[DEFAULT_ACCOUNT_ID][b.region].put_metric_data("AWS/RDS", [
            {"MetricName": name, "Value": value, "Timestamp": now,
             "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": b.identifier}]}
            for name, value in metrics.items()])

    def _cpu(self, b: Backing) -> float:
        """CPU % of the serving server's processes since the last sample (one core = 100 / cores)."""
        pid = b.pg._pid(b.active)
        ticks = _process_ticks(pid)
        now = utcnow().timestamp()
        previous, b.cpu = b.cpu, (pid, now, ticks)
        if previous is None or previous[0] != pid or now <= previous[1]:  # first sample, or another server now
            return 0.0
        return max(0.0, round(100.0 * (ticks - previous[2]) / os.sysconf("SC_CLK_TCK") / (now - previous[1])
                              / (os.cpu_count() or 1), 2))


def _segment_end(wal: str | None) -> int:
    """The LSN just past archived WAL segment `wal` (0 for none, a .history or .partial file)."""
    if not wal or len(wal) != 24 or not all(c in "0123456789ABCDEF" for c in wal):
        return 0
    log_id, seg = int(wal[8:16], 16), int(wal[16:24], 16)
    return (log_id * (0x100000000 // WAL_SEGMENT) + seg + 1) * WAL_SEGMENT


def _latest_restorable(samples: deque, archived_end: int) -> datetime | None:
    """The newest sampled time T with WAL written after it that is archived: a restore to T reaches T (it needs a
    record past T to stop at) and loses nothing committed before T."""
    latest, newer_lsn = None, None
    for when, lsn in reversed(samples):
        if lsn > archived_end:
            continue
        if newer_lsn is not None and newer_lsn > lsn:
            latest = when
            break
        newer_lsn = lsn
    return latest.astimezone(UTC).replace(microsecond=0) if latest else None


def _process_ticks(pid: int | None) -> float:
    """utime + stime of the postmaster and its children (their cumulative times once they have exited)."""
    if pid is None:
        return 0.0
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(entry.name) == pid:
                total += sum(int(f) for f in fields[11:15])
            elif int(fields[1]) == pid:
                total += int(fields[11]) + int(fields[12])
    return total
