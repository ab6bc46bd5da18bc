"""Restore tasks against a database target (tasks.targets): window, restore, mark served, drop, sweep."""

from __future__ import annotations

from datetime import datetime, timedelta

from prefect import task
from prefect.cache_policies import NO_CACHE

from drplan.clients import DbCredentials, PgTarget
from drplan.logs import run_logger
from drplan.plan import Integrity
from drplan.results import CheckResult, Status
from drplan.timeutil import utcnow
from tasks.targets import RestorableWindow, RestoreTarget, Scratch


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def find_restorable_window(target: RestoreTarget) -> RestorableWindow:
    window = target.window()
    run_logger().info("%s restorable from %s to %s", target.db.name, window.earliest, window.latest)
    return window


@task(cache_policy=NO_CACHE)
def restore_scratch(target: RestoreTarget, name: str, target_time: datetime, credentials: DbCredentials,
                    serving: bool = False) -> Scratch:
    """Restore to a scratch copy (no retries: a failed restore is the finding, and it is cleaned up); `serving`:
    the copy may already serve the application being recovered (see Copy.check_reusable)."""
    run_logger().info("restoring %s to %s as of %s", target.db.name, name, target_time.isoformat())
    scratch = target.restore(name, target_time, credentials, serving)
    run_logger().info("scratch copy %s accepting connections on %s:%s", name, scratch.host, scratch.port)
    return scratch


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def mark_copy_served(target: RestoreTarget, name: str, service: str) -> None:
    """Record on the copy that `service` is cut over to it: from then on no rerun reuses it as the database as of its
    target time (a rerun also marks a copy it finds an application using: a crash between the cutover and this
    mark cannot leave a serving copy unmarked)."""
    target.mark_served(name)
    run_logger().info("copy %s marked as serving %s: a rerun will not reuse it", name, service)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def drop_scratch(target: RestoreTarget, name: str) -> bool:
    dropped = target.drop(name)
    run_logger().info("scratch copy %s %s", name, "removed" if dropped else "was already gone")
    return dropped


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def sweep_leftovers(target: RestoreTarget, older_than: timedelta) -> list[str]:
    """Remove scratch copies earlier drills left behind (crashed runs) once older than `older_than`."""
    cutoff = utcnow() - older_than
    swept = []
    for leftover in target.leftovers():
        if leftover.created_at is None or leftover.created_at <= cutoff:
            target.drop(leftover.name)
            swept.append(leftover.name)
    if swept:
        run_logger().warning("swept leftovers of earlier drills: %s", ", ".join(swept))
    return swept


@task(cache_policy=NO_CACHE)
def check_restored_copy(source: PgTarget, restored: PgTarget, integrity: Integrity, target_time: datetime,
                        rpo: timedelta) -> list[CheckResult]:
    """The integrity suites (checks/) of a restored copy against its source, one result per check, including a
    heartbeat within the database RPO of T."""
    from checks import run_integrity_checks

    results = run_integrity_checks(source, restored, integrity, target_time, rpo).checks
    failed = [c.name for c in results if not c.passed]
    run_logger().info("%d checks, not passed: %s", len(results), ", ".join(failed) or "none")
    return results


@task(cache_policy=NO_CACHE)
def compare_fingerprints(source: PgTarget, restored: PgTarget, integrity: Integrity, target_time: datetime
                         ) -> list[CheckResult]:
    """Rows the source has not changed since T (timestamp column <= T) must be identical in the copy.
    Rows only in the copy are rows changed or deleted in the source since T: reported, not a failure."""
    from checks import fingerprint_diff

    results = []
    for table in integrity.tables:
        diff = fingerprint_diff(source, restored, table, predicate=(integrity.timestamp_column, "<=", target_time))
        if diff.errors:
            status, observed = Status.error, "; ".join(diff.errors)
        else:
            lost = [f"{d.key} ({d.kind})" for d in diff.keys if d.kind != "extra"][:10]
            status = Status.failed if diff.missing or diff.changed or diff.unresolved_rows else Status.passed
            observed = (f"{diff.rows_source} rows compared; {diff.missing} missing, {diff.changed} changed"
                        + (f" ({', '.join(lost)})" if lost else "")
                        + f"; {diff.extra} changed or deleted in the source since T")
        results.append(CheckResult.of_table(
            table, "fingerprint", status=status, observed=observed,
            expectation=f"rows with {integrity.timestamp_column} <= T identical in source and copy",
        ))
    return results
