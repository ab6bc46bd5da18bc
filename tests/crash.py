"""Crash harness: a drplan CLI command run as its own process (against the test Prefect server), the
`drplan.recovery.*` events it emits as the server streams them, and a SIGKILL of its whole process group as soon as
a chosen event appears; what it leaves running afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
from prefect.settings import PREFECT_API_URL

from drplan.timeutil import utcnow
from tests.helpers import REPO, wait_for

PREFIX = "drplan.recovery."


class EventStream:
    """The `drplan.recovery.*` events the Prefect server receives while the block runs, in order (a thread
    subscribed to its event stream: live, not waiting for the events to be persisted)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._since = utcnow()
        self._subscribed = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._listen(),), daemon=True)

    async def _listen(self) -> None:
        self._task = asyncio.current_task()
        flt = EventFilter(event=EventNameFilter(prefix=[PREFIX]), occurred=EventOccurredFilter(since=self._since))
        try:
            async with get_events_subscriber(filter=flt) as subscriber:
                self._subscribed.set()
                async for event in subscriber:
                    if event.occurred >= self._since:  # the server's backfill also sends older ones
                        self.events.append(event.event.removeprefix(PREFIX))
        except asyncio.CancelledError:
            pass

    def __enter__(self) -> EventStream:
        self._thread.start()
        assert self._subscribed.wait(30), "no subscription to the Prefect event stream"
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)


@dataclass
class Run:
    """One finished or killed run of a command: exit code, output, events, and (killed) its process tree then."""

    code: int
    output: str
    events: list[str]
    seconds: float
    tree: dict[int, str] = field(default_factory=dict)

    @property
    def steps(self) -> str:
        """The actions of the report the run wrote (its timeline), or '-' without one."""
        written = re.search(r"^report: (\S+)\.md$", self.output, re.MULTILINE)
        if not written:
            return "-"
        return ", ".join(step["action"] for step in json.loads(Path(written[1] + ".json").read_text())["steps"])


def drplan(*args: str) -> list[str]:
    """The CLI command, run from this checkout with this interpreter."""
    return [sys.executable, "-m", "cli.main", *args]


def command_env() -> dict[str, str]:
    """The test's environment with its Prefect server: the command imports this checkout (cwd REPO)."""
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}


def run(command: list[str], timeout: float = 600) -> Run:
    """Run `command` to completion."""
    started = time.monotonic()
    with EventStream() as stream:
        done = subprocess.run(command, cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=timeout)
        time.sleep(1)  # the last events reach the stream after the process ends
    return Run(done.returncode, done.stdout + done.stderr, stream.events, time.monotonic() - started)


Kill = Callable[[list[str]], bool]
"""When to kill a run, given the events it emitted so far."""


def run_until(command: list[str], kill: Kill, point: str, timeout: float = 600) -> Run:
    """Start `command` and SIGKILL its process group as soon as `kill(events so far)` (kill point `point`)."""
    started = time.monotonic()
    with EventStream() as stream:
        process = subprocess.Popen(command, cwd=REPO, env=command_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_for(lambda: kill(stream.events) or process.poll() is not None, timeout, point, interval=0.02)
            tree = descendants(process.pid)
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL, f"the run ended ({process.returncode}) before {point}:\n{output}"
    return Run(process.returncode, output, stream.events, time.monotonic() - started, tree)


def descendants(pid: int) -> dict[int, str]:
    """`pid` and every process below it: pid -> command line."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = {}, [pid]
    while todo:
        current = todo.pop()
        try:
            tree[current] = Path(f"/proc/{current}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return tree


def still_running(tree: dict[int, str], expected: Callable[[str], bool] = lambda _: False) -> list[str]:
    """The processes of a killed run's tree still running (the same pid and command line), except `expected` ones."""
    alive = []
    for pid, cmdline in tree.items():
        try:
            now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if now == cmdline and not expected(cmdline):
            alive.append(f"{pid} {cmdline}")
    return alive


def lock_slots(name: str) -> int:
    """Active slots of the recovery lock `name` (0: free)."""
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def free_lock(name: str) -> None:
    """What the operator does once the killed run is known dead (the test server runs no repossessor)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))


@dataclass
class Scene:
    """What one run of a crash matrix acts on: the command, its end state (compared between runs), the recovery
    locks it takes, and what of a killed run may keep running (a restored copy's server)."""

    command: list[str]
    state: Callable[[], dict]
    locks: list[str] = field(default_factory=list)
    survivors: Callable[[str], bool] = lambda _: False


def crash_matrix(scene: Callable[[], AbstractContextManager[Scene]], points: Callable[[Run], list[tuple[str, Kill]]],
                 check: Callable[[dict], None]) -> None:
    """Run the command of a fresh `scene()` uninterrupted and `check` its end state; then, in a fresh scene per
    kill point of `points(uninterrupted run)`, kill a run there, free its locks, rerun it to completion and compare
    the end state with the uninterrupted one; nothing of the killed run may still run but the scene's survivors.
    Prints the matrix (point, the rerun's events and report steps, result, time) and fails naming every point
    that did not converge."""
    with scene() as first:
        clean = run(first.command)
        assert clean.code == 0, clean.output
        expected = first.state()
    check(expected)
    rows, wrong = [("uninterrupted", " ".join(clean.events) or "-", clean.steps, "-", f"{clean.seconds:.0f}s")], []
    for point, kill in points(clean):
        with scene() as current:
            killed = run_until(current.command, kill, point)
            for lock in current.locks:
                free_lock(lock)
            rerun = run(current.command)
            got = current.state()
            problems = [] if rerun.code == 0 else [f"exit {rerun.code}: {rerun.output.strip()[-800:]}"]
            problems += [f"{key}: {got.get(key)!r}, uninterrupted {value!r}" for key, value in expected.items()
                         if got.get(key) != value]
            problems += [f"left running: {p}" for p in still_running(killed.tree, current.survivors)]
        rows.append((point, " ".join(rerun.events) or "-", rerun.steps, "; ".join(problems) or "converged",
                     f"{killed.seconds:.0f}s + {rerun.seconds:.0f}s"))
        if problems:
            wrong.append(f"killed at {point}: " + "; ".join(problems))
    header = ("kill point", "(rerun) events", "(rerun) steps", "result", "time")
    print("\n".join(" | ".join(map(str, row)) for row in [header, *rows]))
    assert not wrong, "\n".join(wrong)


def at_events(clean: Run) -> list[tuple[str, Kill]]:
    """Kill points: each event of the uninterrupted run, as soon as it is first emitted."""
    return [(event, lambda events, e=event: e in events) for event in dict.fromkeys(clean.events)]
