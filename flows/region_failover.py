"""Full region failover (and failback): the runbook's "Full Region Recovery", step by step as the runbook has it.

readiness (sub-flow dr-readiness, without the DR test's age; refuse an unready region unless forced) -> each
database resolved on the live topology: its live primary and the replica in the target region (none: refused,
re-protect first) -> approval gate (summary of every change) -> each live primary's network exposure read -> the
applications in the region traffic leaves scaled to zero -> each live primary fenced (tasks/fencing.py; pending
until it answers when the region is lost) and, when it answers, the replica waits until it has replayed its last
WAL (else the lag guard) -> promote it, count the heartbeat rows lost (goal 0) -> point the region's application
Secret at it -> deploy the core services from the manifests, node capacity and scale (sub-flow eks-recovery) ->
recovery validation (with each serving member's network exposure against the old primary's) -> switch the Route 53
records to the region (UPSERT, TTL <= 60 s, INSYNC) -> verify the records answer the new target -> report the
measured RTO against the tier objective, and offer `drplan reprotect` for each promoted database.

Failback is the same planned switchover towards the primary region (re-protect toward it first: its replica of the
DR primary is what gets promoted); both regions end at the plan's normal sizes. Every step finds what an earlier,
crashed run already did and continues from there. Dry run changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from datetime import timedelta

from prefect import flow

from drplan.clients import aws_client, check_aws_access, db_credentials, kube_client
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Cluster, Database, Plan, load_plan
from drplan.regions import Placement, placements, traffic_target
from drplan.results import CheckResult
from drplan.timeutil import format_duration, utcnow
from flows.dr_readiness import ReadinessReport, dr_readiness
from flows.eks_recovery import EksReport, eks_recovery
from flows.shared.cutover import database_url
from flows.shared.dns import switch_dns, validate_placement
from flows.shared.exposure import exposure_before, with_exposure
from flows.shared.gates import recovery_lock, request_approval
from flows.shared.promotion import (
    Request,
    already_promoted,
    apply_fence,
    fence_and_drain,
    lag_guard,
    lost_rows,
    promote,
    promotion_finished,
)
from flows.shared.report import RecoveryReport, finished, published, run_report
from flows.shared.requests import first_alarm_time
from tasks.eks import scale_deployment, scale_nodegroup_task
from tasks.fencing import FENCE_HOW
from tasks.health import Exposure, ServiceValidation, moved_exposure_check
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
from tasks.topology import discover


class RegionReport(RecoveryReport):
    kind: str = "region"
    from_region: str
    readiness: ReadinessReport | None = None
    rto_seconds: float | None = None
    rto_objective_seconds: float | None = None
    lost_rows: dict[str, int | None] = {}
    """Per database: heartbeat rows committed on the old primary before its fence, missing on the new one (goal 0;
    None when the old primary did not answer)."""

    def data_at_risk(self) -> str:
        if not self.lost_rows:
            return "not measured (no database moved)"
        return "; ".join(f"{db}: {'unknown (old primary did not answer)' if n is None else f'{n} rows lost'}"
                         for db, n in sorted(self.lost_rows.items()))

    def markdown(self) -> str:
        rto = "-" if self.rto_seconds is None else format_duration(timedelta(seconds=self.rto_seconds))
        objective = format_duration(timedelta(seconds=self.rto_objective_seconds or 0))
        lines = [f"# Region failover {self.from_region} -> {self.subject}: **{self.outcome}**", "",
                 f"- measured RTO {rto} (objective {objective})",
                 *(f"- {db}: rows lost {'unknown (old primary unreachable)' if n is None else n}"
                   for db, n in self.lost_rows.items())]
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
    first_alarm: str | None = None,
) -> RegionReport:
    """Move every service with a `dr` section to region `to` (the DR region, or back to the primary).
    `first_alarm`: when the alarm that started this fired (alarm-triggered runs)."""
    started = utcnow()
    alarm = first_alarm_time(first_alarm)
    dr_plan = load_plan(plan)
    to, placed = traffic_target(dr_plan, to)
    source = dr_plan.aws.region if to == dr_plan.aws.dr_region else dr_plan.aws.dr_region
    report = RegionReport(flow="region-failover", plan=dr_plan.name, subject=to, from_region=source,
                          dry_run=dry_run, first_alarm=alarm, rto_objective_seconds=min(
                              getattr(dr_plan.objectives.rto, p.service.tier.value).total_seconds() for p in placed))
    check_aws_access(dr_plan)
    with published(report, f"region-failover-{to}", dr_plan):
        with ExitStack() as locks:
            if not dry_run:
                for db in {p.database.name: p.database for p in placed if p.database}.values():
                    locks.enter_context(recovery_lock(db))
            fail_over_region(dr_plan, plan, to, placed, report, force, approve)
        if not dry_run and not report.failed and report.outcome != "refused: nothing changed":
            report.rto_seconds = (utcnow() - started).total_seconds()
    return finished(report, f"region failover to {to}")


class Move:
    """One database moving with the traffic: the live primary it leaves and the member that takes over in the
    target region (its replica there), or nothing to do when the live primary already serves from there."""

    def __init__(self, plan: Plan, db: Database, to: str):
        self.plan, self.db = plan, db
        topology = discover(plan, [db.name]).databases[0]
        live = topology.primary
        self.request = None if live is not None and topology.region_of(live) == to else \
            Request(plan, db.name, "promote-replica", "dr_replica", topology)
        self.serving = live if self.request is None else self.request.new
        self.stray = [m for m in topology.writable if m is not live and topology.region_of(m) != to] \
            if self.request is None else []
        """Members still taking writes outside the target region once it serves (a rerun after a crash)."""
        self.topology = topology
        if self.request is not None and self.request.region != to:
            raise DrplanError(f"{db.name}: the primary {self.request.old.identifier} has no replica in {to} to "
                              f"promote; run drplan reprotect --database {db.name} first")


def exposure_check_of(move: Move, before: Exposure) -> Callable[[], CheckResult]:
    """The check, after the failover, of the serving member's network exposure against `before`."""
    def check() -> CheckResult:
        serving, plan, db = move.serving, move.plan, move.db
        return moved_exposure_check(plan, db, before, serving.target(db.dbname, db_credentials(plan, db)),
                                    (move.topology.region_of(serving) or plan.aws.region, serving.identifier))
    return check


def moves(plan: Plan, to: str, placed: list[Placement]) -> list[Move]:
    """Each database the placed services use, resolved on the live topology (refused before any change when a
    database has no replica in the target region)."""
    return [Move(plan, db, to) for db in {p.database.name: p.database for p in placed if p.database}.values()]


def fail_over_region(dr_plan: Plan, plan_ref: str, to: str, placed: list[Placement], report: RegionReport,
                     force: bool, approve: bool) -> None:
    moving = moves(dr_plan, to, placed)  # a database with nothing to promote there is refused before anything runs
    try:
        report.readiness = run_report(dr_readiness, ReadinessReport, plan=plan_ref, region=to, dr_test_age=False,
                                      drift=False)
    except DrplanError as exc:
        raise DrplanError(f"readiness check of {to} did not complete: {exc}") from None
    unready = [f.check for f in report.readiness.unready]
    if unready and not force:
        raise DrplanError(f"region {to} is not ready to take over ({'; '.join(unready)}); fix it, or force "
                          "(--force) to fail over anyway")
    report.record("readiness", to, "ready" if not unready else f"NOT READY, forced: {'; '.join(unready)}",
                  mutating=bool(unready))
    failback = to == dr_plan.aws.region
    if report.dry_run:
        plan_steps(dr_plan, plan_ref, to, placed, moving, report)
        return
    decision = request_approval(report, f"region-failover-approval-{to}",
                                approval_summary(dr_plan, to, report.from_region, placed, moving), approve,
                                dr_plan.approval.timeout)
    if not decision.approve:
        report.outcome = "refused: nothing changed"
        return
    exposures = [exposure_check_of(move, exposure_before(report, dr_plan, move.db, move.topology,
                                                         db_credentials(dr_plan, move.db))) for move in moving]
    scale_leaving(dr_plan, report)
    for move in moving:
        promote_move(move, report, force)
    for placement in placed:
        if placement.database:
            point_secret(dr_plan, placement, next(m for m in moving if m.db is placement.database), report)
    for cluster in {p.cluster.name: p.cluster for p in placed}.values():
        nodes, scale = normal_sizes(dr_plan, cluster) if failback else (dr_plan.failover.nodes,
                                                                       dr_plan.failover.scale)
        try:
            eks = run_report(eks_recovery, EksReport, plan=plan_ref, cluster=cluster.name, nodes=nodes, scale=scale)
        except DrplanError as exc:
            raise DrplanError(f"EKS recovery of {cluster.name} did not complete: {exc}") from None
        changed = [s.action + " " + s.resource for s in eks.steps if s.action in ("created", "updated", "scaled")]
        report.record("deployed", cluster.name, ", ".join(changed) or "everything already in place",
                      mutating=bool(changed))
        if eks.failed:
            raise DrplanError(f"EKS recovery of {cluster.name}: {eks.error}")
    report.validation = with_exposure(ServiceValidation.of_all([validate_placement(dr_plan, p) for p in placed]),
                                      *exposures)
    if not report.validation.passed:
        report.outcome = "validation failed: DNS not switched"
        return
    switch_dns(dr_plan, to, report)
    for move in moving:
        promotion_finished(move.db)
    if failback:
        shrink_leaving(dr_plan, report)
    report.outcome = f"serving from {to}"
    for move in moving:
        report.record("offered", f"drplan reprotect --database {move.db.name}",
                      f"{move.serving.identifier} needs replicas again before the next failover")


def scale_leaving(plan: Plan, report: RegionReport) -> None:
    """The region traffic leaves stops its applications first (their writes end before the fence)."""
    for leaving in placements(plan, report.from_region):
        try:
            before, _ = scale_deployment(kube_client(plan, leaving.cluster), leaving.cluster.namespace,
                                         leaving.service.name, 0)
        except DrplanError as exc:  # the region is gone: nothing runs there to scale
            report.record("not scaled", f"{leaving.cluster.name}/{leaving.service.name}", str(exc))
            continue
        report.record("scaled to 0" if before else "already at 0", f"{leaving.cluster.name}/{leaving.service.name}",
                      before=str(before), after="0", mutating=bool(before))


def promote_move(move: Move, report: RegionReport, force: bool) -> None:
    """Fence the live primary the traffic leaves (pending while unreachable), let the member taking over replay
    its last WAL when it answers (else the lag guard), promote it, and measure the rows lost (goal 0)."""
    request = move.request
    if request is None:
        credentials = db_credentials(move.plan, move.db)
        for stray in move.stray:
            apply_fence(report, move.plan, move.db, stray, credentials, move.topology)
        report.record("kept", move.serving.identifier, f"already the primary of {move.db.name} there")
        return
    credentials = db_credentials(request.plan, move.db)
    new_primary = request.target(request.new, credentials)
    if already_promoted(request, new_primary):
        report.record("found promoted", request.identifier, "promoted by an earlier run")
        return
    status = fence_and_drain(request, report, credentials)
    if status == "pending":
        lag_guard(request, report, credentials, force)
    promote(request, report, new_primary)
    lost = lost_rows(request, credentials)
    if lost is not None:
        report.record("rows lost", move.db.name, f"{lost} heartbeat rows committed on {request.old.identifier} "
                      f"before its fence are missing on {request.identifier} (goal 0)", mutating=lost > 0)
    report.lost_rows[move.db.name] = lost


def point_secret(plan: Plan, placement: Placement, move: Move, report: RegionReport) -> None:
    """Write the serving member's URL into the Secret the service's manifest references, in the region's cluster."""
    cluster, db = placement.cluster, placement.database
    objects = render_manifests(plan, cluster)
    secret, key = env_secret_ref(objects, placement.service.name, DATABASE_ENV)
    credentials = db_credentials(plan, db)
    member = move.serving
    url = database_url(credentials, member.host, member.port, db.dbname).get_secret_value()
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


def normal_sizes(plan: Plan, cluster: Cluster) -> tuple[dict[str, int], dict[str, int]]:
    """A failback's sizes: the cluster's node groups as the plan sets them, the deployments at their manifests'
    replicas (with the cluster's overrides), not the failover sizes."""
    objects = render_manifests(plan, cluster)
    replicas = {o["metadata"]["name"]: o["spec"].get("replicas", 1) for o in objects if o["kind"] == "Deployment"}
    return ({name: group.desired for name, group in cluster.nodegroups.items()},
            {name: replicas[name] for name in plan.failover.scale if name in replicas})


def shrink_leaving(plan: Plan, report: RegionReport) -> None:
    """After a failback the DR region is a pilot light again: its node groups back to the plan's sizes."""
    for leaving in {p.cluster.name: p.cluster for p in placements(plan, report.from_region)}.values():
        eks, api = aws_client(plan, "eks", plan.region_of(leaving)), kube_client(plan, leaving)
        for name, group in leaving.nodegroups.items():
            before, after = scale_nodegroup_task(eks, api, leaving.name, name, group.desired)
            report.record("scaled" if before != after else "already scaled", f"{leaving.name} node group {name}",
                          f"{after} nodes (the plan's size)", before=str(before), after=str(after),
                          mutating=before != after)


def approval_summary(plan: Plan, to: str, source: str, placed: list[Placement], moving: list[Move]) -> str:
    lines = [f"## Approve the region failover to {to}?", "",
             f"- scale {', '.join(p.service.name for p in placed)} in {source} to 0"]
    for move in moving:
        request = move.request
        if request is None:
            lines.append(f"- **{move.serving.identifier}** ({move.db.name}) already serves as the primary in {to}")
            continue
        lines.append(f"- fence **{request.old.identifier}** ({move.db.name}): {FENCE_HOW[move.db.kind]} (pending "
                     "until it answers if unreachable), then wait until its last WAL is replayed")
        lines.append(f"- promote **{request.identifier}** ({move.db.name}) in {to} to a standalone primary "
                     "(irreversible: the old primary must be rebuilt from it: drplan reprotect)")
    for p in placed:
        if p.database:
            lines.append(f"- rewrite the database Secret of **{p.service.name}** in {p.cluster.name}")
        sizes = normal_sizes(plan, p.cluster) if to == plan.aws.region else (plan.failover.nodes,
                                                                             plan.failover.scale)
        lines.append(f"- deploy the manifests into **{p.cluster.name}**, node groups {sizes[0] or '-'}, "
                     f"scale {sizes[1] or '-'}; validate {p.health}")
    lines.append(f"- switch DNS {', '.join(plan.dns.records)} to **{plan.dns.targets[to]}** (TTL "
                 f"{failover_ttl(plan.dns)}s)")
    if to == plan.aws.region:
        lines.append(f"- shrink the node groups in {source} back to the plan's sizes")
    return "\n".join(lines)


def plan_steps(plan: Plan, plan_ref: str, to: str, placed: list[Placement], moving: list[Move],
               report: RegionReport) -> None:
    """The dry run: every step and resource a real run would touch, in order; nothing changes."""
    report.record("would ask approval", to)
    for leaving in placements(plan, report.from_region):
        report.record("would scale to 0", f"{leaving.cluster.name}/{leaving.service.name}")
    for move in moving:
        if move.request is None:
            report.record("would keep", move.serving.identifier, f"already the primary of {move.db.name}")
            continue
        report.record("would fence", move.request.old.identifier, FENCE_HOW[move.db.kind])
        report.record("would promote", move.request.identifier, "once it has replayed the old primary's last WAL "
                      "(the lag guard when that one does not answer)")
    for p in placed:
        if p.database:
            move = next(m for m in moving if m.db is p.database)
            report.record("would rewrite", f"{p.cluster.name} Secret of {p.service.name}",
                          f"DATABASE_URL -> {move.serving.identifier}")
    failback = to == plan.aws.region
    for cluster in {p.cluster.name: p.cluster for p in placed}.values():
        nodes, scale = normal_sizes(plan, cluster) if failback else (plan.failover.nodes, plan.failover.scale)
        eks = eks_recovery(plan=plan_ref, cluster=cluster.name, nodes=nodes, scale=scale, dry_run=True)
        for step in eks.steps[1:]:
            report.record(step.action, f"{cluster.name}: {step.resource}", step.detail)
    for p in placed:
        report.record("would validate", p.service.name, p.health)
    current = read_records(aws_client(plan, "route53"), plan.dns)
    for name in plan.dns.records:
        report.record("would switch", f"DNS {name}",
                      f"UPSERT CNAME, TTL {failover_ttl(plan.dns)}s, wait INSYNC, verify",
                      before=None if current[name] is None else current[name][0], after=plan.dns.targets[to])
    if failback:
        for leaving in {p.cluster.name: p.cluster for p in placements(plan, report.from_region)}.values():
            report.record("would shrink", f"{leaving.name} node groups", "to the plan's sizes")
    report.outcome = "planned (dry run)"
