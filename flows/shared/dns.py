"""Moving traffic: validate the services placed in a region, then switch the plan's DNS records to it."""

from __future__ import annotations

from drplan.clients import aws_client, db_credentials, pg_target
from drplan.errors import DrplanError
from drplan.plan import DatabaseKind, Plan
from drplan.regions import Placement
from flows.shared.report import RecoveryReport
from tasks.health import ServiceValidation, validate_service_task
from tasks.route53 import failover_ttl, read_records, switch_records


def validate_placement(plan: Plan, placement: Placement) -> ServiceValidation:
    """Recovery validation of one service in its new region, against the database member it now uses (and, for RDS,
    that member's CloudWatch metrics)."""
    db = placement.database
    credentials = db_credentials(plan, db) if db else None
    target = pg_target(plan, db, placement.member, credentials) if credentials else None
    metrics = (plan.member_region(db, placement.member), db.members[placement.member]) \
        if db and db.kind is DatabaseKind.rds else None
    return validate_service_task(plan, placement.serving(), target, metrics)


def switch_dns(plan: Plan, to: str, report: RecoveryReport) -> None:
    r53, target, ttl = aws_client(plan, "route53"), plan.dns.targets[to], failover_ttl(plan.dns)
    before = read_records(r53, plan.dns)
    changed = switch_records(r53, plan.dns, target)
    wrong = [f"{name} -> {answer}" for name, answer in read_records(r53, plan.dns).items() if answer != (target, ttl)]
    if wrong:
        raise DrplanError(f"Route 53 does not answer the new target {target}: {', '.join(wrong)}")
    for name in plan.dns.records:
        report.record("switched" if name in changed else "already switched", f"DNS {name}",
                      f"CNAME {target}, TTL {ttl}s, INSYNC",
                      before=None if before[name] is None else before[name][0], after=target,
                      mutating=name in changed)
