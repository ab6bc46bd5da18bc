"""The fleet drill's evidence: one row per database (its restore-drill flow run, when it ran, how it ended), the
concurrency limit they ran under, and the highest number that really ran at once (from the runs' own times)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, computed_field

from drplan.results import Status, markdown_table, overall


class FleetDrill(BaseModel):
    """One database's drill: a run of the restore-drill deployment, on whichever worker took it."""

    database: str
    status: Status
    flow_run: str | None = None
    """`<name> <id>` of the restore-drill run (None: it could not be created)."""
    state: str = "-"
    message: str = ""
    """The run's final state message: names the failed check or error."""
    started_at: datetime | None = None
    finished_at: datetime | None = None


def max_overlap(spans: list[tuple[datetime, datetime]]) -> int:
    """The most spans (start, end) open at one instant; a span ending exactly when another starts does not overlap."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


class FleetReport(BaseModel):
    plan: str
    limit: int
    """The plan's drill.fleet_concurrency: the slots of the global concurrency limit the drills ran under."""
    concurrency_limit: str
    deployment: str
    started_at: datetime
    finished_at: datetime | None = None
    drills: list[FleetDrill] = []

    @computed_field
    @property
    def status(self) -> Status:
        return overall(d.status for d in self.drills)

    @property
    def exit_code(self) -> int:
        return self.status.exit_code

    @computed_field
    @property
    def peak_concurrency(self) -> int:
        """The most drills running at once, from their flow runs' start and end times (at most `limit`)."""
        return max_overlap([(d.started_at, d.finished_at) for d in self.drills if d.started_at and d.finished_at])

    @property
    def not_passed(self) -> list[FleetDrill]:
        return [d for d in self.drills if d.status is not Status.passed]

    def summary(self) -> str:
        failed = ", ".join(f"{d.database} {d.status.value}" for d in self.not_passed)
        return f"fleet drill of {len(self.drills)} databases: " + (failed or "all passed")

    def markdown(self) -> str:
        def at(t: datetime | None) -> str:
            return f"{t:%H:%M:%S}" if t else "-"

        rows = [[d.database, d.status.value, at(d.started_at), at(d.finished_at), d.flow_run or "-", d.message]
                for d in self.drills]
        return "\n".join([
            f"# Fleet drill: {self.plan}: **{self.status.value}**",
            "",
            f"- {self.summary()}",
            f"- runs of `{self.deployment}`, at most {self.limit} at once (global concurrency limit "
            f"`{self.concurrency_limit}`); at most {self.peak_concurrency} ran at once",
            "",
            markdown_table(["database", "status", "started", "finished", "flow run", "message"], rows),
        ])
