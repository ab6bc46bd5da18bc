"""Heartbeat writer: one row into the heartbeat table every interval; the newest row in a copy measures RPO.

    python -m drplan.heartbeat --host H --port P --dbname D --user U --source NAME [--status-file F]
    python -m drplan.heartbeat --secret NAMESPACE/SECRET:KEY [--kubeconfig F --context C] --source NAME

The first writes to one server (the password from PGPASSWORD in the environment, never from argv). The second
follows the application: it writes wherever the DATABASE_URL in the application's Kubernetes Secret points, re-read
every interval, so every cutover (recovery, failover) moves the heartbeat with the application. Reconnects after
any failure (one log line each) and exits cleanly on SIGTERM. With --status-file, the file is touched after every
committed row: its age is how long ago the writer last really wrote.
"""

from __future__ import annotations

import argparse
import base64
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

log = logging.getLogger("drplan.heartbeat")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drplan.heartbeat", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--dbname")
    parser.add_argument("--user")
    parser.add_argument("--secret", help="NAMESPACE/SECRET:KEY holding the application's database URL: follow it")
    parser.add_argument("--kubeconfig")
    parser.add_argument("--context")
    parser.add_argument("--table", default="drplan_heartbeat")
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--source", required=True)
    parser.add_argument("--status-file", type=Path, help="touched after every committed row")
    args = parser.parse_args(argv)
    if not args.secret and not (args.port and args.dbname and args.user):
        parser.error("give --port, --dbname and --user, or --secret to follow the application's Secret")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    target = following(args.secret, args.kubeconfig, args.context) if args.secret else (
        lambda: {"host": args.host, "port": args.port, "dbname": args.dbname, "user": args.user})

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    insert = sql.SQL("INSERT INTO {} (source) VALUES (%s)").format(sql.Identifier(*args.table.split(".")))
    conn: psycopg.Connection | None = None
    connected: dict | None = None
    log.info("writing to %s every %ss (%s)", args.table, args.interval,
             f"following {args.secret}" if args.secret else f"{args.host}:{args.port}/{args.dbname}")
    next_at = time.monotonic()
    while not stop.is_set():
        try:
            wanted = target()
            if conn is not None and wanted != connected:
                log.info("the database moved; reconnecting")
                conn.close()
                conn = None
            if conn is None:
                connected = wanted
                conn = psycopg.connect(**wanted, autocommit=True, connect_timeout=5,
                                       application_name="drplan-heartbeat")
            conn.execute(insert, (args.source,))
            if args.status_file:
                args.status_file.touch()
        except (psycopg.Error, OSError, ValueError) as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            log.warning("insert failed (%s: %s); reconnecting", type(exc).__name__, first_line)
            if conn is not None:
                conn.close()
                conn = None
        next_at += args.interval
        if next_at < time.monotonic():  # fell behind (slow connect): keep the cadence from now
            next_at = time.monotonic() + args.interval
        stop.wait(next_at - time.monotonic())
    if conn is not None:
        conn.close()
    log.info("stopped")
    return 0


def following(ref: str, kubeconfig: str | None, context: str | None) -> Callable[[], dict]:
    """Connection keywords from the database URL in a Kubernetes Secret (`namespace/name:key`), read on each call.
    The URL holds a password: it is passed to libpq, never logged."""
    from kubernetes import client, config
    from urllib3.exceptions import HTTPError

    namespace, _, rest = ref.partition("/")
    name, _, key = rest.partition(":")
    if not (namespace and name and key):
        raise SystemExit(f"--secret {ref}: expected NAMESPACE/NAME:KEY")
    api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig, context=context))

    def read() -> dict:
        try:
            data = api.read_namespaced_secret(name, namespace).data or {}
        except client.ApiException as exc:
            raise OSError(f"secret {namespace}/{name}: HTTP {exc.status}") from None
        except HTTPError as exc:  # the Kubernetes API does not answer
            raise OSError(f"secret {namespace}/{name}: {type(exc).__name__}") from None
        if key not in data:
            raise ValueError(f"secret {namespace}/{name} has no key {key}")
        return {"conninfo": base64.b64decode(data[key]).decode()}
    return read


if __name__ == "__main__":
    raise SystemExit(main())
