"""Progress of a long transfer: nowhere, as a Prefect progress artifact (flow runs), or a rich bar (CLI).
Prefect is imported only when an artifact is made, so that the CLI starts fast."""

from __future__ import annotations

import time
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TimeRemainingColumn


class Reporter(Protocol):
    def start(self, objects: int, size: int) -> None: ...

    def advance(self, objects: int, size: int) -> None: ...

    def finish(self) -> None: ...


class Silent:
    def start(self, objects: int, size: int) -> None:
        pass

    def advance(self, objects: int, size: int) -> None:
        pass

    def finish(self) -> None:
        pass


class _ByBytes:
    """Percent done, weighting objects and bytes alike (many small objects cost requests, big ones bytes)."""

    def __init__(self) -> None:
        self.objects = self.size = self.done_objects = self.done_size = 0

    def start(self, objects: int, size: int) -> None:
        self.objects, self.size = objects, size

    def advance(self, objects: int, size: int) -> None:
        self.done_objects += objects
        self.done_size += size

    @property
    def percent(self) -> float:
        parts = [done / total for done, total in ((self.done_objects, self.objects), (self.done_size, self.size))
                 if total]
        return 100.0 * sum(parts) / len(parts) if parts else 100.0


class ArtifactProgress(_ByBytes):
    """A Prefect progress artifact, updated at most every `interval` seconds; outside a flow or task run, nothing."""

    def __init__(self, key: str, description: str, interval: float = 2.0) -> None:
        super().__init__()
        self.key, self.description, self.interval = key, description, interval
        self._id = None
        self._last = 0.0

    def start(self, objects: int, size: int) -> None:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        super().start(objects, size)
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return  # no run to attach it to (a library call): Prefect would start a server of its own for it
        self._id = create_progress_artifact(progress=0.0, key=self.key, description=self.description)
        self._last = time.monotonic()

    def advance(self, objects: int, size: int) -> None:
        super().advance(objects, size)
        if self._id is not None and time.monotonic() - self._last >= self.interval:
            self._update()

    def finish(self) -> None:
        if self._id is not None:
            self._update()

    def _update(self) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self._id, progress=round(self.percent, 1))
        self._last = time.monotonic()


class RichProgress:
    """A progress bar on the given console (stderr in the CLI, so that --json output stays clean)."""

    def __init__(self, console: Console, label: str) -> None:
        self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                             TaskProgressColumn(), TimeRemainingColumn(), console=console, transient=True)
        self._label = label
        self._task = None

    def start(self, objects: int, size: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task(self._label, total=objects)

    def advance(self, objects: int, size: int) -> None:
        self._bar.advance(self._task, objects)

    def finish(self) -> None:
        self._bar.stop()
