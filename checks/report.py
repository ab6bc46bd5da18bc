"""Report models of the integrity checks and the fingerprint diff, renderable as markdown table rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, computed_field

from drplan.drill_report import CheckStatus  # failed: data not as expected; error: the check could not be evaluated


def overall(statuses: list[CheckStatus]) -> CheckStatus:
    """error beats failed beats passed."""
    for status in (CheckStatus.error, CheckStatus.failed):
        if status in statuses:
            return status
    return CheckStatus.passed


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows])


class CheckResult(BaseModel):
    """One check of one table of the restored copy."""

    table: str
    check: str
    """Short name, e.g. `row count`, `not null: email`, `foreign key orders_user_id_fkey`."""
    status: CheckStatus
    expectation: str
    """What was expected, in words (with the source's values)."""
    observed: str = ""
    gx_expectation: str | None = None
    """The GX expectation type that evaluated it; None for catalog checks (existence, column types)."""
    error: str | None = None
    """Why the check could not be evaluated (status error); `observed` then repeats it."""

    @classmethod
    def errored(cls, message: str, **fields: Any) -> CheckResult:
        return cls(**fields, status=CheckStatus.error, error=message, observed=f"error: {message}")

    @computed_field
    @property
    def name(self) -> str:
        return f"{self.table}: {self.check}"

    @property
    def passed(self) -> bool:
        return self.status is CheckStatus.passed

    def markdown_row(self) -> list[object]:
        return [self.table, self.check, self.status.value, self.expectation, self.observed]


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
    def status(self) -> CheckStatus:
        return overall([c.status for c in self.checks])

    @property
    def passed(self) -> bool:
        return self.status is CheckStatus.passed

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def markdown(self) -> str:
        header = ["table", "check", "status", "expected", "observed"]
        return markdown_table(header, [c.markdown_row() for c in self.checks])


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
    status: CheckStatus = CheckStatus.passed
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
        return self.status is CheckStatus.passed

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
