"""RPO verification: how old is the newest recoverable copy of every database, bucket and configuration?
The plan's `discover:` selectors add the buckets and RDS databases they take in (tasks/inventory.py).

Runbook it replaces: "check the replica lag, check the last snapshot, check the last backup, by hand".
Every measurement is taken concurrently, compared with the plan's objective, reported as a table artifact;
each breach emits `drplan.rpo.breached`, and the run ends Failed when any objective is breached or any
measurement could not be taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from drplan import rpo
from drplan.clients import PgTarget, aws_client, check_aws_access, db_credentials, retries_since
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Database, DatabaseKind, Plan, load_plan
from drplan.report_files import RPO_PREFIX, write_json
from drplan.results import Status
from drplan.timeutil import utcnow
from drplan.topology import DatabaseTopology, Member, State
from tasks import barman, postgres, rds, s3
from tasks.inventory import discovered_plan
from tasks.topology import discover_topology

Judge = Callable[[Any, datetime], rpo.Measurement]


@dataclass
class Pending:
    """A submitted measurement: what it measures, its future(s), and how to judge the result."""

    resource: str
    data_class: rpo.DataClass
    measure: str
    objective: timedelta
    judge: Judge
    futures: tuple[PrefectFuture, ...] = ()
    failure: BaseException | None = None

    def collect(self, now: datetime) -> rpo.Measurement:
        try:
            if self.failure:
                raise self.failure
            if not self.futures:  # nothing to measure: the judge reports why
                return self.judge(None, now)
            results = [f.result() for f in self.futures]
            return self.judge(results[0] if len(results) == 1 else results, now)
        except Exception as exc:  # one broken measurement must not hide the others
            return rpo.error(self.resource, self.data_class, self.measure, self.objective, exc)


def _aged(resource: str, data_class: rpo.DataClass, measure: str, objective: timedelta, **kw: Any) -> Judge:
    return lambda newest, now: rpo.age_of(resource, data_class, measure, newest, objective, now, **kw)


def database_checks(plan: Plan, db: Database, topology: DatabaseTopology,
                    rds_facts: Callable[[str], tuple[PrefectFuture]]) -> list[Pending]:
    """The database's measurements, taken on the live topology: the heartbeat on the live primary and on its replica
    in its region and in the other region (each as the plan requires), and its WAL archive and base backup
    (postgres) or latest restorable time and snapshot (rds, from `rds_facts`: one submission per region, shared by
    every database). A member the plan requires but the live primary lacks (no replica, archiving off) is a breach
    naming `drplan reprotect`."""
    objective = plan.objectives.rpo.database
    checks: list[Pending] = []
    primary = topology.primary
    reprotect = f"drplan reprotect --database {db.name}"

    def add(measure: str, objective: timedelta, judge: Judge, submit: Callable[[], tuple] | tuple) -> None:
        pending = Pending(db.name, "database", measure, objective, judge)
        try:
            pending.futures = submit if isinstance(submit, tuple) else submit()
        except Exception as exc:
            pending.failure = exc
        checks.append(pending)

    try:
        credentials = db_credentials(plan, db)
    except Exception as exc:
        credentials, credential_error = None, exc

    def target(member: Member) -> PgTarget:
        if credentials is None:
            raise credential_error
        return member.target(db.dbname, credentials)

    no_primary = "no live primary: " + "; ".join(topology.differences[:1])
    unprobed = topology.plan_primary if primary is None and topology.plan_primary and \
        topology.plan_primary.state is State.down else None

    def missing(measure: str, objective: timedelta, why: str, member: Member | None = None) -> None:
        """A measurement that cannot be taken on the live topology: an error when the member that would hold it
        does not answer (nothing could be measured), else a breach saying why."""
        down = member if member is not None and member.state is State.down else unprobed
        pending = Pending(db.name, "database", measure, objective,
                          _aged(db.name, "database", measure, objective, missing=why))
        if down is not None:
            pending.failure = DrplanError(down.detail or f"{down.identifier} does not answer")
        checks.append(pending)
    for role, planned in db.members.items():
        measure = f"{role} newest heartbeat"
        member = primary if role == "primary" else None
        if primary is not None and role == "replica":
            member = topology.in_region_replica(primary)
        elif primary is not None and role == "dr_replica":
            member = topology.dr_replica(primary)
        if member is None:
            missing(measure, objective, no_primary if primary is None else
                    f"the live primary {primary.identifier} has no replica in "
                    f"{topology.region_of(primary) if role == 'replica' else topology.other_region(primary)}; "
                    f"run {reprotect}", topology.member(planned))
            continue
        detail = "" if member.identifier == planned else f"on {member.identifier}"
        aged = _aged(db.name, "database", measure, objective, detail=detail, missing="heartbeat table is empty")

        def heartbeat(member: Member = member) -> tuple:
            return (postgres.read_newest_heartbeat_task.submit(target(member), db.integrity.heartbeat_table),)
        if db.kind is DatabaseKind.rds and role != "primary":  # with what CloudWatch says of its lag
            add(measure, objective, with_replica_lag(aged, member.identifier),
                lambda heartbeat=heartbeat, member=member: heartbeat() + rds_facts(topology.region_of(member)))
        else:
            add(measure, objective, aged, heartbeat)

    if db.kind is DatabaseKind.postgres:
        s3_client = aws_client(plan, "s3")

        def judge_wal(results: list, now: datetime) -> rpo.Measurement:
            newest, archiver = results
            detail = "" if primary.identifier == db.primary else f"on {primary.identifier}"
            if archiver.failing:
                detail = rpo.join(detail, f"archiver failing since {archiver.last_failed_time:%H:%M:%SZ} "
                                          f"({archiver.failed_count} failures, {archiver.last_failed_wal})")
            return rpo.age_of(db.name, "database", "WAL archive", newest, objective, now, detail=detail,
                              missing=f"no WAL of timeline {primary.timeline} in the archive")

        if primary is None or primary.archiving is False:
            missing("WAL archive", objective, no_primary if primary is None else
                    f"the live primary {primary.identifier} does not archive WAL; run {reprotect}")
        else:
            add("WAL archive", objective, judge_wal,
                lambda: (barman.find_newest_wal_task.submit(s3_client, db.backup, primary.timeline),
                         postgres.read_archiver_status.submit(target(primary))))

        def judge_base(backups: list[barman.BaseBackup], now: datetime) -> rpo.Measurement:
            done = [b for b in backups if b.status == "DONE" and b.end_time]
            failed = [b.backup_id for b in backups if b.status == "FAILED"]
            detail = f"failed backups in catalogue: {', '.join(failed)}" if failed else ""
            newest = max((b.end_time for b in done), default=None)
            return rpo.age_of(db.name, "database", "base backup", newest, db.base_backup_max_age, now,
                              detail=detail, missing="no completed base backup")

        add("base backup", db.base_backup_max_age, judge_base,
            lambda: (barman.list_base_backups.submit(s3_client, db.backup),))
    elif primary is None:
        missing("latest restorable time", objective, no_primary)
        missing("snapshot", db.base_backup_max_age, no_primary)
    else:
        facts = rds_facts(topology.region_of(primary))
        on = "" if primary.identifier == db.primary else f"on {primary.identifier}"

        def judge_restorable(facts: rds.RegionFacts, now: datetime) -> rpo.Measurement:
            if primary.identifier not in facts.instances:
                raise DrplanError(f"RDS instance {primary.identifier} not found in {topology.region_of(primary)}")
            return rpo.age_of(db.name, "database", "latest restorable time",
                              facts.instances[primary.identifier].get("LatestRestorableTime"), objective, now,
                              detail=on,
                              missing=f"{primary.identifier} reports no LatestRestorableTime (backups disabled?)")

        def judge_snapshot(facts: rds.RegionFacts, now: datetime) -> rpo.Measurement:
            return rpo.age_of(db.name, "database", "snapshot", facts.snapshots.get(primary.identifier),
                              db.base_backup_max_age, now, detail=on,
                              missing=f"no available snapshot of {primary.identifier}")

        add("latest restorable time", objective, judge_restorable, facts)
        add("snapshot", db.base_backup_max_age, judge_snapshot, facts)
    return checks


def with_replica_lag(judge: Judge, identifier: str) -> Judge:
    """A replica's heartbeat judged on the heartbeat, with its CloudWatch ReplicaLag (from its region's facts)
    added to the detail."""
    def judged(results: list, now: datetime) -> rpo.Measurement:
        newest, facts = results
        measurement = judge(newest, now)
        lag = facts.lags.get(identifier)
        return measurement if lag is None else measurement.model_copy(
            update={"detail": rpo.join(measurement.detail, f"ReplicaLag {lag:g}s (CloudWatch)")})
    return judged


def shared_futures(submit: Callable[[str], PrefectFuture]) -> Callable[[str], tuple[PrefectFuture]]:
    """One submission per key (a region), shared by every measurement that reads it."""
    submitted: dict[str, PrefectFuture] = {}

    def get(key: str) -> tuple[PrefectFuture]:
        if key not in submitted:
            submitted[key] = submit(key)
        return (submitted[key],)
    return get


def _newest(uri: str) -> Callable[[dict[str, datetime | None | Exception]], datetime | None]:
    """The newest time of `uri` in `newest_under`'s answer (its exception raised)."""
    def pick(found: dict[str, datetime | None | Exception]) -> datetime | None:
        if isinstance(found[uri], Exception):
            raise found[uri]
        return found[uri]
    return pick


def listing_checks(plan: Plan) -> list[Pending]:
    """Buckets (how far each backup trails its live data) and the configuration backup, from one task listing
    each backup prefix once (delimited) and each live prefix, a bounded number at a time."""
    live = [b.live for b in plan.buckets] + ([plan.configuration.backup] if plan.configuration else [])
    if not live:
        return []
    listed = (s3.newest_under.submit(aws_client(plan, "s3"), [b.backup for b in plan.buckets], live),)
    checks = []
    files = plan.objectives.rpo.file_storage
    for bucket in plan.buckets:
        def judge(found: dict, now: datetime, bucket=bucket) -> rpo.Measurement:
            return rpo.exposure(bucket.name, "file_storage", "backup trails live", _newest(bucket.backup)(found),
                                _newest(bucket.live)(found), files, now)

        checks.append(Pending(bucket.name, "file_storage", "backup trails live", files, judge, listed))
    if plan.configuration is not None:
        configuration, measure = plan.objectives.rpo.configuration, "newest configuration backup"
        aged = _aged("configuration", "configuration", measure, configuration, missing="no configuration backup")
        checks.append(Pending(
            "configuration", "configuration", measure, configuration,
            lambda found, now, uri=plan.configuration.backup: aged(_newest(uri)(found), now), listed))
    return checks


def publish(report: rpo.RpoReport) -> None:
    """Table artifact for the UI, one event per breach or failed measurement for automations."""
    create_table_artifact(
        key="rpo-verification", table=[m.row for m in report.measurements],
        description=f"RPO verification of plan {report.plan}: {report.summary}",
    )
    for m in report.measurements:
        if m.status is Status.passed:
            continue
        emit_event(
            event="drplan.rpo.breached" if m.status is Status.failed else "drplan.rpo.unverified",
            resource={
                "prefect.resource.id": f"drplan.{m.data_class}.{m.resource}",
                "prefect.resource.name": m.resource,
                "drplan.measure": m.measure,
            },
            payload={"age_seconds": m.age.total_seconds() if m.age is not None else None,
                     "objective_seconds": m.objective.total_seconds(), "detail": m.detail},
        )


@flow(name="rpo-verification", task_runner=ThreadPoolTaskRunner(max_workers=8))
def rpo_verification(plan: str = DEFAULT_PLAN) -> rpo.RpoReport:
    """Measure the age of the newest recoverable copy of everything in the plan against its RPO."""
    dr_plan = load_plan(plan)
    logger = get_run_logger()
    retries = retries_since()
    logger.info("AWS access as %s", check_aws_access(dr_plan))
    dr_plan = discovered_plan(dr_plan)  # with the buckets and databases its discover: selectors take in
    started = utcnow()
    topology = discover_topology(dr_plan)
    create_markdown_artifact(key="rpo-verification-topology", markdown=topology.markdown(),
                             description="the live topology measured")
    facts = shared_futures(lambda region: rds.region_facts.submit(aws_client(dr_plan, "rds", region),
                                                                  aws_client(dr_plan, "cloudwatch", region)))
    pending = [
        *(check for db, live in zip(dr_plan.databases, topology.databases, strict=True)
          for check in database_checks(dr_plan, db, live, facts)),
        *listing_checks(dr_plan),
    ]
    for future in (f for p in pending for f in p.futures):
        future.wait()
    now = utcnow()
    report = rpo.RpoReport(
        plan=dr_plan.name, started_at=started, finished_at=now,
        measurements=[p.collect(now) for p in pending], differences=topology.differences, aws_retries=retries(),
    )
    publish(report)
    write_json(dr_plan, RPO_PREFIX, report)  # for `drplan metrics`
    for m in report.breaches + report.errors:
        logger.warning("%s %s: %s (age %s, objective %s) %s", m.resource, m.measure, m.label,
                       m.age, m.objective, m.detail)
    if report.exit_code:
        return Failed(message=f"RPO verification: {report.summary}", data=report)
    logger.info("RPO verification: %s", report.summary)
    return report
