"""What every on-demand recovery flow shares: the report with its timeline, the approval gate, the one-recovery-
per-database lock, and the application cutover with validation and rollback.

The lock is a Prefect global concurrency limit `drplan-recovery-<database>` (limit 1, created on first use),
acquired without waiting: a second recovery of the same database fails at once. Its lease is renewed while the
run lives; a killed run's slot is freed when the lease expires (LOCK_LEASE, plus the server's repossessor loop),
or at once with `prefect gcl update drplan-recovery-<database> --active-slots 0` once you know the other run is dead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from urllib.parse import quote

import httpx
from prefect import get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Failed, State
from pydantic import BaseModel, Field, SecretStr

from drplan.clients import DbCredentials, PgTarget, kube_client
from drplan.errors import DrplanError, first_line
from drplan.plan import Database, Plan, Service
from drplan.timeutil import utcnow
from tasks.health import ServiceValidation, validate_service_task
from tasks.k8s import cut_over_task, find_database_secret, roll_back_task

LOCK_LEASE_SECONDS = 60
"""Prefect's shortest lease: how long a killed recovery keeps its database locked."""
APPROVAL_TIMEOUT_SECONDS = 3600


class Approval(RunInput):
    approve: bool
    reason: str = ""


class Step(BaseModel):
    """One entry of the recovery timeline (for the post-mortem)."""

    at: datetime
    action: str
    resource: str
    detail: str = ""
    before: str | None = None
    after: str | None = None


class RecoveryReport(BaseModel):
    flow: str
    plan: str
    subject: str
    """What the run recovers: a database, a cluster, a region."""
    kind: str = "database"
    dry_run: bool
    outcome: str = "started"
    steps: list[Step] = Field(default_factory=list)
    validation: ServiceValidation | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.outcome == "failed" or self.outcome.startswith("validation failed")

    def record(self, action: str, resource: str, detail: str = "", *, before: str | None = None,
               after: str | None = None, mutating: bool = False) -> None:
        """Add a timeline step; a mutating one is also an event (resource, action, actor, before/after)."""
        self.steps.append(Step(at=utcnow(), action=action, resource=resource, detail=detail, before=before,
                               after=after))
        change = f" ({before} -> {after})" if before is not None or after is not None else ""
        get_run_logger().info("%s %s %s%s", action, resource, detail, change)
        if mutating:
            emit_event(
                event=f"drplan.recovery.{action.replace(' ', '-')}",
                resource={"prefect.resource.id": f"drplan.{self.kind}.{self.subject}", "drplan.target": resource},
                payload={"action": action, "resource": resource, "detail": detail, "before": before,
                         "after": after, "actor": actor(self.flow)},
            )

    def timeline(self) -> str:
        lines = ["| at | action | resource | detail | before | after |", "|---|---|---|---|---|---|"]
        lines += [f"| {s.at:%H:%M:%SZ} | {s.action} | {s.resource} | {s.detail} | {s.before or ''} | "
                  f"{s.after or ''} |" for s in self.steps]
        return "\n".join(lines)

    def validation_table(self) -> str:
        if self.validation is None:
            return ""
        rows = [f"| {c.name} | {c.status.value} | {c.observed} | {c.expected} |" for c in self.validation.checks]
        return "\n".join(["", "| check | status | observed | expected |", "|---|---|---|---|", *rows])


@contextmanager
def published(report: RecoveryReport, key: str) -> Iterator[None]:
    """The body of a recovery run: an exception becomes the report's error (outcome `failed`) instead of escaping,
    and the report (each flow's report class has `markdown()`) is published as artifact `key` whatever happens."""
    try:
        yield
    except Exception as exc:
        report.error, report.outcome = first_line(exc), "failed"
    finally:
        create_markdown_artifact(key=key.lower(), markdown=report.markdown())


def finished(report: RecoveryReport, what: str) -> RecoveryReport | State:
    """The run's result: the report, or a Failed state (carrying the report) when the recovery failed."""
    if not report.failed:
        return report
    return Failed(message=f"{what}: {report.outcome}: {report.error or ''}".rstrip(": "), data=report)


def actor(flow_name: str) -> str:
    """Who did it: the flow run (and the deployment it came from), for events and the timeline."""
    run = runtime.flow_run.name or "local"
    deployment = runtime.deployment.name
    return f"{flow_name} run {run}" + (f" (deployment {deployment})" if deployment else "")


def lock_name(db: Database) -> str:
    return f"drplan-recovery-{db.name}"


@contextmanager
def recovery_lock(db: Database) -> Iterator[None]:
    """Hold the database's recovery lock for the block; refuse at once if another recovery holds it."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError  # not exported publicly in 3.9

    name = lock_name(db)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except Exception:  # created concurrently by another run: fine, it exists now
                client.read_global_concurrency_limit_by_name(name)
    try:
        with concurrency(name, occupy=1, max_retries=0, lease_duration=LOCK_LEASE_SECONDS, strict=True,
                         raise_on_lease_renewal_failure=False):
            yield
            return
    except ConcurrencySlotAcquisitionError as exc:
        cause = exc.__cause__
        if not (isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423):  # 423: taken
            raise
    raise DrplanError(
        f"another recovery of {db.name} is in progress (Prefect concurrency limit {name} is taken); wait for it "
        f"to finish, or if that run is dead, wait {LOCK_LEASE_SECONDS}s for its lease to expire or free it with "
        f"`prefect gcl update {name} --active-slots 0`")


def request_approval(report: RecoveryReport, key: str, summary: str, approve: bool) -> Approval:
    """The gate before the first destructive step: pre-approved (`--yes` / approve=True), or pause for an
    Approval given in the UI, through the REST API or by the CLI prompt."""
    if approve:
        decision = Approval(approve=True, reason="approved in advance (--yes / approve=true)")
    else:
        create_markdown_artifact(key=key, markdown=f"{summary}\n\n## Timeline so far\n\n{report.timeline()}")
        decision = pause_flow_run(wait_for_input=Approval, timeout=APPROVAL_TIMEOUT_SECONDS, poll_interval=2)
    report.record("approval", report.subject, f"approve={decision.approve} {decision.reason}".strip())
    return decision


def database_url(credentials: DbCredentials, host: str, port: int, dbname: str) -> SecretStr:
    """The application's connection string. It exists only in memory here and in the Kubernetes Secret."""
    return SecretStr(f"postgresql://{quote(credentials.username, safe='')}:"
            f"{quote(credentials.password.get_secret_value(), safe='')}@{host}:{port}/{dbname}")


def service_of(plan: Plan, db: Database) -> Service:
    """The application a cutover moves: the plan's service that uses this database in a cluster."""
    for service in plan.services:
        if service.database == db.name and service.cluster:
            return service
    raise DrplanError(f"no service in the plan uses database {db.name} in a cluster; add services[].database "
                      "and services[].cluster")


def find_app_secret(plan: Plan, service: Service) -> str:
    """`namespace/secret:key` holding the service's DATABASE_URL; refuses a missing deployment or Secret."""
    cluster = plan.cluster(service.cluster)
    secret, key = find_database_secret(kube_client(plan, cluster), cluster.namespace, service.name)
    return f"{cluster.namespace}/{secret}:{key}"


def cut_over_and_validate(plan: Plan, report: RecoveryReport, service: Service, url: SecretStr, database: PgTarget,
                          metrics_instance: tuple[str, str] | None = None) -> None:
    """Point the service at `url` (Secret, rollout, wait), validate it against `database`, and roll the Secret
    back if validation fails. Sets the report's outcome to `validation failed: rolled back` on failure."""
    cluster = plan.cluster(service.cluster)
    result = cut_over_task(plan, cluster, service.name, url)
    report.record("cut over", f"deployment {service.name}", f"Secret {result.secret}, rollout restarted"
                  if result.changed else f"Secret {result.secret} already set", before=result.previous_url_redacted,
                  after=result.url_redacted, mutating=True)
    report.validation = validate_service_task(plan, service, database, metrics_instance)
    if report.validation.passed:
        return
    back = roll_back_task(plan, cluster, service.name)
    report.record("rolled back", f"deployment {service.name}", "validation failed",
                  before=back.previous_url_redacted, after=back.url_redacted, mutating=True)
    report.outcome = "validation failed: rolled back"
