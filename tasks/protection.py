"""Re-protection: the live primary of a database gets what the plan requires of a primary: WAL archiving (RDS:
automated backups), a fresh base backup of its own lineage, and a replica in its region and in the other region.

What drplan can do itself:
- PostgreSQL: servers it runs on this machine (recovery copies; the plan's members when the plan has `sandbox:`):
  archiving is switched on by giving the copy its archive command (it kept every WAL file since its promotion),
  the base backup is barman-cloud-backup, and a replica is the plan's member of that region rebuilt from the live
  primary with pg_basebackup (what it held is gone: it was the old lineage). A server elsewhere is refused with
  the command to run on its host.
- RDS: `modify_db_instance` (BackupRetentionPeriod), `create_db_instance_read_replica` in the primary's region
  and, with the primary's ARN, in the other region; tagged `drplan:database` so discovery finds them.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from drplan.clients import DbCredentials, aws_client
from drplan.errors import DrplanError
from drplan.pgserver import HOST, LocalPostgres, PostgresError
from drplan.plan import Database, DatabaseKind, Plan, host_port
from drplan.timeutil import utcnow
from drplan.topology import DatabaseTopology, Member
from tasks.barman import holds_timeline
from tasks.fencing import FENCED_FROM_TAG, forget_pending
from tasks.rds import describe_instance, find_instance, wait_instance_available
from tasks.s3 import STAMP
from tasks.targets import DATABASE_TAG, PLAN_TAG, PostgresArchive, instance_tag

RDS_POLL_SECONDS = 5.0
BACKUP_RETENTION_DAYS = 7


def local_server(plan: Plan, db: Database, member: Member, credentials: DbCredentials) -> LocalPostgres | None:
    """The LocalPostgres running `member` on this machine, or None when drplan does not run it."""
    password = credentials.password.get_secret_value()
    archive = PostgresArchive(plan, db)
    copy = next((c for c in archive.copies() if c.name == member.identifier), None)
    if copy is not None:
        local = archive.local(credentials)
        local.ports[copy.name] = copy.port
        return local
    if plan.sandbox is not None and member.identifier in db.members.values():
        return LocalPostgres.for_plan(plan, db, credentials.username, password)
    return None


def _run_here(server: LocalPostgres | None, member: Member, what: str, command: str) -> LocalPostgres:
    if server is None:
        raise DrplanError(f"{member.identifier} ({member.address}) is not a server drplan runs on this machine; "
                          f"{what} on its host: {command}")
    return server


@task(cache_policy=NO_CACHE)
def enable_archiving(plan: Plan, db: Database, primary: Member, credentials: DbCredentials) -> bool:
    """Switch WAL archiving on for the live primary (postgres: the archive command, a reload; rds: automated
    backups). Refused when the archive already holds the primary's timeline from another server: two histories
    would share it."""
    if db.kind is DatabaseKind.rds:
        rds = aws_client(plan, "rds", primary.region)
        if describe_instance(rds, primary.identifier).get("BackupRetentionPeriod", 0) > 0:
            return False
        rds.modify_db_instance(DBInstanceIdentifier=primary.identifier, BackupRetentionPeriod=BACKUP_RETENTION_DAYS,
                               ApplyImmediately=True)
        wait_instance_available(rds, primary.identifier, plan.drill.restore_timeout, RDS_POLL_SECONDS)
        return True
    server = _run_here(local_server(plan, db, primary, credentials), primary, "switch archiving on",
                       "archive_command = 'barman-cloud-wal-archive ... %p' (archive_mode = on needs a restart)")
    if primary.timeline and holds_timeline(aws_client(plan, "s3"), db.backup, primary.timeline):
        raise DrplanError(f"the archive already holds timeline {primary.timeline} of another server; archiving "
                          f"{primary.identifier} would mix two histories: restore a new copy (it takes a new "
                          "timeline) and promote that")
    try:
        return server.archive(primary.identifier)
    except PostgresError as exc:
        raise DrplanError(str(exc)) from None


@task(cache_policy=NO_CACHE)
def take_base_backup(plan: Plan, db: Database, primary: Member, credentials: DbCredentials) -> str:
    """A base backup of the live primary now (postgres), so that its lineage restores from its own backup."""
    server = _run_here(local_server(plan, db, primary, credentials), primary, "take a base backup",
                       f"barman-cloud-backup {db.backup.destination} {db.backup.server_name}")
    try:
        return server.base_backup(primary.identifier)
    except PostgresError as exc:
        raise DrplanError(str(exc)) from None


def replica_candidate(topology: DatabaseTopology, db: Database, plan: Plan, primary: Member, region: str) -> str:
    """The plan member that becomes the live primary's replica in `region` (postgres): the plan's member of the
    matching role (toward the primary region from a primary in the DR region: the plan's primary, which a failback
    then promotes), else any other plan member in that region that is not the primary itself."""
    roles = {identifier: role for role, identifier in db.members.items()}
    in_region = [identifier for identifier, role in roles.items()
                 if plan.member_region(db, role) == region and identifier != primary.identifier
                 and not any(r.identifier == identifier for r in topology.replicas_of(primary))]
    home = region == plan.aws.region
    wanted = "dr_replica" if not home else "replica" if topology.region_of(primary) == region else "primary"
    preferred = sorted(in_region, key=lambda identifier: (roles[identifier] != wanted, identifier))
    if not preferred:
        raise DrplanError(f"{db.name}: no plan member in {region} can become a replica of {primary.identifier}; "
                          "add one to the plan")
    return preferred[0]


@task(cache_policy=NO_CACHE)
def rebuild_postgres_replica(plan: Plan, db: Database, identifier: str, primary: Member,
                             credentials: DbCredentials) -> None:
    """Rebuild the plan member `identifier` as a streaming replica of the live primary."""
    member = Member(database=db.name, identifier=identifier, role="replica")
    server = _run_here(local_server(plan, db, member, credentials), member, "rebuild it as a replica",
                       f"pg_basebackup -h {primary.host} -p {primary.port} -D DATA -R -X stream, then start it")
    _, port = host_port(db.endpoints[identifier])
    host = HOST if primary.host in ("localhost", HOST) else primary.host
    try:
        server.rebuild_standby(identifier, port, host, primary.port)
    except PostgresError as exc:
        raise DrplanError(str(exc)) from None
    forget_pending(db.name, identifier)  # a fence still pending for its old self has nothing left to fence


@task(cache_policy=NO_CACHE)
def create_rds_replica(plan: Plan, db: Database, primary: Member, region: str) -> str:
    """A read replica of the live primary in `region` (cross-region with the primary's ARN), available before
    this returns; named `<database>-replica-<stamp>` in the primary region, `<database>-dr-<stamp>` in the DR one."""
    source = describe_instance(aws_client(plan, "rds", primary.region), primary.identifier)
    rds = aws_client(plan, "rds", region)
    started = _replica_in_progress(rds, db, primary)
    if started:  # an earlier run created it, then died: wait for that one
        return wait_instance_available(rds, started, plan.drill.restore_timeout, RDS_POLL_SECONDS)[
            "DBInstanceIdentifier"]
    kind = "dr" if region == plan.aws.dr_region else "replica"
    identifier = f"{db.name}-{kind}-{utcnow().strftime(STAMP).lower()}"
    request = {"DBInstanceIdentifier": identifier,
               "Tags": [{"Key": DATABASE_TAG, "Value": db.name}, {"Key": PLAN_TAG, "Value": plan.name}]}
    if region == primary.region:
        request |= {"SourceDBInstanceIdentifier": primary.identifier,
                    "VpcSecurityGroupIds": [g["VpcSecurityGroupId"] for g in source.get("VpcSecurityGroups", [])]}
    else:
        request |= {"SourceDBInstanceIdentifier": source["DBInstanceArn"], "SourceRegion": primary.region,
                    **_network_in(plan, db, region)}
    rds.create_db_instance_read_replica(**request)
    wait_instance_available(rds, identifier, plan.drill.restore_timeout, RDS_POLL_SECONDS)
    return identifier


def _replica_in_progress(rds, db: Database, primary: Member) -> str | None:
    """A replica of the primary for the database that RDS is still creating in this region."""
    for page in rds.get_paginator("describe_db_instances").paginate():
        for instance in page["DBInstances"]:
            source = (instance.get("ReadReplicaSourceDBInstanceIdentifier") or "").rsplit(":", 1)[-1]
            if (source == primary.identifier and instance_tag(instance, DATABASE_TAG) == db.name
                    and instance["DBInstanceStatus"] != "available"):
                return instance["DBInstanceIdentifier"]
    return None


def _network_in(plan: Plan, db: Database, region: str) -> dict:
    """The subnet group and security groups the database's plan member in `region` has (those it had before a
    fence cut it off), for a replica created there; nothing when it has no member there."""
    rds = aws_client(plan, "rds", region)
    for role, identifier in db.members.items():
        instance = find_instance(rds, identifier) if plan.member_region(db, role) == region else None
        if instance is None:
            continue
        fenced_from = instance_tag(instance, FENCED_FROM_TAG)
        groups = fenced_from.split() if fenced_from else [
            g["VpcSecurityGroupId"] for g in instance.get("VpcSecurityGroups", [])]
        network = {"VpcSecurityGroupIds": groups}
        if instance.get("DBSubnetGroup"):
            network["DBSubnetGroupName"] = instance["DBSubnetGroup"]["DBSubnetGroupName"]
        return network
    return {}
