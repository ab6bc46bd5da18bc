"""Moving traffic: validate the services placed in a region, then switch the plan's DNS records to it."""

from __future__ import annotations

from drplan.clients import PgTarget, aws_client, db_credentials, pg_target
from drplan.errors import DrplanError
from drplan.plan import DatabaseKind, Plan
from drplan.regions import Placement
from flows.shared.report import RecoveryReport
from tasks.health import ServiceValidation, validate_service_task
from tasks.route53 import failover_ttl, read_records, switch_records
from tasks.topology import discover


def validate_placement(plan: Plan, placement: Placement) -> ServiceValidation:
    """Recovery validation of one service in its region, against the database it really uses there (the address
    in its Secret, from the live topology; the plan's member for that region when its Secret names none yet) and,
    for RDS, that member's CloudWatch metrics."""
    db = placement.database
    if db is None:
        return validate_service_task(plan, placement.serving(), None, None)
    credentials = db_credentials(plan, db)
    topology = discover(plan, [db.name]).databases[0]
    binding = next((b for b in topology.bindings
                    if b.service == placement.service.name and b.cluster == placement.cluster.name and b.host), None)
    if binding is None:
        target = pg_target(plan, db, placement.member, credentials)
        member = topology.member(db.members[placement.member])
    else:
        member = topology.member(binding.member)
        target = PgTarget(f"{db.name}/{binding.member or binding.address}", binding.host, binding.port, db.dbname,
                          credentials)
    metrics = (topology.region_of(member) or plan.aws.region, member.identifier) \
        if db.kind is DatabaseKind.rds and member is not None else None
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
