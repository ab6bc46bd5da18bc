"""The DR test: the quarterly evidence an auditor asks for (and what `make run` runs on the sandbox).

RPO verification -> every bucket's newest backup checked against its manifest, then restored into a scratch bucket,
verified against the manifest and removed -> DR readiness -> cross-region rehearsal (flows/rehearsal.py) -> restore
drill (each database, or one) -> failover test (each database, or one) -> one report of what was measured against
which objective: appended to the plan's evidence chain (drplan/evidence.py), a markdown artifact, a markdown, a JSON,
an HTML file and a post-mortem draft in `drill.report_dir`, and a `drplan.dr_test.<status>` event. A part that fails
or errors does not stop the others; the report says which part failed and why. The drill and the rehearsal restore
to scratch copies (and the rehearsal deploys into a scratch namespace) and remove them; the failover test (Multi-AZ
failover and re-protection with a client writing throughout) causes a short outage, so outside the sandbox it runs
only with `include_failover` and after approval.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.states import Failed
from pydantic import BaseModel, Field, computed_field

from drplan.clients import aws_client
from drplan.dr_test_part import Measure, Part
from drplan.drill_report import DrillReport
from drplan.errors import DrplanError, first_line
from drplan.evidence import Record, append, history, open_store, record_name
from drplan.failover_report import FailoverTestReport, Run, approval_summary
from drplan.html_report import render
from drplan.plan import DEFAULT_PLAN, Database, Plan
from drplan.report_files import reports_dir
from drplan.results import Status, markdown_table, overall
from drplan.rpo import RpoReport
from drplan.s3manifest import resolve_backup
from drplan.s3store import transfer_client
from drplan.s3sync import DEFAULTS
from drplan.timeutil import utcnow
from drplan.write_probe import WriteProbe
from flows.db_failover import FailoverReport, db_failover
from flows.dr_readiness import ReadinessReport, dr_readiness
from flows.rehearsal import RehearsalReport, dr_rehearsal
from flows.reprotect import ReprotectReport, reprotect
from flows.restore_drill import restore_drill
from flows.rpo_verification import rpo_verification
from flows.shared.gates import request_approval
from flows.shared.postmortem import dr_test_draft
from flows.shared.report import RecoveryReport, run_report
from flows.shared.requests import validate_request
from tasks.s3 import restore_into_scratch, verify_backup
from tasks.write_probe import application_target


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
    return Part(name="RPO verification", status=report.status, summary=report.summary, details=report.markdown(),
                measures=[Measure(kind="RPO", subject=f"{m.resource} {m.measure}", category=m.data_class,
                                  measured=m.age, objective=m.objective) for m in report.measurements])


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


def failover_parts(plan: Plan, plan_ref: str, database: str | None, include: bool) -> list[Part]:
    """The failover test of each database (or `database`): always on the sandbox; elsewhere only when included and
    approved, since it causes a short outage."""
    databases = [plan.database(database)] if database else plan.databases
    skipped = None if plan.sandbox else failover_refused(plan, databases, include)
    if skipped:
        return [Part(name=f"failover of {db.name}", status=Status.skipped, summary=skipped) for db in databases]
    return [failover_part(failover_test(plan_ref, plan, db)) for db in databases]


def failover_refused(plan: Plan, databases: list[Database], include: bool) -> str | None:
    """Why the failover part does not run outside the sandbox: not included, or not approved."""
    if not include:
        return "skipped: a failover causes a short outage; include it with --include-failover (include_failover)"
    gate = RecoveryReport(flow="dr-test", plan=plan.name, subject="failover test", kind="plan", dry_run=False)
    decision = request_approval(gate, "dr-test-failover-approval", approval_summary(databases), False,
                                plan.approval.timeout)
    return None if decision.approve else f"skipped: not approved ({decision.reason})"


def failover_test(plan_ref: str, plan: Plan, db: Database) -> FailoverTestReport:
    """A Multi-AZ failover and a re-protection while a client writes through the application's connection; when
    another member took over (self-managed PostgreSQL: its replica), the same again back to the plan's primary, so
    the test leaves the database as planned."""
    report = FailoverTestReport(database=db.name, kind=db.kind.value)
    try:
        with WriteProbe(application_target(plan, db), sweep_after=plan.drill.sweep_after) as probe:
            primary = fail_over_and_protect(plan_ref, db, report)
            if primary not in (None, db.primary):
                fail_over_and_protect(plan_ref, db, report)
        report.probe = probe.result
    except Exception as exc:  # the report says what could not be checked; the other parts still run
        report.error = first_line(exc)
    return report


def fail_over_and_protect(plan_ref: str, db: Database, report: FailoverTestReport) -> str | None:
    """One Multi-AZ failover, then re-protection (approved: the DR test's gate came first); returns the live primary
    afterwards, None when a run failed."""
    failover = run_report(db_failover, FailoverReport, plan=plan_ref, database=db.name, mode="multi-az",
                          approve=True)
    report.runs.append(run_of(failover))
    if failover.failed:
        return None
    protection = run_report(reprotect, ReprotectReport, plan=plan_ref, database=db.name, approve=True)
    report.runs.append(run_of(protection))
    report.protected = protection.outcome == "protected" or protection.outcome.startswith("already protected")
    return None if protection.failed else protection.primary


def run_of(report: RecoveryReport) -> Run:
    return Run(flow=report.flow, outcome=report.outcome, failed=report.failed, markdown=report.markdown())


def failover_part(report: FailoverTestReport) -> Part:
    return Part(name=f"failover of {report.database}", status=report.status, summary=report.summary,
                details=report.markdown())


def rehearsal_part(plan: Plan, plan_ref: str) -> Part:
    """The rehearsal, its whole-stack RTO kept against the strictest tier of the services it deploys."""
    name = "cross-region rehearsal"
    try:
        report = run_report(dr_rehearsal, RehearsalReport, plan=plan_ref)
    except DrplanError as exc:
        return Part(name=name, status=Status.error, summary=str(exc))
    tiers = [s.tier for s in plan.services if s.dr]
    measures = [Measure(kind="RTO", subject=f"whole stack in {report.region}",
                        category=min(tiers, key=plan.objectives.rto_for).value, measured=report.rto.measured,
                        objective=report.rto.objective)] if report.rto and tiers else []
    return Part(name=name, status=report.status, summary=report.summary, details=report.markdown(),
                measures=measures)


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
    measured = [("RTO", report.tier.value, report.rto), ("RPO", "database", report.rpo)]
    return Part(name=f"restore drill of {report.database}", status=report.status, summary=summary,
                details=report.markdown(),
                measures=[Measure(kind=kind, subject=report.database, category=category, **value.model_dump())
                          for kind, category, value in measured if value is not None])


def evidence_history(plan: Plan) -> list[Record | str]:
    """The plan's evidence chain for the HTML report (charts, trend); a line saying why when it cannot be read."""
    if plan.evidence is None:
        return []
    try:
        return history(open_store(plan))
    except DrplanError as exc:
        return [str(exc)]


def publish(plan: Plan, report: DrTestReport) -> Path:
    """The evidence: artifacts, markdown, JSON and HTML files (the HTML page for management), the post-mortem draft,
    event. Returns the markdown file."""
    create_markdown_artifact(key="dr-test", markdown=report.markdown(),
                             description=f"DR test of {report.plan}: {report.status.value}")
    directory = reports_dir(plan)
    path = directory / f"dr-test-{report.started_at:%Y%m%dT%H%M%SZ}.md"
    report.evidence = str(path)
    path.write_text(report.markdown() + "\n")
    path.with_suffix(".json").write_text(report.model_dump_json(indent=2))
    page = path.with_suffix(".html")
    page.write_text(render(report, evidence_history(plan), plan.objectives), encoding="utf-8")
    create_link_artifact(key="dr-test-html", link=page.as_uri(), link_text=page.name,
                         description=f"DR test of {report.plan} for management (self-contained HTML, opens offline)")
    postmortem = dr_test_draft(report.plan, report.started_at, report.status.value, report.parts, str(path))
    path.with_name(f"{path.stem}-postmortem.md").write_text(postmortem + "\n")
    create_markdown_artifact(key="dr-test-postmortem", markdown=postmortem,
                             description=f"post-mortem draft of the DR test of {report.plan}")
    emit_event(event=f"drplan.dr_test.{report.status.value}",
               resource={"prefect.resource.id": f"drplan.plan.{report.plan}", "prefect.resource.name": report.plan},
               payload={"report": str(path), "html": str(page),
                        "not_passed": [f"{p.name}: {p.summary}" for p in report.parts
                                       if p.status is not Status.passed]})
    return path


@flow(name="dr-test")
def dr_test(plan: str = DEFAULT_PLAN, database: str | None = None, include_failover: bool = False) -> DrTestReport:
    """RPO verification, backup verification and a restore of each into a scratch bucket, DR readiness, a restore
    drill and a failover test of each database (or `database`), reported together as evidence. The failover test
    runs outside the sandbox only with `include_failover`, after approval. Fails when any part failed."""
    dr_plan, _, _, _ = validate_request(plan, database, None, None)
    has_dr = bool(dr_plan.aws.dr_region) and any(s.dr for s in dr_plan.services)
    report = DrTestReport(plan=dr_plan.name, started_at=utcnow())
    progress = create_progress_artifact(progress=0.0, key="dr-test-progress", description="DR test parts done")
    steps, done = (7 if has_dr else 5), 0

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
        record([rehearsal_part(dr_plan, plan)])
    record(drill_parts(plan, database))
    record(failover_parts(dr_plan, plan, database, include_failover))
    report.finished_at = utcnow()
    record_evidence(dr_plan, report)
    path = publish(dr_plan, report)
    get_run_logger().info("DR test: %s (evidence %s)", report.status.value, path)
    if report.exit_code:
        return Failed(message=f"DR test: {report.status.value}: " + "; ".join(
            p.name for p in report.parts if p.status is not Status.passed), data=report)
    return report
