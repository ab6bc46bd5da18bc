"""Heartbeat writer: one row into the heartbeat table every interval; the newest row in a copy measures RPO.

    python -m drplan.heartbeat --host H --port P --dbname D --user U --source NAME

The password comes from PGPASSWORD in the environment, never from argv. Reconnects after any failure
(one log line each) and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

import psycopg
from psycopg import sql

log = logging.getLogger("drplan.heartbeat")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drplan.heartbeat", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dbname", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--table", default="drplan_heartbeat")
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--source", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    insert = sql.SQL("INSERT INTO {} (source) VALUES (%s)").format(sql.Identifier(*args.table.split(".")))
    conn: psycopg.Connection | None = None
    log.info("writing to %s on %s:%s/%s every %ss", args.table, args.host, args.port, args.dbname, args.interval)
    next_at = time.monotonic()
    while not stop.is_set():
        try:
            if conn is None:
                conn = psycopg.connect(
                    host=args.host,
                    port=args.port,
                    dbname=args.dbname,
                    user=args.user,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="drplan-heartbeat",
                )
            conn.execute(insert, (args.source,))
        except psycopg.Error as exc:
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


if __name__ == "__main__":
    raise SystemExit(main())
