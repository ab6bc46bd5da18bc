"""The report every recovery run keeps: its timeline of steps (each mutating one also an event), published as an
artifact whatever happens, and the run's end state; and how any flow is run for its report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from prefect import Flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.states import Failed, State
from pydantic import BaseModel, Field

from drplan.clients import retries_since
from drplan.errors import DrplanError, first_line
from drplan.plan import Plan
from drplan.report_files import reports_dir
from drplan.results import RetriesCounted, markdown_table
from drplan.timeutil import utcnow
from flows.shared import dr_room
from flows.shared.postmortem import draft, rto_line
from tasks.health import ServiceValidation

R = TypeVar("R")


class Step(BaseModel):
    """One entry of the recovery timeline (for the post-mortem)."""

    at: datetime
    action: str
    resource: str
    detail: str = ""
    before: str | None = None
    after: str | None = None


def requested_time() -> datetime:
    """When the run was asked for: its flow run's expected start (now, outside a flow run)."""
    expected = runtime.flow_run.scheduled_start_time
    return utcnow() if expected is None else datetime.fromtimestamp(expected.timestamp(), UTC)


class RecoveryReport(RetriesCounted):
    flow: str
    plan: str
    subject: str
    """What the run recovers: a database, a cluster, a region."""
    kind: str = "database"
    dry_run: bool
    outcome: str = "started"
    requested_at: datetime = Field(default_factory=requested_time)
    first_alarm: datetime | None = None
    """When the alarm that led to this run first fired, when known (the impact window starts there)."""
    finished_at: datetime | None = None
    steps: list[Step] = Field(default_factory=list)
    validation: ServiceValidation | None = None
    error: str | None = None
    written_to: str | None = None
    """The report file (markdown; the JSON beside it), once the run has ended."""

    @property
    def failed(self) -> bool:
        return self.outcome == "failed" or self.outcome.startswith("validation failed")

    @property
    def restored_at(self) -> datetime | None:
        """When the service counted as restored: the end of a real run that succeeded and passed its validation."""
        if self.dry_run or self.failed or (self.validation is not None and not self.validation.passed):
            return None
        return self.finished_at

    def data_at_risk(self) -> str:
        """What the recovery may have lost, in words (runbooks that measure it say more)."""
        return "not measured by this runbook"

    def record(self, action: str, resource: str, detail: str = "", *, before: str | None = None,
               after: str | None = None, mutating: bool = False) -> None:
        """Add a timeline step; a mutating one is also an event (resource, action, actor, before/after)."""
        self.steps.append(Step(at=utcnow(), action=action, resource=resource, detail=detail, before=before,
                               after=after))
        change = f" ({before} -> {after})" if before is not None or after is not None else ""
        get_run_logger().info("%s %s %s%s", action, resource, detail, change)
        if mutating:
            dr_room.post(" ".join(p for p in (action, resource, detail) if p) + change)
            emit_event(
                event=f"drplan.recovery.{action.replace(' ', '-')}",
                resource={"prefect.resource.id": f"drplan.{self.kind}.{self.subject}", "drplan.target": resource},
                payload={"action": action, "resource": resource, "detail": detail, "before": before,
                         "after": after, "actor": actor(self.flow)},
            )

    def markdown(self) -> str:
        """The report: outcome, error, timeline, validation (runbooks with more to say override it)."""
        error = f"\n\n- **error**: {self.error}" if self.error else ""
        return (f"# {self.flow} of {self.subject}: **{self.outcome}**{error}\n\n{self.timeline()}"
                f"{self.validation_table()}")

    def timeline(self) -> str:
        """The steps as a table, and the AWS retries they took."""
        return markdown_table(["at", "action", "resource", "detail", "before", "after"],
                              [[f"{s.at:%H:%M:%SZ}", s.action, s.resource, s.detail, s.before or "", s.after or ""]
                               for s in self.steps]) + f"\n\n{self.retries_line}"

    def validation_table(self) -> str:
        if self.validation is None:
            return ""
        rows = [[c.name, c.status.value, c.observed, c.expectation] for c in self.validation.checks]
        return "\n" + markdown_table(["check", "status", "observed", "expected"], rows)


@contextmanager
def published(report: RecoveryReport, key: str, plan: Plan) -> Iterator[None]:
    """The body of a recovery run: an exception becomes the report's error (outcome `failed`) instead of escaping,
    and the report (each flow's report class has `markdown()`) is published whatever happens: as artifact `key`,
    and as `<drill.report_dir>/<key>-<stamp>.md` and `.json` (the evidence outlives the Prefect server); a real run
    also leaves its post-mortem draft (`<key>-<stamp>-postmortem.md`, artifact `<key>-postmortem`). The run posts
    to the DR room (flows/shared/dr_room.py) as it starts, changes something and ends."""
    retries = retries_since()
    with dr_room.opened(plan, f"{report.flow} of {report.subject}", report.dry_run) as room:
        try:
            yield
        except Exception as exc:
            report.error, report.outcome = first_line(exc), "failed"
        finally:
            report.aws_retries, report.finished_at = retries(), utcnow()
            path = reports_dir(plan) / f"{key.lower()}-{report.finished_at:%Y%m%dT%H%M%S%fZ}"
            report.written_to = str(path.with_suffix(".md"))
            path.with_suffix(".md").write_text(report.markdown() + "\n")
            path.with_suffix(".json").write_text(report.model_dump_json(indent=2))
            create_markdown_artifact(key=key.lower(), markdown=report.markdown())
            if not report.dry_run:
                postmortem = draft(plan, report)
                path.with_name(f"{path.name}-postmortem.md").write_text(postmortem + "\n")
                create_markdown_artifact(key=f"{key.lower()}-postmortem", markdown=postmortem,
                                         description=f"post-mortem draft of {report.flow} of {report.subject}")
            ended = (f"finished: {report.flow} of {report.subject}: {report.outcome}"
                     + (f" ({report.error})" if report.error else "")
                     + ("" if report.dry_run else f"; {rto_line(plan, report)}; data at risk: {report.data_at_risk()}")
                     + f"; report {report.written_to}")
            (room.alert if report.failed else room.post)(ended)


def finished(report: RecoveryReport, what: str) -> RecoveryReport | State:
    """The run's result: the report, or a Failed state (carrying the report) when the recovery failed."""
    if not report.failed:
        return report
    return Failed(message=f"{what}: {report.outcome}: {report.error or ''}".rstrip(": "), data=report)


def run_report(flow_fn: Flow, report_type: type[R], **parameters: Any) -> R:
    """Run `flow_fn` and return its report: a completed run's result, or the report its Failed state carries. A run
    that ended without one (it failed before making it, or crashed) raises DrplanError with its error's first line."""
    result = flow_fn(**parameters, return_state=True).result(raise_on_failure=False)
    if not isinstance(result, report_type):
        raise DrplanError(first_line(result))
    return result


def actor(flow_name: str) -> str:
    """Who did it: the flow run (and the deployment it came from), for events and the timeline."""
    run = runtime.flow_run.name or "local"
    deployment = runtime.deployment.name
    return f"{flow_name} run {run}" + (f" (deployment {deployment})" if deployment else "")
