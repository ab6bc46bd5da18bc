"""The restore drill's evidence: what was restored, what was measured against which objective, what failed."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, Field

from drplan.timeutil import format_duration


class CheckStatus(StrEnum):
    passed = "passed"
    failed = "failed"
    error = "error"


class DrillCheck(BaseModel):
    name: str
    status: CheckStatus
    expectation: str = ""
    observed: str = ""


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


class DrillReport(BaseModel):
    plan: str
    database: str
    kind: str
    scratch: str
    started_at: datetime
    finished_at: datetime | None = None
    target_time: datetime | None = None
    backup_id: str | None = None
    restore_duration: timedelta | None = None
    rto: Measured | None = None
    rpo: Measured | None = None
    """Target time minus the newest heartbeat found in the restored copy: data lost by restoring to T."""
    nominal_rpo: Measured | None = None
    """Age of the latest restorable time when the drill started (what the backup system promises)."""
    checks: list[DrillCheck] = Field(default_factory=list)
    swept: list[str] = Field(default_factory=list)
    cleanup: str = "not reached"
    error: str | None = None

    @property
    def status(self) -> CheckStatus:
        """error: the drill could not complete; failed: a check failed or an objective was not met."""
        if self.error or any(c.status is CheckStatus.error for c in self.checks):
            return CheckStatus.error
        objectives_met = all(m is not None and m.met for m in (self.rto, self.rpo))
        if not self.checks or not objectives_met or any(c.status is CheckStatus.failed for c in self.checks):
            return CheckStatus.failed
        return CheckStatus.passed

    @property
    def exit_code(self) -> int:
        return {CheckStatus.passed: 0, CheckStatus.failed: 1, CheckStatus.error: 2}[self.status]

    def markdown(self) -> str:
        when = self.target_time.strftime("%Y-%m-%d %H:%M:%SZ") if self.target_time else "-"
        lines = [
            f"# Restore drill: {self.database} ({self.kind}): **{self.status.value}**",
            "",
            f"- plan `{self.plan}`, scratch copy `{self.scratch}`, base backup `{self.backup_id or '-'}`",
            f"- target time {when}; restore took {format_duration(self.restore_duration)}",
            f"- RTO {self.rto or '-'}",
            f"- RPO measured {self.rpo or '-'}; nominal {self.nominal_rpo or '-'}",
            f"- cleanup: {self.cleanup}" + (f"; swept leftovers: {', '.join(self.swept)}" if self.swept else ""),
        ]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        lines += ["", "| check | status | expectation | observed |", "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.status.value} | {c.expectation} | {c.observed} |".replace("\n", " ")
                  for c in self.checks]
        return "\n".join(lines)
