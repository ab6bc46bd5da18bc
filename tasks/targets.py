"""Database targets: one interface, two implementations, for what restores and drills need.

- `PostgresArchive` (kind postgres): barman-cloud base backups and WAL in S3, restored on this machine as the
  unprivileged OS user with `LocalPostgres.restore` (a scratch server on a free loopback port).
- `RdsInstance` (kind rds): `restore_db_instance_to_point_in_time` with the source's network and parameter
  settings passed explicitly (RDS would otherwise use the defaults), drill tags, and our own wait.
Scratch copies are named `<database>-drill-<YYYYMMDDTHHMMSSZ>` and labelled so a later drill can sweep them.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from datetime import UTC, datetime

from pydantic import BaseModel

from drplan.clients import DbCredentials, PgTarget, aws_client, child_aws_env
from drplan.errors import DrplanError
from drplan.pgserver import HOST, LocalPostgres, PostgresError
from drplan.plan import Database, DatabaseKind, Plan
from drplan.timeutil import utcnow
from tasks.barman import find_newest_wal
from tasks.rds import find_instance, wait_instance_available
from tasks.s3 import STAMP

DRILL_TAG = "drplan:drill"
DATABASE_TAG = "drplan:database"


class RestorableWindow(BaseModel):
    earliest: datetime
    latest: datetime

    def check(self, when: datetime) -> None:
        """Refuse a target time outside the window, with the window in the message."""
        if when.tzinfo is None:
            raise DrplanError(f"target time {when.isoformat()} has no time zone; add one, e.g. Z")
        if not self.earliest <= when <= self.latest:
            raise DrplanError(
                f"target time {when:%Y-%m-%dT%H:%M:%SZ} is outside the restorable window "
                f"[{self.earliest:%Y-%m-%dT%H:%M:%SZ}, {self.latest:%Y-%m-%dT%H:%M:%SZ}]; choose a time inside it"
            )


class Scratch(BaseModel):
    """A restored scratch copy."""

    name: str
    host: str
    port: int
    created_at: datetime
    backup_id: str | None = None
    reused: bool = False
    """An earlier run had already restored it (a rerun after a crash): nothing was restored this time."""

    def target(self, db: Database, credentials: DbCredentials) -> PgTarget:
        return PgTarget(f"{db.name}/scratch {self.name}", self.host, self.port, db.dbname, credentials)


class Leftover(BaseModel):
    name: str
    created_at: datetime | None


def scratch_name(db: Database, when: datetime, purpose: str = "drill") -> str:
    """`<database>-<purpose>-<stamp>`: drills sweep only their own (`-drill-`) copies."""
    return f"{db.name}-{purpose}-{when.astimezone(UTC).strftime(STAMP).lower()}"


class RestoreTarget(ABC):
    def __init__(self, plan: Plan, db: Database):
        self.plan, self.db = plan, db

    @abstractmethod
    def window(self) -> RestorableWindow:
        """The times this database can be restored to right now."""

    @abstractmethod
    def restore(self, name: str, target_time: datetime, credentials: DbCredentials) -> Scratch:
        """Restore to a scratch copy `name` as of `target_time`; a rerun finds an existing copy and returns it."""

    @abstractmethod
    def drop(self, name: str) -> bool:
        """Delete scratch copy `name`; returns whether there was one."""

    @abstractmethod
    def leftovers(self) -> list[Leftover]:
        """Scratch copies of this database that earlier drills left behind."""


class PostgresArchive(RestoreTarget):
    def __init__(self, plan: Plan, db: Database):
        super().__init__(plan, db)
        self.work_dir = plan.resolve_path(plan.drill.work_dir)
        self.markers = self.work_dir / "drills"

    def local(self, credentials: DbCredentials | None = None) -> LocalPostgres:
        assert self.db.backup is not None
        return LocalPostgres(
            self.work_dir, os_user=self.plan.drill.os_user,
            superuser=credentials.username if credentials else "postgres",
            password=credentials.password.get_secret_value() if credentials else "",
            dbname=self.db.dbname, endpoint_url=self.plan.aws.endpoint_url, aws_env=child_aws_env(self.plan),
            destination=self.db.backup.destination, server_name=self.db.backup.server_name,
        )

    def window(self) -> RestorableWindow:
        assert self.db.backup is not None
        done = [b for b in self.local().list_backups() if b.status == "DONE" and b.end_time]
        if not done:
            raise DrplanError(f"{self.db.name}: no completed base backup in {self.db.backup.destination}; "
                              "nothing can be restored until one exists")
        newest_wal = find_newest_wal(aws_client(self.plan, "s3"), self.db.backup)
        latest = max(newest_wal or done[-1].end_time, done[-1].end_time)
        return RestorableWindow(earliest=done[0].end_time, latest=latest)

    def restore(self, name: str, target_time: datetime, credentials: DbCredentials) -> Scratch:
        local = self.local(credentials)
        marker = self.markers / f"{name}.json"
        if marker.is_file():  # a rerun: the same backup and port as the first attempt
            scratch = Scratch.model_validate_json(marker.read_text())
            backup = next(b for b in local.list_backups() if b.id == scratch.backup_id)
        else:
            backup = local.backup_for(target_time)
            scratch = Scratch(name=name, host=HOST, port=free_port(), created_at=utcnow(), backup_id=backup.id)
            self.markers.mkdir(parents=True, exist_ok=True)
            marker.write_text(scratch.model_dump_json())  # written first: a crash leaves something to sweep
        try:
            restored = local.restore(name, scratch.port, target_time, backup,
                                     timeout=self.plan.drill.restore_timeout.total_seconds())
        except PostgresError as exc:
            raise DrplanError(str(exc)) from None
        return scratch.model_copy(update={"reused": not restored})

    def drop(self, name: str) -> bool:
        existed = self.local().remove(name)
        marker = self.markers / f"{name}.json"
        existed = existed or marker.is_file()
        marker.unlink(missing_ok=True)
        return existed

    def copies(self) -> list[Scratch]:
        """Every scratch copy of this database restored on this machine (drills and recoveries), from its marker."""
        markers = sorted(self.markers.glob(f"{self.db.name}-*.json"))
        return [Scratch.model_validate_json(m.read_text()) for m in markers
                if m.stem.rsplit("-", 2)[0] == self.db.name]  # not those of a database named like `<db>-x`

    def leftovers(self) -> list[Leftover]:
        prefix = f"{self.db.name}-drill-"
        return [Leftover(name=s.name, created_at=s.created_at) for s in self.copies() if s.name.startswith(prefix)]


class RdsInstance(RestoreTarget):
    poll_seconds = 10.0

    def __init__(self, plan: Plan, db: Database):
        super().__init__(plan, db)
        self.rds = aws_client(plan, "rds")

    def _source(self) -> dict:
        source = find_instance(self.rds, self.db.primary)
        if source is None:
            raise DrplanError(f"{self.db.name}: RDS instance {self.db.primary} not found in {self.plan.aws.region}")
        return source

    def window(self) -> RestorableWindow:
        source = self._source()
        latest = source.get("LatestRestorableTime")
        if latest is None:
            raise DrplanError(f"{self.db.name}: {self.db.primary} reports no LatestRestorableTime; "
                              "enable automated backups (BackupRetentionPeriod > 0)")
        earliest = source["InstanceCreateTime"]
        backups = self.rds.describe_db_instance_automated_backups(
            DBInstanceIdentifier=self.db.primary).get("DBInstanceAutomatedBackups", [])
        window = next((b["RestoreWindow"] for b in backups if b.get("RestoreWindow", {}).get("EarliestTime")), None)
        if window:
            earliest = window["EarliestTime"]
        return RestorableWindow(earliest=earliest.astimezone(UTC), latest=latest.astimezone(UTC))

    def restore_request(self, name: str, target_time: datetime) -> dict:
        """The restore call's arguments: the source's network and parameter settings, and the drill tags."""
        source = self._source()
        request = {
            "SourceDBInstanceIdentifier": self.db.primary,
            "TargetDBInstanceIdentifier": name,
            "RestoreTime": target_time,
            "DBInstanceClass": source["DBInstanceClass"],
            "MultiAZ": False,
            "PubliclyAccessible": False,
            "VpcSecurityGroupIds": [g["VpcSecurityGroupId"] for g in source.get("VpcSecurityGroups", [])],
            "Tags": [{"Key": DRILL_TAG, "Value": "true"}, {"Key": DATABASE_TAG, "Value": self.db.name},
                     {"Key": "drplan:created", "Value": utcnow().isoformat()}],
        }
        if source.get("DBSubnetGroup"):
            request["DBSubnetGroupName"] = source["DBSubnetGroup"]["DBSubnetGroupName"]
        if source.get("DBParameterGroups"):
            request["DBParameterGroupName"] = source["DBParameterGroups"][0]["DBParameterGroupName"]
        return request

    def restore(self, name: str, target_time: datetime, credentials: DbCredentials) -> Scratch:
        reused = find_instance(self.rds, name) is not None
        if not reused:
            self.rds.restore_db_instance_to_point_in_time(**self.restore_request(name, target_time))
        instance = wait_instance_available(self.rds, name, self.plan.drill.restore_timeout, self.poll_seconds)
        endpoint = instance.get("Endpoint") or {}
        return Scratch(name=name, host=endpoint["Address"], port=int(endpoint["Port"]),
                       created_at=_created(instance) or utcnow(), reused=reused)

    def drop(self, name: str) -> bool:
        if find_instance(self.rds, name) is None:
            return False
        self.rds.delete_db_instance(DBInstanceIdentifier=name, SkipFinalSnapshot=True, DeleteAutomatedBackups=True)
        return True

    def leftovers(self) -> list[Leftover]:
        found = []
        for page in self.rds.get_paginator("describe_db_instances").paginate():
            for instance in page["DBInstances"]:
                if instance_tag(instance, DRILL_TAG) == "true" and instance_tag(instance, DATABASE_TAG) == self.db.name:
                    found.append(Leftover(name=instance["DBInstanceIdentifier"], created_at=_created(instance)))
        return found


def instance_tag(instance: dict, key: str) -> str | None:
    return next((t["Value"] for t in instance.get("TagList", []) if t["Key"] == key), None)


def _created(instance: dict) -> datetime | None:
    value = instance_tag(instance, "drplan:created")
    return datetime.fromisoformat(value) if value else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def restore_target(plan: Plan, db: Database) -> RestoreTarget:
    return PostgresArchive(plan, db) if db.kind is DatabaseKind.postgres else RdsInstance(plan, db)
