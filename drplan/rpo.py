"""RPO arithmetic and the verification report: how old is the newest recoverable data, against the objective."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer

from drplan.errors import first_line
from drplan.results import RetriesCounted, Status, markdown_table, overall
from drplan.timeutil import format_duration

DataClass = Literal["database", "file_storage", "configuration"]

LABELS = {Status.passed: "met", Status.failed: "breached", Status.error: "error"}
"""The words RPO verification prints for a measurement's status: in its tables, logs and JSON."""
_BY_LABEL = {label: status for status, label in LABELS.items()}
RpoStatus = Annotated[Status, BeforeValidator(lambda v: _BY_LABEL.get(v, v)), PlainSerializer(LABELS.__getitem__)]
"""A Status written as its label, and read back from it."""


class Measurement(BaseModel):
    """One measured age of one resource, compared with its objective."""

    resource: str
    data_class: DataClass
    measure: str
    newest: datetime | None = None
    age: timedelta | None = None
    objective: timedelta
    status: RpoStatus
    detail: str = ""

    @property
    def label(self) -> str:
        """met, breached or error."""
        return LABELS[self.status]

    @property
    def row(self) -> dict[str, str]:
        return {
            "resource": self.resource,
            "class": self.data_class,
            "measure": self.measure,
            "newest": self.newest.strftime("%Y-%m-%d %H:%M:%SZ") if self.newest else "-",
            "age": format_duration(self.age),
            "objective": format_duration(self.objective),
            "status": self.label,
            "detail": self.detail,
        }


def age_of(
    resource: str,
    data_class: DataClass,
    measure: str,
    newest: datetime | None,
    objective: timedelta,
    now: datetime,
    detail: str = "",
    missing: str = "nothing found",
) -> Measurement:
    """Age = now - newest; met when age <= objective. Nothing found at all is a breach, not an error:
    a missing backup is exactly what verification exists to catch."""
    if newest is None:
        return Measurement(
            resource=resource, data_class=data_class, measure=measure, objective=objective,
            status=Status.failed, detail=join(missing, detail),
        )
    if newest.tzinfo is None:
        raise ValueError(f"{resource} {measure}: naive timestamp {newest.isoformat()}; times must be UTC-aware")
    age = now - newest
    if age < timedelta(0):  # the source's clock runs ahead of ours: report it, count the age as zero
        detail = join(detail, f"clock skew {format_duration(-age)}")
        age = timedelta(0)
    status = Status.passed if age <= objective else Status.failed
    return Measurement(
        resource=resource, data_class=data_class, measure=measure, newest=newest, age=age,
        objective=objective, status=status, detail=detail,
    )


def exposure(
    resource: str,
    data_class: DataClass,
    measure: str,
    newest_backup: datetime | None,
    newest_change: datetime | None,
    objective: timedelta,
    now: datetime,
) -> Measurement:
    """How far a copy trails its source: zero while nothing changed after the newest copy, else the age
    of that copy (every change since it would be lost)."""
    if newest_backup is not None and (newest_change is None or newest_change <= newest_backup):
        return Measurement(
            resource=resource, data_class=data_class, measure=measure, newest=newest_backup,
            age=timedelta(0), objective=objective, status=Status.passed,
            detail="no change since the newest backup",
        )
    return age_of(resource, data_class, measure, newest_backup, objective, now, missing="no backup found")


def error(resource: str, data_class: DataClass, measure: str, objective: timedelta, exc: BaseException) -> Measurement:
    return Measurement(
        resource=resource, data_class=data_class, measure=measure, objective=objective,
        status=Status.error, detail=first_line(exc),
    )


def join(*parts: str) -> str:
    """The non-empty parts, joined with "; "."""
    return "; ".join(p for p in parts if p)


class RpoReport(RetriesCounted):
    plan: str
    started_at: datetime
    finished_at: datetime
    measurements: list[Measurement] = Field(default_factory=list)
    differences: list[str] = Field(default_factory=list)
    """How the live topology measured differs from the plan."""

    @property
    def breaches(self) -> list[Measurement]:
        return [m for m in self.measurements if m.status is Status.failed]

    @property
    def errors(self) -> list[Measurement]:
        return [m for m in self.measurements if m.status is Status.error]

    @property
    def status(self) -> Status:
        """error: a measurement could not be taken (verification incomplete); failed: an objective was breached."""
        return overall(m.status for m in self.measurements)

    @property
    def exit_code(self) -> int:
        return self.status.exit_code

    @property
    def summary(self) -> str:
        met = len(self.measurements) - len(self.breaches) - len(self.errors)
        return f"{met} met, {len(self.breaches)} breached, {len(self.errors)} errors"

    def markdown(self) -> str:
        lines = [
            f"# RPO verification: {self.plan}",
            f"{self.started_at:%Y-%m-%d %H:%M:%SZ}, {self.summary}; {self.retries_line}",
            "",
            markdown_table(["resource", "class", "measure", "newest", "age", "objective", "status", "detail"],
                           [m.row.values() for m in self.measurements]),
        ]
        if self.differences:
            lines += ["", "Measured on the live topology, which differs from the plan:",
                      *(f"- {line}" for line in self.differences)]
        return "\n".join(lines)
