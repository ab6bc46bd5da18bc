"""The restore drill's evidence: what was restored, what was measured against which objective, what failed."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, Field

from drplan.plan import Tier
from drplan.results import CheckResult, RetriesCounted, Status, markdown_table, overall
from drplan.timeutil import format_duration


class Measured(BaseModel):
    """A measured duration against its objective (met when measured <= objective)."""

    measured: timedelta | None
    objective: timedelta

    @property
    def met(self) -> bool:
        return self.measured is not None and self.measured <= self.objective

    def __str__(self) -> str:
        verdict = "met" if self.met else "NOT met"
        return f"{format_duration(self.measured)} (objective {format_duration(self.objective)}, {verdict})"


class DrillReport(RetriesCounted):
    plan: str
    database: str
    kind: str
    tier: Tier
    """The database's tier, whose RTO objective applies."""
    scratch: str
    started_at: datetime
    finished_at: datetime | None = None
    target_time: datetime | None = None
    backup_id: str | None = None
    restore_duration: timedelta | None = None
    download: timedelta | None = None
    """postgres: the base backup's download, part of the restore."""
    replay: timedelta | None = None
    """postgres: WAL fetched and replayed up to the promotion, part of the restore."""
    checks_duration: timedelta | None = None
    """The checks of the copy (integrity suites, fingerprints), part of the RTO."""
    rto: Measured | None = None
    rpo: Measured | None = None
    """Target time minus the newest heartbeat found in the restored copy: data lost by restoring to T."""
    nominal_rpo: Measured | None = None
    """Age of the latest restorable time when the drill started (what the backup system promises)."""
    checks: list[CheckResult] = Field(default_factory=list)
    swept: list[str] = Field(default_factory=list)
    cleanup: str = "not reached"
    error: str | None = None

    @property
    def status(self) -> Status:
        """error: the drill could not complete; failed: a check failed or an objective was not met."""
        if self.error:
            return Status.error
        objectives_met = all(m is not None and m.met for m in (self.rto, self.rpo))
        unmet = [] if self.checks and objectives_met else [Status.failed]
        return overall([*(c.status for c in self.checks), *unmet])

    @property
    def exit_code(self) -> int:
        return self.status.exit_code

    @property
    def rto_split(self) -> str | None:
        """Where the measured RTO went: `download 3s, replay 41s, checks 5s, the rest 2s` (the rest: the window, the
        sweep, server start-up); the restore as one part where it has no download and replay (rds)."""
        measured = self.rto.measured if self.rto else None
        if measured is None or self.restore_duration is None or self.checks_duration is None:
            return None
        if self.download is not None and self.replay is not None:
            parts = {"download": self.download, "replay": self.replay}
        else:
            parts = {"restore": self.restore_duration}
        parts["checks"] = self.checks_duration
        parts["the rest"] = max(measured - sum(parts.values(), timedelta()), timedelta())
        return ", ".join(f"{name} {format_duration(value)}" for name, value in parts.items())

    def markdown(self) -> str:
        when = self.target_time.strftime("%Y-%m-%d %H:%M:%SZ") if self.target_time else "-"
        lines = [
            f"# Restore drill: {self.database} ({self.kind}): **{self.status.value}**",
            "",
            f"- plan `{self.plan}`, scratch copy `{self.scratch}`, base backup `{self.backup_id or '-'}`",
            f"- target time {when}; restore took {format_duration(self.restore_duration)}",
            f"- RTO {self.rto or '-'}" + (f": {self.rto_split}" if self.rto_split else ""),
            f"- RPO measured {self.rpo or '-'}; nominal {self.nominal_rpo or '-'}",
            f"- cleanup: {self.cleanup}" + (f"; swept leftovers: {', '.join(self.swept)}" if self.swept else ""),
            f"- {self.retries_line}",
        ]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        rows = [[c.name, c.status.value, c.expectation, c.observed] for c in self.checks]
        return "\n".join([*lines, "", markdown_table(["check", "status", "expectation", "observed"], rows)])
