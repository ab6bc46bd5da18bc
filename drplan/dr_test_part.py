"""One part of the DR test: its verdict, its summary line, its own report, and the RTO and RPO it measured against
the plan's objectives (structured, so that reports can chart them across the evidence history)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from drplan.drill_report import Measured
from drplan.results import Status


class Measure(Measured):
    """A measured RTO or RPO against the objective of its tier (RTO) or data class (RPO)."""

    kind: Literal["RTO", "RPO"]
    subject: str
    """What was measured: a database (drill), or a resource and its measure (RPO verification)."""
    category: str
    """Whose objective applies: a tier (critical, secondary, tertiary) or a data class (database, ...)."""

    @property
    def key(self) -> tuple[str, str]:
        """The same measure in another test of the same part."""
        return self.kind, self.subject


class Part(BaseModel):
    """One part of the test: its verdict, one line for the summary table, and its own report."""

    name: str
    status: Status
    summary: str
    details: str = ""
    measures: list[Measure] = []
    """RTO and RPO measured by the part (none in records written before they were kept)."""
