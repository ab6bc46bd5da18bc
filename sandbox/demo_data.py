"""Demo schema and data for the sandbox database: users, orders and the heartbeat table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from sandbox.postgres import SandboxPostgres

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id bigint PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id bigint PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id),
    amount numeric(12, 2) NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS orders_api_id START 1000000000;  -- ids of orders the app creates
CREATE TABLE IF NOT EXISTS drplan_heartbeat (
    id bigserial PRIMARY KEY,
    ts timestamptz NOT NULL DEFAULT now(),
    source text NOT NULL
);
"""

LOAD_USERS = """
INSERT INTO users (id, email, name, created_at, updated_at)
SELECT i, 'user' || i || '@example.test', 'User ' || i, t, t
FROM generate_series(1, %(rows)s::bigint) AS i,
     LATERAL (SELECT timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute' AS t) AS c
"""

LOAD_ORDERS = """
INSERT INTO orders (id, user_id, amount, status, created_at, updated_at)
SELECT i, (i - 1) %% %(rows)s::bigint + 1, ((i * 7919) %% 100000) / 100.0,
       (ARRAY['new', 'paid', 'shipped', 'refunded'])[i %% 4 + 1], t, t
FROM generate_series(1, 2 * %(rows)s::bigint) AS i,
     LATERAL (SELECT timestamptz '2024-01-01 00:00:00+00' + i * interval '30 seconds' AS t) AS c
"""


def load(conn: psycopg.Connection, rows: int) -> bool:
    """Create the schema; load `rows` users and 2×rows orders unless users has rows. Returns whether it loaded."""
    with conn.transaction():
        conn.execute(SCHEMA)
        if conn.execute("SELECT EXISTS (SELECT 1 FROM users)").fetchone()[0]:
            return False
        conn.execute(LOAD_USERS, {"rows": rows})
        conn.execute(LOAD_ORDERS, {"rows": rows})
    conn.execute("ANALYZE users, orders")
    return True


def create_and_load(pg: SandboxPostgres, member: str, rows: int) -> bool:
    """Create the database if missing and load the demo data unless loaded. Returns whether it loaded."""
    with pg.connect(member, "postgres") as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (pg.dbname,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(pg.dbname)))
    with pg.connect(member) as conn:
        return load(conn, rows)
