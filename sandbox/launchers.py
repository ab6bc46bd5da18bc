"""Starting the sandbox's servers, for the sandbox itself, the tests and the benchmarks: moto (AWS) and a
throwaway PostgreSQL. Every process is tracked by PID (`drplan.processes`) in the state directory of whoever
started it, and stopped by it."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from drplan import processes
from drplan.errors import DrplanError
from drplan.pgserver import free_port
from sandbox.postgres import SandboxPostgres

PART_MIN_SIZE = 5 * 1024 * 1024  # AWS's minimum multipart part size, whatever the environment says


def wait_until(what: str, ready: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise DrplanError(f"{what} did not come up within {timeout:.0f}s; see the logs under the sandbox state dir")


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code < 500


def world_traversable_dir(prefix: str) -> Path:
    """A temp dir the PostgreSQL OS user can reach (mkdtemp's and pytest's own are 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def start_moto(directory: Path, host: str, port: int, data_plane: list[str] | None = None) -> processes.Tracked:
    """moto_server with the sandbox's RDS behaviour (`sandbox.moto_server`) as tracked process `moto` of
    `directory`, answering before this returns; `data_plane`: its --rds-data-plane options (real PostgreSQL
    behind RDS instances)."""
    env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(PART_MIN_SIZE), "PYTHONUNBUFFERED": "1"}
    tracked = processes.start(directory, "moto", [sys.executable, "-m", "sandbox.moto_server", "-H", host,
                                                  "-p", str(port), *(data_plane or [])], env=env)  # fmt: skip
    wait_until("moto_server", lambda: http_ok(f"http://{host}:{port}/moto-api/"))
    return tracked


@contextmanager
def moto(directory: Path | None = None) -> Iterator[str]:
    """A moto_server of its own on a free loopback port, tracked in `directory` (a temp dir when None); yields
    its URL, stops it afterwards."""
    state = directory or Path(tempfile.mkdtemp(prefix="drplan-moto-"))
    try:
        port = free_port()
        start_moto(state, "127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        processes.stop(state, "moto")
        if directory is None:
            shutil.rmtree(state, ignore_errors=True)


@contextmanager
def throwaway_postgres(password: str, **settings: str) -> Iterator[int]:
    """A PostgreSQL 18 of its own on a free loopback port; yields the port. Superuser `postgres` with `password`,
    no WAL archive, fsync off, plus `settings` (name=value); run as the OS user drplan-pg in a temp dir it can
    reach, the postmaster tracked by PID; stopped and deleted afterwards. Needs root (initdb refuses root)."""
    directory = world_traversable_dir("drplan-throwaway-pg-")
    pg = SandboxPostgres(directory, superuser="postgres", password=password, dbname="postgres", endpoint_url=None,
                         aws_env={}, destination="", server_name="")  # fmt: skip
    try:
        pg.up_throwaway("postgres", free_port(), {"fsync": "off", **settings})
        yield pg.ports["postgres"]
    finally:
        pg.stop("postgres")
        shutil.rmtree(directory, ignore_errors=True)
