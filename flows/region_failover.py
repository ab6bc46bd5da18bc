"""Full region failover (and failback): the runbook's "Full Region Recovery", step by step as the runbook has it.

readiness (sub-flow dr-readiness; refuse an unready region unless forced) -> approval gate (summary of every
change) -> fence the region traffic leaves: its database members accept no more writes (tasks/fencing.py; pending
until they answer when the region is lost) and its services are scaled to zero -> promote the region's database
member (lag guard; a primary is left alone, and unfenced if a failover had fenced it) -> point the region's
application Secret at it -> deploy the core services from the manifests, node capacity and scale (sub-flow
eks-recovery) -> recovery validation -> switch the Route 53 records to the region (UPSERT, TTL <= 60 s, INSYNC)
-> verify the records answer the new target -> report the measured RTO against the tier objective.

Failback is the same flow with `to` = the primary region: its primary is not promoted (re-establishing
replication from the DR region is out of scope, and impossible for an RDS replica once promoted: recreate it).
Every step finds what an earlier, crashed run already did and continues from there. Dry run changes nothing.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import timedelta

from prefect import flow

from drplan.clients import aws_client, check_aws_access, db_credentials, kube_client, pg_target
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Plan, load_plan
from drplan.regions import Placement, placements, traffic_target
from drplan.timeutil import format_duration, utcnow
from flows.dr_readiness import ReadinessReport, dr_readiness
from flows.eks_recovery import EksReport, eks_recovery
from flows.shared.cutover import database_url
from flows.shared.dns import switch_dns, validate_placement
from flows.shared.gates import recovery_lock, request_approval
from flows.shared.promotion import Request, already_promoted, apply_fence, lag_guard, promote
from flows.shared.report import RecoveryReport, finished, published, run_report
from tasks.eks import scale_deployment
from tasks.fencing import FENCE_HOW, unfence_role
from tasks.health import ServiceValidation
from tasks.k8s import (
    DATABASE_ENV,
    deployment_exists,
    redact_url,
    restart_deployment,
    wait_deployment_available,
    write_secret_value,
)
from tasks.manifests import env_secret_ref, render_manifests
from tasks.route53 import failover_ttl, read_records


class RegionReport(RecoveryReport):
    kind: str = "region"
    from_region: str
    readiness: ReadinessReport | None = None
    rto_seconds: float | None = None
    rto_objective_seconds: float | None = None

    def markdown(self) -> str:
        rto = "-" if self.rto_seconds is None else format_duration(timedelta(seconds=self.rto_seconds))
        objective = format_duration(timedelta(seconds=self.rto_objective_seconds or 0))
        lines = [f"# Region failover {self.from_region} -> {self.subject}: **{self.outcome}**", "",
                 f"- measured RTO {rto} (objective {objective})"]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        if self.readiness:
            lines += ["", self.readiness.markdown()]
        return "\n".join([*lines, "", "## Timeline", self.timeline(), self.validation_table()])


@flow(name="region-failover")
def region_failover(
    plan: str = DEFAULT_PLAN,
    to: str = "",
    dry_run: bool = False,
    force: bool = False,
    approve: bool = False,
) -> RegionReport:
    """Move every service with a `dr` section to region `to` (the DR region, or back to the primary)."""
    started = utcnow()
    dr_plan = load_plan(plan)
    to, placed = traffic_target(dr_plan, to)
    source = dr_plan.aws.region if to == dr_plan.aws.dr_region else dr_plan.aws.dr_region
    report = RegionReport(flow="region-failover", plan=dr_plan.name, subject=to, from_region=source,
                          dry_run=dry_run, rto_objective_seconds=min(
                              getattr(dr_plan.objectives.rto, p.service.tier.value).total_seconds() for p in placed))
    check_aws_access(dr_plan)
    with published(report, f"region-failover-{to}"):
        with ExitStack() as locks:
            if not dry_run:
                for db in {p.database.name: p.database for p in placed if p.database}.values():
                    locks.enter_context(recovery_lock(db))
            fail_over_region(dr_plan, plan, to, placed, report, force, approve)
        if not dry_run and not report.failed and report.outcome != "refused: nothing changed":
            report.rto_seconds = (utcnow() - started).total_seconds()
    return finished(report, f"region failover to {to}")


def fail_over_region(dr_plan: Plan, plan_ref: str, to: str, placed: list[Placement], report: RegionReport,
                     force: bool, approve: bool) -> None:
    try:
        report.readiness = run_report(dr_readiness, ReadinessReport, plan=plan_ref, region=to)
    except DrplanError as exc:
        raise DrplanError(f"readiness check of {to} did not complete: {exc}") from None
    unready = [f.check for f in report.readiness.unready]
    if unready and not force:
        raise DrplanError(f"region {to} is not ready to take over ({'; '.join(unready)}); fix it, or force "
                          "(--force) to fail over anyway")
    report.record("readiness", to, "ready" if not unready else f"NOT READY, forced: {'; '.join(unready)}",
                  mutating=bool(unready))
    if report.dry_run:
        plan_steps(dr_plan, plan_ref, to, placed, report)
        return
    decision = request_approval(report, f"region-failover-approval-{to}",
                                approval_summary(dr_plan, to, report.from_region, placed), approve)
    if not decision.approve:
        report.outcome = "refused: nothing changed"
        return
    fence_source(dr_plan, placed, report)
    for placement in placed:
        if placement.database:
            promote_member(dr_plan, placement, report, force)
            point_secret(dr_plan, placement, report)
    for cluster in {p.cluster.name: p.cluster for p in placed}.values():
        try:
            eks = run_report(eks_recovery, EksReport, plan=plan_ref, cluster=cluster.name,
                             nodes=dr_plan.failover.nodes, scale=dr_plan.failover.scale)
        except DrplanError as exc:
            raise DrplanError(f"EKS recovery of {cluster.name} did not complete: {exc}") from None
        changed = [s.action + " " + s.resource for s in eks.steps if s.action in ("created", "updated", "scaled")]
        report.record("deployed", cluster.name, ", ".join(changed) or "everything already in place",
                      mutating=bool(changed))
        if eks.failed:
            raise DrplanError(f"EKS recovery of {cluster.name}: {eks.error}")
    report.validation = ServiceValidation.of_all([validate_placement(dr_plan, p) for p in placed])
    if not report.validation.passed:
        report.outcome = "validation failed: DNS not switched"
        return
    switch_dns(dr_plan, to, report)
    report.outcome = f"serving from {to}"


def source_role(placement: Placement) -> str:
    """The role of the database member serving in the region traffic leaves."""
    return "dr_replica" if placement.member == "primary" else "primary"


def fence_source(plan: Plan, placed: list[Placement], report: RegionReport) -> None:
    """The region traffic leaves stops writing before anything is promoted: each database member serving there is
    fenced (pending while unreachable) and its services are scaled to zero."""
    for placement in (p for p in placed if p.database):
        db, credentials = placement.database, db_credentials(plan, placement.database)
        apply_fence(report, plan, db, source_role(placement), credentials)
        if placement.member == "primary" and unfence_role(plan, db, "primary", credentials):
            report.record("unfenced", db.primary, "fenced when traffic left it; it serves again", mutating=True)
    for leaving in placements(plan, report.from_region):
        try:
            before, _ = scale_deployment(kube_client(plan, leaving.cluster), leaving.cluster.namespace,
                                         leaving.service.name, 0)
        except DrplanError as exc:  # the region is gone: nothing runs there to scale
            report.record("not scaled", f"{leaving.cluster.name}/{leaving.service.name}", str(exc))
            continue
        report.record("scaled to 0" if before else "already at 0", f"{leaving.cluster.name}/{leaving.service.name}",
                      before=str(before), after="0", mutating=bool(before))


def promote_member(plan: Plan, placement: Placement, report: RegionReport, force: bool) -> None:
    """Promote the DR replica (lag guard first); the primary region's primary needs nothing."""
    db = placement.database
    if placement.member == "primary":
        report.record("kept", db.primary, not_carried_back(report.from_region))
        return
    request = Request(plan, db.name, "promote-replica", placement.member)
    credentials = db_credentials(plan, db)
    new_primary = pg_target(plan, db, placement.member, credentials)
    if already_promoted(request, new_primary):
        report.record("found promoted", request.identifier, "promoted by an earlier run")
        return
    lag_guard(request, report, credentials, force)
    promote(request, report, new_primary)


def point_secret(plan: Plan, placement: Placement, report: RegionReport) -> None:
    """Write the member's URL into the Secret the service's manifest references, in the region's cluster."""
    cluster, db = placement.cluster, placement.database
    objects = render_manifests(plan, cluster)
    secret, key = env_secret_ref(objects, placement.service.name, DATABASE_ENV)
    credentials = db_credentials(plan, db)
    target = pg_target(plan, db, placement.member, credentials)
    url = database_url(credentials, target.host, target.port, db.dbname).get_secret_value()
    api = kube_client(plan, cluster)
    before = write_secret_value(api, cluster.namespace, secret, key, url)
    if before == url:
        report.record("already set", f"{cluster.name}/{secret}:{key}", redact_url(url))
        return
    report.record("rewrote", f"{cluster.name}/{secret}:{key}", before=None if before is None else redact_url(before),
                  after=redact_url(url), mutating=True)
    if deployment_exists(api, cluster.namespace, placement.service.name):  # else the manifests step creates it
        restart_deployment(api, cluster.namespace, placement.service.name)
        wait_deployment_available(api, cluster.namespace, placement.service.name)


def not_carried_back(source: str) -> str:
    """A failback's warning: the primary region's primary serves as it is."""
    return (f"not promoted, serves as it is: writes made in {source} since the failover are NOT on it "
            "(drplan does not copy them back)")


def approval_summary(plan: Plan, to: str, source: str, placed: list[Placement]) -> str:
    lines = [f"## Approve the region failover to {to}?", ""]
    for p in placed:
        if p.database:
            lines.append(f"- fence **{p.database.members[source_role(p)]}** ({p.database.name}) in {source}: "
                         f"{FENCE_HOW[p.database.kind]} (pending until it answers if unreachable)")
    lines.append(f"- scale {', '.join(p.service.name for p in placed)} in {source} to 0")
    for p in placed:
        if p.database and p.member != "primary":
            lines.append(f"- promote **{p.database.members[p.member]}** ({p.database.name}) to a standalone primary "
                         "(irreversible: the old primary must be rebuilt from it)")
        if p.database and p.member == "primary":
            lines.append(f"- **{p.database.primary}** ({p.database.name}) {not_carried_back(source)}")
        if p.database:
            lines.append(f"- rewrite the database Secret of **{p.service.name}** in {p.cluster.name}")
        lines.append(f"- deploy the manifests into **{p.cluster.name}**, node groups {plan.failover.nodes or '-'}, "
                     f"scale {plan.failover.scale or '-'}; validate {p.health}")
    lines.append(f"- switch DNS {', '.join(plan.dns.records)} to **{plan.dns.targets[to]}** (TTL "
                 f"{failover_ttl(plan.dns)}s)")
    return "\n".join(lines)


def plan_steps(plan: Plan, plan_ref: str, to: str, placed: list[Placement], report: RegionReport) -> None:
    """The dry run: every step and resource a real run would touch, in order; nothing changes."""
    report.record("would ask approval", to)
    for p in placed:
        if p.database:
            report.record("would fence", p.database.members[source_role(p)], FENCE_HOW[p.database.kind])
    for leaving in placements(plan, report.from_region):
        report.record("would scale to 0", f"{leaving.cluster.name}/{leaving.service.name}")
    for p in placed:
        if p.database and p.member != "primary":
            report.record("would promote", p.database.members[p.member], "after the lag guard")
        if p.database and p.member == "primary":
            report.record("would keep", p.database.primary, not_carried_back(report.from_region))
        if p.database:
            report.record("would rewrite", f"{p.cluster.name} Secret of {p.service.name}",
                          f"DATABASE_URL -> {p.database.members[p.member]}")
    for cluster in {p.cluster.name: p.cluster for p in placed}.values():
        eks = eks_recovery(plan=plan_ref, cluster=cluster.name, nodes=plan.failover.nodes,
                           scale=plan.failover.scale, dry_run=True)
        for step in eks.steps[1:]:
            report.record(step.action, f"{cluster.name}: {step.resource}", step.detail)
    for p in placed:
        report.record("would validate", p.service.name, p.health)
    current = read_records(aws_client(plan, "route53"), plan.dns)
    for name in plan.dns.records:
        report.record("would switch", f"DNS {name}",
                      f"UPSERT CNAME, TTL {failover_ttl(plan.dns)}s, wait INSYNC, verify",
                      before=None if current[name] is None else current[name][0], after=plan.dns.targets[to])
    report.outcome = "planned (dry run)"
