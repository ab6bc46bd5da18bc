"""What pg_catalog says about a table: columns with exact types, NOT NULL, primary key, foreign keys, unique keys."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    """format_type() with modifiers: `numeric(12,2)`, `timestamp with time zone`, `character varying(50)`."""
    not_null: bool
    base_type: str
    """The type without modifiers: `numeric`, `character varying`."""


@dataclass(frozen=True)
class ForeignKey:
    name: str
    columns: tuple[str, ...]
    parent_schema: str
    parent_table: str
    parent_columns: tuple[str, ...]


@dataclass(frozen=True)
class TableSchema:
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    foreign_keys: tuple[ForeignKey, ...]
    unique_columns: tuple[str, ...]
    """Columns that alone carry a unique index (without predicate), primary key included."""

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


_RESOLVE = """
SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s) AND c.relkind IN ('r', 'p')
"""
_COLUMNS = """
SELECT attname, format_type(atttypid, atttypmod), attnotnull, format_type(atttypid, NULL) FROM pg_attribute
WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum
"""
_NAMES = "ARRAY(SELECT a.attname FROM unnest({keys}) WITH ORDINALITY k(num, i) JOIN pg_attribute a " \
         "ON a.attrelid = {rel} AND a.attnum = k.num ORDER BY k.i)"  # fmt: skip
_CONSTRAINTS = f"""
SELECT con.contype, con.conname, n.nspname, c.relname,
       {_NAMES.format(keys="con.conkey", rel="con.conrelid")}, {_NAMES.format(keys="con.confkey", rel="con.confrelid")}
FROM pg_constraint con LEFT JOIN pg_class c ON c.oid = con.confrelid LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.conrelid = %s AND con.contype IN ('p', 'f') ORDER BY con.conname
"""
_UNIQUE = """
SELECT DISTINCT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = %s AND i.indisunique AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL
"""


def table_reference(name: str) -> sql.Identifier:
    """A plan table name (`users` or `schema.users`) as an identifier."""
    return sql.Identifier(*name.split(".", 1))


def read_table(conn: psycopg.Connection, name: str) -> TableSchema | None:
    """The table `name` resolves to on this connection's search_path, or None if there is none."""
    found = conn.execute(_RESOLVE, (table_reference(name).as_string(conn),)).fetchone()
    if found is None:
        return None
    oid, schema, relname = found
    columns = tuple(Column(*row) for row in conn.execute(_COLUMNS, (oid,)))
    constraints = conn.execute(_CONSTRAINTS, (oid,)).fetchall()
    primary_key = next((tuple(cols) for kind, _, _, _, cols, _ in constraints if kind == "p"), ())
    foreign_keys = tuple(
        ForeignKey(name, tuple(cols), parent_schema, parent, tuple(parent_cols))
        for kind, name, parent_schema, parent, cols, parent_cols in constraints
        if kind == "f"
    )
    unique = tuple(sorted(row[0] for row in conn.execute(_UNIQUE, (oid,))))
    return TableSchema(schema, relname, columns, primary_key, foreign_keys, unique)


def count_rows(conn: psycopg.Connection, table: TableSchema) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.identifier)).fetchone()[0]
