"""The Prefect API a CLI command runs its flow against: the one in the environment (PREFECT_API_URL), else a
temporary server that lives exactly as long as the command.

Prefect's own temporary server is stopped only by an exit handler, so a killed CLI left it running, and it keeps
concurrency leases in its memory, so a killed recovery's lock stayed taken. drplan's temporary server instead:
- uses Prefect's database (PREFECT_HOME), like Prefect's own would;
- keeps leases on disk (`SERVER_LEASE_SETTINGS`, shared with `drplan serve`), so whichever server runs next finds
  the lease of a killed holder, and runs the repossessor, which frees an expired lease within seconds: a killed
  recovery's lock is free again at most LOCK_LEASE_SECONDS + REPOSSESS_SECONDS after the kill;
- runs no scheduler, late-runs or foreman loop (nothing here schedules runs), but serves the UI: a recovery waiting
  for approval can be approved there while the command runs;
- is started with a parent-death signal: it dies with the CLI even when the CLI is killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from prefect.settings import PREFECT_API_URL, temporary_settings

from drplan.errors import DrplanError
from drplan.processes import die_with_parent

REPOSSESS_SECONDS = 5
SERVER_LEASE_SETTINGS = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": str(REPOSSESS_SECONDS),
}
"""Server settings for leases that survive a server restart and expire on time (drplan's servers all use them)."""
QUIET_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "CLEANUP_RECONCILER")
STARTUP_SECONDS = 120


@contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured API; without one, a temporary server for the block (stopped on exit, killed with us)."""
    if PREFECT_API_URL.value():
        yield
        return
    with temporary_server() as api, temporary_settings(updates={PREFECT_API_URL: api}):
        yield


@contextmanager
def temporary_server() -> Iterator[str]:
    """A Prefect server on a free loopback port for the block (PREFECT_HOME from the environment); yields its API
    URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **SERVER_LEASE_SETTINGS, "PREFECT_UI_API_URL": api,
           **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in QUIET_SERVICES}}
    output = tempfile.TemporaryFile()  # read only when it fails to start; a pipe nobody reads would block it
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )
    try:
        _wait_healthy(server, api, output)
        yield api
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        output.close()


def _wait_healthy(server: subprocess.Popen, api: str, output) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output.seek(0)
            lines = output.read().decode(errors="replace").strip().splitlines()
            raise DrplanError(f"the temporary Prefect server exited (code {server.returncode}): "
                              f"{lines[-1] if lines else 'no output'}; set PREFECT_API_URL to use a running server")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise DrplanError(f"the temporary Prefect server did not answer within {STARTUP_SECONDS}s; set PREFECT_API_URL "
                      "to use a running server")
