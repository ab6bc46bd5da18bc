"""Promoting a replica: the validated request, the lag guard, the promotion itself and its rerun check; shared by
db-failover, region-failover and readiness."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

from drplan.clients import DbCredentials, PgTarget, aws_client, db_credentials, pg_target
from drplan.errors import DrplanError, first_line
from drplan.pgserver import LocalPostgres
from drplan.plan import Database, DatabaseKind, Plan, Service, load_plan
from drplan.timeutil import format_duration, utcnow
from flows.shared.report import RecoveryReport
from tasks.fencing import FENCE_HOW, fence_role_task
from tasks.postgres import is_in_recovery, promote_standby, read_newest_heartbeat, read_newest_heartbeat_task
from tasks.rds import (
    describe_instance_task,
    promote_read_replica,
    read_replica_lag,
    wait_instance_available,
)

RDS_POLL_SECONDS = 10.0


class Mode(StrEnum):
    multi_az = "multi-az"
    promote_replica = "promote-replica"


class Request:
    """A validated failover request: every check here runs before the first side effect."""

    def __init__(self, plan: str | Plan, database: str, mode: str, member: str | None):
        self.plan: Plan = plan if isinstance(plan, Plan) else load_plan(plan)
        if not database:
            raise DrplanError("name the database to fail over: database=NAME")
        self.db: Database = self.plan.database(database)
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise DrplanError(f"mode {mode!r} is not one of: multi-az, promote-replica") from None
        rds_multi_az = self.mode is Mode.multi_az and self.db.kind is DatabaseKind.rds
        self.member = "primary" if rds_multi_az else member or (
            "replica" if self.mode is Mode.multi_az else "dr_replica" if self.db.dr_replica else "replica")
        if self.member not in self.db.members:
            raise DrplanError(f"{self.db.name} has no {self.member} in the plan; add databases[].{self.member} or "
                              f"choose member= one of: {', '.join(r for r in self.db.members if r != 'primary')}")
        if self.member == "primary" and not rds_multi_az:
            raise DrplanError("member=primary makes no sense for a promotion; choose replica or dr_replica")
        self.service: Service | None = next(
            (s for s in self.plan.services if s.database == self.db.name and s.cluster), None)
        if self.mode is Mode.multi_az and self.db.kind is DatabaseKind.postgres and self.plan.sandbox is None:
            raise DrplanError(f"{self.db.name}: drplan can stop only a PostgreSQL primary it runs (the sandbox); "
                              "stop it yourself, then run mode=promote-replica member=replica")

    @property
    def region(self) -> str:
        return self.plan.member_region(self.db, self.member)

    @property
    def identifier(self) -> str:
        return self.db.members[self.member]


def already_promoted(request: Request, new_primary: PgTarget) -> bool:
    """A rerun: the member is no longer a replica, an earlier run promoted it."""
    if request.db.kind is DatabaseKind.rds:
        instance = describe_instance_task(aws_client(request.plan, "rds", request.region), request.identifier)
        return not instance.get("ReadReplicaSourceDBInstanceIdentifier")
    return not is_in_recovery(new_primary)


def metrics(request: Request) -> tuple[str, str] | None:
    return (request.region, request.identifier) if request.db.kind is DatabaseKind.rds else None


def measure_lag(request: Request, credentials: DbCredentials) -> tuple[float | None, str]:
    """(seconds the replica is behind, how it was measured); None when it cannot be known. For postgres the
    primary's newest heartbeat minus the replica's (now, if the primary does not answer); for rds the
    ReplicaLag metric."""
    if request.db.kind is DatabaseKind.rds:
        lag = read_replica_lag(aws_client(request.plan, "cloudwatch", request.region), request.identifier)
        return lag, "CloudWatch ReplicaLag"
    table = request.db.integrity.heartbeat_table
    replica = read_newest_heartbeat_task(pg_target(request.plan, request.db, request.member, credentials), table)
    try:  # the plain function: a primary that is down is expected here, not a failed task with a traceback
        primary = read_newest_heartbeat(pg_target(request.plan, request.db, "primary", credentials), table)
        basis = "newest heartbeat on the primary minus on the replica"
    except Exception as exc:  # noqa: BLE001 - the primary is down: the lag bound is the replica's heartbeat age
        primary, basis = utcnow(), f"heartbeat age on the replica; the primary: {first_line(exc)}"
    return (None if replica is None else max(0.0, (primary - replica).total_seconds())), basis


def lag_guard(request: Request, report: RecoveryReport, credentials: DbCredentials, force: bool) -> float | None:
    """Refuse to promote a replica whose data is older than the database RPO (unless forced); unknown lag is
    refused too. Returns the lag."""
    objective = request.plan.objectives.rpo.database
    lag, basis = measure_lag(request, credentials)
    shown = "unknown" if lag is None else format_duration(timedelta(seconds=lag))
    detail = f"lag {shown} ({basis}); objective {format_duration(objective)}"
    if lag is not None and lag <= objective.total_seconds():
        report.record("lag guard passed", request.identifier, detail)
        return lag
    if not force:
        raise DrplanError(f"{request.identifier}: {detail}; promoting would lose more than the RPO allows. "
                          "Wait for the replica to catch up, or force (--force) to accept the loss")
    report.record("lag guard overridden", request.identifier, f"{detail}; forced", mutating=True)
    return lag


def promote(request: Request, report: RecoveryReport, new_primary: PgTarget) -> None:
    if request.db.kind is DatabaseKind.rds:
        rds = aws_client(request.plan, "rds", request.region)
        if promote_read_replica(rds, request.identifier):
            report.record("promoted", request.identifier, "promote_read_replica", before="read replica",
                          after="standalone", mutating=True)
        wait_instance_available(rds, request.identifier, request.plan.drill.restore_timeout, RDS_POLL_SECONDS,
                                done=lambda i: not i.get("ReadReplicaSourceDBInstanceIdentifier"))
        return
    if request.mode is Mode.multi_az:
        credentials = db_credentials(request.plan, request.db)
        servers = LocalPostgres.for_plan(request.plan, request.db, credentials.username,
                                         credentials.password.get_secret_value())
        if servers.stop(request.db.primary):
            report.record("stopped", request.db.primary, "fast shutdown", before="running", after="stopped",
                          mutating=True)
    if promote_standby(new_primary):
        report.record("promoted", request.identifier, "pg_promote()", before="standby", after="primary",
                      mutating=True)


def apply_fence(report: RecoveryReport, plan: Plan, db: Database, role: str, credentials: DbCredentials) -> str:
    """Fence the member with `role` before anything is promoted and record it (pending while unreachable);
    returns the fence's status."""
    result = fence_role_task(plan, db, role, credentials)
    if result.status == "pending":
        report.record("fence pending", result.member, f"unreachable ({result.detail}); fenced as soon as it answers",
                      mutating=True)
    else:
        report.record(result.status, result.member, FENCE_HOW[db.kind], before="primary", after="fenced",
                      mutating=result.status == "fenced")
    return result.status
