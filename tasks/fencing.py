"""Fencing: the old primary accepts no more writes before the application is pointed elsewhere; a fence that
cannot be applied now (the member unreachable: a region loss) is recorded as pending and applied as soon as the
member answers.

- PostgreSQL: `ALTER SYSTEM SET default_transaction_read_only = on`, `pg_reload_conf()`, then every client
  session ends (`pg_terminate_backend`), so no transaction opened before the fence keeps writing. Replication
  connections stay: replicas keep what it has. (A client could still `SET default_transaction_read_only = off`
  in its own session: the fence stops the application, not a determined operator.)
- RDS: cut off: the instance's security groups are replaced by `drplan-fence`, a group without ingress rules
  (`modify_db_instance`, ApplyImmediately); the groups it had are kept in its tag `drplan:fenced-from` so that
  unfencing restores them. (`stop_db_instance` is refused for an instance that has read replicas.)

Pending fences live in the Prefect Variable `drplan-pending-fences` (one entry per member), so every flow and
the `fence-keeper` deployment see them.
"""

from __future__ import annotations

from typing import Literal

from botocore.exceptions import BotoCoreError, ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from drplan.clients import PgTarget, aws_client
from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.plan import Database, DatabaseKind, Plan
from drplan.timeutil import utcnow

FENCE_GROUP = "drplan-fence"
FENCED_FROM_TAG = "drplan:fenced-from"
PENDING_VARIABLE = "drplan-pending-fences"
READ_ONLY = "default_transaction_read_only"
FENCE_HOW = {DatabaseKind.postgres: "read-only, client sessions ended",
             DatabaseKind.rds: "cut off: security group drplan-fence only"}


class Fence(BaseModel):
    """A fence of one member: applied now, found applied, or pending until the member answers."""

    database: str
    member: str
    region: str
    host: str | None = None
    port: int | None = None
    status: Literal["fenced", "already fenced", "pending"]
    detail: str = ""
    recorded_at: str = ""


# --- PostgreSQL ----------------------------------------------------------------------------------------------------

def fence_postgres(target: PgTarget) -> bool:
    """Read-only for new transactions, then every other client session ended. False if it already was fenced."""
    with target.connect(autocommit=True) as conn:
        already = conn.execute(f"SELECT current_setting('{READ_ONLY}') = 'on'").fetchone()[0]
        if not already:
            conn.execute(f"ALTER SYSTEM SET {READ_ONLY} = on")
            conn.execute("SELECT pg_reload_conf()")
        ended = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchone()[0]
    run_logger().warning("%s fenced (read-only, %d client sessions ended)", target.label, ended)
    return not already


def _fence_group(ec2, vpc_id: str) -> str:
    """The VPC's `drplan-fence` security group (no ingress rules), created when missing."""
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [FENCE_GROUP]},
                                                  {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
    if found:
        return found[0]["GroupId"]
    group = ec2.create_security_group(GroupName=FENCE_GROUP, VpcId=vpc_id,
                                      Description="drplan fence: no ingress; a fenced database is cut off")
    return group["GroupId"]


def fence_rds(plan: Plan, region: str, identifier: str) -> bool:
    """Cut the instance off (only the fence group); False if it already was."""
    rds, ec2 = aws_client(plan, "rds", region), aws_client(plan, "ec2", region)
    instance = rds.describe_db_instances(DBInstanceIdentifier=identifier)["DBInstances"][0]
    groups = [g["VpcSecurityGroupId"] for g in instance.get("VpcSecurityGroups", [])]
    vpc_id = (instance.get("DBSubnetGroup") or {}).get("VpcId")
    if not vpc_id:
        raise DrplanError(f"{identifier}: no VPC known (no DB subnet group); cannot cut it off with a security group")
    fence = _fence_group(ec2, vpc_id)
    if groups == [fence]:
        return False
    rds.add_tags_to_resource(ResourceName=instance["DBInstanceArn"],
                             Tags=[{"Key": FENCED_FROM_TAG, "Value": " ".join(groups)}])
    rds.modify_db_instance(DBInstanceIdentifier=identifier, VpcSecurityGroupIds=[fence], ApplyImmediately=True)
    run_logger().warning("%s fenced (security groups %s -> %s)", identifier, ",".join(groups), fence)
    return True


def unfence_rds(plan: Plan, region: str, identifier: str) -> bool:
    """Give the instance back the security groups it had before its fence; False if it was not fenced."""
    rds = aws_client(plan, "rds", region)
    instance = rds.describe_db_instances(DBInstanceIdentifier=identifier)["DBInstances"][0]
    before = next((t["Value"] for t in instance.get("TagList", []) if t["Key"] == FENCED_FROM_TAG), None)
    if before is None:
        return False
    rds.modify_db_instance(DBInstanceIdentifier=identifier, VpcSecurityGroupIds=before.split(), ApplyImmediately=True)
    rds.remove_tags_from_resource(ResourceName=instance["DBInstanceArn"], TagKeys=[FENCED_FROM_TAG])
    return True


# --- one member, whatever its kind, and the pending ones -------------------------------------------------------------

def fence_member(plan: Plan, db: Database, identifier: str, region: str, target: PgTarget | None) -> Fence:
    """Fence `identifier`; when it cannot be reached, the fence is recorded as pending (and returned so)."""
    base = {"database": db.name, "member": identifier, "region": region,
            "host": target.host if target else None, "port": target.port if target else None}
    try:
        if db.kind is DatabaseKind.rds:
            applied = fence_rds(plan, region, identifier)
        else:
            assert target is not None
            applied = fence_postgres(target)
    except (DrplanError, ClientError, BotoCoreError, OSError) as exc:
        fence = Fence(**base, status="pending", detail=first_line(exc), recorded_at=utcnow().isoformat())
        record_pending(fence)
        run_logger().error("%s unreachable: fence pending (%s)", identifier, fence.detail)
        return fence
    forget_pending(db.name, identifier)
    return Fence(**base, status="fenced" if applied else "already fenced")


def unfence_member(plan: Plan, db: Database, identifier: str, region: str, target: PgTarget | None) -> bool:
    """Lift the fence of `identifier` (a recovery rolled back to it); False if it was not fenced."""
    forget_pending(db.name, identifier)
    if db.kind is DatabaseKind.rds:
        return unfence_rds(plan, region, identifier)
    assert target is not None
    with target.connect(autocommit=True) as conn:
        if conn.execute(f"SELECT current_setting('{READ_ONLY}') = 'off'").fetchone()[0]:
            return False
        conn.execute(f"ALTER SYSTEM RESET {READ_ONLY}")
        conn.execute("SELECT pg_reload_conf()")
    run_logger().warning("%s unfenced (accepts writes again)", target.label)
    return True


unfence_member_task = task(unfence_member, cache_policy=NO_CACHE)


def pending_fences() -> list[Fence]:
    from prefect.variables import Variable

    return [Fence.model_validate(f) for f in Variable.get(PENDING_VARIABLE, default=[]) or []]


def _save(fences: list[Fence]) -> None:
    from prefect.variables import Variable

    Variable.set(PENDING_VARIABLE, [f.model_dump() for f in fences], overwrite=True)


def record_pending(fence: Fence) -> None:
    _save([f for f in pending_fences() if (f.database, f.member) != (fence.database, fence.member)] + [fence])


def forget_pending(database: str, member: str) -> None:
    fences = pending_fences()
    if any((f.database, f.member) == (database, member) for f in fences):
        _save([f for f in fences if (f.database, f.member) != (database, member)])


def apply_pending_fences(plan: Plan) -> list[Fence]:
    """Apply every pending fence of the plan's databases whose member answers again; the rest stay pending."""
    from drplan.clients import db_credentials

    results = []
    for pending in pending_fences():
        db = next((d for d in plan.databases if d.name == pending.database), None)
        if db is None:
            continue
        credentials = db_credentials(plan, db)
        target = (PgTarget(f"{db.name}/{pending.member}", pending.host, pending.port, db.dbname, credentials)
                  if pending.host and pending.port else None)
        results.append(fence_member(plan, db, pending.member, pending.region, target))
    return results


fence_member_task = task(fence_member, cache_policy=NO_CACHE)
apply_pending_fences_task = task(apply_pending_fences, cache_policy=NO_CACHE)
