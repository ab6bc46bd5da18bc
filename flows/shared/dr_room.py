"""The DR room: a recovery run posts to the plan's channel (`notifications.slack_webhook_block`) as it goes:
started (what, by whom, dry run or not), each change, "waiting for approval" with the run's address, finished
(outcome, RTO against the objective, data at risk). An approval left unanswered notifies the plan's escalation
levels in turn, one more each `escalation_interval`; a failed recovery also notifies `secondary_block` (SMS/email).
This holds however the run was started (CLI, UI, API, schedule): the run posts, not the caller. A channel that
cannot be reached is logged once per block and never fails the run."""

from __future__ import annotations

import contextvars
import getpass
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from prefect import get_run_logger, runtime
from prefect.utilities.urls import url_for

from drplan.plan import Plan
from tasks.notify import send

_ROOM: ContextVar[Room | None] = ContextVar("drplan_dr_room", default=None)


def started_by() -> str:
    """Who asked for the run: its deployment (UI, API, schedule, automation), else the user and host running it."""
    if runtime.deployment.name:
        return f"deployment {runtime.deployment.name}"
    return f"{getpass.getuser()}@{socket.gethostname()}"


def run_address() -> str:
    """Where to see (and approve) the run: its page in the UI, else its id."""
    run_id = runtime.flow_run.id
    return (url_for("flow-run", obj_id=run_id) if run_id else None) or f"flow run {run_id or 'local'}"


class Room:
    def __init__(self, plan: Plan, title: str) -> None:
        self.plan, self.title = plan, title
        self._failed_blocks: set[str] = set()

    def _send(self, block: str | None, text: str) -> None:
        if not block:
            return
        problem = send(block, self.title, text)
        if problem and block not in self._failed_blocks:
            self._failed_blocks.add(block)
            get_run_logger().warning("notification block %s: %s (the run goes on)", block, problem)

    def post(self, text: str) -> None:
        self._send(self.plan.notifications.slack_webhook_block, text)

    def alert(self, text: str) -> None:
        """The room and the secondary channel."""
        self.post(text)
        self._send(self.plan.notifications.secondary_block, text)

    @contextmanager
    def escalating(self, waiting_for: str) -> Iterator[None]:
        """While the block runs (an approval pending), notify the next escalation level every interval."""
        settings = self.plan.notifications
        answered = threading.Event()

        def escalate() -> None:
            for level in settings.escalation:
                if answered.wait(settings.escalation_interval.total_seconds()):
                    return
                self._send(level.block, f"ESCALATED to {level.name}: {waiting_for} still waiting for approval "
                                        f"after {settings.escalation_interval}: {run_address()}")

        worker = threading.Thread(target=contextvars.copy_context().run, args=(escalate,), name="drplan-escalation",
                                  daemon=True)  # with the run's context: its logger and runtime
        worker.start()
        try:
            yield
        finally:
            answered.set()
            worker.join(timeout=30)


@contextmanager
def opened(plan: Plan, title: str, dry_run: bool) -> Iterator[Room]:
    """The room for the block's run: posts that it started; `post()` and `current()` reach it inside."""
    room = Room(plan, title)
    token = _ROOM.set(room)
    room.post(f"started: {title} by {started_by()}{' (dry run)' if dry_run else ''}: {run_address()}")
    try:
        yield room
    finally:
        _ROOM.reset(token)


def current() -> Room | None:
    return _ROOM.get()


def post(text: str) -> None:
    """Post to the run's room (nothing outside one)."""
    if (room := current()) is not None:
        room.post(text)


@contextmanager
def escalating(waiting_for: str) -> Iterator[None]:
    """The run's room escalates while the block runs (nothing outside a room)."""
    room = current()
    if room is None:
        yield
        return
    with room.escalating(waiting_for):
        yield
