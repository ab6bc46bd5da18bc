"""Background processes of the sandbox: started detached, tracked by PID file, stopped by name.

Every process the sandbox starts is recorded as `<state>/pids/<name>.pid` (PID and start time, so a recycled
PID is never signalled) and is stopped by `stop()`, never left behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from drplan.errors import DrplanError

PR_SET_PDEATHSIG = 1


class ProcessError(DrplanError):
    """A sandbox process could not be started or stopped."""


@dataclass(frozen=True)
class Tracked:
    name: str
    pid: int
    started: float  # process start time from /proc, guards against PID reuse
    log: str

    @property
    def alive(self) -> bool:
        return _start_time(self.pid) == self.started


def _start_time(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # zombie: exited, not yet reaped
        return None
    return float(fields[19])


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None]:
    """A Popen `preexec_fn`: the child gets `sig` when the thread that started it dies, even by SIGKILL."""
    parent = os.getpid()

    def arm() -> None:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def _pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / "pids" / f"{name}.pid"


def record(state_dir: Path, name: str, pid: int, log: Path | str = "") -> Tracked:
    """Track a process started elsewhere (e.g. a postmaster daemonised by pg_ctl)."""
    started = _start_time(pid)
    if started is None:
        raise ProcessError(f"{name}: process {pid} is not running")
    tracked = Tracked(name, pid, started, str(log))
    path = _pid_file(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tracked.__dict__))
    return tracked


def get(state_dir: Path, name: str) -> Tracked | None:
    path = _pid_file(state_dir, name)
    if not path.is_file():
        return None
    return Tracked(**json.loads(path.read_text()))


def running(state_dir: Path, name: str) -> Tracked | None:
    tracked = get(state_dir, name)
    return tracked if tracked and tracked.alive else None


def log_file(state_dir: Path, name: str) -> Path:
    """Where the tracked process `name` writes its output (appended to by each start)."""
    return state_dir / "logs" / f"{name}.log"


def start(
    state_dir: Path,
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Tracked:
    """Start `argv` detached (own session, output to `<state>/logs/<name>.log`) unless already running."""
    existing = running(state_dir, name)
    if existing:
        return existing
    log = log_file(state_dir, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    time.sleep(0.05)
    if proc.poll() is not None:
        raise ProcessError(f"{name} exited at once (code {proc.returncode}); see {log}")
    return record(state_dir, name, proc.pid, log)


def stop(state_dir: Path, name: str, timeout: float = 15.0) -> bool:
    """SIGTERM the tracked process group, SIGKILL after `timeout`. Returns whether it was running."""
    tracked = get(state_dir, name)
    path = _pid_file(state_dir, name)
    if tracked is None:
        return False
    was_alive = tracked.alive
    if was_alive:
        _signal(tracked.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while tracked.alive and time.monotonic() < deadline:
            _reap(tracked.pid)
            time.sleep(0.1)
        if tracked.alive:
            _signal(tracked.pid, signal.SIGKILL)
            while tracked.alive and time.monotonic() < deadline + 5:
                _reap(tracked.pid)
                time.sleep(0.1)
    path.unlink(missing_ok=True)
    return was_alive


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def tracked_names(state_dir: Path) -> list[str]:
    return sorted(p.stem for p in (state_dir / "pids").glob("*.pid"))
