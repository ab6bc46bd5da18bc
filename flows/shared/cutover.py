"""The application cutover: the service's Kubernetes Secret pointed at the new database, rollout, validation,
and a roll-back of the Secret when validation fails; a passed validation records the service's known-good
revision (tasks/revisions.py)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from pydantic import SecretStr

from drplan.clients import DbCredentials, PgTarget, kube_client
from drplan.errors import DrplanError
from drplan.plan import Database, Plan, Service
from drplan.results import CheckResult
from flows.shared.exposure import with_exposure
from flows.shared.report import RecoveryReport
from tasks.health import validate_service_task
from tasks.k8s import cut_over_task, find_database_secret, roll_back_task
from tasks.revisions import remember_known_good


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
                          metrics_instance: tuple[str, str] | None = None,
                          before_rollback: Callable[[], None] | None = None,
                          after_cutover: Callable[[], None] | None = None,
                          exposure: Callable[[], CheckResult] | None = None) -> None:
    """Point the service at `url` (Secret, rollout, wait; then `after_cutover`), validate it against `database`
    (with `exposure`, the network exposure check, when the runbook took the exposure before its change), and roll
    the Secret back if validation fails (after `before_rollback`, e.g. lifting the fence of the database it returns
    to). Sets the report's outcome to `validation failed: rolled back` on failure."""
    cluster = plan.cluster(service.cluster)
    result = cut_over_task(plan, cluster, service.name, url)
    if after_cutover is not None:
        after_cutover()
    report.record("cut over", f"deployment {service.name}", f"Secret {result.secret}, rollout restarted"
                  if result.changed else f"Secret {result.secret} already set", before=result.previous_url_redacted,
                  after=result.url_redacted, mutating=True)
    report.validation = with_exposure(validate_service_task(plan, service, database, metrics_instance), exposure)
    if report.validation.passed:
        remember_known_good(plan, cluster, service.name, f"validated by {report.flow}")
        return
    if before_rollback is not None:
        before_rollback()
    back = roll_back_task(plan, cluster, service.name)
    report.record("rolled back", f"deployment {service.name}", "validation failed",
                  before=back.previous_url_redacted, after=back.url_redacted, mutating=True)
    report.outcome = "validation failed: rolled back"
