"""The CLI's temporary Prefect server: killed with the CLI, and a killed recovery's lock frees itself within its
lease (at most 90 s), although the server that held the lease died too: another server on the same database (as the
rerun's) finds the expired lease on disk. Without that, the slot stays taken for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from cli.prefect_api import temporary_server
from flows.shared.gates import lock_name
from tasks.targets import PostgresArchive
from tests.helpers import REPO, wait_for


def children(pid: int) -> dict[int, str]:
    """The direct children of `pid`: their command lines."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_killed_cli_takes_its_server_along_and_its_lock_frees_itself(sandbox, sandbox_plan_path, tmp_path,
                                                                      monkeypatch):
    db = sandbox.database("devonn-postgres")
    target = PostgresArchive(sandbox, db)
    at = (target.window().latest - timedelta(seconds=5)).isoformat()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # the temporary servers' database, shared
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    cli = [sys.executable, "-m", "cli.main", "recover", "--plan", str(sandbox_plan_path), "--database", db.name,
           "--to", at]
    stderr = tmp_path / "first.err"
    with stderr.open("wb") as sink:
        first = subprocess.Popen([*cli, "--promote"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=sink)
    copy = None
    try:
        wait_for(lambda: "waiting for the approval in the UI or through the API" in stderr.read_text(), 240,
                 "the recovery to restore and wait for approval (no terminal to ask on)", interval=0.5)
        copy = next(c.name for c in target.copies() if c.kind == "recovery")
        server = next(pid for pid, cmd in children(first.pid).items() if "prefect.server.api.server" in cmd)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    killed = time.monotonic()
    try:
        wait_for(lambda: not Path(f"/proc/{server}").exists() or "zombie" in _state(server), 30,
                 "the temporary Prefect server to die with the killed CLI")
        with temporary_server() as api, temporary_settings(updates={PREFECT_API_URL: api}), \
                get_client(sync_client=True) as client:  # another server on the same database, as the rerun's
            def taken() -> int:
                return client.read_global_concurrency_limit_by_name(lock_name(db)).active_slots

            wait_for(lambda: taken() == 0, 90 - (time.monotonic() - killed), "the killed run's lock to free itself",
                     interval=1)
        freed = time.monotonic() - killed
        rerun = subprocess.run([*cli, "--yes"], cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=300)
        assert rerun.returncode in (0, 1), rerun.stderr  # 1: the copy's checks differ from the live source
        assert "found restored" in rerun.stdout and copy in rerun.stdout  # the killed run's copy, not restored again
        print(f"lock free {freed:.0f}s after the kill")
    finally:
        if copy:
            target.drop(copy)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"
