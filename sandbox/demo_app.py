"""devonn-api, the sandbox's application: a small HTTP service backed by PostgreSQL.

It takes its database URL and API token from Kubernetes Secrets and re-reads them every second, so a
DR cutover that rewrites the Secret really moves the app to the new database. The URL, password and
token are never logged or returned; only host:port/dbname is.

    GET /health           200 {"status": "ok", "database": "up", "db": "host:port/dbname"} or 503
    GET /api/me           200 {"user": "drplan-check"} with `Authorization: Bearer TOKEN`, else 401
    GET /api/stats        200 {"users": N, "orders": M}
    GET /api/users/<id>   200 {"id", "email", "name", "updated_at"} or 404
    POST /api/orders      201 {"id": N}: a new order (of user 1), committed before the answer

Each process is one pod of a Deployment, started by the sandbox's kubelet (`sandbox/kubelet.py`) with the names of
the Secrets its pod template references (without `--token-secret`, /api/me answers 401). Its one setting,
ORDERS_TABLE (default `orders`, from the ConfigMap devonn-api-config), is the table /api/stats counts and
POST /api/orders writes: a table that does not exist breaks those two endpoints while /health stays 200.
`--broken` is the sandbox's broken build: the process runs but never listens.

Run as `python -m sandbox.demo_app --listen 127.0.0.1:PORT --kubeconfig FILE --context CTX
--namespace NS --db-secret devonn-api-db [--token-secret devonn-api-token] [--broken]`; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg
from kubernetes.client import CoreV1Api
from kubernetes.config import new_client_from_config
from psycopg import sql

log = logging.getLogger("devonn-api")

DB_TIMEOUT = 2.0  # seconds a query (including connecting) may take before the database counts as down
POLL_SECONDS = 1.0
IDLE_CONNECTIONS = 4
ORDERS_TABLE = "ORDERS_TABLE"
"""The environment variable naming the orders table (the app's setting, from its ConfigMap)."""
T = TypeVar("T")


def describe(url: str) -> str:
    """host:port/dbname of a PostgreSQL URL: all of it that may be logged or shown."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
    except ValueError:
        return "(unparsable URL)"


def within(seconds: float, call: Callable[[], T]) -> T:
    """`call()` in a worker thread; TimeoutError if it does not finish in time (the worker is abandoned)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Database:
    """Connections to the database the app currently uses; a new URL drops the old connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._url: str | None = None
        self._idle: list[psycopg.Connection[Any]] = []

    @property
    def url(self) -> str | None:
        return self._url

    def switch(self, url: str) -> None:
        with self._lock:
            self._url, stale, self._idle = url, self._idle, []
        for conn in stale:
            conn.close()

    def query(self, statement: str | sql.Composed, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of `statement` on the current database, within DB_TIMEOUT."""
        with self._lock:
            url = self._url
            conn = self._idle.pop() if self._idle else None
        if url is None:
            raise ConnectionError("no database URL yet (Secret not read)")
        return within(DB_TIMEOUT, lambda: self._run(url, conn, statement, params))

    def _run(self, url: str, conn: psycopg.Connection[Any] | None, statement: str | sql.Composed,
             params: tuple[Any, ...]) -> Any:
        if conn is not None:
            try:
                return self._execute(url, conn, statement, params)
            except psycopg.OperationalError:
                pass  # the server went away since this connection was made: try a fresh one
        fresh = psycopg.connect(url, connect_timeout=int(DB_TIMEOUT), autocommit=True)
        return self._execute(url, fresh, statement, params)

    def _execute(self, url: str, conn: psycopg.Connection[Any], statement: str | sql.Composed,
                 params: tuple[Any, ...]) -> Any:
        try:
            rows = conn.execute(statement, params).fetchall()
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if self._url == url and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return rows
        conn.close()
        return rows

    def close(self) -> None:
        with self._lock:
            stale, self._idle = self._idle, []
        for conn in stale:
            conn.close()


class App:
    """The app's state: its database and token, kept in step with its Secrets."""

    def __init__(self, core: CoreV1Api, namespace: str, db_secret: str, token_secret: str | None):
        self.core = core
        self.namespace = namespace
        self.db_secret = db_secret
        self.token_secret = token_secret
        self.db = Database()
        self.token: str | None = None
        self._secrets_ok: bool | None = None
        self.orders = sql.Identifier(os.environ.get(ORDERS_TABLE) or "orders")

    def _secret_value(self, name: str, key: str) -> str:
        secret = self.core.read_namespaced_secret(name, self.namespace, _request_timeout=2)
        if not secret.data or key not in secret.data:
            raise KeyError(f"Secret {self.namespace}/{name} has no key {key}")
        return base64.b64decode(secret.data[key]).decode()

    def refresh(self) -> None:
        """Re-read the Secrets; switch to the database the URL names when it changed."""
        try:
            url = self._secret_value(self.db_secret, "DATABASE_URL")
            token = self._secret_value(self.token_secret, "token") if self.token_secret else None
        except Exception as exc:
            if self._secrets_ok is not False:
                log.warning("cannot read the Secrets, keeping the last values: %s", self.reason(exc))
            self._secrets_ok = False
            return
        if self._secrets_ok is False:
            log.info("Secrets readable again")
        self._secrets_ok = True
        if url != self.db.url:
            log.info("database is now %s", describe(url))
            self.db.switch(url)
        if token != self.token:
            log.info("API token %s", "loaded" if self.token is None else "changed")
            self.token = token

    def poll(self, stop: threading.Event) -> None:
        while True:
            self.refresh()
            if stop.wait(POLL_SECONDS):
                return

    def reason(self, exc: BaseException) -> str:
        """A one-line description of an error, with the URL, password and token masked."""
        text = (str(exc).strip().splitlines() or [""])[0][:200]
        url = self.db.url
        for secret in (url, unquote(urlsplit(url).password or "") if url else None, self.token):
            if secret:
                text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path == "/health":
                app.db.query("SELECT 1")
                self.reply(200, {"status": "ok", "database": "up", "db": describe(app.db.url or "")})
            elif path == "/api/me":
                given = self.headers.get("Authorization", "").removeprefix("Bearer ").encode()
                if app.token and hmac.compare_digest(given, app.token.encode()):
                    self.reply(200, {"user": "drplan-check"})
                else:
                    self.reply(401, {"error": "missing or wrong bearer token"})
            elif path == "/api/stats":
                [(users, orders)] = app.db.query(sql.SQL(
                    "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM {})").format(app.orders))
                self.reply(200, {"users": users, "orders": orders})
            elif path.startswith("/api/users/") and path.removeprefix("/api/users/").isdigit():
                rows = app.db.query(
                    "SELECT id, email, name, updated_at FROM users WHERE id = %s",
                    (int(path.removeprefix("/api/users/")),),
                )
                if rows:
                    user_id, email, name, updated = rows[0]
                    updated_at = updated.isoformat() if updated else None
                    self.reply(200, {"id": user_id, "email": email, "name": name, "updated_at": updated_at})
                else:
                    self.reply(404, {"error": "no such user"})
            else:
                self.reply(404, {"error": "not found"})
        except Exception as exc:
            reason = app.reason(exc)
            log.warning("%s failed: %s", path, reason)
            body = {"status": "unhealthy", "error": reason} if path == "/health" else {"error": reason}
            self.reply(503, body)

    def do_POST(self) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/api/orders":
            self.reply(404, {"error": "not found"})
            return
        try:
            [(order_id,)] = app.db.query(sql.SQL(
                "INSERT INTO {} (id, user_id, amount, status, created_at, updated_at) "
                "VALUES (nextval('orders_api_id'), 1, 1.00, 'new', now(), now()) RETURNING id").format(app.orders))
            self.reply(201, {"id": order_id})
        except Exception as exc:
            self.reply(503, {"error": app.reason(exc)})

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], app: App):
        super().__init__(address, Handler)
        self.app = app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--context", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--db-secret", required=True)
    parser.add_argument("--token-secret", default=None)
    parser.add_argument("--broken", action="store_true", help="the broken build: run, never listen")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retry warnings while the API is away
    if args.broken:
        log.error("broken build: never listening on %s", args.listen)
        stopping = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
        signal.sigwait(stopping)
        return

    api = new_client_from_config(config_file=args.kubeconfig, context=args.context)
    app = App(CoreV1Api(api), args.namespace, args.db_secret, args.token_secret)
    host, _, port = args.listen.rpartition(":")
    server = Server((host.strip("[]"), int(port)), app)
    stop = threading.Event()
    poller = threading.Thread(target=app.poll, args=(stop,), name="secrets", daemon=True)
    poller.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown).start())
    log.info("devonn-api listening on http://%s", args.listen)
    server.serve_forever()
    stop.set()
    poller.join(5)
    server.server_close()
    app.db.close()
    log.info("devonn-api stopped")


if __name__ == "__main__":
    main()
