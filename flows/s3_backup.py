"""Bucket backup: server-side copies of every live object into `<backup>/<stamp>/`, then the manifest.

Runbook it replaces: "aws s3 sync live backup, then aws s3 ls to see it is there". Each backup is verified
against what was copied before its manifest is written; a backup without a manifest is incomplete and RPO
verification ignores it.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.states import Failed

from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.plan import DEFAULT_PLAN, load_plan
from drplan.s3store import transfer_client
from drplan.s3sync import DEFAULTS
from drplan.timeutil import utcnow
from tasks.s3 import BackupResult, back_up_bucket


@flow(name="s3-backup")
def s3_backup(plan: str = DEFAULT_PLAN, bucket: str | None = None) -> list[BackupResult]:
    """Back up every bucket of the plan (or only `bucket`), one after the other, each with many workers."""
    dr_plan = load_plan(plan)
    buckets = [dr_plan.bucket(bucket)] if bucket else dr_plan.buckets
    if not buckets:
        raise DrplanError(f"plan {dr_plan.name} has no buckets; add buckets: [{{name, live, backup}}]")
    s3 = transfer_client(dr_plan, DEFAULTS.workers)
    at = utcnow()
    states = {b.name: back_up_bucket(s3, b, at, return_state=True) for b in buckets}
    results = [state.result() for state in states.values() if state.is_completed()]
    failed = {name: state.message for name, state in states.items() if not state.is_completed()}
    create_table_artifact(
        key="s3-backup", description=f"bucket backups of plan {dr_plan.name}",
        table=[{"bucket": name, "backup": "-", "objects": "-", "AWS retries": "-", "status": f"failed: {message}"}
               for name, message in failed.items()]
        + [{"bucket": r.source, "backup": r.backup, "objects": str(r.objects), "AWS retries": str(r.aws_retries),
            "status": "complete"} for r in results],
    )
    if failed:
        return Failed(message="; ".join(f"{name}: {message}" for name, message in failed.items()), data=results)
    run_logger().info("backed up %d buckets", len(results))
    return results
