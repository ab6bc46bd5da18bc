"""Credential compromise: a new database password (`--database`) or API token (`--service`), rotated the way AWS's
own rotation functions do, and proof that the old one is refused.

input validated (the database or service exists, its secret is in Secrets Manager and is its own) -> live primary
discovered -> network exposure taken -> dry run lists the steps -> approval -> (its lock: database or service) ->
a new value staged AWSPENDING -> set in the system that checks it (ALTER ROLE with a SCRAM verifier, never the
password; the role's other client sessions ended) -> tested -> AWSCURRENT (the old value becomes AWSPREVIOUS) ->
each Kubernetes Secret that held the old value rewritten (primary and DR cluster), rollout -> validation: the old
credential refused, the new one accepted, the services healthy, network exposure unchanged. When validation fails
every change is undone in reverse (the old, compromised credential is then active again: the report says so).

No credential is a parameter, a log line, an event, a report entry or a process argument: values live in memory
(SecretStr), in Secrets Manager and in the Kubernetes Secrets only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from prefect import flow
from pydantic import SecretStr

from drplan.clients import DbCredentials, PgTarget, api_token, check_aws_access, db_credentials, kube_client
from drplan.clients import kubeconfig_path as kubeconfig_of
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Cluster, Database, Plan, Service, load_plan
from drplan.results import CheckResult
from flows.shared.gates import recovery_lock, request_approval, service_lock
from flows.shared.report import RecoveryReport, finished, published
from tasks.health import ServiceValidation, exposure_check, network_exposure, run_check, validate_service_task
from tasks.k8s import (
    DATABASE_ENV,
    TOKEN_ENV,
    deployment_exists,
    find_database_secret,
    read_secret_value,
    restart_deployment,
    wait_deployment_available,
    write_secret_value,
)
from tasks.postgres import end_sessions_of, login_refused, set_role_password
from tasks.rotation import (
    LEAKED_TAG,
    check_rotatable,
    current_version,
    leaked_at,
    make_current,
    new_credential,
    stage_pending,
)
from tasks.topology import discover


class RotationReport(RecoveryReport):
    kind: str = "credentials"

    def markdown(self) -> str:
        lines = [f"# credential rotation of {self.subject}: **{self.outcome}**"]
        if self.error:
            lines.append(f"\n- **error**: {self.error}")
        return "\n".join([*lines, "", "## Timeline", self.timeline(), self.validation_table()])


def chosen(plan: Plan, database: str, service: str) -> Database | Service:
    """The database or the service whose credential to rotate; bad input refused in one line."""
    if bool(database) == bool(service):
        raise DrplanError("name exactly one of --database NAME (its password) or --service NAME (its API token)")
    if database:
        db = plan.database(database)
        check_rotatable(db.credentials_secret)
        sharing = [d.name for d in plan.databases if d.credentials_secret == db.credentials_secret and d is not db]
        if sharing:
            raise DrplanError(f"secret {db.credentials_secret} also holds the credentials of {', '.join(sharing)}: "
                              f"a new password for {db.name} would lock drplan out of them; give each database its "
                              "own databases[].credentials_secret")
        return db
    svc = plan.service(service)
    if not svc.token_secret:
        raise DrplanError(f"service {svc.name} has no API token (services[].token_secret): nothing to rotate")
    check_rotatable(svc.token_secret)
    return svc


@dataclass(frozen=True)
class AppSecret:
    """A Kubernetes Secret key holding the credential, and the Deployment that reads it there (None: not deployed,
    as in a pilot-light DR cluster)."""

    cluster: Cluster
    secret: str
    key: str
    deployment: str | None

    @property
    def name(self) -> str:
        return f"{self.cluster.name}:{self.cluster.namespace}/{self.secret}:{self.key}"


def app_secrets(plan: Plan, services: list[Service], env: str) -> list[AppSecret]:
    """Where the services keep `env`: the Secret their Deployment takes it from in their cluster, and the Secret of
    that name in their DR cluster (synced there for a region failover)."""
    found = []
    for service in (s for s in services if s.cluster):
        home = plan.cluster(service.cluster)
        secret, key = find_database_secret(kube_client(plan, home), home.namespace, service.name, env)
        for cluster in [home] + ([plan.cluster(service.dr.cluster)] if service.dr else []):
            if not kubeconfig_of(plan, cluster).is_file():
                continue
            api = kube_client(plan, cluster)
            try:
                read_secret_value(api, cluster.namespace, secret, key)
            except DrplanError:  # no such Secret in this cluster
                continue
            deployed = service.name if deployment_exists(api, cluster.namespace, service.name) else None
            found.append(AppSecret(cluster, secret, key, deployed))
    return found


@dataclass
class Rotation:
    """One credential's rotation: what differs between a database password and an API token."""

    plan: Plan
    subject: str
    ref: str
    services: list[Service]
    secrets: list[AppSecret]
    value: Callable[[SecretStr], dict[str, str]]
    """The secret's JSON for a new credential."""
    app_value: Callable[[str, SecretStr], str | None]
    """A Kubernetes Secret's new value from its current one; None: it does not hold this credential."""
    set_in_system: Callable[[SecretStr], str] | None = None
    """setSecret: make the system accept the new credential (returns what was done); None: the app's Secret is it."""
    test: Callable[[SecretStr], tuple[bool, str]] | None = None
    """testSecret: (accepted, observed) for a credential."""
    refused: Callable[[], CheckResult] | None = None
    """The old credential is refused now."""
    restore_in_system: Callable[[SecretStr], None] | None = None
    """Undo set_in_system, given the new credential (the system accepts only that one by then)."""
    exposure: Callable[[], CheckResult] | None = None


def database_rotation(plan: Plan, db: Database) -> Rotation:
    topology = discover(plan, [db.name]).databases[0]
    primary = topology.primary
    if primary is None or not primary.accepts_writes:
        raise DrplanError(f"{db.name} has no writable primary now (see drplan topology); recover it first, then "
                          "rotate its password")
    old = db_credentials(plan, db)
    target = primary.target(db.dbname, old)
    instance = (topology.region_of(primary) or plan.aws.region, primary.identifier)
    before = network_exposure(plan, db, target, instance)
    users = [s for s in plan.services if s.database == db.name]

    def as_user(credentials: DbCredentials) -> PgTarget:
        return PgTarget(target.label, target.host, target.port, target.dbname, credentials)

    def set_password(new: SecretStr) -> str:
        set_role_password(target, old.username, new)
        ended = end_sessions_of(as_user(DbCredentials(old.username, new)), old.username)
        return f"ALTER ROLE {old.username} (SCRAM verifier); {ended} other session(s) of the role ended"

    def url_with(current: str, new: SecretStr) -> str | None:
        parts = urlsplit(current)
        if parts.username != old.username or parts.password is None:
            return None
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        netloc = f"{quote(old.username, safe='')}:{quote(new.get_secret_value(), safe='')}@{host}" + (
            f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def accepted(new: SecretStr) -> tuple[bool, str]:
        refused, reason = login_refused(as_user(DbCredentials(old.username, new)))
        return not refused and reason.startswith("logged in"), reason

    return Rotation(
        plan, db.name, db.credentials_secret, users, app_secrets(plan, users, DATABASE_ENV),
        value=lambda new: {"username": old.username, "password": new.get_secret_value()},
        app_value=url_with, set_in_system=set_password, test=accepted,
        refused=lambda: run_check(f"database {db.name}: old password", "login refused", lambda: login_refused(target)),
        restore_in_system=lambda new: set_role_password(as_user(DbCredentials(old.username, new)), old.username,
                                                        old.password),
        exposure=lambda: exposure_check(plan, db, before, as_user(db_credentials(plan, db)), instance))


def token_rotation(plan: Plan, service: Service) -> Rotation:
    old = api_token(plan, service)
    auth = [e for e in service.endpoints if e.auth]
    if not auth:
        raise DrplanError(f"service {service.name} has no endpoint with auth: true; drplan could not prove the old "
                          "token refused: add one to services[].endpoints")
    url = httpx.URL(service.health).join(auth[0].path)

    def answer(token: SecretStr) -> int:
        return httpx.get(url, headers={"Authorization": f"Bearer {token.get_secret_value()}"}, timeout=5).status_code

    def old_refused() -> CheckResult:
        return run_check(f"GET {auth[0].path} with the old token", "HTTP 401 or 403",
                    lambda: (answer(old) in (401, 403), f"HTTP {answer(old)}"))

    return Rotation(
        plan, service.name, service.token_secret, [service], app_secrets(plan, [service], TOKEN_ENV),
        value=lambda new: {"token": new.get_secret_value()},
        app_value=lambda current, new: new.get_secret_value() if current == old.get_secret_value() else None,
        test=lambda new: (answer(new) == auth[0].expect_status, f"HTTP {answer(new)}"), refused=old_refused)


@flow(name="rotate-credentials")
def rotate_credentials(plan: str = DEFAULT_PLAN, database: str = "", service: str = "", dry_run: bool = False,
                       approve: bool = False) -> RotationReport:
    """A new password for `database` or a new API token for `service`; the old one proved refused."""
    dr_plan = load_plan(plan)
    what = chosen(dr_plan, database, service)
    report = RotationReport(flow="rotate-credentials", plan=dr_plan.name, subject=what.name, dry_run=dry_run)
    check_aws_access(dr_plan)
    with published(report, f"rotate-credentials-{what.name}", dr_plan):
        rotation = database_rotation(dr_plan, what) if database else token_rotation(dr_plan, what)
        with recovery_lock(what) if database else service_lock(what.name):
            rotate(rotation, report, approve)
    return finished(report, f"credential rotation of {what.name}")


def rotate(rotation: Rotation, report: RotationReport, approve: bool) -> None:
    plan, ref = rotation.plan, rotation.ref
    steps = [f"- Secrets Manager {ref}: a new version AWSPENDING, tested, then AWSCURRENT (the old one AWSPREVIOUS)"]
    if rotation.set_in_system:
        steps.append(f"- {rotation.subject}: new password for its role (other sessions of the role ended)")
    steps += [f"- Kubernetes Secret {s.name} rewritten" + (f", deployment {s.deployment} restarted" if s.deployment
                                                            else "") for s in rotation.secrets]
    steps.append("- then: the old credential must be refused, the new one accepted, the services healthy")
    if (leaked := leaked_at(plan, ref)) is not None:
        report.record("leaked", f"secret {ref}", f"tagged {LEAKED_TAG} {leaked}: the credential it holds is known")
    if report.dry_run:
        for line in steps:
            report.record("would", rotation.subject, line.removeprefix("- "))
        report.outcome = "planned (dry run)"
        return
    summary = "\n".join([f"## Approve rotating the credential of {rotation.subject}?", "", *steps])
    if not request_approval(report, f"rotate-credentials-approval-{rotation.subject}", summary, approve,
                            plan.approval.timeout).approve:
        report.outcome = "refused: nothing changed"
        return
    undo: list[tuple[str, Callable[[], None]]] = []
    _apply(rotation, report, undo)
    report.validation = validate(rotation)
    if report.validation.passed:
        report.outcome = "rotated: the old credential is refused"
        return
    for what, step in reversed(undo):
        step()
        report.record("rolled back", what, "validation failed", mutating=True)
    report.outcome = "validation failed: rolled back (the old, compromised credential is active again)"


def _apply(rotation: Rotation, report: RotationReport, undo: list[tuple[str, Callable[[], None]]]) -> None:
    """The rotation's changes, each recorded and its undo pushed on `undo` (a failure midway undoes the done ones
    and re-raises)."""
    plan, ref, new = rotation.plan, rotation.ref, new_credential()
    try:
        replaced = current_version(plan, ref)
        version = stage_pending(plan, ref, rotation.value(new))
        report.record("staged", f"secret {ref}", f"version {version} AWSPENDING", mutating=True)
        if rotation.set_in_system:
            done = rotation.set_in_system(new)
            undo.append((rotation.subject, lambda: rotation.restore_in_system(new)))
            report.record("set", rotation.subject, done, mutating=True)
        changed = []
        for app in rotation.secrets:
            api = kube_client(plan, app.cluster)
            current = read_secret_value(api, app.cluster.namespace, app.secret, app.key)
            value = rotation.app_value(current, new) if current is not None else None
            if value is None:
                report.record("left alone", app.name, "does not hold this credential")
                continue
            write_secret_value(api, app.cluster.namespace, app.secret, app.key, value)
            undo.append((app.name, lambda a=app, was=current: _write_and_roll(plan, a, was)))
            report.record("rewritten", app.name, "new credential", mutating=True)
            changed.append(app)
        for app in (a for a in changed if a.deployment):
            _roll(plan, app)
            report.record("rolled out", f"deployment {app.cluster.name}/{app.deployment}", "restarted, available",
                          mutating=True)
        if rotation.test:
            accepted, observed = rotation.test(new)
            report.record("tested", f"version {version}", observed)
            if not accepted:
                raise DrplanError(f"the new credential of {rotation.subject} is not accepted ({observed})")
        make_current(plan, ref, version, replaced)
        undo.append((f"secret {ref}", lambda: make_current(plan, ref, replaced, version)))
        report.record("made current", f"secret {ref}", "AWSCURRENT", before=replaced, after=version, mutating=True)
    except Exception:
        for what, step in reversed(undo):
            step()
            report.record("rolled back", what, "the rotation failed midway", mutating=True)
        raise


def _roll(plan: Plan, app: AppSecret) -> None:
    api = kube_client(plan, app.cluster)
    restart_deployment(api, app.cluster.namespace, app.deployment)
    wait_deployment_available(api, app.cluster.namespace, app.deployment)


def _write_and_roll(plan: Plan, app: AppSecret, value: str) -> None:
    write_secret_value(kube_client(plan, app.cluster), app.cluster.namespace, app.secret, app.key, value)
    if app.deployment:
        _roll(plan, app)


def validate(rotation: Rotation) -> ServiceValidation:
    """The old credential refused, then each service's own validation (the new credential from AWSCURRENT), and
    the database's network exposure as before."""
    checks = [rotation.refused()]
    checks += [c for v in (validate_service_task(rotation.plan, s) for s in rotation.services) for c in v.checks]
    if rotation.exposure:
        checks.append(rotation.exposure())
    return ServiceValidation(service=rotation.subject, checks=checks)
