"""Cross-region full-stack rehearsal: the whole stack brought up from scratch in the DR region, isolated from
everything serving, validated, timed and torn down. Also the runbook's "deploy the application from scratch" test.

For each database a DR service uses: a copy made from what the DR region itself holds (its DR replica cloned and
promoted: tasks/clones.py) -> in each DR cluster a new namespace `drplan-rehearsal-<stamp>` holding the Secrets the
manifests reference (copied from the cluster's own namespace, the database Secrets pointing at the copy), the
manifests applied from scratch, each DR service's Deployment exposed through a Service of type LoadBalancer and
waited for -> recovery validation of each service through its load balancer against the copy (health, query, auth,
endpoints) -> the whole-stack RTO (start to validated) against the strictest tier objective of those services ->
always: the namespace deleted with everything in it, the copies removed (no DNS record is made, so none is
removed). First, what an earlier rehearsal left (a killed run's namespaces and copies, older than
drill.sweep_after by the stamp in their names) is removed; a younger one may belong to a rehearsal still running.
A Deployment that never becomes available, a failed check or a missed RTO fails the rehearsal naming it; a step that
could not run, or anything left behind, is an error.
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlsplit

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed
from pydantic import BaseModel, Field, computed_field

from drplan.clients import PgTarget, db_credentials, kube_client
from drplan.drill_report import Measured
from drplan.errors import DrplanError, first_line
from drplan.plan import DEFAULT_PLAN, Cluster, DatabaseKind, Plan, Service, load_plan
from drplan.results import CheckResult, Status, markdown_table
from drplan.timeutil import utcnow
from flows.shared.cutover import database_url
from tasks.clones import clone_dr_replica, drop_clone, rehearsal_clones
from tasks.health import validate_service_task
from tasks.k8s import DATABASE_ENV, DeploymentNotAvailable, wait_deployment_available
from tasks.manifests import apply_manifest, env_secret_ref, render_manifests, secret_refs
from tasks.namespaces import copy_secret, create_namespace, delete_namespace, expose, labelled_namespaces
from tasks.targets import copy_stamp, scratch_name, stamp_time

NAMESPACE_LABEL = "drplan/rehearsal"
EXPOSE_TIMEOUT = 60.0
DELETE_TIMEOUT = 120.0


class RehearsalReport(BaseModel):
    plan: str
    region: str
    started_at: datetime
    finished_at: datetime | None = None
    namespace: str
    copies: dict[str, str] = Field(default_factory=dict)
    """database -> the copy made from its DR replica."""
    load_balancers: dict[str, str] = Field(default_factory=dict)
    checks: list[CheckResult] = Field(default_factory=list)
    swept: list[str] = Field(default_factory=list)
    """What earlier rehearsals had left behind (killed runs) and this one removed."""
    findings: list[str] = Field(default_factory=list)
    """What the rehearsal found wrong with the stack (a deployment never available, a failed check, a missed RTO)."""
    rto: Measured | None = None
    error: str | None = None
    """Why the rehearsal could not complete."""
    teardown: list[str] = Field(default_factory=list)
    teardown_error: str | None = None
    """What could not be removed: something is left behind."""

    @computed_field
    @property
    def status(self) -> Status:
        if self.error or self.teardown_error:
            return Status.error
        return Status.failed if self.findings else Status.passed

    @property
    def summary(self) -> str:
        passed = sum(c.passed for c in self.checks)
        parts = [f"RTO {self.rto or '-'}", f"{passed}/{len(self.checks)} checks passed",
                 *(self.findings), *([f"error: {self.error}"] if self.error else []),
                 f"left behind: {self.teardown_error}" if self.teardown_error else "torn down"]
        return "; ".join(parts)

    def markdown(self) -> str:
        lines = [f"## Cross-region rehearsal in {self.region}: **{self.status.value}**", "",
                 f"Namespace `{self.namespace}`, started {self.started_at:%Y-%m-%d %H:%M:%SZ}; RTO {self.rto or '-'}",
                 "", *(f"- removed, left by an earlier rehearsal: {what}" for what in self.swept),
                 *(f"- copy of {db}: `{name}`" for db, name in self.copies.items()),
                 *(f"- {service} through {url}" for service, url in self.load_balancers.items()),
                 *(f"- **finding**: {finding}" for finding in self.findings),
                 *([f"- **error**: {self.error}"] if self.error else [])]
        if self.checks:
            lines += ["", markdown_table(["check", "status", "observed", "expected"],
                                         [[c.name, c.status.value, c.observed, c.expectation] for c in self.checks])]
        lines += ["", "Torn down: " + (", ".join(self.teardown) or "nothing was created")]
        if self.teardown_error:
            lines.append(f"**Left behind**: {self.teardown_error}")
        return "\n".join(lines)


def dr_services(plan: Plan) -> list[tuple[Service, Cluster]]:
    """Each service that runs in the DR region, with its cluster there."""
    return [(s, plan.cluster(s.dr.cluster)) for s in plan.services if s.dr]


def deploy(plan: Plan, cluster: Cluster, namespace: str, urls: dict[str, str], report: RehearsalReport,
           timeout: float) -> dict[str, str]:
    """The manifests from scratch into `namespace` with their Secrets (database Secrets holding `urls`, by
    service); each DR service exposed and waited for. Returns service -> its load balancer's base URL."""
    api = kube_client(plan, cluster)
    objects = render_manifests(plan, cluster)
    if not objects:
        raise DrplanError(f"cluster {cluster.name} has no manifests to deploy; set clusters[].manifests")
    services = [s for s, c in dr_services(plan) if c.name == cluster.name]
    overrides: dict[str, dict[str, str]] = {}
    for service in services:
        if service.name in urls:
            secret, key = env_secret_ref(objects, service.name, DATABASE_ENV)
            overrides.setdefault(secret, {})[key] = urls[service.name]
    create_namespace(api, namespace, {NAMESPACE_LABEL: "true"})
    for secret in sorted(secret_refs(objects)):
        copy_secret(api, cluster.namespace, namespace, secret, overrides.get(secret))
    for obj in objects:
        apply_manifest(api, namespace, obj)
    bases = {s.name: expose(api, namespace, s.name, EXPOSE_TIMEOUT) for s in services}
    report.load_balancers |= bases
    for service in services:
        wait_deployment_available(api, namespace, service.name, timeout)
    return bases


def sweep_earlier(plan: Plan, report: RehearsalReport, clusters: list[Cluster], databases: list[str]) -> None:
    """Remove the namespaces and copies that rehearsals made more than drill.sweep_after before this one (killed runs
    leave them); each is named in `report.swept`."""
    before = report.started_at - plan.drill.sweep_after

    def earlier(name: str) -> bool:
        made = stamp_time(name)
        return made is not None and made < before

    for cluster in clusters:
        api = kube_client(plan, cluster)
        for namespace in filter(earlier, labelled_namespaces(api, NAMESPACE_LABEL)):
            delete_namespace(api, namespace, DELETE_TIMEOUT)
            report.swept.append(f"namespace {namespace} in {cluster.name}")
    for name in databases:
        db = plan.database(name)
        for copy in filter(earlier, rehearsal_clones(plan, db)):
            if drop_clone(plan, db, copy):
                report.swept.append(f"copy {copy}")
    if report.swept:
        get_run_logger().warning("removed what earlier rehearsals left: %s", ", ".join(report.swept))


def tear_down(plan: Plan, report: RehearsalReport, clusters: list[Cluster]) -> None:
    """Delete the namespace in each cluster and every copy; what fails is named, the rest still goes."""
    left = []
    for cluster in clusters:
        try:
            removed = delete_namespace(kube_client(plan, cluster), report.namespace, DELETE_TIMEOUT)
            report.teardown += [f"{cluster.name}: {what}" for what in removed]
        except Exception as exc:  # noqa: BLE001 - named in the report; the copies still go
            left.append(f"namespace {report.namespace} in {cluster.name} ({first_line(exc)})")
    for database, name in report.copies.items():
        try:
            if drop_clone(plan, plan.database(database), name):
                report.teardown.append(f"copy {name}")
        except Exception as exc:  # noqa: BLE001 - named in the report
            left.append(f"copy {name} ({first_line(exc)})")
    report.teardown_error = "; ".join(left) or None


@flow(name="dr-rehearsal")
def dr_rehearsal(plan: str = DEFAULT_PLAN, timeout: float = 300.0) -> RehearsalReport:
    """Bring the stack up from scratch in an isolated namespace of the DR region against copies of the DR
    replicas, validate it, measure the RTO, tear everything down. `timeout`: seconds each Deployment may take to
    become available."""
    if timeout <= 0:
        raise DrplanError(f"timeout {timeout:g} must be positive (seconds a Deployment may take to become available)")
    dr_plan = load_plan(plan)
    placed = dr_services(dr_plan)
    if not placed:
        raise DrplanError(f"plan {dr_plan.name} has no service with a dr placement; add services[].dr")
    logger = get_run_logger()
    started = utcnow()
    report = RehearsalReport(plan=dr_plan.name, region=dr_plan.aws.dr_region, started_at=started,
                             namespace=f"drplan-rehearsal-{copy_stamp(started)}")
    clusters = list({c.name: c for _, c in placed}.values())
    databases = list(dict.fromkeys(s.database for s, _ in placed if s.database))
    try:
        sweep_earlier(dr_plan, report, clusters, databases)
        targets: dict[str, PgTarget] = {}
        for name in databases:
            db = dr_plan.database(name)
            report.copies[name] = scratch_name(db, started, "rehearsal")
            targets[name] = clone_dr_replica(dr_plan, db, report.copies[name], db_credentials(dr_plan, db))
        urls = {s.name: database_url(targets[s.database].credentials, targets[s.database].host,
                                     targets[s.database].port, targets[s.database].dbname).get_secret_value()
                for s, _ in placed if s.database}
        bases: dict[str, str] = {}
        for cluster in clusters:
            bases |= deploy(dr_plan, cluster, report.namespace, urls, report, timeout)
        for service, _ in placed:
            health = bases[service.name] + urlsplit(service.dr.health).path
            db = dr_plan.database(service.database) if service.database else None
            metrics = (report.region, report.copies[db.name]) if db and db.kind is DatabaseKind.rds else None
            validation = validate_service_task(dr_plan, service.model_copy(update={"health": health}),
                                               targets.get(service.database or ""), metrics)
            report.checks += [c.model_copy(update={"name": f"{service.name}: {c.name}"}) for c in validation.checks]
        report.findings += [f"{c.name} {c.status.value} (observed {c.observed})" for c in report.checks
                            if not c.passed]
        report.rto = Measured(measured=utcnow() - started,
                              objective=min(dr_plan.objectives.rto_for(s.tier) for s, _ in placed))
        if not report.rto.met:
            report.findings.append(f"RTO {report.rto}")
    except DeploymentNotAvailable as exc:
        report.findings.append(str(exc))
    except Exception as exc:  # the report says what failed; the teardown below still runs
        report.error = first_line(exc)
    finally:
        tear_down(dr_plan, report, clusters)
        report.finished_at = utcnow()
    logger.info("rehearsal in %s: %s (%s)", report.region, report.status.value, report.summary)
    create_markdown_artifact(key="dr-rehearsal", markdown=report.markdown(),
                             description=f"cross-region rehearsal of {report.plan}: {report.status.value}")
    if report.status is not Status.passed:
        return Failed(message=f"rehearsal {report.status.value}: {report.summary}", data=report)
    return report
