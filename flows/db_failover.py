"""Database failover: the runbook's "RDS Multi-AZ Failover" test and "Promote to Primary" (cross-region).

multi-az:
  rds       check the instance is Multi-AZ -> approval -> reboot with forced failover -> wait available ->
            validate (connectivity, CloudWatch, the service). The endpoint name does not change: no cutover.
  postgres  lag guard on the streaming replica -> approval -> stop the primary (its fence) -> pg_promote() the
            replica -> point the app at it -> validate -> roll the Secret back if validation fails.
promote-replica (the DR replica by default):
  lag guard (newest heartbeat on the replica for postgres, CloudWatch ReplicaLag for rds; refuse beyond the
  database RPO unless force) -> approval -> fence the old primary (tasks/fencing.py: read-only with its sessions
  ended, RDS cut off by a security group; unreachable: the fence is pending and applied once it answers;
  skipping it needs force) -> promote (pg_promote() / promote_read_replica, wait) -> point the app at it ->
  validate -> roll back on failure.
Every mode reads the live primary's network exposure before approval (before any fence) and its validation checks
the new primary's is the same (flows/shared/exposure.py).
Every step is rerun-safe: a stopped primary stays stopped, a promoted replica is not promoted again, a Secret
already set is left alone. Dry run reports each step and resource and changes nothing.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial

from prefect import flow

from drplan.clients import DbCredentials, aws_client, check_aws_access, db_credentials
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, DatabaseKind
from drplan.timeutil import format_duration
from flows.shared.cutover import cut_over_and_validate, database_url, find_app_secret
from flows.shared.exposure import exposure_before, with_exposure
from flows.shared.gates import recovery_lock, request_approval
from flows.shared.promotion import (
    RDS_POLL_SECONDS,
    Mode,
    Request,
    already_promoted,
    apply_fence,
    lag_guard,
    metrics,
    promote,
    promotion_finished,
)
from flows.shared.report import RecoveryReport, finished, published
from flows.shared.requests import first_alarm_time
from tasks.fencing import FENCE_HOW
from tasks.health import moved_exposure_check, validate_database_task, validate_service_task
from tasks.rds import (
    describe_instance_task,
    reboot_with_failover,
    wait_instance_available,
)


class FailoverReport(RecoveryReport):
    mode: Mode
    member: str
    """Role of the member that becomes the primary (`replica` / `dr_replica`), or `primary` for rds multi-az."""
    lag_seconds: float | None = None
    forced: bool = False
    fence: str | None = None
    """What happened to the old primary: fenced, already fenced, pending, stopped, or skipped (forced)."""

    def data_at_risk(self) -> str:
        if self.lag_seconds is None:
            return "replica lag not measured (Multi-AZ replication is synchronous)" if self.mode is Mode.multi_az \
                else "replica lag not measured"
        forced = ", promoted with --force past the lag guard" if self.forced else ""
        return f"replica lag {self.lag_seconds:.1f}s at promotion{forced}; old primary {self.fence or 'not fenced'}"

    def markdown(self) -> str:
        lag = "-" if self.lag_seconds is None else format_duration(timedelta(seconds=self.lag_seconds))
        lines = [f"# {self.mode} failover of {self.subject}: **{self.outcome}**", "",
                 f"- new primary: {self.member}; replica lag {lag}{' (forced past the guard)' if self.forced else ''}",
                 f"- old primary: {self.fence or '-'}"]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        return "\n".join([*lines, "", self.timeline(), self.validation_table()])


@flow(name="db-failover")
def db_failover(
    plan: str = DEFAULT_PLAN,
    database: str = "",
    mode: str = "promote-replica",
    member: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    approve: bool = False,
    fence: bool = True,
    first_alarm: str | None = None,
) -> FailoverReport:
    """Fail a database over to a replica (or test RDS Multi-AZ failover), fence the old primary, cut the app over,
    validate. `fence=False` (skip the fence) needs `force`. `first_alarm`: when the alarm that started this fired
    (alarm-triggered runs; the post-mortem's impact window starts there)."""
    alarm = first_alarm_time(first_alarm)
    request = Request(plan, database, mode, member)
    if not fence and not force:
        raise DrplanError("skipping the fence of the old primary needs force (--force): both primaries could "
                          "accept writes")
    report = FailoverReport(flow="db-failover", plan=request.plan.name, subject=request.db.name, dry_run=dry_run,
                            mode=request.mode, member=request.member, forced=force, first_alarm=alarm)
    if request.service and not (request.mode is Mode.multi_az and request.db.kind is DatabaseKind.rds):
        report.record("found", find_app_secret(request.plan, request.service),
                      f"used by deployment {request.service.name}")
    check_aws_access(request.plan)
    credentials = db_credentials(request.plan, request.db)
    with published(report, f"db-failover-{request.db.name}", request.plan), recovery_lock(request.db):
        fail_over(request, report, credentials, dry_run, force, approve, fence)
        if not dry_run:
            promotion_finished(request.db)
    return finished(report, f"{request.mode} failover of {request.db.name}")


def fail_over(request: Request, report: FailoverReport, credentials: DbCredentials, dry_run: bool, force: bool,
              approve: bool, fence: bool) -> None:
    if request.db.kind is DatabaseKind.rds and request.mode is Mode.multi_az:
        rds_multi_az(request, report, dry_run, approve)
        return
    new_primary = request.target(request.new, credentials)
    already = already_promoted(request, new_primary)
    if already:
        report.record("found promoted", request.identifier, "promoted by an earlier run; no lag guard, no promotion")
    else:
        report.lag_seconds = lag_guard(request, report, credentials, force)
    if dry_run:
        plan_steps(request, report, already, fence)
        return
    before = exposure_before(report, request.plan, request.db, request.topology, credentials)
    if not already:
        decision = request_approval(report, f"db-failover-approval-{request.db.name}".lower(),
                                    approval_summary(request, report, fence), approve,
                                    request.plan.approval.timeout)
        if not decision.approve:
            report.outcome = "refused: nothing changed"
            return
    if request.mode is Mode.promote_replica:
        fence_old_primary(request, report, credentials, fence)
    if not already:
        promote(request, report, new_primary)
    report.outcome = "failed over"
    exposure = partial(moved_exposure_check, request.plan, request.db, before, new_primary, metrics(request))
    if request.service is None:
        report.record("no cutover", request.db.name, "no service of the plan uses this database in a cluster")
        report.validation = with_exposure(
            validate_database_task(request.plan, request.db, new_primary, metrics(request)), exposure)
        if not report.validation.passed:
            report.outcome = "validation failed: database checks"
        return
    url = database_url(credentials, new_primary.host, new_primary.port, request.db.dbname)
    cut_over_and_validate(request.plan, report, request.service, url, new_primary, metrics(request),
                          exposure=exposure)


def fence_old_primary(request: Request, report: FailoverReport, credentials: DbCredentials, fence: bool) -> None:
    """Before the promotion: the old primary accepts no more writes (or its fence is pending until it answers)."""
    old = request.old.identifier
    if not fence:
        report.fence = "skipped (forced)"
        report.record("fence skipped", old, "forced: the old primary may still accept writes", mutating=True)
        return
    report.fence = apply_fence(report, request.plan, request.db, request.old, credentials, request.topology)


def plan_steps(request: Request, report: FailoverReport, already: bool, fence: bool) -> None:
    """The dry run: every step and resource, nothing changed."""
    if request.mode is Mode.multi_az:
        report.record("would stop", request.old.identifier, "fast shutdown of the primary")
    if not already:
        report.record("would ask approval", request.db.name)
    if request.mode is Mode.promote_replica:
        report.record("would fence" if fence else "would skip the fence", request.old.identifier,
                      FENCE_HOW[request.db.kind] if fence else "forced: the old primary may still accept writes")
    if not already:
        report.record("would promote", request.identifier,
                      "pg_promote()" if request.db.kind is DatabaseKind.postgres else "promote_read_replica")
    if request.service:
        report.record("would rewrite", f"Secret of {request.service.name}", f"DATABASE_URL -> {request.identifier}")
        report.record("would restart", f"deployment {request.service.name}", "and validate; roll back on failure")
    else:
        report.record("would validate", request.identifier, "connectivity")
    report.outcome = "planned (dry run)"


def approval_summary(request: Request, report: FailoverReport, fence: bool) -> str:
    lines = [f"## Approve {request.mode} failover of {request.db.name}?", ""]
    if request.mode is Mode.multi_az:
        lines.append(f"- the primary **{request.old.identifier}** is stopped (fast shutdown)")
    lines.append(f"- **{request.identifier}** ({request.member}, {request.region}) is promoted to a standalone "
                 f"primary; replica lag {report.lag_seconds}s. This cannot be undone: the old primary must be "
                 "rebuilt from it to replicate again")
    if request.mode is Mode.promote_replica:
        lines.append(f"- the old primary **{request.old.identifier}** is fenced first ({FENCE_HOW[request.db.kind]}; "
                     "pending until it answers if unreachable)" if fence else
                     f"- the old primary **{request.old.identifier}** is **not fenced** (forced): it may still "
                     "accept writes")
    if request.service:
        lines.append(f"- the application **{request.service.name}** is pointed at it (Kubernetes Secret "
                     "rewritten, deployment restarted), validated, and rolled back if validation fails")
    return "\n".join(lines)


def rds_multi_az(request: Request, report: FailoverReport, dry_run: bool, approve: bool) -> None:
    """Reboot with forced failover, wait, then validate; the endpoint is unchanged, so there is no cutover."""
    rds, primary = aws_client(request.plan, "rds", request.region), request.old.identifier
    instance = describe_instance_task(rds, primary)
    if not instance.get("MultiAZ"):
        raise DrplanError(f"{primary} is not Multi-AZ; there is no standby to fail over to "
                          "(modify it with MultiAZ=true first)")
    zones = f"{instance.get('AvailabilityZone')} / standby {instance.get('SecondaryAvailabilityZone')}"
    if dry_run:
        report.record("would ask approval", request.db.name)
        report.record("would reboot", primary, f"ForceFailover=True ({zones})")
        report.record("would validate", primary, "connectivity and CloudWatch metrics")
        report.outcome = "planned (dry run)"
        return
    credentials = db_credentials(request.plan, request.db)
    before = exposure_before(report, request.plan, request.db, request.topology, credentials)
    if instance["DBInstanceStatus"] != "rebooting":
        summary = (f"## Approve a Multi-AZ failover test of {request.db.name}?\n\n**{primary}** "
                   f"({zones}) reboots with ForceFailover: connections drop for about a minute.")
        decision = request_approval(report, f"db-failover-approval-{request.db.name}".lower(), summary, approve,
                                    request.plan.approval.timeout)
        if not decision.approve:
            report.outcome = "refused: nothing changed"
            return
    if reboot_with_failover(rds, primary):
        report.record("rebooted", primary, "ForceFailover=True", before=zones, mutating=True)
    after = wait_instance_available(rds, primary, request.plan.drill.restore_timeout, RDS_POLL_SECONDS)
    report.record("available", primary,
                  f"{after.get('AvailabilityZone')} / standby {after.get('SecondaryAvailabilityZone')}")
    target = request.target(request.old, credentials)
    report.validation = with_exposure(
        validate_service_task(request.plan, request.service, target) if request.service
        else validate_database_task(request.plan, request.db, target),
        partial(moved_exposure_check, request.plan, request.db, before, target, (request.region, primary)))
    report.outcome = "failed over" if report.validation.passed else "validation failed"
