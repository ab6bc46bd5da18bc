"""Point-in-time recovery: the runbook's "Database Point-in-Time Recovery" and "Promote to Primary".

validate (plan, database, a target time inside the restorable window, the app's deployment and its Secret)
-> restore `<db>-recovery-<T>` (a rerun finds it) -> integrity checks -> [promote] approval gate showing exactly
what changes -> point the app's Secret at the restored database, roll the deployment, wait until available ->
validate the service -> on failed validation, roll the Secret back. Dry run lists each step and changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Failed
from pydantic import BaseModel, Field

from drplan.clients import DbCredentials, check_aws_access, db_credentials, kube_client, pg_target
from drplan.drill_report import CheckStatus, DrillCheck
from drplan.errors import DrplanError, first_line
from drplan.plan import Database, Plan, Service
from drplan.targets import RestoreTarget, Scratch, restore_target, scratch_name
from drplan.timeutil import utcnow
from flows.restore_drill import choose_target_time, validate_request
from tasks.database import check_restored_copy, find_restorable_window, restore_scratch
from tasks.health import ServiceValidation, validate_service_task
from tasks.k8s import cut_over, find_database_secret, roll_back

DEFAULT_PLAN = "plans/devonn.yaml"


class Approval(RunInput):
    approve: bool
    reason: str = ""


class Step(BaseModel):
    """One entry of the recovery timeline (for the post-mortem)."""

    at: datetime
    action: str
    resource: str
    detail: str = ""


class RecoveryReport(BaseModel):
    plan: str
    database: str
    target_time: datetime | None = None
    recovery_copy: str | None = None
    dry_run: bool
    promote: bool
    outcome: str = "started"
    steps: list[Step] = Field(default_factory=list)
    checks: list[DrillCheck] = Field(default_factory=list)
    validation: ServiceValidation | None = None
    error: str | None = None

    def record(self, action: str, resource: str, detail: str = "", mutating: bool = False) -> None:
        self.steps.append(Step(at=utcnow(), action=action, resource=resource, detail=detail))
        get_run_logger().info("%s %s %s", action, resource, detail)
        if mutating:
            emit_event(event=f"drplan.recovery.{action.replace(' ', '-')}",
                       resource={"prefect.resource.id": f"drplan.database.{self.database}"},
                       payload={"resource": resource, "detail": detail, "actor": "drplan pitr-recovery"})

    def markdown(self) -> str:
        lines = [f"# PITR recovery of {self.database}: **{self.outcome}**", "",
                 f"- target time {self.target_time or '-'}; recovery copy `{self.recovery_copy or '-'}`"]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        lines += ["", "| at | action | resource | detail |", "|---|---|---|---|"]
        lines += [f"| {s.at:%H:%M:%SZ} | {s.action} | {s.resource} | {s.detail} |" for s in self.steps]
        return "\n".join(lines)


def service_of(plan: Plan, db: Database) -> Service:
    """The application the cutover moves: the plan's service that uses this database in a cluster."""
    for service in plan.services:
        if service.database == db.name and service.cluster:
            return service
    raise DrplanError(f"no service in the plan uses database {db.name} in a cluster; add services[].database "
                      "and services[].cluster to promote")


@task(cache_policy=NO_CACHE)
def point_app_at(plan: Plan, service: Service, scratch: Scratch, db: Database, credentials: DbCredentials) -> str:
    """Write the restored copy's URL into the Secret the deployment references; roll and wait. Returns the
    redacted new URL. The URL with its password exists only here and in the Kubernetes Secret."""
    url = (f"postgresql://{quote(credentials.username, safe='')}:"
           f"{quote(credentials.password.get_secret_value(), safe='')}@{scratch.host}:{scratch.port}/{db.dbname}")
    result = cut_over(plan, plan.cluster(service.cluster), service.name, url)
    return f"{result.url_redacted} (was {result.previous_url_redacted}; changed={result.changed})"


def approval(report: RecoveryReport, service: Service, approve: bool) -> Approval:
    if approve:
        return Approval(approve=True, reason="approved in advance (--yes)")
    create_markdown_artifact(key=f"pitr-approval-{report.database}".lower(), markdown=(
        f"## Approve PITR recovery of {report.database}?\n\nThe application **{service.name}** will be pointed "
        f"at `{report.recovery_copy}` (restored to {report.target_time}): its Kubernetes Secret is rewritten and "
        "the deployment restarted. Validation failure rolls the Secret back.\n\n" + report.markdown()))
    return pause_flow_run(wait_for_input=Approval, timeout=3600, poll_interval=2)


@flow(name="pitr-recovery")
def pitr_recovery(
    plan: str = DEFAULT_PLAN,
    database: str = "",
    target_time: str = "latest",
    promote: bool = False,
    dry_run: bool = False,
    approve: bool = False,
) -> RecoveryReport:
    """Restore a database to a point in time; with promote, cut the application over after approval."""
    dr_plan, databases, when, _ = validate_request(plan, database or None, target_time, None)
    if len(databases) != 1:
        raise DrplanError("name the database to recover: database=NAME")
    db = databases[0]
    report = RecoveryReport(plan=dr_plan.name, database=db.name, dry_run=dry_run, promote=promote)
    service = service_of(dr_plan, db) if promote else None
    if service:
        cluster = dr_plan.cluster(service.cluster)
        secret, key = find_database_secret(kube_client(dr_plan, cluster), cluster.namespace, service.name)
        report.record("found", f"{cluster.namespace}/{secret}:{key}", f"used by deployment {service.name}")
    check_aws_access(dr_plan)
    target: RestoreTarget = restore_target(dr_plan, db)
    window = find_restorable_window(target)
    report.target_time = choose_target_time(window, when, None, dr_plan.drill.target_margin)
    report.recovery_copy = scratch_name(db, report.target_time, "recovery")
    if dry_run:
        report.record("would restore", report.recovery_copy, f"as of {report.target_time.isoformat()}")
        report.record("would check", report.recovery_copy, "integrity suites against the source")
        if service:
            report.record("would ask approval", service.name)
            report.record("would rewrite", f"Secret of {service.name}", "DATABASE_URL -> the recovery copy")
            report.record("would restart", f"deployment {service.name}", "and validate; roll back on failure")
        report.outcome = "planned (dry run)"
        return report
    try:
        recover(dr_plan, db, service, target, report, approve)
    except Exception as exc:
        report.error = first_line(exc)
        report.outcome = "failed"
    finally:
        create_markdown_artifact(key=f"pitr-recovery-{db.name}".lower(), markdown=report.markdown())
    if report.outcome.startswith(("failed", "validation failed")):
        return Failed(message=f"pitr recovery of {db.name}: {report.outcome}", data=report)
    return report


def recover(dr_plan: Plan, db: Database, service: Service | None, target: RestoreTarget, report: RecoveryReport,
            approve: bool) -> None:
    """Restore and check; with a service: approval, cutover, validation, rollback on failure."""
    credentials = db_credentials(dr_plan, db)
    scratch = restore_scratch(target, report.recovery_copy, report.target_time, credentials)
    report.record("restored", report.recovery_copy, f"{scratch.host}:{scratch.port}", mutating=True)
    report.checks = check_restored_copy(pg_target(dr_plan, db, "primary", credentials),
                                        scratch.target(db, credentials), db.integrity, report.target_time)
    failed = [c.name for c in report.checks if c.status is not CheckStatus.passed]
    report.record("checked", report.recovery_copy, f"{len(report.checks)} checks, not passed: {failed or 'none'}")
    report.outcome = "restored"
    if service is None:
        return
    decision = approval(report, service, approve)
    report.record("approval", service.name, f"approve={decision.approve} {decision.reason}".strip())
    if not decision.approve:
        report.outcome = "refused: nothing changed"
        return
    detail = point_app_at(dr_plan, service, scratch, db, credentials)
    report.record("cut over", f"deployment {service.name}", detail, mutating=True)
    report.validation = validate_service_task(dr_plan, service)
    if report.validation.passed:
        report.outcome = "promoted"
        return
    back = roll_back(dr_plan, dr_plan.cluster(service.cluster), service.name)
    report.record("rolled back", f"deployment {service.name}", back.url_redacted, mutating=True)
    report.outcome = "validation failed: rolled back"
