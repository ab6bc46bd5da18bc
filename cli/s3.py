"""`drplan s3-restore` and `drplan s3-backup`: bucket recovery and backup from the command line, run in-process
(no flow run) with a progress bar on stderr. Exit 0 done and verified, 1 objects failed or did not verify,
2 an error (bad URI, missing bucket, access denied) before or instead of copying."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.console import PlanOption, err, out, plan_or_exit, refusals
from drplan.errors import DrplanError
from drplan.plan import Bucket, Plan
from drplan.progress import RichProgress
from drplan.s3manifest import SAMPLE
from drplan.s3store import parse_prefix, transfer_client
from drplan.s3sync import SyncOptions, SyncReport, restore
from drplan.timeutil import utcnow

BucketOption = typer.Option(None, "--bucket", help="Only this bucket of the plan (default: all).")
JsonOption = typer.Option(False, "--json", help="Print the results as JSON.")


def s3_restore(
    source: str = typer.Option(..., "--from", help="A backup (s3://…/<stamp>/), a backup root (its newest complete "
                                                   "backup is used), or any prefix (unverified)."),
    target: str = typer.Option(..., "--to", help="The prefix to restore into, e.g. s3://live-bucket/"),
    plan: str = PlanOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be copied and deleted; change nothing."),
    delete: bool = typer.Option(False, "--delete", help="Delete target objects the backup does not have."),
    workers: int = typer.Option(32, "--workers", min=1, max=256, help="Concurrent server-side copies."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Restore a bucket from a backup: copy server-side what differs by size or checksum, verify the result."""
    with refusals():
        parse_prefix(source)
        parse_prefix(target)
    dr_plan = plan_or_exit(plan)
    options = SyncOptions(dry_run=dry_run, delete=delete, workers=workers)
    s3 = transfer_client(dr_plan, workers)
    with refusals():
        report = restore(s3, source, target, options, progress=RichProgress(err, "restoring"))
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        show_sync(report)
    raise typer.Exit(report.exit_code)


def s3_backup(
    plan: str = PlanOption,
    bucket: str | None = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Back up the plan's buckets: server-side copies into <backup>/<stamp>/, verified, then the manifest."""
    from tasks.s3 import back_up_prefix

    dr_plan = plan_or_exit(plan)
    with refusals():
        buckets = plan_buckets(dr_plan, bucket)
        s3 = transfer_client(dr_plan, SyncOptions().workers)
        at = utcnow()
        results = [back_up_prefix(s3, b.live, b.backup, at, progress=RichProgress(err, f"backing up {b.name}"))
                   for b in buckets]
    if as_json:
        out.print_json(data=[r.model_dump(mode="json") for r in results])
        return
    for r in results:
        out.print(f"{r.source} -> {r.backup}: {r.objects} objects ({r.copied} copied), manifest {r.manifest}, "
                  f"{r.duration_s:.1f}s", highlight=False, soft_wrap=True)


def plan_buckets(dr_plan: Plan, bucket: str | None) -> list[Bucket]:
    """One named bucket of the plan, or all of them; an unknown name or a plan without buckets is an error."""
    buckets = [dr_plan.bucket(bucket)] if bucket else dr_plan.buckets
    if not buckets:
        raise DrplanError(f"plan {dr_plan.name} has no buckets; add buckets: [{{name, live, backup}}]")
    return buckets


def show_sync(report: SyncReport) -> None:
    table = Table(title=f"{report.source} -> {report.target}" + (" (dry run)" if report.dry_run else ""),
                  title_justify="left")
    for column in ("", "objects", "bytes"):
        table.add_column(column, justify="right" if column else "left")
    rows = [("to copy", report.planned_copy), ("to delete", report.planned_delete), ("unchanged", report.skipped)]
    if not report.dry_run:
        rows += [("copied", report.copied), ("deleted", report.deleted), ("failed", report.failed)]
    for name, tally in rows:
        table.add_row(name, str(tally.objects), str(tally.bytes))
    out.print(table)
    for label, keys in (("would copy", report.would_copy), ("would delete", report.would_delete)):
        for key in keys[:SAMPLE]:
            out.print(f"{label}: {key}", highlight=False)
        if len(keys) > SAMPLE:
            out.print(f"{label}: ... {len(keys) - SAMPLE} more (--json lists all)", highlight=False)
    out.print(report.summary, highlight=False, soft_wrap=True)
    if report.manifest is None and not report.dry_run:
        err.print(f"warning: {report.source} has no manifest; the restore is unverified", highlight=False)
    for failure in report.failures[:SAMPLE]:
        err.print(f"failed: {failure.key}: {failure.error}", highlight=False, soft_wrap=True)


def s3_verify(
    plan: str = PlanOption,
    bucket: str | None = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Check each bucket's newest backup against its manifest: missing, corrupt, extra keys. Exit 0 all verified."""
    from drplan.clients import aws_client
    from drplan.s3manifest import resolve_backup
    from tasks.s3 import verify_backup

    dr_plan = plan_or_exit(plan)
    with refusals():
        buckets = plan_buckets(dr_plan, bucket)
        s3 = aws_client(dr_plan, "s3")
        results = [verify_backup(s3, resolve_backup(s3, b.backup)) for b in buckets]
    if as_json:
        out.print_json(data=[r.model_dump(mode="json") for r in results])
    else:
        for r in results:
            out.print(r.summary, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if all(r.ok for r in results) else 1)
