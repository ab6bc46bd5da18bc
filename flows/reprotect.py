"""Re-protection: the runbook's "re-establish backups and replication after a promotion", run after every
`recover --promote` and failover (each offers it), or by hand.

discover the live topology -> the live primary and what it lacks of what the plan requires -> nothing: a no-op that
says so -> dry run: the steps, nothing changed -> approval -> WAL archiving on (RDS: automated backups) -> a fresh
base backup of its lineage (postgres) -> a replica in its region and one in the other region (postgres: the plan's
member there rebuilt from it; RDS: new read replicas) -> discover again: protected, or the run fails naming what is
still missing. A rerun skips what is already there.
"""

from __future__ import annotations

from prefect import flow

from drplan.clients import DbCredentials, check_aws_access, db_credentials
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Database, DatabaseKind, Plan, load_plan
from drplan.topology import DatabaseTopology, Member
from flows.shared.gates import recovery_lock, request_approval
from flows.shared.report import RecoveryReport, finished, published
from tasks.protection import (
    create_rds_replica,
    enable_archiving,
    rebuild_postgres_replica,
    replica_candidate,
    take_base_backup,
)
from tasks.topology import discover_topology


class ReprotectReport(RecoveryReport):
    primary: str | None = None
    gaps: list[str] = []
    """What the live primary lacked when the run started."""
    remaining: list[str] = []
    """What it still lacks at the end (empty: protected)."""

    def markdown(self) -> str:
        lines = [f"# Re-protection of {self.subject}: **{self.outcome}**", "",
                 f"- live primary: {self.primary or '-'}",
                 f"- lacked: {'; '.join(self.gaps) or 'nothing'}",
                 f"- still lacks: {'; '.join(self.remaining) or 'nothing'}"]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        return "\n".join([*lines, "", self.timeline()])


class Work:
    """The steps that protect the live primary, decided from the live topology before anything changes."""

    def __init__(self, plan: Plan, db: Database, topology: DatabaseTopology, primary: Member):
        self.plan, self.db, self.topology, self.primary = plan, db, topology, primary
        self.archive = primary.archiving is False or primary.archive_failing
        self.regions = topology.unprotected_regions(primary)
        self.rebuild = {region: replica_candidate(topology, db, plan, primary, region)
                        for region in self.regions} if db.kind is DatabaseKind.postgres else {}
        self.base_backup = db.kind is DatabaseKind.postgres and (self.archive or bool(self.regions))

    @property
    def empty(self) -> bool:
        return not (self.archive or self.regions)

    def steps(self) -> list[tuple[str, str, str]]:
        """(action, resource, detail) of each step, in order: the dry run and the approval summary list them."""
        name, steps = self.primary.identifier, []
        if self.archive:
            steps.append(("archive", name, "WAL archiving on (its archive command; the WAL kept since its "
                          "promotion is archived)" if self.db.kind is DatabaseKind.postgres else
                          "automated backups on (BackupRetentionPeriod)"))
        if self.base_backup:
            steps.append(("back up", name, "a fresh base backup of its lineage (barman-cloud-backup)"))
        for region in self.regions:
            if self.db.kind is DatabaseKind.postgres:
                steps.append(("rebuild", self.rebuild[region], f"as a streaming replica of {name} in {region} "
                              "(pg_basebackup; what it held is discarded)"))
            else:
                steps.append(("create replica", f"{self.db.name} in {region}", f"read replica of {name}"))
        return steps


@flow(name="reprotect")
def reprotect(plan: str = DEFAULT_PLAN, database: str = "", dry_run: bool = False, approve: bool = False
              ) -> ReprotectReport:
    """Give the live primary of `database` the protection the plan requires: archiving, a base backup of its
    lineage, a replica in its region and in the other region. A no-op on a protected database."""
    dr_plan = load_plan(plan)
    if not database:
        raise DrplanError("name the database to re-protect: database=NAME")
    db = dr_plan.database(database)
    check_aws_access(dr_plan)
    report = ReprotectReport(flow="reprotect", plan=dr_plan.name, subject=db.name, dry_run=dry_run)
    topology = discover_topology(dr_plan, [db.name]).databases[0]
    primary = topology.primary
    if primary is None:
        raise DrplanError(f"{db.name}: no single live primary ({'; '.join(topology.differences[:1])}); "
                          "fail over or recover first, then re-protect")
    report.primary, report.gaps = primary.identifier, topology.protection_gaps(primary)
    work = Work(dr_plan, db, topology, primary)
    if work.empty:
        report.outcome = f"already protected: {primary.identifier} archives WAL and has the replicas the plan requires"
        report.record("nothing to do", db.name, report.outcome)
        return report
    if dry_run:
        for action, resource, detail in [("ask approval", db.name, ""), *work.steps()]:
            report.record(f"would {action}", resource, detail)
        report.outcome = "planned (dry run)"
        return report
    credentials = db_credentials(dr_plan, db)
    with published(report, f"reprotect-{db.name}", dr_plan), recovery_lock(db):
        decision = request_approval(report, f"reprotect-approval-{db.name}".lower(), approval_summary(work), approve,
                                    dr_plan.approval.timeout)
        if not decision.approve:
            report.outcome = "refused: nothing changed"
            return report
        protect(work, report, credentials)
        after = discover_topology(dr_plan, [db.name]).databases[0]
        live = after.primary
        report.remaining = after.protection_gaps(live) if live else ["no single live primary"]
        report.outcome = "protected" if not report.remaining else "failed"
        if report.remaining:
            report.error = "still not protected: " + "; ".join(report.remaining)
    return finished(report, f"re-protection of {db.name}")


def protect(work: Work, report: ReprotectReport, credentials: DbCredentials) -> None:
    plan, db, primary = work.plan, work.db, work.primary
    if work.archive and enable_archiving(plan, db, primary, credentials):
        report.record("archiving", primary.identifier, "WAL archiving on", before="off", after="on", mutating=True)
    if work.base_backup:
        backup = take_base_backup(plan, db, primary, credentials)
        report.record("backed up", primary.identifier, f"base backup {backup}", mutating=True)
    for region in work.regions:
        if db.kind is DatabaseKind.postgres:
            member = work.rebuild[region]
            rebuild_postgres_replica(plan, db, member, primary, credentials)
            report.record("rebuilt", member, f"streaming replica of {primary.identifier} in {region}",
                          after=f"replica of {primary.identifier}", mutating=True)
        else:
            replica = create_rds_replica(plan, db, primary, region)
            report.record("created replica", replica, f"read replica of {primary.identifier} in {region}",
                          after="available", mutating=True)


def approval_summary(work: Work) -> str:
    lines = [f"## Re-protect {work.db.name}?", "", f"The live primary **{work.primary.identifier}** lacks: "
             f"{'; '.join(work.topology.protection_gaps(work.primary))}.", ""]
    lines += [f"- {action} **{resource}**: {detail}" for action, resource, detail in work.steps()]
    return "\n".join(lines)
