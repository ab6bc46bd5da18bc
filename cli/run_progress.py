"""Progress of the long steps inside a flow run the CLI waits for (a base backup download, a bucket restore), shown
as rich bars: the run and its subflows publish Prefect progress artifacts (drplan/progress.py), the CLI reads them
from the API while it waits. The bars go to stderr, so that --json output stays clean."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TimeElapsedColumn

SUBFLOW_DEPTH = 3
"""How deep subflows are followed (dr-test -> restore-drill)."""


class RunProgress:
    """`poll()` after each wait: one bar per progress artifact of the run named `name` and of its subflows."""

    def __init__(self, console: Console, name: str) -> None:
        self._name = name
        self._bar = Progress("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                             TimeElapsedColumn(), console=console, transient=False)
        self._tasks: dict[Any, TaskID] = {}

    def poll(self) -> None:
        for artifact in self._artifacts():
            if artifact.id not in self._tasks:
                if not self._tasks:
                    self._bar.start()
                self._tasks[artifact.id] = self._bar.add_task(artifact.description or artifact.key or "", total=100)
            self._bar.update(self._tasks[artifact.id], completed=float(artifact.data or 0))

    def pause(self) -> None:
        """Stop drawing (before the terminal asks a question); the next poll draws again."""
        if self._tasks:
            self._bar.stop()
            self._tasks.clear()

    def close(self) -> None:
        if self._tasks:
            self.poll()  # their final values
            self._bar.stop()

    def _artifacts(self) -> list[Any]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterType,
            FlowRunFilter,
            FlowRunFilterName,
            FlowRunFilterParentFlowRunId,
        )

        with get_client(sync_client=True) as client:
            level = [r.id for r in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[self._name])))]
            runs = list(level)
            for _ in range(SUBFLOW_DEPTH):
                if not level:
                    break
                level = [r.id for r in client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=level)))]
                runs += level
            if not runs:
                return []
            return client.read_artifacts(artifact_filter=ArtifactFilter(
                type=ArtifactFilterType(any_=["progress"]), flow_run_id=ArtifactFilterFlowRunId(any_=runs)))
