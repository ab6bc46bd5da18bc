"""One real PostgreSQL 18 for the checks tests: a template database with the demo schema, cloned per test into
"source" and "restored" copies; stopped at the end."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from drplan.clients import DbCredentials, PgTarget
from sandbox import demo_data
from sandbox.launchers import throwaway_postgres
from tests.helpers import wait_for

PASSWORD = f"p@ss:w/rd%{{x}}'{secrets.token_hex(8)}"  # URL-hostile on purpose
DEMO_ROWS = 200  # users; orders are 2x, updated_at up to 2024-01-01 03:20 UTC
TARGET_TIME = datetime(2024, 1, 1, 4, 0, tzinfo=UTC)


@dataclass
class Cluster:
    port: int
    credentials: DbCredentials

    def target(self, dbname: str) -> PgTarget:
        return PgTarget(dbname, "127.0.0.1", self.port, dbname, self.credentials)

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return self.target(dbname).connect(autocommit=True)

    def clone(self, name: str) -> PgTarget:
        """A fresh copy of the demo database (dropped first if a previous run left it)."""
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE demo").format(sql.Identifier(name)))
        return self.target(name)

    def sessions_end(self, *dbnames: str) -> bool:
        """Whether every session on these databases ends within 5 s (backends exit after their client left)."""
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid()"
        with self.connect() as conn:
            try:
                wait_for(lambda: conn.execute(query, (list(dbnames),)).fetchone()[0] == 0, 5, "sessions to end")
            except AssertionError:
                return False
        return True

    def run(self, target: PgTarget, *statements: str) -> None:
        with target.connect(autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root and runuser (initdb refuses root)")
    with throwaway_postgres(PASSWORD) as port:
        running = Cluster(port, DbCredentials("postgres", SecretStr(PASSWORD)))
        with running.connect() as conn:
            conn.execute("CREATE DATABASE demo")
        with running.target("demo").connect() as conn:
            demo_data.load(conn, DEMO_ROWS)
        yield running
