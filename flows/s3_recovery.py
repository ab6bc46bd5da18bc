"""S3 data recovery: restore a live bucket from a verified bucket backup.

Runbook it replaces: "aws s3 ls the backup, then aws s3 sync it back". Here the backup is checked against its
manifest first, only objects that differ by size or checksum are copied (server-side, many workers), keys
the backup lacks can be deleted, and the result is verified. A dry run (the default) lists what would
change; a rerun resumes where a failed run stopped.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed
from pydantic import Field

from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.plan import DEFAULT_PLAN, Bucket, Plan, load_plan
from drplan.s3manifest import SAMPLE
from drplan.s3store import transfer_client
from drplan.s3sync import SyncOptions, SyncReport
from tasks.s3 import restore_backup


def pick_bucket(plan: Plan, name: str | None) -> Bucket:
    if name:
        return plan.bucket(name)
    if len(plan.buckets) != 1:
        known = ", ".join(b.name for b in plan.buckets) or "(none defined)"
        raise DrplanError(f"plan {plan.name} has {len(plan.buckets)} buckets; pass bucket= one of: {known}")
    return plan.buckets[0]


def publish(report: SyncReport) -> None:
    lines = [f"**{report.source} → {report.target}**", "", report.summary, ""]
    for label, keys in (("would copy", report.would_copy), ("would delete", report.would_delete),
                        ("failed", [f"{f.key}: {f.error}" for f in report.failures])):
        lines += [f"- {label}: `{key}`" for key in keys[:SAMPLE]]
        if len(keys) > SAMPLE:
            lines.append(f"- {label}: … {len(keys) - SAMPLE} more")
    create_markdown_artifact(key="s3-recovery-report", markdown="\n".join(lines), description=report.summary)


@flow(name="s3-recovery")
def s3_recovery(
    plan: str = DEFAULT_PLAN,
    bucket: str | None = None,
    backup: Annotated[str | None, Field(pattern=r"^\d{8}T\d{6}Z$")] = None,
    dry_run: bool = True,
    delete: bool = False,
    workers: Annotated[int, Field(ge=1, le=256)] = 32,
) -> SyncReport:
    """Restore plan bucket `bucket` (default: the only one) from backup stamp `backup` (default: the newest
    complete one). Dry run unless dry_run=false."""
    dr_plan = load_plan(plan)
    target = pick_bucket(dr_plan, bucket)
    options = SyncOptions(dry_run=dry_run, delete=delete, workers=workers)
    source = f"{target.backup}{backup}/" if backup else target.backup
    report = restore_backup(transfer_client(dr_plan, workers), source, target.live, options)
    publish(report)
    if report.exit_code:
        return Failed(message=f"S3 recovery incomplete: {report.summary}", data=report)
    run_logger().info("S3 recovery: %s", report.summary)
    return report
