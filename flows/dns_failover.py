"""DNS failover on its own: the runbook's "DNS failover", for when the services already run in the region that
should take the traffic (or a record was lost), without promoting or deploying anything.

the region has a target in dns.targets -> records already there are left alone -> the services placed in that
region pass recovery validation (refused unless forced) -> approval (each record, from -> to) -> Route 53 UPSERT
(TTL <= 60 s), INSYNC, read back. Dry run changes nothing. Rerun-safe.
"""

from __future__ import annotations

from prefect import flow

from drplan.clients import aws_client, check_aws_access
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Plan, load_plan
from drplan.regions import Placement, traffic_target
from flows.shared.dns import switch_dns, validate_placement
from flows.shared.gates import request_approval
from flows.shared.report import RecoveryReport, finished, published
from tasks.health import ServiceValidation
from tasks.route53 import failover_ttl, read_records


class DnsReport(RecoveryReport):
    kind: str = "dns"

    def markdown(self) -> str:
        lines = [f"# DNS failover to {self.subject}: **{self.outcome}**"]
        if self.error:
            lines.append(f"\n- **error**: {self.error}")
        return "\n".join([*lines, "", "## Timeline", self.timeline(), self.validation_table()])


@flow(name="dns-failover")
def dns_failover(
    plan: str = DEFAULT_PLAN,
    to: str = "",
    dry_run: bool = False,
    force: bool = False,
    approve: bool = False,
) -> DnsReport:
    """Point the plan's DNS records at region `to` (default: the DR region) once its services answer."""
    dr_plan = load_plan(plan)
    to, placed = traffic_target(dr_plan, to)
    report = DnsReport(flow="dns-failover", plan=dr_plan.name, subject=to, dry_run=dry_run)
    check_aws_access(dr_plan)
    with published(report, f"dns-failover-{to}", dr_plan):
        switch(dr_plan, to, placed, report, force, approve)
    return finished(report, f"DNS failover to {to}")


def switch(plan: Plan, to: str, placed: list[Placement], report: DnsReport, force: bool, approve: bool) -> None:
    target, ttl = plan.dns.targets[to], failover_ttl(plan.dns)
    current = read_records(aws_client(plan, "route53"), plan.dns)
    before = {name: answer[0] if answer else None for name, answer in current.items() if answer != (target, ttl)}
    if not before:
        report.record("already switched", f"DNS {', '.join(plan.dns.records)}", f"CNAME {target}, TTL {ttl}s")
        report.outcome = f"DNS on {to}"
        return
    report.validation = ServiceValidation.of_all([validate_placement(plan, p) for p in placed])
    failed = [c.name for c in report.validation.checks if not c.passed]
    if failed and not force:
        raise DrplanError(f"the services in {to} do not pass validation ({', '.join(failed)}); fix them first, or "
                          "force (--force) to send the traffic anyway")
    report.record("validated", ", ".join(p.service.name for p in placed),
                  "all checks passed" if not failed else f"FAILED, forced: {', '.join(failed)}", mutating=bool(failed))
    if report.dry_run:
        for name, was in before.items():
            report.record("would switch", f"DNS {name}", f"UPSERT CNAME, TTL {ttl}s, wait INSYNC", before=was,
                          after=target)
        report.outcome = "planned (dry run)"
        return
    changes = [f"- {name}: {was or 'no record'} -> **{target}** (TTL {ttl}s)" for name, was in before.items()]
    summary = "\n".join([f"## Approve the DNS failover to {to}?", "", *changes])
    if not request_approval(report, f"dns-failover-approval-{to}", summary, approve, plan.approval.timeout).approve:
        report.outcome = "refused: nothing changed"
        return
    switch_dns(plan, to, report)
    report.outcome = f"DNS on {to}"
