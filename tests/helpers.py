"""Small helpers shared by the tests: free loopback ports, polling, temp dirs the PostgreSQL OS user can reach."""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until predicate() is truthy and return its value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)
    return value


def world_traversable_dir(prefix: str) -> Path:
    """A temp dir the PostgreSQL OS user can reach (pytest's own tmp dirs are 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def logged_text(caplog) -> str:
    """Every log message pytest captured, as one text (to assert that no secret was logged)."""
    return "\n".join(r.getMessage() for r in caplog.records)
