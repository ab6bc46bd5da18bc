"""Recovery validation: is a service really back? One separate, timed check per aspect, driven by the plan.

Checks for a service: its health URL answers 200; `SELECT 1` on its database's primary; each `endpoints[]`
entry answers its expected status and text (auth endpoints with the token from `token_secret`, and refused
without it); for an `rds` database, CloudWatch CPUUtilization (average) and DatabaseConnections (maximum: someone
was connected in the last minute, as right after a cutover) of the newest period within bounds, where
"no datapoints" is its own status (`no data`), not a pass. The token is never logged nor reported.

Security posture, after any recovery: requests without the token are refused (each auth endpoint); a rotated-out
credential (the AWSPREVIOUS version of the database's or the token's secret, when it differs from AWSCURRENT) is
refused; and, for a runbook that took `network_exposure` before its change, the database's network exposure
(listen addresses, port, pg_hba rules; for RDS also public accessibility and security group ingress) is unchanged;
after a recovery that moved it to another server, the new server's exposure is the old one's, the port and security
group ids aside (`skipped`, with the reason, when the old server could not be read before).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, computed_field

from drplan.clients import DbCredentials, PgTarget, api_token, aws_client, db_credentials, pg_target
from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.plan import Database, DatabaseKind, Plan, Service
from drplan.results import CheckResult, Status
from drplan.timeutil import utcnow
from drplan.topology import Member
from tasks.postgres import login_refused

TIMEOUT = 5.0
SETTLE_POLL_SECONDS = 2.0
METRIC_WINDOW = timedelta(minutes=10)
PERIOD = timedelta(minutes=1)
"""CloudWatch period; queries end one period after now so that the current minute's datapoints count."""
RDS_METRIC_BOUNDS = {"CPUUtilization": ("Average", 0.0, 90.0), "DatabaseConnections": ("Maximum", 1.0, math.inf)}
"""metric -> (statistic, low, high): CPU below 90 %, and at least one connection (the application is connected)."""


class ServiceValidation(BaseModel):
    service: str
    checks: list[CheckResult]

    @computed_field
    @property
    def passed(self) -> bool:
        """Every check passed or was skipped with its reason (`no data` is not a pass)."""
        return all(check.passed or check.status is Status.skipped for check in self.checks)

    @classmethod
    def of_all(cls, validations: list[ServiceValidation]) -> ServiceValidation:
        """Several services' validations as one, each check named after its service."""
        if len(validations) == 1:
            return validations[0]
        return cls(service=", ".join(v.service for v in validations),
                   checks=[c.model_copy(update={"name": f"{v.service}: {c.name}"})
                           for v in validations for c in v.checks])


Probe = Callable[[], tuple[bool | Status, str]]


def run_check(name: str, expected: str, probe: Probe) -> CheckResult:
    """Time one check; an exception fails it with the error's first line as what was observed."""
    start = time.monotonic()
    try:
        outcome, observed = probe()
    except Exception as exc:  # a check reports, it does not crash the validation
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        outcome, observed = False, f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    status = outcome if isinstance(outcome, Status) else Status.passed if outcome else Status.failed
    result = CheckResult(name=name, status=status, observed=observed, expectation=expected,
                         duration_s=round(time.monotonic() - start, 3))
    run_logger().info("check %s: %s (observed %s, expected %s)", name, status.value, observed, expected)
    return result


def _http_probe(http: httpx.Client, url: httpx.URL, statuses: set[int], contains: str | None = None,
                token: Callable[[], str] | None = None) -> Probe:
    """GET `url` (with the bearer token when `token` is given); pass on one of `statuses` and, if set, `contains`."""
    def probe() -> tuple[bool, str]:
        response = http.get(url, headers={"Authorization": f"Bearer {token()}"} if token else {})
        observed = f"HTTP {response.status_code}"
        if response.status_code in statuses and contains and contains not in response.text:
            return False, f"{observed}, body without {contains!r}"
        return response.status_code in statuses, observed
    return probe


def _database_probe(plan: Plan, db: Database, target: PgTarget | None) -> Probe:
    def probe() -> tuple[bool, str]:
        nonlocal target
        target = target or pg_target(plan, db, "primary", db_credentials(plan, db))
        with target.connect(timeout=int(TIMEOUT)) as conn:
            value = conn.execute("SELECT 1").fetchone()[0]
        return value == 1, f"SELECT 1 -> {value} on {target.address}"
    return probe


def _metric_probe(plan: Plan, region: str, identifier: str, metric: str) -> Probe:
    statistic, low, high = RDS_METRIC_BOUNDS[metric]

    def probe() -> tuple[Status, str]:
        now = utcnow()
        points = aws_client(plan, "cloudwatch", region).get_metric_statistics(
            Namespace="AWS/RDS", MetricName=metric, StartTime=now - METRIC_WINDOW, EndTime=now + PERIOD, Period=60,
            Dimensions=[{"Name": "DBInstanceIdentifier", "Value": identifier}], Statistics=[statistic],
        )["Datapoints"]
        if not points:
            return Status.no_data, f"no datapoints in the last {METRIC_WINDOW.total_seconds() / 60:g} min"
        latest = max(points, key=lambda p: p["Timestamp"])[statistic]
        ok = low <= latest <= high
        return Status.passed if ok else Status.failed, f"{latest:g} (newest {statistic.lower()})"
    return probe


def _database_checks(plan: Plan, db: Database, database: PgTarget | None,
                     metrics_instance: tuple[str, str] | None) -> list[CheckResult]:
    checks = [run_check("database", "SELECT 1 -> 1", _database_probe(plan, db, database))]
    if db.kind is DatabaseKind.rds:
        region, instance = metrics_instance or (plan.aws.region, db.primary)
        for metric, (statistic, low, high) in RDS_METRIC_BOUNDS.items():
            checks.append(run_check(f"cloudwatch {metric}",
                                    f"{low:g} <= {statistic.lower()} <= {high:g} for {instance}",
                                    _metric_probe(plan, region, instance, metric)))
    return checks


def validate_service(plan: Plan, service: Service, database: PgTarget | None = None,
                     metrics_instance: tuple[str, str] | None = None) -> ServiceValidation:
    """Run every check the plan implies for `service`; each is reported separately, none stops the others.
    After a cutover, `database` is what the service now uses and `metrics_instance` its (region, RDS instance);
    by default the plan's primary."""
    checks = []
    with httpx.Client(timeout=TIMEOUT) as http:
        checks.append(run_check("health", "HTTP 200", _http_probe(http, httpx.URL(service.health), {200})))
        if service.database:
            checks += _database_checks(plan, plan.database(service.database), database, metrics_instance)
        for endpoint in service.endpoints:
            url = httpx.URL(service.health).join(endpoint.path)
            expected = f"HTTP {endpoint.expect_status}" + (
                f" containing {endpoint.expect_contains!r}" if endpoint.expect_contains else "")
            probe = _http_probe(http, url, {endpoint.expect_status}, endpoint.expect_contains,
                                (lambda: api_token(plan, service).get_secret_value()) if endpoint.auth else None)
            checks.append(run_check(f"GET {endpoint.path}" + (" with token" if endpoint.auth else ""), expected, probe))
            if endpoint.auth:
                checks.append(run_check(f"GET {endpoint.path} without token", "HTTP 401 or 403",
                                   _http_probe(http, url, {401, 403})))
                if (previous := _rotated_out_token(plan, service)) is not None:
                    checks.append(run_check(f"GET {endpoint.path} with the rotated-out token", "HTTP 401 or 403",
                                       _http_probe(http, url, {401, 403}, token=previous.get_secret_value)))
        if service.database:
            checks += rotated_out_database_checks(plan, plan.database(service.database), database)
    return ServiceValidation(service=service.name, checks=checks)


def _previous(read: Callable[[str], Any]) -> Any:
    """The AWSPREVIOUS version read by `read(stage)` when there is one and it differs from AWSCURRENT, else None."""
    try:
        previous = read("AWSPREVIOUS")
    except DrplanError:  # never rotated, or a Prefect Secret block
        return None
    return None if previous == read("AWSCURRENT") else previous


def _rotated_out_token(plan: Plan, service: Service) -> Any:
    return _previous(lambda stage: api_token(plan, service, stage)) if service.token_secret else None


def rotated_out_database_checks(plan: Plan, db: Database, database: PgTarget | None = None) -> list[CheckResult]:
    """A login with the database's rotated-out password is refused (no check when it was never rotated)."""
    previous: DbCredentials | None = _previous(lambda stage: db_credentials(plan, db, stage))
    if previous is None:
        return []

    def probe() -> tuple[bool, str]:
        where = database or pg_target(plan, db, "primary", previous)
        return login_refused(PgTarget(where.label, where.host, where.port, where.dbname, previous))
    return [run_check(f"database {db.name}: rotated-out password", "login refused", probe)]


def network_exposure(plan: Plan, db: Database, target: PgTarget, instance: tuple[str, str] | None = None
                     ) -> dict[str, str]:
    """What the database exposes to the network, as comparable facts: listen_addresses, port and the pg_hba rules
    (when the role may read them); for RDS (`instance` = its region and identifier) public accessibility and the
    ingress of its security groups."""
    facts: dict[str, str] = {}
    with target.connect(timeout=int(TIMEOUT)) as conn:
        for setting in ("listen_addresses", "port"):
            facts[setting] = str(conn.execute(f"SHOW {setting}").fetchone()[0])
        try:
            rules = conn.execute("SELECT type, database, user_name, address, netmask, auth_method "
                                 "FROM pg_hba_file_rules WHERE error IS NULL ORDER BY rule_number").fetchall()
            facts["pg_hba"] = "; ".join(" ".join(str(v) for v in rule if v is not None) for rule in rules)
        except Exception:  # noqa: BLE001 - only superusers read pg_hba_file_rules: the other facts remain
            pass
    if db.kind is DatabaseKind.rds:
        region, identifier = instance or (plan.aws.region, db.primary)
        found = aws_client(plan, "rds", region).describe_db_instances(DBInstanceIdentifier=identifier)
        described = found["DBInstances"][0]
        facts["publicly accessible"] = str(described.get("PubliclyAccessible", False))
        groups = sorted(g["VpcSecurityGroupId"] for g in described.get("VpcSecurityGroups", []))
        if groups:
            ec2 = aws_client(plan, "ec2", region)
            for group in ec2.describe_security_groups(GroupIds=groups)["SecurityGroups"]:
                facts[f"security group {group['GroupId']}"] = "; ".join(sorted(
                    f"{p.get('IpProtocol')} {p.get('FromPort', '')}-{p.get('ToPort', '')} from "
                    + ",".join(sorted([r["CidrIp"] for r in p.get("IpRanges", [])]
                                      + [g["GroupId"] for g in p.get("UserIdGroupPairs", [])]))
                    for p in group.get("IpPermissions", [])))
    return facts


def _exposure_probe(before: dict[str, str], now: Callable[[], dict[str, str]]) -> Probe:
    def probe() -> tuple[bool, str]:
        after = now()
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        return not changed, "unchanged" if not changed else "changed: " + "; ".join(
            f"{k} {before.get(k, '(none)')} -> {after.get(k, '(none)')}" for k in changed)
    return probe


def exposure_check(plan: Plan, db: Database, before: dict[str, str], target: PgTarget,
                   instance: tuple[str, str] | None = None) -> CheckResult:
    """The database's network exposure now against `before` (network_exposure of the same server, taken before
    the recovery)."""
    return run_check(f"database {db.name}: network exposure", "as before the recovery",
                     _exposure_probe(before, lambda: network_exposure(plan, db, target, instance)))


def _server_independent(facts: dict[str, str]) -> dict[str, str]:
    """The facts two servers of one database share when equally exposed: no port, and for RDS the ingress of all
    its security groups as one fact (group ids differ between regions)."""
    kept = {k: v for k, v in facts.items() if k != "port" and not k.startswith("security group ")}
    if "publicly accessible" in facts:
        kept["security group ingress"] = "; ".join(sorted({rule for k, v in facts.items()
                                                           if k.startswith("security group ")
                                                           for rule in v.split("; ") if rule})) or "(none)"
    return kept


@dataclass(frozen=True)
class Exposure:
    """network_exposure of the server that served before a recovery, or why it could not be read."""

    server: str
    facts: dict[str, str] | None
    unreadable: str = ""


def read_exposure(plan: Plan, db: Database, member: Member, credentials: DbCredentials, region: str) -> Exposure:
    """The exposure of `member` (read only); a failure is kept as its first line, not raised."""
    try:
        facts = network_exposure(plan, db, member.target(db.dbname, credentials), (region, member.identifier))
    except Exception as exc:  # noqa: BLE001 - the check then reports it not measured
        return Exposure(member.identifier, None, first_line(exc))
    return Exposure(member.identifier, facts)


def moved_exposure_check(plan: Plan, db: Database, before: Exposure, target: PgTarget,
                         instance: tuple[str, str] | None = None) -> CheckResult:
    """After a recovery that may have moved the database to another server (`target`; for RDS `instance`, its
    region and identifier): its exposure against `before`'s, the port and security group ids aside. `skipped`,
    with the reason, when `before` could not be read."""
    name, expected = f"database {db.name}: network exposure", f"as {before.server}'s before the recovery"
    if before.facts is None:
        return run_check(name, expected, lambda: (Status.skipped, f"not measured: {before.server} unreadable before "
                                                                  f"the recovery ({before.unreadable})"))
    return run_check(name, expected, _exposure_probe(_server_independent(before.facts), lambda: _server_independent(
        network_exposure(plan, db, target, instance))))


@task(name="validate-database", cache_policy=NO_CACHE)
def validate_database_task(plan: Plan, db: Database, database: PgTarget | None = None,
                           metrics_instance: tuple[str, str] | None = None) -> ServiceValidation:
    """The database part of recovery validation alone (no service uses the database)."""
    return ServiceValidation(service=f"database {db.name}",
                             checks=_database_checks(plan, db, database, metrics_instance))


@task(name="validate-service", cache_policy=NO_CACHE)
def validate_service_task(plan: Plan, service: Service, database: PgTarget | None = None,
                          metrics_instance: tuple[str, str] | None = None) -> ServiceValidation:
    """Prefect task around `validate_service`, repeated for up to `services[].settle` until every check passes;
    the last result says which checks failed (the task itself does not fail)."""
    deadline = time.monotonic() + service.settle.total_seconds()
    while not (result := validate_service(plan, service, database, metrics_instance)).passed \
            and time.monotonic() < deadline:
        time.sleep(SETTLE_POLL_SECONDS)
    failed = [c.name for c in result.checks if not c.passed]
    run_logger().info("service %s: %s", service.name, f"not validated ({', '.join(failed)})" if failed else "validated")
    return result
