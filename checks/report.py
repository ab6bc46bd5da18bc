"""Report models of the integrity checks and the fingerprint diff, renderable as markdown table rows."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, computed_field

from drplan.results import CheckResult, Status, markdown_table, overall


class IntegrityReport(BaseModel):
    """All checks of a restored copy against its source at target time T."""

    source: str
    restored: str
    target_time: datetime
    checks: list[CheckResult] = []
    errors: list[str] = []
    """Every check in status error, one line each (`table: check: why`), including a run that could not start."""
    duration_s: float = 0.0

    @computed_field
    @property
    def status(self) -> Status:
        return overall([c.status for c in self.checks])

    @property
    def passed(self) -> bool:
        return self.status is Status.passed

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def markdown(self) -> str:
        header = ["table", "check", "status", "expected", "observed"]
        return markdown_table(header, [[c.table, c.check, c.status.value, c.expectation, c.observed]
                                       for c in self.checks])


class KeyDiff(BaseModel):
    key: int | str
    kind: Literal["missing", "extra", "changed"]
    """missing: in the source only; extra: in the restored copy only; changed: both, different content."""


class DiffReport(BaseModel):
    """Fingerprint comparison of one table between the source and the restored copy."""

    table: str
    key: str = ""
    source: str
    restored: str
    predicate: str | None = None
    status: Status = Status.passed
    rows_source: int = 0
    rows_restored: int = 0
    ranges_hashed: int = 0
    """Key ranges fingerprinted on each side, over all levels."""
    levels: int = 0
    missing: int = 0
    extra: int = 0
    changed: int = 0
    keys: list[KeyDiff] = []
    """The first differing keys, sorted (numerically, or as Python strings); capped, the counts above are complete."""
    unresolved_rows: int = 0
    """Rows in mismatching ranges not resolved to keys (over the fetch budget): the counts are then lower bounds."""
    duration_s: float = 0.0
    errors: list[str] = []

    @property
    def differing(self) -> int:
        return self.missing + self.extra + self.changed

    @property
    def passed(self) -> bool:
        return self.status is Status.passed

    MARKDOWN_HEADER: ClassVar[list[str]] = [
        "table", "status", "rows (source / restored)", "differing keys", "ranges", "duration"
    ]

    def markdown_row(self) -> list[object]:
        if self.errors:
            detail = "; ".join(self.errors)
        else:
            sample = ", ".join(f"{d.key} ({d.kind})" for d in self.keys[:10])
            more = " …" if self.differing > 10 else ""
            bound = "≥ " if self.unresolved_rows else ""
            detail = f"{bound}{self.differing}" + (f": {sample}{more}" if sample else "")
        return [self.table, self.status.value, f"{self.rows_source} / {self.rows_restored}", detail,
                self.ranges_hashed, f"{self.duration_s:.2f}s"]
