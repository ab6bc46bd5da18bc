"""Promoting a replica: the validated request, the lag guard, the promotion itself and its rerun check; shared by
db-failover, region-failover and readiness."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

import psycopg

from drplan.clients import DbCredentials, PgTarget, aws_client, db_credentials
from drplan.errors import DrplanError, first_line
from drplan.pgserver import LocalPostgres
from drplan.plan import Database, DatabaseKind, Plan, Service, load_plan
from drplan.timeutil import format_duration, utcnow
from drplan.topology import DatabaseTopology, Member
from flows.shared.report import RecoveryReport
from tasks.fencing import FENCE_HOW, fence_member_task
from tasks.postgres import (
    Position,
    count_heartbeats,
    is_in_recovery,
    promote_standby,
    read_newest_heartbeat,
    read_newest_heartbeat_task,
    read_position,
    wait_replayed,
)
from tasks.protection import local_server
from tasks.rds import (
    describe_instance_task,
    promote_read_replica,
    read_replica_lag,
    wait_instance_available,
)
from tasks.topology import discover

RDS_POLL_SECONDS = 10.0


class Mode(StrEnum):
    multi_az = "multi-az"
    promote_replica = "promote-replica"


class Request:
    """A validated failover request resolved on the live topology: every check here runs before the first side
    effect. `member` is what to promote, relative to the live primary: `replica` (in its region) or `dr_replica`
    (in the other region); `old` is the live primary (when none accepts writes: the member the services use, the
    one that failed) and `new` the member that becomes the primary."""

    def __init__(self, plan: str | Plan, database: str, mode: str, member: str | None,
                 topology: DatabaseTopology | None = None):
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
        self.topology = topology or discover(self.plan, [self.db.name]).databases[0]
        self.position: Position | None = None
        """Where the old primary's history ended, once fence_and_drain has read it."""
        self.old, self.new = self._resolve(rds_multi_az)
        if self.mode is Mode.multi_az and self.db.kind is DatabaseKind.postgres and not self.runs_here(self.old):
            raise DrplanError(f"{self.db.name}: drplan can stop only a PostgreSQL primary it runs "
                              f"({self.old.identifier} is not one); stop it yourself, then run "
                              "mode=promote-replica member=replica")

    def _resolve(self, rds_multi_az: bool) -> tuple[Member, Member]:
        topology = self.topology
        old = topology.last_primary
        if old is None:
            raise DrplanError(f"{self.db.name}: no primary found, live or last used ("
                              f"{'; '.join(topology.differences[:1])}); see drplan topology")
        if rds_multi_az:
            return old, old
        started = promotion_in_flight(self.db)
        if started and started.get("member") == self.member and topology.primary is not None \
                and topology.primary.identifier == started.get("new"):
            # an earlier run promoted it and died before it finished: found promoted, nothing promoted again
            return topology.member(started.get("old")) or old, topology.primary
        new = topology.in_region_replica(old) if self.member == "replica" else topology.dr_replica(old)
        if new is None:
            where = topology.region_of(old) if self.member == "replica" else topology.other_region(old)
            raise DrplanError(f"{self.db.name}: the primary {old.identifier} has no replica in {where} to promote; "
                              f"run drplan reprotect --database {self.db.name} first")
        return old, new

    def runs_here(self, member: Member) -> bool:
        return self.server(member) is not None

    def server(self, member: Member) -> LocalPostgres | None:
        credentials = db_credentials(self.plan, self.db)
        return local_server(self.plan, self.db, member, credentials)

    def target(self, member: Member, credentials: DbCredentials) -> PgTarget:
        return member.target(self.db.dbname, credentials)

    @property
    def region(self) -> str:
        return self.topology.region_of(self.new) or self.plan.aws.region

    @property
    def identifier(self) -> str:
        return self.new.identifier


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
    replica = read_newest_heartbeat_task(request.target(request.new, credentials), table)
    try:  # the plain function: a primary that is down is expected here, not a failed task with a traceback
        primary = read_newest_heartbeat(request.target(request.old, credentials), table)
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


def promotion_variable(db: Database) -> str:
    return f"drplan-promotion-{db.name}"


def promotion_in_flight(db: Database) -> dict | None:
    """The promotion an earlier run started and did not finish (it recorded it just before promoting)."""
    from prefect.variables import Variable

    return Variable.get(promotion_variable(db), default=None)


def promotion_finished(db: Database) -> None:
    """The run that promoted has finished its cutover: a later run is a new request, not a rerun."""
    from prefect.variables import Variable

    Variable.unset(promotion_variable(db))


def promote(request: Request, report: RecoveryReport, new_primary: PgTarget) -> None:
    """Promote `request.new` (recorded first, so that a rerun after a crash finds it promoted and goes on)."""
    from prefect.variables import Variable

    Variable.set(promotion_variable(request.db), {"old": request.old.identifier, "new": request.identifier,
                                                  "member": request.member, "at": utcnow().isoformat()},
                 overwrite=True)
    if request.db.kind is DatabaseKind.rds:
        rds = aws_client(request.plan, "rds", request.region)
        if promote_read_replica(rds, request.identifier):
            report.record("promoted", request.identifier, "promote_read_replica", before="read replica",
                          after="standalone", mutating=True)
        wait_instance_available(rds, request.identifier, request.plan.drill.restore_timeout, RDS_POLL_SECONDS,
                                done=lambda i: not i.get("ReadReplicaSourceDBInstanceIdentifier"))
        return
    if request.mode is Mode.multi_az:
        server = request.server(request.old)
        if server is not None and server.stop(request.old.identifier):
            report.record("stopped", request.old.identifier, "fast shutdown", before="running", after="stopped",
                          mutating=True)
    if promote_standby(new_primary):
        report.record("promoted", request.identifier, "pg_promote()", before="standby", after="primary",
                      mutating=True)


def apply_fence(report: RecoveryReport, plan: Plan, db: Database, member: Member, credentials: DbCredentials,
                topology: DatabaseTopology) -> str:
    """Fence `member` (the old primary) before anything is promoted and record it (pending while unreachable);
    returns the fence's status."""
    target = member.target(db.dbname, credentials) if db.kind is DatabaseKind.postgres and member.host else None
    result = fence_member_task(plan, db, member.identifier, topology.region_of(member) or plan.aws.region, target)
    if result.status == "pending":
        report.record("fence pending", result.member, f"unreachable ({result.detail}); fenced as soon as it answers",
                      mutating=True)
    else:
        report.record(result.status, result.member, FENCE_HOW[db.kind], before="primary", after="fenced",
                      mutating=result.status == "fenced")
    return result.status


def fence_and_drain(request: Request, report: RecoveryReport, credentials: DbCredentials) -> str:
    """Fence the old primary and, when it answers, wait until the member to promote has replayed its last WAL: a
    switchover that loses no committed row (`request.position` keeps where the old history ended). PostgreSQL:
    fenced (read-only) first, then its final position read; RDS: its position read (the applications already
    stopped), the replica caught up, then cut off (a cut-off instance cannot be read). Returns the fence's status;
    an old primary that does not answer is fenced later (pending) and the lag guard bounds the loss."""
    if request.db.kind is DatabaseKind.rds:
        _drain(request, report, credentials)
    status = apply_fence(report, request.plan, request.db, request.old, credentials, request.topology)
    if request.db.kind is DatabaseKind.postgres and status != "pending":
        _drain(request, report, credentials)
    return status


def _drain(request: Request, report: RecoveryReport, credentials: DbCredentials) -> None:
    try:
        position = read_position(request.target(request.old, credentials), request.db.integrity.heartbeat_table)
    except (DrplanError, psycopg.Error) as exc:
        report.record("not drained", request.old.identifier, f"its last position is unreadable: {first_line(exc)}")
        return
    replayed = wait_replayed(request.target(request.new, credentials), position.lsn,
                             request.plan.objectives.rpo.database.total_seconds() + 30)
    report.record("caught up", request.identifier, f"replayed {replayed} >= {request.old.identifier}'s last "
                  f"{position.lsn}")
    request.position = position


def lost_rows(request: Request, credentials: DbCredentials) -> int | None:
    """Heartbeat rows the old primary had committed at its last position that the new primary lacks (goal 0);
    None when that position could not be read."""
    if request.position is None:
        return None
    found = count_heartbeats(request.target(request.new, credentials), request.db.integrity.heartbeat_table,
                             request.position.at)
    return request.position.heartbeats - found
