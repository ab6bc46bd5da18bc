"""Restore drill: prove a backup by restoring it. The runbook's "Backup Restoration: test restoring from backups".

For each database: choose a target time inside the restorable window -> sweep leftovers of earlier drills ->
restore a scratch copy as of that time -> check the copy against the source (integrity suites) -> measure RTO
(drill start to a checked, connectable copy) and RPO (target time minus the newest heartbeat in the copy) ->
always remove the scratch copy (unless kept) -> report (markdown artifact, JSON file, event). Each database's drill
holds its drill lock (flows/shared/gates.drill_lock): drills of one database queue, of different databases (a fleet
drill's runs of this flow on several workers) run side by side.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.states import Failed

from drplan.clients import check_aws_access, db_credentials, pg_target, retries_since
from drplan.drill_report import DrillReport, Measured
from drplan.errors import DrplanError, first_line
from drplan.plan import DEFAULT_PLAN, Database, Plan
from drplan.report_files import DRILL_PREFIX, reports_dir
from drplan.timeutil import utcnow
from flows.shared.gates import drill_lock
from flows.shared.requests import choose_target_time, validate_request
from tasks.database import (
    check_restored_copy,
    compare_fingerprints,
    drop_scratch,
    find_restorable_window,
    restore_scratch,
    sweep_leftovers,
)
from tasks.postgres import read_newest_heartbeat_task
from tasks.targets import restore_target, scratch_name
from tasks.topology import discover_topology


def drill_database(dr_plan: Plan, db: Database, when: datetime | None, spread: timedelta | None,
                   keep: bool) -> DrillReport:
    logger = get_run_logger()
    retries, started = retries_since(), utcnow()
    live = discover_topology(dr_plan, [db.name]).databases[0].last_primary  # the source is what serves now
    target = restore_target(dr_plan, db, live)
    name = scratch_name(db, started)
    report = DrillReport(plan=dr_plan.name, database=db.name, kind=db.kind.value, tier=db.tier, scratch=name,
                         started_at=started)
    restore_started = False
    try:
        window = find_restorable_window(target)
        report.target_time = choose_target_time(window, when, spread, dr_plan.drill.target_margin)
        report.nominal_rpo = Measured(measured=started - window.latest, objective=dr_plan.objectives.rpo.database)
        report.swept = sweep_leftovers(target, dr_plan.drill.sweep_after)
        credentials = db_credentials(dr_plan, db)
        restore_started = True
        scratch = restore_scratch(target, name, report.target_time, credentials)
        report.backup_id = scratch.backup_id
        report.restore_duration = utcnow() - started
        report.download, report.replay = scratch.download, scratch.replay
        copy = scratch.target(db, credentials)
        source = live.target(db.dbname, credentials) if live and live.host else pg_target(dr_plan, db, "primary",
                                                                                         credentials)
        checks_started = utcnow()
        report.checks = check_restored_copy(source, copy, db.integrity, report.target_time,
                                            dr_plan.objectives.rpo.database)
        if db.integrity.fingerprint:
            report.checks += compare_fingerprints(source, copy, db.integrity, report.target_time)
        report.checks_duration = utcnow() - checks_started
        report.rto = Measured(measured=utcnow() - started, objective=dr_plan.objectives.rto_for(db.tier))
        try:
            newest = read_newest_heartbeat_task(copy, db.integrity.heartbeat_table)
        except DrplanError:  # no heartbeat table in the copy: already a failed check; RPO unmeasurable
            newest = None
        report.rpo = Measured(measured=report.target_time - newest if newest else None,
                              objective=dr_plan.objectives.rpo.database)
    except Exception as exc:  # the report must say what failed; cleanup below still runs
        report.error = first_line(exc)
        logger.error("drill of %s failed: %s", db.name, report.error)
    finally:
        if keep and restore_started:
            report.cleanup = f"kept for inspection: {name} (a later drill sweeps it after drill.sweep_after)"
        elif restore_started:
            try:
                report.cleanup = "removed" if drop_scratch(target, name) else "nothing to remove"
            except Exception as exc:  # noqa: BLE001 - reported, and the next drill's sweep retries
                report.cleanup = f"FAILED: {exc}; the next drill sweeps it"
        else:
            report.cleanup = "nothing restored"
        report.aws_retries, report.finished_at = retries(), utcnow()
    return report


def publish(dr_plan: Plan, report: DrillReport) -> Path:
    create_markdown_artifact(key=f"restore-drill-{report.database}".lower(), markdown=report.markdown(),
                             description=f"restore drill of {report.database}: {report.status.value}")
    directory = reports_dir(dr_plan)
    path = directory / f"{DRILL_PREFIX}{report.scratch}.json"
    path.write_text(report.model_dump_json(indent=2))
    emit_event(
        event=f"drplan.drill.{report.status.value}",
        resource={"prefect.resource.id": f"drplan.database.{report.database}",
                  "prefect.resource.name": report.database},
        payload={"report": str(path), "error": report.error,
                 "failed_checks": [c.name for c in report.checks if not c.passed]},
    )
    return path


@flow(name="restore-drill")
def restore_drill(
    plan: str = DEFAULT_PLAN,
    database: str | None = None,
    target_time: str | None = None,
    random_within: str | None = None,
    keep: bool = False,
) -> list[DrillReport]:
    """Restore each database (or one) to a scratch copy, check it, measure RTO/RPO, clean up, report.

    target_time: ISO 8601 with a zone, or "latest" (default: latest restorable minus the plan's margin);
    random_within: e.g. "24h" picks a random target time in that span; keep: leave the scratch copy running.
    """
    dr_plan, databases, when, spread = validate_request(plan, database, target_time, random_within)
    check_aws_access(dr_plan)
    reports = []
    for db in databases:
        with drill_lock(db):  # a second drill of this database (another run, a fleet drill) waits for this one
            report = drill_database(dr_plan, db, when, spread, keep)
        path = publish(dr_plan, report)
        get_run_logger().info("drill of %s: %s (report %s)", db.name, report.status.value, path)
        reports.append(report)
    worst = max(r.exit_code for r in reports)
    if worst:
        summary = ", ".join(f"{r.database} {r.status.value}" + (f" ({r.error})" if r.error else "") for r in reports)
        return Failed(message=f"restore drill: {summary}", data=reports)
    return reports
