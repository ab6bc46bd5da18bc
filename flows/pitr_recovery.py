"""Point-in-time recovery: the runbook's "Database Point-in-Time Recovery" and "Promote to Primary".

validate (plan, database, a target time inside the restorable window, the app's deployment and its Secret)
-> [promote] the live primary's network exposure read -> restore `<db>-recovery-<T>` (a rerun finds it) ->
integrity checks -> [promote] approval gate showing exactly what changes -> fence the database the app uses now
(the damaged history takes no more writes) -> point the app's Secret at the restored database, roll the
deployment, wait until available -> mark the copy as serving (no other run reuses it as the database at T) ->
validate the service, and the copy's network exposure against the live primary's -> on failed validation, lift
the fence and roll the Secret back; on success offer `drplan reprotect` (the copy does not archive and has no
replicas yet). A rerun after a crash resumes: it finds the restored copy, or, once the app uses it, only completes
the cutover. Dry run lists each step and changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from urllib.parse import urlsplit

from prefect import flow

from checks.integrity import ROW_COUNT
from drplan.clients import check_aws_access, db_credentials, kube_client, pg_target
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Database, DatabaseKind, Plan, Service
from drplan.results import CheckResult
from drplan.topology import DatabaseTopology, Member
from flows.shared.cutover import cut_over_and_validate, database_url, find_app_secret, service_of
from flows.shared.exposure import exposure_before
from flows.shared.gates import recovery_lock, request_approval
from flows.shared.promotion import apply_fence
from flows.shared.report import RecoveryReport, finished, published
from flows.shared.requests import choose_target_time, validate_request
from tasks.database import check_restored_copy, find_restorable_window, mark_copy_served, restore_scratch
from tasks.fencing import FENCE_HOW, unfence_member_task
from tasks.health import moved_exposure_check
from tasks.k8s import PREVIOUS_SUFFIX, find_database_secret, read_secret_value
from tasks.targets import RestoreTarget, restore_target, scratch_name
from tasks.topology import discover_topology


class PitrReport(RecoveryReport):
    promote: bool
    target_time: datetime | None = None
    recovery_copy: str | None = None
    checks: list[CheckResult] = []

    def data_at_risk(self) -> str:
        if self.target_time is None:
            return "no target time chosen"
        return (f"restored to {self.target_time:%Y-%m-%d %H:%M:%SZ}: what was written after it is not in the recovery "
                f"copy (it stays in the fenced old database)")

    def markdown(self) -> str:
        lines = [f"# PITR recovery of {self.subject}: **{self.outcome}**", "",
                 f"- target time {self.target_time or '-'}; recovery copy `{self.recovery_copy or '-'}`"]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        return "\n".join([*lines, "", self.timeline(), self.validation_table()])


@flow(name="pitr-recovery")
def pitr_recovery(
    plan: str = DEFAULT_PLAN,
    database: str = "",
    target_time: str = "latest",
    promote: bool = False,
    dry_run: bool = False,
    approve: bool = False,
) -> PitrReport:
    """Restore a database to a point in time; with promote, cut the application over after approval."""
    dr_plan, databases, when, _ = validate_request(plan, database or None, target_time, None)
    if len(databases) != 1:
        raise DrplanError("name the database to recover: database=NAME")
    db = databases[0]
    report = PitrReport(flow="pitr-recovery", plan=dr_plan.name, subject=db.name, dry_run=dry_run,
                        promote=promote)
    service = service_of(dr_plan, db) if promote else None
    if service:
        report.record("found", find_app_secret(dr_plan, service), f"used by deployment {service.name}")
    check_aws_access(dr_plan)
    live = discover_topology(dr_plan, [db.name]).databases[0].last_primary
    target: RestoreTarget = restore_target(dr_plan, db, live)
    window = find_restorable_window(target)
    report.target_time = choose_target_time(window, when, None, dr_plan.drill.target_margin)
    report.recovery_copy = scratch_name(db, report.target_time, "recovery")
    if dry_run:
        report.record("would restore", report.recovery_copy, f"as of {report.target_time.isoformat()}")
        report.record("would check", report.recovery_copy, "integrity suites against the source")
        if service:
            report.record("would ask approval", service.name)
            report.record("would fence", "the database the app uses now", FENCE_HOW[db.kind])
            report.record("would rewrite", f"Secret of {service.name}", "DATABASE_URL -> the recovery copy")
            report.record("would restart", f"deployment {service.name}", "and validate; roll back on failure")
        report.outcome = "planned (dry run)"
        return report
    with published(report, f"pitr-recovery-{db.name}", dr_plan), recovery_lock(db):
        recover(dr_plan, db, service, target, live, report, approve)
    return finished(report, f"pitr recovery of {db.name}")


def recover(dr_plan: Plan, db: Database, service: Service | None, target: RestoreTarget, live: Member | None,
            report: PitrReport, approve: bool) -> None:
    """Restore (or find the copy a crashed run restored) and check it against the live primary (`live`); with a
    service: approval, fence, cutover, validation, rollback on failure. A rerun after a crash that had already cut
    the service over to the copy resumes there: the cutover is checked and validated, nothing restored or fenced."""
    credentials = db_credentials(dr_plan, db)
    topology = discover_topology(dr_plan, [db.name]).databases[0]
    before = exposure_before(report, dr_plan, db, topology, credentials) if service else None
    users = [b for b in topology.bindings if b.member == report.recovery_copy]
    if users:  # a crash may have come between the cutover and its mark
        mark_copy_served(target, report.recovery_copy, ", ".join(b.service for b in users))
    serving = service is not None and any(b.service == service.name and b.cluster == service.cluster for b in users)
    scratch = restore_scratch(target, report.recovery_copy, report.target_time, credentials, serving)
    if serving:
        report.record("found serving", report.recovery_copy, f"{service.name} was cut over to it by an earlier run")
        report.outcome = "promoted"
        old = previous_member(dr_plan, service, topology)  # fenced by that run: unfenced again on a rollback
        fence = "fenced" if old else None
    else:
        source = live.target(db.dbname, credentials) if live and live.host else pg_target(dr_plan, db, "primary",
                                                                                         credentials)
        report.record("found restored" if scratch.reused else "restored", report.recovery_copy,
                      f"{scratch.host}:{scratch.port}", mutating=not scratch.reused)
        report.checks = check_restored_copy(source, scratch.target(db, credentials), db.integrity,
                                            report.target_time, dr_plan.objectives.rpo.database)
        failed = [c.name for c in report.checks if not c.passed]
        report.record("checked", report.recovery_copy, f"{len(report.checks)} checks, not passed: {failed or 'none'}")
        report.outcome = "restored"
        if service is None:
            return
        if not approved(dr_plan, db, service, report, failed, approve):
            report.outcome = "refused: nothing changed"
            return
        old = next((topology.member(b.member) for b in topology.bindings  # what the service in its cluster uses
                    if b.service == service.name and b.cluster == service.cluster and b.member
                    and b.member != report.recovery_copy), None)
        fence = apply_fence(report, dr_plan, db, old, credentials, topology) if old else None
        report.outcome = "promoted"
    url = database_url(credentials, scratch.host, scratch.port, db.dbname)
    instance = (dr_plan.aws.region, report.recovery_copy) if db.kind is DatabaseKind.rds else None

    def unfence() -> None:  # the app returns to the database it left: it must take writes again
        if old is not None and fence in ("fenced", "pending"):
            target = old.target(db.dbname, credentials) if old.host else None
            if unfence_member_task(dr_plan, db, old.identifier, topology.region_of(old) or dr_plan.aws.region,
                                   target):
                report.record("unfenced", old.identifier, "the application returns to it", mutating=True)

    cut_over_and_validate(dr_plan, report, service, url, scratch.target(db, credentials), instance, unfence,
                          lambda: mark_copy_served(target, report.recovery_copy, service.name),
                          partial(moved_exposure_check, dr_plan, db, before, scratch.target(db, credentials), instance))
    if report.outcome == "promoted":
        report.record("offered", f"drplan reprotect --database {db.name}",
                      f"{report.recovery_copy} serves without archiving or replicas until then")


def approved(dr_plan: Plan, db: Database, service: Service, report: PitrReport, failed: list[str],
             approve: bool) -> bool:
    """The approval gate before the cutover; approval in advance covers a copy failing only its row counts."""
    broken = [name for name in failed if not name.endswith(f": {ROW_COUNT}")]
    if approve and broken:
        raise DrplanError(f"{report.recovery_copy} did not pass {', '.join(broken)}; approval in advance (--yes) "
                          "does not cover a copy that fails its checks: inspect it, then approve in the UI or at the "
                          "CLI prompt")
    return request_approval(report, f"pitr-approval-{db.name}".lower(), (
        f"## Approve PITR recovery of {db.name}?\n\nThe application **{service.name}** will be pointed at "
        f"`{report.recovery_copy}` (restored to {report.target_time}): the database it uses now is fenced first "
        f"({FENCE_HOW[db.kind]}), its Kubernetes Secret is rewritten and the deployment restarted. Validation "
        "failure lifts the fence and rolls the Secret back.\n\nChecks of the copy that did not pass: "
        f"{', '.join(failed) or 'none'}."), approve, dr_plan.approval.timeout).approve


def previous_member(dr_plan: Plan, service: Service, topology: DatabaseTopology) -> Member | None:
    """The member the service's Secret pointed at before its cutover (the URL kept for a rollback)."""
    cluster = dr_plan.cluster(service.cluster)
    api = kube_client(dr_plan, cluster)
    secret, key = find_database_secret(api, cluster.namespace, service.name)
    previous = read_secret_value(api, cluster.namespace, secret, key + PREVIOUS_SUFFIX)
    address = urlsplit(previous) if previous else None
    return next((m for m in topology.members
                 if address and (m.host, m.port) == (address.hostname, address.port)), None)
