"""The report every recovery run keeps: its timeline of steps (each mutating one also an event), published as an
artifact whatever happens, and the run's end state; and how any flow is run for its report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from prefect import Flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.states import Failed, State
from pydantic import BaseModel, Field

from drplan.clients import retries_since
from drplan.errors import DrplanError, first_line
from drplan.plan import Plan
from drplan.results import RetriesCounted, markdown_table
from drplan.timeutil import utcnow
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


class RecoveryReport(RetriesCounted):
    flow: str
    plan: str
    subject: str
    """What the run recovers: a database, a cluster, a region."""
    kind: str = "database"
    dry_run: bool
    outcome: str = "started"
    steps: list[Step] = Field(default_factory=list)
    validation: ServiceValidation | None = None
    error: str | None = None
    written_to: str | None = None
    """The report file (markdown; the JSON beside it), once the run has ended."""

    @property
    def failed(self) -> bool:
        return self.outcome == "failed" or self.outcome.startswith("validation failed")

    def record(self, action: str, resource: str, detail: str = "", *, before: str | None = None,
               after: str | None = None, mutating: bool = False) -> None:
        """Add a timeline step; a mutating one is also an event (resource, action, actor, before/after)."""
        self.steps.append(Step(at=utcnow(), action=action, resource=resource, detail=detail, before=before,
                               after=after))
        change = f" ({before} -> {after})" if before is not None or after is not None else ""
        get_run_logger().info("%s %s %s%s", action, resource, detail, change)
        if mutating:
            emit_event(
                event=f"drplan.recovery.{action.replace(' ', '-')}",
                resource={"prefect.resource.id": f"drplan.{self.kind}.{self.subject}", "drplan.target": resource},
                payload={"action": action, "resource": resource, "detail": detail, "before": before,
                         "after": after, "actor": actor(self.flow)},
            )

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
    and as `<drill.report_dir>/<key>-<stamp>.md` and `.json` (the evidence outlives the Prefect server)."""
    retries = retries_since()
    try:
        yield
    except Exception as exc:
        report.error, report.outcome = first_line(exc), "failed"
    finally:
        report.aws_retries = retries()
        directory = plan.resolve_path(plan.drill.report_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{key.lower()}-{utcnow().strftime('%Y%m%dT%H%M%S%fZ')}"
        report.written_to = str(path.with_suffix(".md"))
        path.with_suffix(".md").write_text(report.markdown() + "\n")
        path.with_suffix(".json").write_text(report.model_dump_json(indent=2))
        create_markdown_artifact(key=key.lower(), markdown=report.markdown())


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
