"""RPO verification: how old is the newest recoverable copy of every database, bucket and configuration?

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
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from drplan import rpo
from drplan.clients import aws_client, check_aws_access, db_credentials, pg_target
from drplan.plan import DEFAULT_PLAN, Database, DatabaseKind, Plan, load_plan
from drplan.results import Status
from drplan.timeutil import utcnow
from tasks import barman, postgres, rds, s3

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
            results = [f.result() for f in self.futures]
            return self.judge(results[0] if len(results) == 1 else results, now)
        except Exception as exc:  # one broken measurement must not hide the others
            return rpo.error(self.resource, self.data_class, self.measure, self.objective, exc)


def _aged(resource: str, data_class: rpo.DataClass, measure: str, objective: timedelta, **kw: Any) -> Judge:
    return lambda newest, now: rpo.age_of(resource, data_class, measure, newest, objective, now, **kw)


def database_checks(plan: Plan, db: Database) -> list[Pending]:
    objective = plan.objectives.rpo.database
    checks: list[Pending] = []

    def add(measure: str, objective: timedelta, judge: Judge, submit: Callable[[], tuple]) -> None:
        pending = Pending(db.name, "database", measure, objective, judge)
        try:
            pending.futures = submit()
        except Exception as exc:
            pending.failure = exc
        checks.append(pending)

    try:
        credentials = db_credentials(plan, db)
    except Exception as exc:
        credentials, credential_error = None, exc
    for role in db.members:
        measure = f"{role} newest heartbeat"

        def submit_heartbeat(role: str = role) -> tuple:
            if credentials is None:
                raise credential_error
            target = pg_target(plan, db, role, credentials)
            return (postgres.read_newest_heartbeat_task.submit(target, db.integrity.heartbeat_table),)

        add(measure, objective, _aged(db.name, "database", measure, objective,
                                      missing="heartbeat table is empty"), submit_heartbeat)

    if db.kind is DatabaseKind.postgres:
        s3_client = aws_client(plan, "s3")

        def judge_wal(results: list, now: datetime) -> rpo.Measurement:
            newest, archiver = results
            detail = ""
            if archiver.failing:
                detail = (f"archiver failing since {archiver.last_failed_time:%H:%M:%SZ} "
                          f"({archiver.failed_count} failures, {archiver.last_failed_wal})")
            return rpo.age_of(db.name, "database", "WAL archive", newest, objective, now, detail=detail,
                              missing="no WAL in the archive")

        def submit_wal() -> tuple:
            if credentials is None:
                raise credential_error
            primary = pg_target(plan, db, "primary", credentials)
            return (barman.find_newest_wal_task.submit(s3_client, db.backup),
                    postgres.read_archiver_status.submit(primary))

        add("WAL archive", objective, judge_wal, submit_wal)

        def judge_base(backups: list[barman.BaseBackup], now: datetime) -> rpo.Measurement:
            done = [b for b in backups if b.status == "DONE" and b.end_time]
            failed = [b.backup_id for b in backups if b.status == "FAILED"]
            detail = f"failed backups in catalogue: {', '.join(failed)}" if failed else ""
            newest = max((b.end_time for b in done), default=None)
            return rpo.age_of(db.name, "database", "base backup", newest, db.base_backup_max_age, now,
                              detail=detail, missing="no completed base backup")

        add("base backup", db.base_backup_max_age, judge_base,
            lambda: (barman.list_base_backups.submit(s3_client, db.backup),))
    else:
        rds_client = aws_client(plan, "rds")

        def judge_restorable(instance: dict, now: datetime) -> rpo.Measurement:
            return rpo.age_of(db.name, "database", "latest restorable time",
                              instance.get("LatestRestorableTime"), objective, now,
                              missing="instance reports no LatestRestorableTime (backups disabled?)")

        add("latest restorable time", objective, judge_restorable,
            lambda: (rds.describe_instance_task.submit(rds_client, db.primary),))
        add("snapshot", db.base_backup_max_age,
            _aged(db.name, "database", "snapshot", db.base_backup_max_age, missing="no available snapshot"),
            lambda: (rds.find_newest_snapshot.submit(rds_client, db.primary),))
    return checks


def bucket_checks(plan: Plan) -> list[Pending]:
    objective = plan.objectives.rpo.file_storage
    s3_client = aws_client(plan, "s3") if plan.buckets else None
    checks = []
    for bucket in plan.buckets:
        def judge(results: list, now: datetime, name: str = bucket.name) -> rpo.Measurement:
            newest_backup, newest_change = results
            return rpo.exposure(name, "file_storage", "backup trails live", newest_backup, newest_change,
                                objective, now)

        checks.append(Pending(
            bucket.name, "file_storage", "backup trails live", objective, judge,
            (s3.find_newest_backup.submit(s3_client, bucket.backup),
             s3.find_newest_object.submit(s3_client, bucket.live)),
        ))
    return checks


def configuration_checks(plan: Plan) -> list[Pending]:
    if plan.configuration is None:
        return []
    objective = plan.objectives.rpo.configuration
    measure = "newest configuration backup"
    return [Pending(
        "configuration", "configuration", measure, objective,
        _aged("configuration", "configuration", measure, objective, missing="no configuration backup"),
        (s3.find_newest_object.submit(aws_client(plan, "s3"), plan.configuration.backup),),
    )]


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
    logger.info("AWS access as %s", check_aws_access(dr_plan))
    started = utcnow()
    pending = [
        *(check for db in dr_plan.databases for check in database_checks(dr_plan, db)),
        *bucket_checks(dr_plan),
        *configuration_checks(dr_plan),
    ]
    for future in (f for p in pending for f in p.futures):
        future.wait()
    now = utcnow()
    report = rpo.RpoReport(
        plan=dr_plan.name, started_at=started, finished_at=now,
        measurements=[p.collect(now) for p in pending],
    )
    publish(report)
    for m in report.breaches + report.errors:
        logger.warning("%s %s: %s (age %s, objective %s) %s", m.resource, m.measure, m.label,
                       m.age, m.objective, m.detail)
    if report.exit_code:
        return Failed(message=f"RPO verification: {report.summary}", data=report)
    logger.info("RPO verification: %s", report.summary)
    return report
