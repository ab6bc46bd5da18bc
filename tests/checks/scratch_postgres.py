"""A throwaway PostgreSQL 18 cluster on 127.0.0.1 for tests and benchmarks: initdb and pg_ctl as the OS user
drplan-pg (initdb refuses root), in a temp dir that user can reach; fsync off; removed on exit. Needs root."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drplan.pgserver import PG_BIN, ensure_os_user
from tests.helpers import free_port, world_traversable_dir

PG_USER = "drplan-pg"


def _as_pg_user(*argv: str | Path) -> None:
    # output to a file, not a pipe: the postmaster that pg_ctl starts would hold a pipe open
    with tempfile.TemporaryFile() as out:
        done = subprocess.run(["runuser", "-u", PG_USER, "--", *map(str, argv)], stdin=subprocess.DEVNULL,
                              stdout=out, stderr=out, timeout=120)  # fmt: skip
        out.seek(0)
        if done.returncode != 0:
            last = (out.read().decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{Path(argv[0]).name} as {PG_USER} failed (exit {done.returncode}): {last}")


@contextmanager
def scratch_postgres(password: str, *settings: str) -> Iterator[int]:
    """Yields the port of a running cluster whose superuser `postgres` has `password`; `settings` are extra
    `name=value` server settings."""
    ensure_os_user(PG_USER)
    root = world_traversable_dir("drplan-scratch-pg-")
    shutil.chown(root, PG_USER)
    pwfile, data, port = root / "pwfile", root / "data", free_port()
    pwfile.write_text(password)
    shutil.chown(pwfile, PG_USER)
    pwfile.chmod(0o600)
    try:
        _as_pg_user(PG_BIN / "initdb", "-D", data, "-U", "postgres", "-A", "scram-sha-256", f"--pwfile={pwfile}",
                    "--no-sync", "--no-locale", "-E", "UTF8")  # fmt: skip
        pwfile.unlink()
        options = " ".join(f"-c {s}" for s in ("listen_addresses=127.0.0.1", f"port={port}",
                                                f"unix_socket_directories={root}", "fsync=off", *settings))  # fmt: skip
        _as_pg_user(PG_BIN / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-o", options, "-w", "start")
        yield port
    finally:
        if (data / "postmaster.pid").exists():
            _as_pg_user(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
