"""The DR test's failover evidence for one database: what a client writing throughout saw (downtime, rows lost),
each failover and re-protection run, and whether the database ended protected."""

from __future__ import annotations

from pydantic import BaseModel, Field

from drplan.plan import Database, DatabaseKind
from drplan.results import Status
from drplan.write_probe import ProbeResult


class Run(BaseModel):
    """One flow run of the test (db-failover, reprotect): its outcome and its own report."""

    flow: str
    outcome: str
    failed: bool
    markdown: str


class FailoverTestReport(BaseModel):
    database: str
    kind: str
    probe: ProbeResult | None = None
    runs: list[Run] = Field(default_factory=list)
    protected: bool = False
    """The last re-protection found the live primary protected, or left it so."""
    error: str | None = None

    @property
    def status(self) -> Status:
        """error: the test could not complete; failed: a run failed, a row was lost, writes did not resume, or
        the database is not protected at the end."""
        if self.error or self.probe is None:
            return Status.error
        ok = self.runs and not any(r.failed for r in self.runs) and self.protected and not self.probe.lost \
            and self.probe.resumed
        return Status.passed if ok else Status.failed

    @property
    def summary(self) -> str:
        if self.error or self.probe is None:
            return f"error: {self.error or 'no measurement'}"
        ends = [self.probe.summary, ", ".join(f"{r.flow}: {r.outcome}" for r in self.runs),
                "protected" if self.protected else "NOT protected afterwards"]
        if not self.probe.resumed:
            ends.insert(1, "writes did NOT resume")
        return "; ".join(ends)

    def markdown(self) -> str:
        lines = [f"# Failover test: {self.database} ({self.kind}): **{self.status.value}**", "",
                 f"- write probe: {self.probe.summary if self.probe else '-'}",
                 f"- protected afterwards: {'yes' if self.protected else 'no'}"]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        return "\n".join([*lines, *(f"\n{r.markdown}" for r in self.runs)])


def approval_summary(databases: list[Database]) -> str:
    """What the DR test's failover part does to production, for its approval gate."""
    lines = ["## Approve the DR test's failover part?", "",
             "Each database below fails over while a client writes a row every 100 ms into a scratch table drplan "
             "creates and drops: **its connections drop** (about a minute on RDS). Then `drplan reprotect`; a "
             "database whose replica took over fails back the same way to the plan's primary.", ""]
    for db in databases:
        how = (f"reboot of {db.primary} with ForceFailover" if db.kind is DatabaseKind.rds else
               f"{db.primary} stopped, its replica in the region promoted, the application cut over; then back")
        lines.append(f"- **{db.name}** ({db.kind.value}): {how}")
    return "\n".join(lines)
