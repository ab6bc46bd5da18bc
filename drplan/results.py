"""The one vocabulary of outcomes: a check's status, its result, the worst of several, and the markdown table every
report renders its rows with."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, computed_field


class Status(StrEnum):
    passed = "passed"
    failed = "failed"
    """The data or service is not as expected."""
    error = "error"
    """The check could not be evaluated."""
    no_data = "no data"
    """Nothing to judge (a CloudWatch metric without datapoints): not a pass."""
    skipped = "skipped"
    """Not run, by choice (a DR test part that needs an option to run outside the sandbox); the reason is given."""

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 passed (or skipped), 1 failed (or no data), 2 error."""
        return {Status.passed: 0, Status.skipped: 0, Status.error: 2}.get(self, 1)


_WORST_FIRST = (Status.error, Status.failed, Status.no_data)


def overall(statuses: Iterable[Status]) -> Status:
    """The worst status: error beats failed beats no data beats passed (also for none at all, or only skipped)."""
    present = set(statuses)
    return next((status for status in _WORST_FIRST if status in present), Status.passed)


class CheckResult(BaseModel):
    """One check: what was expected, what was observed, and its status."""

    name: str
    status: Status
    expectation: str = ""
    """What was expected, in words."""
    observed: str = ""
    table: str | None = None
    """The table a check of a restored copy is about (its name is then `table: check`)."""
    gx_expectation: str | None = None
    """The GX expectation type that evaluated it; None for checks outside Great Expectations."""
    error: str | None = None
    """Why the check could not be evaluated (status error); `observed` then repeats it."""
    duration_s: float | None = None

    @classmethod
    def of_table(cls, table: str, check: str, **fields: Any) -> CheckResult:
        """A check of one table, named `table: check`."""
        return cls(name=f"{table}: {check}", table=table, **fields)

    @classmethod
    def errored(cls, message: str, table: str, check: str, **fields: Any) -> CheckResult:
        """A check of one table that could not be evaluated, `message` saying why."""
        return cls.of_table(table, check, **fields, status=Status.error, error=message, observed=f"error: {message}")

    @property
    def check(self) -> str:
        """The name without its table."""
        return self.name.removeprefix(f"{self.table}: ") if self.table else self.name

    @computed_field
    @property
    def passed(self) -> bool:
        return self.status is Status.passed


class RetriesCounted(BaseModel):
    """A run's report that counts the AWS retries made during the run (`drplan.clients.retries_since`)."""

    aws_retries: int = 0
    """Retries of drplan's own AWS calls (throttled, reset, timed out); barman-cloud's own are not counted."""

    @property
    def retries_line(self) -> str:
        return f"AWS retries: {self.aws_retries}"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: Iterable[Iterable[object]]) -> str:
    """A markdown table; `|` in a cell is escaped and a newline becomes a space, so that no cell breaks its row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows])
