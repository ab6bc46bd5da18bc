"""The DR test: the quarterly evidence an auditor asks for (and what `make run` runs on the sandbox).

RPO verification -> every bucket's newest backup checked against its manifest, then restored into a scratch bucket,
verified against the manifest and removed -> DR readiness -> cross-region rehearsal (flows/rehearsal.py) -> restore
drill (each database, or one) -> one report of
what was measured against which objective: appended to the plan's evidence chain (drplan/evidence.py), a markdown
artifact, a markdown and a JSON file in `drill.report_dir`, and a `drplan.dr_test.<status>` event. A part that
fails or errors does not stop the others; the report says which part failed and why. Nothing here changes
production: the drill restores to scratch copies and scratch buckets and removes them.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.states import Failed
from pydantic import BaseModel, Field, computed_field

from drplan.clients import aws_client
from drplan.drill_report import DrillReport
from drplan.errors import DrplanError, first_line
from drplan.evidence import append, open_store, record_name
from drplan.plan import DEFAULT_PLAN, Plan
from drplan.results import Status, markdown_table, overall
from drplan.rpo import RpoReport
from drplan.s3manifest import resolve_backup
from drplan.s3store import transfer_client
from drplan.s3sync import DEFAULTS
from drplan.timeutil import utcnow
from flows.dr_readiness import ReadinessReport, dr_readiness
from flows.rehearsal import RehearsalReport, dr_rehearsal
from flows.restore_drill import restore_drill
from flows.rpo_verification import rpo_verification
from flows.shared.report import run_report
from flows.shared.requests import validate_request
from tasks.s3 import restore_into_scratch, verify_backup


class Part(BaseModel):
    """One part of the test: its verdict, one line for the summary table, and its own report."""

    name: str
    status: Status
    summary: str
    details: str = ""


class DrTestReport(BaseModel):
    plan: str
    started_at: datetime
    finished_at: datetime | None = None
    parts: list[Part] = Field(default_factory=list)
    evidence: str | None = None
    """The markdown file this report was written to (the JSON beside it)."""
    record: str | None = None
    """The evidence chain record holding this report, and its SHA-256."""
    record_sha256: str | None = None

    @computed_field
    @property
    def status(self) -> Status:
        """The worst part's status (error > failed > passed); no part at all is an error."""
        return overall(p.status for p in self.parts) if self.parts else Status.error

    @property
    def exit_code(self) -> int:
        return self.status.exit_code

    def markdown(self) -> str:
        until = f" to {self.finished_at:%H:%M:%SZ}" if self.finished_at else ""
        rows = [[p.name, p.status.value, p.summary] for p in self.parts]
        table = markdown_table(["part", "status", "summary"], rows)
        record = [f"Evidence record {self.record} (SHA-256 {self.record_sha256})", ""] if self.record else []
        lines = [f"# DR test of plan {self.plan}: **{self.status.value}**", "",
                 f"{self.started_at:%Y-%m-%d %H:%M:%SZ}{until}", "", *record, table]
        return "\n".join([*lines, *(f"\n{p.details}" for p in self.parts if p.details)])


def rpo_part(plan_ref: str) -> Part:
    try:
        report = run_report(rpo_verification, RpoReport, plan=plan_ref)
    except DrplanError as exc:
        return Part(name="RPO verification", status=Status.error, summary=str(exc))
    return Part(name="RPO verification", status=report.status, summary=report.summary, details=report.markdown())


@task(cache_policy=NO_CACHE)
def backup_parts(plan: Plan) -> list[Part]:
    """Each bucket's newest backup against its manifest (missing, corrupt, extra objects)."""
    parts = []
    for bucket in plan.buckets:
        name = f"backup of bucket {bucket.name}"
        try:
            s3 = aws_client(plan, "s3")
            verification = verify_backup(s3, resolve_backup(s3, bucket.backup))
        except Exception as exc:  # the report says what could not be checked; the other parts still run
            parts.append(Part(name=name, status=Status.error, summary=first_line(exc)))
            continue
        parts.append(Part(name=name, status=Status.passed if verification.ok else Status.failed,
                          summary=verification.summary))
    return parts


@task(cache_policy=NO_CACHE)
def restore_parts(plan: Plan, at: datetime) -> list[Part]:
    """Each bucket's newest backup restored into a scratch bucket named for the test, verified, removed."""
    parts = []
    for bucket in plan.buckets:
        name = f"restore of bucket {bucket.name}"
        try:
            result = restore_into_scratch(transfer_client(plan, DEFAULTS.workers), bucket, at, plan.drill.sweep_after)
        except Exception as exc:  # the report says what could not be checked; the other parts still run
            parts.append(Part(name=name, status=Status.error, summary=first_line(exc)))
            continue
        status = Status.passed if result.ok else Status.error if result.error else Status.failed
        parts.append(Part(name=name, status=status, summary=result.summary))
    return parts


def record_evidence(plan: Plan, report: DrTestReport) -> None:
    """Append the finished report to the plan's evidence chain and name the record in it; a chain that cannot
    take it is an error part (the report files are still written)."""
    if plan.evidence is None:
        return
    try:
        store = open_store(plan)
        record = append(store, report.model_dump(mode="json"))
    except DrplanError as exc:
        report.parts.append(Part(name="evidence history", status=Status.error, summary=str(exc)))
        return
    report.record, report.record_sha256 = store.where(record_name(record.sequence)), record.sha256


def readiness_part(plan_ref: str, region: str) -> Part:
    name = f"DR readiness of {region}"
    try:
        report = run_report(dr_readiness, ReadinessReport, plan=plan_ref, region=region, dr_test_age=False)
    except DrplanError as exc:
        return Part(name=name, status=Status.error, summary=str(exc))
    unready = "; ".join(f"{f.check}: {f.detail}" for f in report.unready)
    return Part(name=name, status=Status.passed if report.ready else Status.failed,
                summary=f"ready ({len(report.findings)} checks)" if report.ready else f"NOT READY: {unready}",
                details=report.markdown())


def rehearsal_part(plan_ref: str) -> Part:
    name = "cross-region rehearsal"
    try:
        report = run_report(dr_rehearsal, RehearsalReport, plan=plan_ref)
    except DrplanError as exc:
        return Part(name=name, status=Status.error, summary=str(exc))
    return Part(name=name, status=report.status, summary=report.summary, details=report.markdown())


def drill_parts(plan_ref: str, database: str | None) -> list[Part]:
    try:
        reports = run_report(restore_drill, list, plan=plan_ref, database=database)
    except DrplanError as exc:
        return [Part(name="restore drill", status=Status.error, summary=str(exc))]
    return [drill_part(r) for r in reports]


def drill_part(report: DrillReport) -> Part:
    failed = [c.name for c in report.checks if not c.passed]
    summary = "; ".join([f"RTO {report.rto or '-'}", f"RPO {report.rpo or '-'}",
                         f"{len(report.checks) - len(failed)}/{len(report.checks)} checks passed",
                         *([f"failed: {', '.join(failed)}"] if failed else []),
                         *([f"error: {report.error}"] if report.error else [])])
    return Part(name=f"restore drill of {report.database}", status=report.status, summary=summary,
                details=report.markdown())


def publish(plan: Plan, report: DrTestReport) -> Path:
    """The evidence: artifact, markdown and JSON files, event. Returns the markdown file."""
    create_markdown_artifact(key="dr-test", markdown=report.markdown(),
                             description=f"DR test of {report.plan}: {report.status.value}")
    directory = plan.resolve_path(plan.drill.report_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"dr-test-{report.started_at:%Y%m%dT%H%M%SZ}.md"
    report.evidence = str(path)
    path.write_text(report.markdown() + "\n")
    path.with_suffix(".json").write_text(report.model_dump_json(indent=2))
    emit_event(event=f"drplan.dr_test.{report.status.value}",
               resource={"prefect.resource.id": f"drplan.plan.{report.plan}", "prefect.resource.name": report.plan},
               payload={"report": str(path),
                        "not_passed": [f"{p.name}: {p.summary}" for p in report.parts
                                       if p.status is not Status.passed]})
    return path


@flow(name="dr-test")
def dr_test(plan: str = DEFAULT_PLAN, database: str | None = None) -> DrTestReport:
    """RPO verification, backup verification and a restore of each into a scratch bucket, DR readiness and a
    restore drill of each database (or `database`), reported together as evidence. Fails when any part failed."""
    dr_plan, _, _, _ = validate_request(plan, database, None, None)
    has_dr = bool(dr_plan.aws.dr_region) and any(s.dr for s in dr_plan.services)
    report = DrTestReport(plan=dr_plan.name, started_at=utcnow())
    progress = create_progress_artifact(progress=0.0, key="dr-test-progress", description="DR test parts done")
    steps, done = (6 if has_dr else 4), 0

    def record(parts: list[Part]) -> None:
        nonlocal done
        report.parts.extend(parts)
        done += 1
        update_progress_artifact(progress, progress=100.0 * done / steps)

    record([rpo_part(plan)])
    record(backup_parts(dr_plan))
    record(restore_parts(dr_plan, report.started_at))
    if has_dr:
        record([readiness_part(plan, dr_plan.aws.dr_region)])
        record([rehearsal_part(plan)])
    record(drill_parts(plan, database))
    report.finished_at = utcnow()
    record_evidence(dr_plan, report)
    path = publish(dr_plan, report)
    get_run_logger().info("DR test: %s (evidence %s)", report.status.value, path)
    if report.exit_code:
        return Failed(message=f"DR test: {report.status.value}: " + "; ".join(
            p.name for p in report.parts if p.status is not Status.passed), data=report)
    return report
