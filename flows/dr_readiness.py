"""DR readiness: could this region take over right now? (scheduled every 30 minutes, like Route 53 ARC's
readiness checks). One finding per question, each ready or not with what was seen:

- AWS credentials work (STS) and can read what the failover changes (RDS member, EKS cluster, the hosted zone);
- they may perform every action the plan's runbooks need (`drplan plan iam-policy`), by IAM policy simulation of
  the caller; not checked (and not counted against readiness) when the credentials may not simulate;
- each database is protected: its live primary archives WAL and has the replicas the plan requires;
- the database member there: a replica within the database RPO (lag), or a primary that accepts writes;
- the cluster is ACTIVE with at least `failover.min_ready_nodes` Ready nodes (a node group at zero is not ready);
- its manifests load with the cluster's overrides, hold the deployments `failover.scale` names, and the Secrets
  they reference exist in the namespace (the Kubernetes credentials can read them);
- the DNS records exist, the region has a target, and a Route 53 health check watches it;
- with `evidence:` in the plan, the newest DR test recorded there is at most a quarter (92 days) plus
  `evidence.grace` old (the DR test itself and a region failover leave this out: it says nothing about whether
  the region could take over now);
- plan drift: no resource tagged `drplan:protect` is left out of the plan, and every bucket and RDS member the plan
  names exists (`drplan plan drift`; a region failover leaves this out, for the same reason).
An unready region emits `drplan.readiness.unready` (notified by deployments/automations.py); the run fails.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from kubernetes import client as k8s
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.states import Failed
from pydantic import BaseModel, Field

from drplan.clients import aws_client, check_aws_access, db_credentials, kube_client
from drplan.errors import first_line
from drplan.evidence import QUARTER, newest, open_store
from drplan.plan import DEFAULT_PLAN, PROTECT_TAG, DatabaseKind, Plan, load_plan
from drplan.regions import Placement, placements
from drplan.report_files import READINESS_PREFIX, write_json
from drplan.results import markdown_table
from drplan.timeutil import format_duration, utcnow
from drplan.topology import DatabaseTopology
from flows.shared.promotion import Request, measure_lag
from tasks.eks import cluster_status, nodegroup_state
from tasks.fencing import apply_pending_fences
from tasks.iam import CannotSimulate, denied_permissions
from tasks.inventory import plan_drift
from tasks.manifests import render_manifests, secret_refs
from tasks.rds import describe_instance
from tasks.route53 import health_check_for, read_records
from tasks.topology import discover_topology


class Finding(BaseModel):
    check: str
    ready: bool
    detail: str


class ReadinessReport(BaseModel):
    plan: str
    region: str
    checked_at: datetime
    findings: list[Finding] = Field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(f.ready for f in self.findings)

    @property
    def unready(self) -> list[Finding]:
        return [f for f in self.findings if not f.ready]

    def markdown(self) -> str:
        rows = [[f.check, "ready" if f.ready else "**NOT READY**", f.detail] for f in self.findings]
        return "\n".join([f"# Region {self.region}: **{'ready' if self.ready else 'not ready'}** to take over", "",
                          markdown_table(["check", "state", "detail"], rows)])


def _finding(report: ReadinessReport, check: str, probe: Callable[[], tuple[bool, str]]) -> None:
    """Run one check; an exception makes it not ready with the error's first line."""
    try:
        ready, detail = probe()
    except Exception as exc:  # a check reports, it does not stop the others
        ready, detail = False, first_line(exc)
    report.findings.append(Finding(check=check, ready=ready, detail=detail))


def database_probe(plan: Plan, placement: Placement, topology: DatabaseTopology) -> Callable[[], tuple[bool, str]]:
    """The member that would serve in the region, on the live topology: the live primary when it is there, else
    its replica there within the database RPO (lag)."""
    def probe() -> tuple[bool, str]:
        db, region = placement.database, plan.region_of(placement.cluster)
        old = topology.last_primary
        if old is None:
            return False, "no primary found: " + "; ".join(topology.differences[:1])
        if db.kind is DatabaseKind.rds:  # the credentials can read the instance the failover promotes
            describe_instance(aws_client(plan, "rds", topology.region_of(old)), old.identifier)
        if topology.region_of(old) == region:
            if old is topology.primary:
                return True, f"{old.identifier} is the live primary here (accepts writes)"
            return False, f"{old.identifier}, the primary here, is {old.state}" + (f": {old.detail}" if old.detail
                                                                                  else "")
        replica = topology.dr_replica(old)
        if replica is None or topology.region_of(replica) != region:
            return False, (f"the primary {old.identifier} has no replica in {region}: run drplan reprotect "
                           f"--database {db.name}")
        request = Request(plan, db.name, "promote-replica", "dr_replica", topology)
        lag, basis = measure_lag(request, db_credentials(plan, db))
        objective = plan.objectives.rpo.database
        shown = "unknown" if lag is None else format_duration(timedelta(seconds=lag))
        return (lag is not None and lag <= objective.total_seconds(),
                f"{replica.identifier} replicates from {old.identifier}, lag {shown} ({basis}); objective "
                f"{format_duration(objective)}")
    return probe


def protection_probe(topology: DatabaseTopology) -> Callable[[], tuple[bool, str]]:
    """The live primary has what the plan requires (archiving, a replica in its region and in the other one):
    else a failover now would leave the database unprotected, or promote a member that no longer follows."""
    def probe() -> tuple[bool, str]:
        primary = topology.primary
        if primary is None:
            return False, "not protected: no live primary (" + "; ".join(topology.differences[:1]) + ")"
        gaps = topology.protection_gaps(primary)
        if gaps:
            return False, f"not protected: {'; '.join(gaps)}; run drplan reprotect --database {topology.database}"
        replicas = ", ".join(r.identifier for r in topology.replicas_of(primary))
        return True, f"live primary {primary.identifier} archives WAL; replicas {replicas or 'none required'}"
    return probe


def capacity_probe(plan: Plan, placement: Placement) -> Callable[[], tuple[bool, str]]:
    def probe() -> tuple[bool, str]:
        cluster = placement.cluster
        eks, api = aws_client(plan, "eks", plan.region_of(cluster)), kube_client(plan, cluster)
        status = cluster_status(eks, cluster.name)
        groups = [nodegroup_state(eks, api, cluster.name, name) for name in cluster.nodegroups]
        ready = sum(g.ready_nodes for g in groups)
        need = plan.failover.min_ready_nodes
        detail = (f"EKS {cluster.name} {status}; {ready} Ready nodes (need {need}); "
                  + ", ".join(f"{g.name} desired {g.desired} ({g.min}-{g.max})" for g in groups))
        return status == "ACTIVE" and ready >= need and all(g.desired > 0 for g in groups), detail
    return probe


def manifests_probe(plan: Plan, placement: Placement) -> Callable[[], tuple[bool, str]]:
    def probe() -> tuple[bool, str]:
        cluster = placement.cluster
        if not cluster.manifests:
            return False, f"cluster {cluster.name} has no manifests folder (clusters[].manifests)"
        objects = render_manifests(plan, cluster)
        deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
        missing = sorted(set(plan.failover.scale) - deployments)
        secrets = {s.metadata.name for s in
                   k8s.CoreV1Api(kube_client(plan, cluster)).list_namespaced_secret(cluster.namespace).items}
        absent = sorted(secret_refs(objects) - secrets)
        problems = ([f"failover.scale names {', '.join(missing)}, not in the manifests"] if missing else []) + (
            [f"Secrets {', '.join(absent)} missing in {cluster.name}/{cluster.namespace}"] if absent else [])
        return not problems, "; ".join(problems) or (
            f"{len(objects)} manifests valid; Secrets {', '.join(sorted(secret_refs(objects)))} present")
    return probe


def dns_probe(plan: Plan, region: str) -> Callable[[], tuple[bool, str]]:
    def probe() -> tuple[bool, str]:
        if plan.dns is None or not plan.dns.records:
            return False, "the plan has no dns records to switch"
        target = plan.dns.targets.get(region)
        if not target:
            return False, f"dns.targets has no target for {region}"
        r53 = aws_client(plan, "route53")
        missing = [name for name, answer in read_records(r53, plan.dns).items() if answer is None]
        check = health_check_for(r53, target)
        problems = ([f"records {', '.join(missing)} missing"] if missing else []) + (
            [] if check else [f"no Route 53 health check watches {target}"])
        return not problems, "; ".join(problems) or f"records present; target {target} watched by check {check}"
    return probe


def permissions_probe(plan: Plan) -> Callable[[], tuple[bool, str]]:
    """The credentials may perform what the runbooks need: a finding naming the denied actions."""
    def probe() -> tuple[bool, str]:
        caller = check_aws_access(plan)
        try:
            denied = denied_permissions(aws_client(plan, "iam"), caller, plan)
        except CannotSimulate as exc:
            return True, f"not checked: {exc}"
        if not denied:
            return True, f"{caller} may perform every action the runbooks need (IAM policy simulation)"
        actions = sorted({action for action, _ in denied})
        return False, (f"{caller} is denied {', '.join(actions)} (e.g. {denied[0][0]} on {denied[0][1]}); grant "
                       "the policy of drplan plan iam-policy")
    return probe


def dr_test_probe(plan: Plan) -> Callable[[], tuple[bool, str]]:
    """The newest DR test in the evidence chain is no older than a quarter plus the plan's grace."""
    def probe() -> tuple[bool, str]:
        store = open_store(plan)
        record = newest(store)
        if record is None:
            return False, f"no DR test recorded in {store.location}; run drplan dr-test"
        age, limit = utcnow() - record.recorded_at, QUARTER + plan.evidence.grace
        seen = (f"last DR test {record.recorded_at:%Y-%m-%d} ({format_duration(age)} ago, "
                f"{record.report.get('status', 'status unknown')}, record {record.sequence})")
        if age > limit:
            return False, (f"{seen}: older than a quarter ({QUARTER.days}d) plus grace "
                           f"{format_duration(plan.evidence.grace)}; run drplan dr-test")
        return True, f"{seen}; next due by {record.recorded_at + limit:%Y-%m-%d}"
    return probe


def drift_probe(plan: Plan) -> Callable[[], tuple[bool, str]]:
    """Nothing tagged drplan:protect is left out of the plan, and every bucket and RDS member it names exists."""
    def probe() -> tuple[bool, str]:
        found = plan_drift(plan)
        lines = [f"{r.label} tagged {PROTECT_TAG}={r.tags[PROTECT_TAG]} is not in the plan" for r in found.uncovered]
        lines += found.gone
        if lines:
            return False, f"{'; '.join(lines)}; add them to the plan (or a discover: selector) or remove them"
        return True, f"{found.summary}; drplan plan drift lists them"
    return probe


@task(cache_policy=NO_CACHE)
def check_region(plan: Plan, region: str, dr_test_age: bool = True, drift: bool = True) -> ReadinessReport:
    report = ReadinessReport(plan=plan.name, region=region, checked_at=utcnow())
    _finding(report, "AWS credentials", lambda: (True, check_aws_access(plan)))
    _finding(report, "AWS permissions", permissions_probe(plan))
    for fence in apply_pending_fences(plan):  # a member back from a region loss is fenced before anything else
        detail = "fenced now (it answers again)" if fence.status != "pending" else \
            f"pending since {fence.recorded_at}: {fence.detail}; fenced as soon as it answers"
        report.findings.append(Finding(check=f"fence of {fence.database} {fence.member}",
                                       ready=fence.status != "pending" or fence.region != region, detail=detail))
    live = {db.database: db for db in discover_topology(plan).databases}
    for db in live.values():
        _finding(report, f"{db.database}: protected", protection_probe(db))
    for placement in placements(plan, region):
        name = placement.service.name
        if placement.database:
            _finding(report, f"{name}: database {placement.database.name} ({placement.member})",
                     database_probe(plan, placement, live[placement.database.name]))
        _finding(report, f"{name}: cluster capacity", capacity_probe(plan, placement))
        _finding(report, f"{name}: manifests and Secrets", manifests_probe(plan, placement))
    _finding(report, "DNS", dns_probe(plan, region))
    if dr_test_age and plan.evidence:
        _finding(report, "DR test", dr_test_probe(plan))
    if drift:
        _finding(report, "plan drift", drift_probe(plan))
    return report


@flow(name="dr-readiness")
def dr_readiness(plan: str = DEFAULT_PLAN, region: str = "", dr_test_age: bool = True,
                 drift: bool = True) -> ReadinessReport:
    """Could `region` (default: the DR region) take over right now? Fails, with an event, when it could not.
    `dr_test_age`: also judge how old the newest recorded DR test is; `drift`: also judge the plan's drift from
    the live inventory (tagged resources it leaves out, entries gone)."""
    dr_plan = load_plan(plan)
    region = region or dr_plan.aws.dr_region
    placements(dr_plan, region)  # a wrong region or a plan without dr services is refused before any check
    report = check_region(dr_plan, region, dr_test_age, drift)
    create_markdown_artifact(key=f"dr-readiness-{region}", markdown=report.markdown())
    write_json(dr_plan, f"{READINESS_PREFIX}{region}-", report)
    emit_event(event=f"drplan.readiness.{'ready' if report.ready else 'unready'}",
               resource={"prefect.resource.id": f"drplan.region.{region}", "prefect.resource.name": region},
               payload={"plan": dr_plan.name,
                        "unready": [f"{f.check}: {f.detail}" for f in report.unready]})
    if not report.ready:
        return Failed(message=f"region {region} not ready: " + "; ".join(f.check for f in report.unready),
                      data=report)
    return report
