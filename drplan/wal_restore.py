"""PostgreSQL's restore_command in drplan's restores (see drplan/wal_prefetch.py for the design).

`command()` builds it: a shell `mv` of `<spool>/%f` (a segment the prefetch daemon fetched, complete and checked)
into `%p`, else `python -m drplan.wal_restore --spool DIR [barman-cloud options] SOURCE_URL SERVER_NAME %f %p`,
which asks the daemon for the file and, with no daemon answering, fetches it itself.

Exit status as PostgreSQL expects it: 0 the file is in place; 1 it is not in the archive (recovery ends there, at
once); FAILED (above 125) it could not be fetched: PostgreSQL stops recovery with FATAL rather than taking a failed
fetch for the end of the archive and ending the replay early. Imports stay light: this starts once per file the
daemon has not spooled.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SOCKET = "prefetch.sock"
MISSING = 1
FAILED = 150


def command(python: str, spool: Path, cloud_args: list[str]) -> str:
    """The restore_command for a restore whose daemon spools into `spool`; `cloud_args` are barman-cloud's options
    and SOURCE_URL SERVER_NAME (no secrets: credentials come from the server's environment)."""
    fast = f"mv -f {shlex.quote(str(spool))}/%f %p 2>/dev/null"
    slow = shlex.join([python, "-m", "drplan.wal_restore", "--spool", str(spool), *cloud_args])
    return f"{fast} || exec {slow} %f %p"


@contextmanager
def socket_path(spool: Path) -> Iterator[str]:
    """The daemon's socket as a path short enough for AF_UNIX (at most 107 bytes, less than a spool's path may be):
    through a descriptor of the spool directory."""
    fd = os.open(spool, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET}"
    finally:
        os.close(fd)


def ask(spool: Path, name: str) -> str | None:
    """The daemon's answer for `name` (`ready`, `missing`, `error ...`); None when no daemon answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn, socket_path(spool) as path:
            conn.connect(path)
            conn.sendall(name.encode() + b"\n")
            answer = conn.makefile("rb").readline().decode(errors="replace").strip()
    except OSError:
        return None
    return answer or None  # no answer: it died meanwhile


def fetch_directly(cloud_args: list[str], name: str, dest: Path) -> int:
    from drplan.wal_prefetch import Archive, Missing, cloud_config

    archive = Archive(cloud_config(cloud_args))
    try:
        key = archive.find(name)
        if key is None:
            return MISSING
        archive.fetch(key, name, dest)
    except Missing:
        return MISSING
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 6 or args[0] != "--spool":
        print("usage: python -m drplan.wal_restore --spool DIR [barman-cloud options] SOURCE_URL SERVER_NAME %f %p",
              file=sys.stderr)
        return FAILED
    spool, cloud_args, name, dest = Path(args[1]), args[2:-2], args[-2], Path(args[-1])
    try:
        answer = ask(spool, name)
        if answer == "ready":
            try:
                os.replace(spool / name, dest)
                return 0
            except FileNotFoundError:  # dropped meanwhile (recovery moved on): fetch it here
                answer = None
            except OSError:  # another filesystem
                shutil.move(spool / name, dest)
                return 0
        if answer is None:
            return fetch_directly(cloud_args, name, dest)
        if answer == "missing":
            return MISSING
        print(f"drplan.wal_restore: {name}: {answer}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - one line into the server log, and recovery stops
        print(f"drplan.wal_restore: {name}: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
    return FAILED


if __name__ == "__main__":
    sys.exit(main())
