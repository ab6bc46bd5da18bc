"""Isolated copies of a database made from what its DR region holds: the DR replica, cloned and promoted. Such a
copy serves nothing and belongs to the run that made it, which removes it (the cross-region rehearsal); the DR
replica keeps replicating throughout.

- postgres: a pg_basebackup of the DR replica into a server on this machine (in `drill.work_dir`), started with
  archiving off and promoted (`LocalPostgres.clone`).
- rds: a read replica of the DR replica in the DR region (RDS PostgreSQL cascades replicas), then promoted. It
  is tagged `drplan:rehearsal`, not `drplan:database`: it is no member of the database.
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from drplan.clients import DbCredentials, PgTarget, aws_client, member_endpoint
from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.pgserver import HOST, PostgresError, free_port
from drplan.plan import Database, DatabaseKind, Plan
from tasks.rds import describe_all, describe_instance, find_instance, wait_instance_available
from tasks.targets import PLAN_TAG, PostgresArchive, instance_tag

REHEARSAL_TAG = "drplan:rehearsal"
RDS_POLL_SECONDS = 2.0


def _dr_role(db: Database) -> str:
    if db.dr_replica is None:
        raise DrplanError(f"{db.name} has no dr_replica; the DR region holds no copy of it to clone")
    return "dr_replica"


@task(cache_policy=NO_CACHE)
def clone_dr_replica(plan: Plan, db: Database, name: str, credentials: DbCredentials) -> PgTarget:
    """A standalone copy `name` of the database's DR replica, in the DR region; returns how to reach it."""
    role = _dr_role(db)
    timeout = plan.drill.restore_timeout
    if db.kind is DatabaseKind.postgres:
        host, port = member_endpoint(plan, db, role)
        local = PostgresArchive(plan, db).local(credentials)
        try:
            local.clone(name, free_port(), host, port, timeout=timeout.total_seconds())
        except PostgresError as exc:
            raise DrplanError(str(exc)) from None
        run_logger().info("%s: %s cloned from the DR replica %s:%s and promoted", db.name, name, host, port)
        return PgTarget(f"{db.name}/copy {name}", HOST, local.ports[name], db.dbname, credentials)
    region = plan.member_region(db, role)
    rds = aws_client(plan, "rds", region)
    source = describe_instance(rds, db.members[role])
    if find_instance(rds, name) is None:
        rds.create_db_instance_read_replica(
            DBInstanceIdentifier=name, SourceDBInstanceIdentifier=source["DBInstanceIdentifier"],
            VpcSecurityGroupIds=[g["VpcSecurityGroupId"] for g in source.get("VpcSecurityGroups", [])],
            Tags=[{"Key": REHEARSAL_TAG, "Value": "true"}, {"Key": PLAN_TAG, "Value": plan.name}])
    instance = wait_instance_available(rds, name, timeout, RDS_POLL_SECONDS)
    if instance.get("ReadReplicaSourceDBInstanceIdentifier"):
        rds.promote_read_replica(DBInstanceIdentifier=name)
    instance = wait_instance_available(rds, name, timeout, RDS_POLL_SECONDS,
                                       done=lambda i: not i.get("ReadReplicaSourceDBInstanceIdentifier"))
    endpoint = instance["Endpoint"]
    run_logger().info("%s: %s replicated from the DR replica %s in %s and promoted", db.name, name,
                      source["DBInstanceIdentifier"], region)
    return PgTarget(f"{db.name}/copy {name}", endpoint["Address"], int(endpoint["Port"]), db.dbname, credentials)


@task(cache_policy=NO_CACHE)
def rehearsal_clones(plan: Plan, db: Database) -> list[str]:
    """The copies of `db` that rehearsals made and have not removed (a running or a killed rehearsal's), by name."""
    prefix = f"{db.name}-rehearsal-"
    role = _dr_role(db)
    if db.kind is DatabaseKind.postgres:
        root = PostgresArchive(plan, db).local().root
        return sorted(p.name for p in root.glob(f"{prefix}*") if p.is_dir()) if root.is_dir() else []
    rds = aws_client(plan, "rds", plan.member_region(db, role))
    return sorted(name for name, i in describe_all(rds).items() if name.startswith(prefix)
                  and instance_tag(i, REHEARSAL_TAG) == "true" and instance_tag(i, PLAN_TAG) == plan.name)


@task(cache_policy=NO_CACHE)
def drop_clone(plan: Plan, db: Database, name: str) -> bool:
    """Remove copy `name` (RDS: deleted without a final snapshot, waited for until gone); whether there was one."""
    role = _dr_role(db)
    if db.kind is DatabaseKind.postgres:
        return PostgresArchive(plan, db).local().remove(name)
    rds = aws_client(plan, "rds", plan.member_region(db, role))
    if find_instance(rds, name) is None:
        return False
    rds.delete_db_instance(DBInstanceIdentifier=name, SkipFinalSnapshot=True, DeleteAutomatedBackups=True)
    deadline = time.monotonic() + plan.drill.restore_timeout.total_seconds()
    while find_instance(rds, name) is not None:
        if time.monotonic() > deadline:
            raise DrplanError(f"RDS instance {name} still exists {plan.drill.restore_timeout} after its deletion")
        time.sleep(RDS_POLL_SECONDS)
    return True
