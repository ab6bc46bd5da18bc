"""devonn-api against a real PostgreSQL and the sandbox's Kubernetes API: health, auth, data, and a cutover
done the way the recovery flow does it (rewriting the Secret). Real processes, no mocks; needs root."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import kubernetes
import psycopg
import pytest
from kubernetes import client

from drplan import processes
from sandbox.launchers import throwaway_postgres
from tests.helpers import free_port, wait_for
from tests.sandbox.test_kube_api import running_kube_api

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root and runuser (initdb refuses root)"
)

PASSWORD = f"pw-{secrets.token_hex(12)}"
TOKEN = secrets.token_urlsafe(24)
NS = "devonn"
SCHEMA = """
CREATE TABLE users (id bigint PRIMARY KEY, email text, name text,
                    created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint REFERENCES users, amount numeric, status text,
                     created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
"""


def db_url(port: int, dbname: str) -> str:
    return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/{dbname}"


def seed(port: int, dbname: str, users: int, orders: int) -> None:
    with psycopg.connect(db_url(port, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    with psycopg.connect(db_url(port, dbname)) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            "INSERT INTO users (id, email, name) SELECT i, 'user' || i || '@devonn.test', 'User ' || i "
            "FROM generate_series(1, %s) i",
            (users,),
        )
        conn.execute(
            "INSERT INTO orders (id, user_id, amount, status) SELECT i, 1, i * 10.5, 'paid' "
            "FROM generate_series(1, %s) i",
            (orders,),
        )


@pytest.fixture(scope="module")
def postgres_port() -> Iterator[int]:
    """A real PostgreSQL of its own on 127.0.0.1 with password auth (`sandbox.launchers.throwaway_postgres`)."""
    with throwaway_postgres(PASSWORD) as port:
        seed(port, "devonn", users=3, orders=5)
        seed(port, "other", users=7, orders=2)
        yield port


@dataclass
class Stack:
    url: str  # of the demo app
    core: client.CoreV1Api
    log: Path
    pg_port: int

    def point_at(self, database_url: str) -> None:
        """What the recovery flow does at cutover: rewrite the app's database Secret."""
        data = {"DATABASE_URL": base64.b64encode(database_url.encode()).decode()}
        self.core.patch_namespaced_secret("devonn-api-db", NS, {"data": data})

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5, **kwargs)


def secret(name: str, key: str, value: str) -> client.V1Secret:
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name), data={key: base64.b64encode(value.encode()).decode()}
    )


@pytest.fixture(scope="module")
def stack(postgres_port: int) -> Iterator[Stack]:
    state_dir = Path(tempfile.mkdtemp(prefix="drplan-demo-app-"))
    try:
        with running_kube_api(state_dir, context="primary") as kubeconfig:
            api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig), context="primary")
            core = client.CoreV1Api(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
            core.create_namespaced_secret(NS, secret("devonn-api-db", "DATABASE_URL", db_url(postgres_port, "devonn")))
            core.create_namespaced_secret(NS, secret("devonn-api-token", "token", TOKEN))
            listen = f"127.0.0.1:{free_port()}"
            argv = [sys.executable, "-m", "sandbox.demo_app", "--listen", listen,
                    "--kubeconfig", str(kubeconfig), "--context", "primary", "--namespace", NS,
                    "--db-secret", "devonn-api-db", "--token-secret", "devonn-api-token"]  # fmt: skip
            tracked = processes.start(state_dir, "demo-app", argv)
            app = Stack(f"http://{listen}", core, Path(tracked.log), postgres_port)
            try:
                wait_for(lambda: healthy(app), 60, "devonn-api to report healthy")  # imports are slow on a busy machine
                yield app
            finally:
                started = time.monotonic()
                assert processes.stop(state_dir, "demo-app"), "devonn-api died during the tests"
                assert time.monotonic() - started < 5, "devonn-api did not exit promptly on SIGTERM"
                assert "devonn-api stopped" in app.log.read_text()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def healthy(app: Stack) -> bool:
    try:
        return app.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def test_health_reports_the_database(stack: Stack) -> None:
    response = stack.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "up", "db": f"127.0.0.1:{stack.pg_port}/devonn"}


def test_me_needs_the_current_token(stack: Stack) -> None:
    assert stack.get("/api/me", headers={"Authorization": f"Bearer {TOKEN}"}).json() == {"user": "drplan-check"}
    assert stack.get("/api/me").status_code == 401
    assert stack.get("/api/me", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401

    rotated = f"{TOKEN}-rotated"
    stack.core.replace_namespaced_secret("devonn-api-token", NS, secret("devonn-api-token", "token", rotated))
    try:
        wait_for(lambda: stack.get("/api/me", headers={"Authorization": f"Bearer {rotated}"}).status_code == 200,
                 5, "the rotated token to be accepted")  # fmt: skip
        assert stack.get("/api/me", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
    finally:
        stack.core.replace_namespaced_secret("devonn-api-token", NS, secret("devonn-api-token", "token", TOKEN))
    wait_for(lambda: stack.get("/api/me", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200,
             5, "the original token to be accepted again")  # fmt: skip


def test_stats_and_users(stack: Stack) -> None:
    assert stack.get("/api/stats").json() == {"users": 3, "orders": 5}
    user = stack.get("/api/users/2").json()
    assert {k: user[k] for k in ("id", "email", "name")} == {"id": 2, "email": "user2@devonn.test", "name": "User 2"}
    assert datetime.fromisoformat(user["updated_at"]).tzinfo is not None
    assert stack.get("/api/users/999").status_code == 404
    assert stack.get("/api/users/abc").status_code == 404


def test_database_down_then_back(stack: Stack) -> None:
    closed = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/devonn"
    stack.point_at(closed)
    try:
        down = wait_for(lambda: (r := stack.get("/health")).status_code == 503 and r, 5, "/health to answer 503")
        assert down.json()["status"] == "unhealthy" and down.json()["error"]
        assert PASSWORD not in down.text
        assert stack.get("/api/stats").status_code == 503
    finally:
        stack.point_at(db_url(stack.pg_port, "devonn"))
    wait_for(lambda: healthy(stack), 5, "/health to answer 200 again")


def test_cutover_to_another_database(stack: Stack) -> None:
    stack.point_at(db_url(stack.pg_port, "other"))
    try:
        wait_for(lambda: stack.get("/api/stats").json() == {"users": 7, "orders": 2}, 5, "the app to switch")
        assert stack.get("/health").json()["db"] == f"127.0.0.1:{stack.pg_port}/other"
    finally:
        stack.point_at(db_url(stack.pg_port, "devonn"))
    wait_for(lambda: stack.get("/api/stats").json() == {"users": 3, "orders": 5}, 5, "the app to switch back")


def test_unresponsive_database_counts_as_down_within_the_timeout(stack: Stack) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP connections, never answers
        stack.point_at(f"postgresql://postgres:{PASSWORD}@127.0.0.1:{silent.getsockname()[1]}/devonn")
        try:
            wait_for(lambda: stack.get("/health").status_code == 503, 10, "/health to answer 503")
            started = time.monotonic()
            assert stack.get("/health").status_code == 503
            assert time.monotonic() - started < 3
        finally:
            stack.point_at(db_url(stack.pg_port, "devonn"))
    wait_for(lambda: healthy(stack), 5, "/health to answer 200 again")


def test_log_names_databases_but_never_secrets(stack: Stack) -> None:
    log = stack.log.read_text()
    assert f"127.0.0.1:{stack.pg_port}/other" in log
    for secret_text in (PASSWORD, TOKEN, "postgresql://"):
        assert secret_text not in log
