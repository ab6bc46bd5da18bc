"""Database targets: one interface, two implementations, for what restores and drills need.

- `PostgresArchive` (kind postgres): barman-cloud base backups and WAL in S3, restored on this machine as the
  unprivileged OS user with `LocalPostgres.restore` (a scratch server on a free loopback port).
- `RdsInstance` (kind rds): `restore_db_instance_to_point_in_time` with the source's network and parameter
  settings passed explicitly (RDS would otherwise use the defaults), drill tags, and our own wait.
Copies are named `<database>-<drill|recovery>-<stamp>` (UTC to the millisecond: unique below one second, and a valid
RDS identifier) and labelled so a later drill can sweep its own. Each records the target time it was restored to
and, once an application is cut over to it, when: a rerun reuses only a copy of the same time that never served.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from drplan.clients import DbCredentials, PgTarget, aws_client, child_aws_env
from drplan.errors import DrplanError
from drplan.pgserver import HOST, LocalPostgres, PostgresError, free_port, spool_dir
from drplan.plan import Database, DatabaseKind, Plan
from drplan.progress import ArtifactProgress
from drplan.timeutil import parse_stamp, utcnow
from drplan.topology import Member
from tasks.barman import find_newest_wal
from tasks.rds import find_instance, wait_instance_available

DRILL_TAG = "drplan:drill"
DATABASE_TAG = "drplan:database"
PLAN_TAG = "drplan:plan"
"""An instance tagged with another plan's name belongs to that plan, even for a database of the same name."""
CREATED_TAG = "drplan:created"
TARGET_TIME_TAG = "drplan:target-time"
SERVED_TAG = "drplan:served"
RDS_IDENTIFIER = re.compile(r"[A-Za-z](?!.*--)[A-Za-z0-9-]{0,62}(?<!-)")
"""Letter first, letters, digits and single hyphens, no trailing hyphen, at most 63 characters."""


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


class Copy(BaseModel):
    """A restored copy as found: its marker (postgres) or its instance and tags (rds)."""

    name: str
    host: str | None = None
    port: int | None = None
    created_at: datetime | None = None
    target_time: datetime | None = None
    """The time it was restored to; None for a copy restored before drplan recorded it."""
    served_at: datetime | None = None
    """When an application was first cut over to it: from then on it is no longer the database as of its target
    time."""

    @property
    def kind(self) -> str:
        """`drill` or `recovery`, from the name."""
        return self.name.rsplit("-", 2)[-2]

    def check_reusable(self, target_time: datetime, serving: bool = False) -> None:
        """Refuse reusing the copy (a rerun after a crash) unless it was restored to `target_time` and never served,
        or `serving`: it serves the application the rerun recovers (the crashed run had cut it over)."""
        fix = f"remove it with `drplan copies remove {self.name}` or choose another target time"
        if self.served_at is not None and not serving:
            raise DrplanError(f"copy {self.name} has served an application since {self.served_at.isoformat()}, so it "
                              f"is no longer the database as of {target_time.isoformat()}; {fix}")
        if self.target_time != target_time:
            made = self.target_time.isoformat() if self.target_time else "an unrecorded time"
            raise DrplanError(f"copy {self.name} was restored to {made}, not {target_time.isoformat()}; {fix}")


class Scratch(Copy):
    """A restored copy ready to use (what a restore returns; for postgres also its marker)."""

    host: str
    port: int
    created_at: datetime
    target_time: datetime
    backup_id: str | None = None
    reused: bool = False
    """An earlier run had already restored it (a rerun after a crash): nothing was restored this time."""
    download: timedelta | None = None
    """postgres: how long the base backup's download took (None when reused, and for rds)."""
    replay: timedelta | None = None
    """postgres: how long WAL took to fetch and replay, up to the promotion."""

    def target(self, db: Database, credentials: DbCredentials) -> PgTarget:
        return PgTarget(f"{db.name}/scratch {self.name}", self.host, self.port, db.dbname, credentials)


def copy_stamp(when: datetime) -> str:
    """`20261202t125512123z`: UTC to the millisecond, lower case, no dash (copy names split on their last two)."""
    when = when.astimezone(UTC)
    return f"{when:%Y%m%dt%H%M%S}{when.microsecond // 1000:03d}z"


def stamp_time(name: str) -> datetime | None:
    """When something named `<...>-<copy_stamp>` was made; None for a name that does not end in a stamp."""
    return parse_stamp(name.rsplit("-", 1)[-1])


def scratch_name(db: Database, when: datetime, purpose: str = "drill") -> str:
    """`<database>-<purpose>-<stamp>`: drills sweep only their own (`-drill-`) copies. An RDS copy's name must be a
    valid instance identifier."""
    name = f"{db.name}-{purpose}-{copy_stamp(when)}"
    if db.kind is DatabaseKind.rds and not RDS_IDENTIFIER.fullmatch(name):
        room = 63 - len(f"-recovery-{copy_stamp(when)}")
        raise DrplanError(f"copy name {name} is no valid RDS instance identifier; name database {db.name} in the plan "
                          f"with a letter first, then letters, digits and single hyphens, at most {room} characters")
    return name


class RestoreTarget(ABC):
    def __init__(self, plan: Plan, db: Database):
        self.plan, self.db = plan, db

    @abstractmethod
    def window(self) -> RestorableWindow:
        """The times this database can be restored to right now."""

    @abstractmethod
    def restore(self, name: str, target_time: datetime, credentials: DbCredentials, serving: bool = False
                ) -> Scratch:
        """Restore to a scratch copy `name` as of `target_time`; a rerun finds an existing copy and returns it
        (refused unless it was restored to `target_time` and never served, or `serving`: see Copy.check_reusable)."""

    @abstractmethod
    def drop(self, name: str) -> bool:
        """Delete scratch copy `name`; returns whether there was one."""

    @abstractmethod
    def copies(self) -> list[Copy]:
        """Every copy of this database that drills and recoveries restored (and did not remove)."""

    @abstractmethod
    def mark_served(self, name: str) -> None:
        """Record that an application is cut over to copy `name`: no rerun reuses it from then on (but the one
        resuming that application's recovery). Idempotent."""

    def leftovers(self) -> list[Copy]:
        """Copies earlier drills left behind (never a recovery's)."""
        return [c for c in self.copies() if c.kind == "drill"]


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
            archive_timeout=self.archive_timeout, prefetch=self.plan.drill.wal_prefetch, spool_dir=spool_dir(self.plan),
        )

    @property
    def archive_timeout(self) -> int:
        """Seconds a copy that became the primary lets a WAL segment wait before archiving it: the sandbox's
        setting, else half the database RPO (at most a minute), so the archive trails it by well under the RPO."""
        if self.plan.sandbox is not None:
            return int(self.plan.sandbox.archive_timeout.total_seconds())
        return int(min(60, max(1, self.plan.objectives.rpo.database.total_seconds() / 2)))

    def window(self) -> RestorableWindow:
        assert self.db.backup is not None
        done = [b for b in self.local().list_backups() if b.status == "DONE" and b.end_time]
        if not done:
            raise DrplanError(f"{self.db.name}: no completed base backup in {self.db.backup.destination}; "
                              "nothing can be restored until one exists")
        newest_wal = find_newest_wal(aws_client(self.plan, "s3"), self.db.backup)
        latest = max(newest_wal or done[-1].end_time, done[-1].end_time)
        return RestorableWindow(earliest=done[0].end_time, latest=latest)

    def restore(self, name: str, target_time: datetime, credentials: DbCredentials, serving: bool = False
                ) -> Scratch:
        local = self.local(credentials)
        marker = self.markers / f"{name}.json"
        if marker.is_file():  # a rerun: the same backup and port as the first attempt
            found = marker.read_text()
            Copy.model_validate_json(found).check_reusable(target_time, serving)  # also one without a target time
            scratch = Scratch.model_validate_json(found)
            backup = next(b for b in local.list_backups() if b.id == scratch.backup_id)
        else:
            backup = local.backup_for(target_time)
            scratch = Scratch(name=name, host=HOST, port=free_port(), created_at=utcnow(), target_time=target_time,
                              backup_id=backup.id)
            self.markers.mkdir(parents=True, exist_ok=True)
            marker.write_text(scratch.model_dump_json())  # written first: a crash leaves something to sweep
        try:
            restored = local.restore(name, scratch.port, target_time, backup,
                                     timeout=self.plan.drill.restore_timeout.total_seconds(),
                                     progress=ArtifactProgress(f"download-{name}".lower(),
                                                               f"base backup {backup.id} -> {name}"))
        except PostgresError as exc:
            if not local.data_dir(name).exists():  # the restore removed what it had half-done
                marker.unlink(missing_ok=True)
            raise DrplanError(str(exc)) from None
        times = {"download": restored.download, "replay": restored.replay} if restored else {}
        return scratch.model_copy(update={"reused": restored is None, **times})

    def drop(self, name: str) -> bool:
        existed = self.local().remove(name)
        marker = self.markers / f"{name}.json"
        existed = existed or marker.is_file()
        marker.unlink(missing_ok=True)
        return existed

    def copies(self) -> list[Copy]:
        """The copies restored on this machine, from their markers."""
        markers = sorted(self.markers.glob(f"{self.db.name}-*.json"))
        return [Copy.model_validate_json(m.read_text()) for m in markers
                if m.stem.rsplit("-", 2)[0] == self.db.name]  # not those of a database named like `<db>-x`

    def mark_served(self, name: str) -> None:
        marker = self.markers / f"{name}.json"
        scratch = Scratch.model_validate_json(marker.read_text())
        if scratch.served_at is None:
            marker.write_text(scratch.model_copy(update={"served_at": utcnow()}).model_dump_json())


class RdsInstance(RestoreTarget):
    poll_seconds = 10.0

    def __init__(self, plan: Plan, db: Database, source: str | None = None, region: str | None = None):
        """Restores come from `source` in `region` (the live primary; default: the plan's primary in aws.region)."""
        super().__init__(plan, db)
        self.source, self.region = source or db.primary, region or plan.aws.region
        self.rds = aws_client(plan, "rds", self.region)

    def _source(self) -> dict:
        source = find_instance(self.rds, self.source)
        if source is None:
            raise DrplanError(f"{self.db.name}: RDS instance {self.source} not found in {self.region}")
        return source

    def window(self) -> RestorableWindow:
        source = self._source()
        latest = source.get("LatestRestorableTime")
        if latest is None:
            raise DrplanError(f"{self.db.name}: {self.source} reports no LatestRestorableTime; "
                              "enable automated backups (BackupRetentionPeriod > 0)")
        earliest = source["InstanceCreateTime"]
        backups = self.rds.describe_db_instance_automated_backups(
            DBInstanceIdentifier=self.source).get("DBInstanceAutomatedBackups", [])
        window = next((b["RestoreWindow"] for b in backups if b.get("RestoreWindow", {}).get("EarliestTime")), None)
        if window:
            earliest = window["EarliestTime"]
        return RestorableWindow(earliest=earliest.astimezone(UTC), latest=latest.astimezone(UTC))

    def restore_request(self, name: str, target_time: datetime) -> dict:
        """The restore call's arguments: the source's network and parameter settings, and the drill tags."""
        source = self._source()
        request = {
            "SourceDBInstanceIdentifier": self.source,
            "TargetDBInstanceIdentifier": name,
            "RestoreTime": target_time,
            "DBInstanceClass": source["DBInstanceClass"],
            "MultiAZ": False,
            "PubliclyAccessible": False,
            "VpcSecurityGroupIds": [g["VpcSecurityGroupId"] for g in source.get("VpcSecurityGroups", [])],
            "Tags": [{"Key": DRILL_TAG, "Value": "true"}, {"Key": DATABASE_TAG, "Value": self.db.name},
                     {"Key": PLAN_TAG, "Value": self.plan.name},
                     {"Key": CREATED_TAG, "Value": utcnow().isoformat()},
                     {"Key": TARGET_TIME_TAG, "Value": target_time.astimezone(UTC).isoformat()}],
        }
        if source.get("DBSubnetGroup"):
            request["DBSubnetGroupName"] = source["DBSubnetGroup"]["DBSubnetGroupName"]
        if source.get("DBParameterGroups"):
            request["DBParameterGroupName"] = source["DBParameterGroups"][0]["DBParameterGroupName"]
        return request

    def restore(self, name: str, target_time: datetime, credentials: DbCredentials, serving: bool = False
                ) -> Scratch:
        existing = find_instance(self.rds, name)
        if existing is None:
            self.rds.restore_db_instance_to_point_in_time(**self.restore_request(name, target_time))
        else:
            as_copy(existing).check_reusable(target_time, serving)
        instance = wait_instance_available(self.rds, name, self.plan.drill.restore_timeout, self.poll_seconds)
        endpoint = instance.get("Endpoint") or {}
        return Scratch(name=name, host=endpoint["Address"], port=int(endpoint["Port"]),
                       created_at=tag_time(instance, CREATED_TAG) or utcnow(), target_time=target_time,
                       reused=existing is not None)

    def drop(self, name: str) -> bool:
        if find_instance(self.rds, name) is None:
            return False
        self.rds.delete_db_instance(DBInstanceIdentifier=name, SkipFinalSnapshot=True, DeleteAutomatedBackups=True)
        return True

    def copies(self) -> list[Copy]:
        """The instances in aws.region tagged as copies of this database."""
        return [as_copy(instance) for page in self.rds.get_paginator("describe_db_instances").paginate()
                for instance in page["DBInstances"]
                if instance_tag(instance, DRILL_TAG) == "true" and instance_tag(instance, DATABASE_TAG) == self.db.name
                and instance_tag(instance, PLAN_TAG) in (None, self.plan.name)]

    def mark_served(self, name: str) -> None:
        instance = find_instance(self.rds, name)
        if instance is None:
            raise DrplanError(f"RDS instance {name} not found in {self.plan.aws.region}")
        if instance_tag(instance, SERVED_TAG) is None:
            self.rds.add_tags_to_resource(ResourceName=instance["DBInstanceArn"],
                                          Tags=[{"Key": SERVED_TAG, "Value": utcnow().isoformat()}])


def instance_tag(instance: dict, key: str) -> str | None:
    return next((t["Value"] for t in instance.get("TagList", []) if t["Key"] == key), None)


def tag_time(instance: dict, key: str) -> datetime | None:
    value = instance_tag(instance, key)
    return datetime.fromisoformat(value) if value else None


def as_copy(instance: dict) -> Copy:
    """An RDS copy from its instance and tags."""
    endpoint = instance.get("Endpoint") or {}
    return Copy(name=instance["DBInstanceIdentifier"], host=endpoint.get("Address"), port=endpoint.get("Port"),
                created_at=tag_time(instance, CREATED_TAG), target_time=tag_time(instance, TARGET_TIME_TAG),
                served_at=tag_time(instance, SERVED_TAG))


def restore_target(plan: Plan, db: Database, live: Member | None = None) -> RestoreTarget:
    """Where copies of `db` come from: its archive (postgres), or the RDS instance `live` (the live primary;
    default the plan's primary)."""
    if db.kind is DatabaseKind.postgres:
        return PostgresArchive(plan, db)
    return RdsInstance(plan, db, live.identifier, live.region) if live else RdsInstance(plan, db)
