"""Fingerprint diff: are two copies of a table equal, and which keys differ, without pulling rows into Python.

Each database hashes its own rows (`hash_record_extended`, 64 bits per row) and sums the hashes with the row
count per key range, in one scan. Ranges whose (count, sum) differ are split again, only there, until they hold
few rows; then the keys and row hashes of those small ranges are fetched and compared. Both sides run
concurrently, each in one REPEATABLE READ READ ONLY transaction (a consistent snapshot of a live source).

Columns of common base types are hashed by their type's own hash function (no text conversion: about twice as
fast as reading the rows as text), strings under COLLATE "C" (byte-exact); every other type is hashed as its text,
with the same output settings on both sides. So equal values hash equal, and changes that keep the value equal
are not reported (numeric 1.0 -> 1.00, float -0 -> 0). Two different row sets of a range collide with
probability ~2^-64. Needs PostgreSQL 14 or later on both sides.

The key is one column with a unique index (the primary key by default). Integer keys are split arithmetically
(the first level is a plain division, as fast as a scan); other types at quantiles sampled inside the database.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
from psycopg import IsolationLevel, sql

from checks.catalog import INTEGER_TYPES, Column, TableSchema, read_table
from checks.report import DiffReport, KeyDiff
from drplan.clients import PgTarget
from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.results import Status

SESSION = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
           "SET extra_float_digits = 1; SET bytea_output = 'hex'")  # fmt: skip
OPERATORS = frozenset({"<", "<=", "=", "<>", ">=", ">"})
MAX_FIRST_LEVEL = 65_536
HASHED_AS_IS = frozenset({"smallint", "integer", "bigint", "oid", "boolean", "uuid", "bytea", "date", "real",
                          "double precision", "numeric", "jsonb", "time without time zone",
                          "timestamp without time zone", "timestamp with time zone"})  # fmt: skip
HASHED_BYTEWISE = frozenset({"text", "character varying", "character", "name"})

Predicate = sql.Composable | tuple[str, str, Any] | None
Fingerprints = dict[int, tuple[int, Decimal]]
T = TypeVar("T")


def predicate_sql(predicate: Predicate) -> sql.Composable:
    """A row filter: a psycopg Composable as given, or (column, op, value) with the value as a literal."""
    if predicate is None:
        return sql.SQL("true")
    if isinstance(predicate, sql.Composable):
        return predicate
    if isinstance(predicate, tuple) and len(predicate) == 3 and isinstance(predicate[0], str) \
            and predicate[1] in OPERATORS:  # fmt: skip
        column, op, value = predicate
        return sql.SQL("{} {} {}").format(sql.Identifier(column), sql.SQL(op), sql.Literal(value))
    raise TypeError(f"predicate: pass a psycopg sql.Composable or a (column, op, value) triple with op one of "
                    f"{' '.join(sorted(OPERATORS))}; raw SQL strings are not accepted")  # fmt: skip


@dataclass(frozen=True)
class KeyRange:
    """Keys lo <= k < hi, or lo <= k <= hi when `last`. Bounds are ints for integer keys, else the key's text."""

    lo: int | str
    hi: int | str
    last: bool


def _hashable(column: Column) -> sql.Composable:
    name = sql.Identifier(column.name)
    if column.base_type in HASHED_BYTEWISE:
        return sql.SQL('{} COLLATE "C"').format(name)
    return name if column.base_type in HASHED_AS_IS else sql.SQL("{}::text").format(name)


@dataclass(frozen=True)
class _Queries:
    """The SQL of one diff; both databases run the same text."""

    key_type: sql.Composable
    rows: sql.Composable  # (key k, row hash h) of every row that passes the predicate, as relation `t`

    @classmethod
    def build(cls, table: TableSchema, key: str, predicate: sql.Composable) -> _Queries:
        columns = sql.SQL(", ").join(_hashable(c) for c in table.columns)
        rows = sql.SQL("(SELECT {key} AS k, hash_record_extended(ROW({columns}), 0) AS h FROM {table} "
                       "WHERE {predicate}) AS t").format(key=sql.Identifier(key), columns=columns,
                                                         table=table.identifier, predicate=predicate)  # fmt: skip
        key_type = sql.SQL(table.column(key).type)  # format_type() output: trusted, already quoted
        return cls(key_type, rows)

    def array(self, name: str) -> sql.Composable:
        return sql.SQL("%({})s::text[]::{}[]").format(sql.SQL(name), self.key_type)

    def in_ranges(self, select: str) -> sql.Composable:
        """`select` over the rows of the ranges passed as %(lo)s, %(hi)s, %(last)s (range number r.i)."""
        return sql.SQL(
            "SELECT " + select + " FROM unnest({lo}, {hi}, %(last)s::bool[]) WITH ORDINALITY AS r(lo, hi, last, i) "
            "JOIN {rows} ON t.k >= r.lo AND t.k <= r.hi AND (t.k < r.hi OR r.last)"
        ).format(lo=self.array("lo"), hi=self.array("hi"), rows=self.rows, starts=self.array("starts"))


def _range_params(ranges: Sequence[KeyRange]) -> dict[str, list]:
    return {"lo": [str(r.lo) for r in ranges], "hi": [str(r.hi) for r in ranges], "last": [r.last for r in ranges]}


def _sub_ranges(parent: KeyRange, starts: Sequence[int | str]) -> list[KeyRange]:
    """Split `parent` at `starts` (ascending, the first is parent.lo)."""
    ends = [*starts[1:], parent.hi]
    final = len(starts) - 1
    return [KeyRange(lo, hi, parent.last and i == final) for i, (lo, hi) in enumerate(zip(starts, ends, strict=True))]


class _Side:
    """One database in its snapshot transaction; `q` is set once the source's catalog was read."""

    q: _Queries

    def __init__(self, target: PgTarget):
        self.target = target
        self.conn = target.connect()
        try:
            self.conn.isolation_level = IsolationLevel.REPEATABLE_READ
            self.conn.read_only = True
            self.conn.execute(SESSION)
        except psycopg.Error:
            self.conn.close()
            raise

    def bounds(self) -> tuple[str | None, str | None]:
        first = sql.SQL("(SELECT t.k::text FROM {} ORDER BY t.k {} LIMIT 1)")
        query = sql.SQL("SELECT {}, {}").format(first.format(self.q.rows, sql.SQL("ASC")),
                                                first.format(self.q.rows, sql.SQL("DESC")))  # fmt: skip
        return self.conn.execute(query).fetchone()

    def hash_first_level(self, whole: KeyRange, starts: list[int | str], integer: bool) -> Fingerprints:
        """Fingerprints of the sub-ranges of the whole key space, in one scan without joins."""
        if integer:
            width = starts[1] - starts[0] if len(starts) > 1 else whole.hi - whole.lo + 1
            bucket = sql.SQL("(t.k - {}::bigint) / {}::bigint").format(sql.Literal(whole.lo), sql.Literal(width))
        else:
            bucket = sql.SQL("width_bucket(t.k, {}) - 1").format(self.q.array("starts"))
        query = sql.SQL("SELECT {} AS b, count(*), sum(t.h) FROM {} GROUP BY 1").format(bucket, self.q.rows)
        return {b: (n, s) for b, n, s in self.conn.execute(query, {"starts": [str(s) for s in starts]})}

    def hash_ranges(self, parents: list[KeyRange], starts: list[int | str]) -> Fingerprints:
        """Fingerprints of the sub-ranges (split at `starts`, all parents' concatenated) of the parent ranges."""
        query = self.q.in_ranges("width_bucket(t.k, {starts}) - 1 AS b, count(*), sum(t.h)") + sql.SQL(" GROUP BY 1")
        params = _range_params(parents) | {"starts": [str(s) for s in starts]}
        return {b: (n, s) for b, n, s in self.conn.execute(query, params)}

    def sample_starts(self, ranges: list[KeyRange], pieces: int) -> dict[int, list[str]]:
        """Per range (by index), the first key of each of `pieces` equal slices of its rows here."""
        if not ranges:
            return {}
        inner = self.q.in_ranges("r.i, t.k, ntile(%(pieces)s) OVER (PARTITION BY r.i ORDER BY t.k) AS tile")
        query = sql.SQL("SELECT DISTINCT ON (s.i, s.tile) s.i, s.k::text FROM ({}) s ORDER BY s.i, s.tile, s.k")
        found: dict[int, list[str]] = defaultdict(list)
        for i, key in self.conn.execute(query.format(inner), _range_params(ranges) | {"pieces": pieces}):
            found[i - 1].append(key)
        return found

    def row_hashes(self, ranges: list[KeyRange]) -> dict[str, list[int]]:
        hashes: dict[str, list[int]] = defaultdict(list)
        for key, h in self.conn.execute(self.q.in_ranges("t.k::text, t.h"), _range_params(ranges)):
            hashes[key].append(h)
        return hashes

    def close(self) -> None:
        self.conn.close()


class _Diff:
    """The narrowing loop over two sides."""

    def __init__(self, src: _Side, dst: _Side, integer: bool, pool: ThreadPoolExecutor, report: DiffReport):
        self.src, self.dst, self.integer, self.pool, self.report = src, dst, integer, pool, report

    def both(self, fn: Callable[..., T], *args: Any) -> tuple[T, T]:
        """fn(side, *args) on both sides at once."""
        futures = [self.pool.submit(fn, side, *args) for side in (self.src, self.dst)]
        return futures[0].result(), futures[1].result()

    def starts(self, ranges: list[KeyRange], counts: list[tuple[int, int]], pieces: int) -> list[list[int | str]]:
        """Where to split each range into about `pieces` parts; ranges that cannot be split get one start."""
        if self.integer:
            out = []
            for r in ranges:
                span = r.hi - r.lo + r.last
                out.append(list(range(r.lo, r.lo + span, max(1, math.ceil(span / pieces)))))
            return out
        # quantiles of the side holding more rows of the range; the first start is the range's own lower bound
        mine = {side: [i for i, (s, d) in enumerate(counts) if (s >= d) == side] for side in (True, False)}
        found = self.both(lambda side: side.sample_starts([ranges[i] for i in mine[side is self.src]], pieces))
        sampled = {i: found[0].get(j, []) for j, i in enumerate(mine[True])}
        sampled |= {i: found[1].get(j, []) for j, i in enumerate(mine[False])}
        return [[r.lo, *dict.fromkeys(k for k in sampled[i][1:] if k != r.lo)] for i, r in enumerate(ranges)]

    def mismatches(self, ranges: list[KeyRange], fingerprints: tuple[Fingerprints, Fingerprints]):
        empty = (0, Decimal(0))
        for b, r in enumerate(ranges):
            a, z = fingerprints[0].get(b, empty), fingerprints[1].get(b, empty)
            if a != z:
                yield r, (a[0], z[0])

    def run(self, first_level: int, leaf_rows: int, fanout: int, max_fetch_rows: int) -> list[KeyDiff]:
        lows, highs = zip(*self.both(_Side.bounds), strict=True)
        if not any(lows):
            return []
        if self.integer:
            lo, hi = min(int(v) for v in lows if v), max(int(v) for v in highs if v)
            pieces = first_level or math.ceil((hi - lo + 1) / leaf_rows)
        else:
            typed = sql.SQL("%s::{}").format(self.src.q.key_type)
            lo, hi = self.src.conn.execute(sql.SQL("SELECT least({t}, {t})::text, greatest({t}, {t})::text").format(
                t=typed), (*lows, *highs)).fetchone()  # fmt: skip
            count = sql.SQL("SELECT count(*) FROM {}").format(self.src.q.rows)
            pieces = first_level or math.ceil(self.src.conn.execute(count).fetchone()[0] / leaf_rows)
        whole = KeyRange(lo, hi, True)
        pieces = min(MAX_FIRST_LEVEL, max(1, pieces))
        starts = self.starts([whole], [(1, 0)], pieces)[0]
        ranges = _sub_ranges(whole, starts)
        fingerprints = self.both(_Side.hash_first_level, whole, starts, self.integer)
        self.report.rows_source, self.report.rows_restored = (sum(n for n, _ in f.values()) for f in fingerprints)
        self.report.levels, self.report.ranges_hashed = 1, len(ranges)
        pending = list(self.mismatches(ranges, fingerprints))
        leaves: list[tuple[KeyRange, int]] = []
        while pending:
            big = [(r, c) for r, c in pending if max(c) > leaf_rows]
            leaves += [(r, max(c)) for r, c in pending if max(c) <= leaf_rows]
            splits = self.starts([r for r, _ in big], [c for _, c in big], fanout)
            parents, flat, children = [], [], []
            for (r, c), cut in zip(big, splits, strict=True):
                if len(cut) == 1:
                    leaves.append((r, max(c)))
                else:
                    parents.append(r)
                    flat += cut
                    children += _sub_ranges(r, cut)
            if not parents:
                break
            fingerprints = self.both(_Side.hash_ranges, parents, flat)
            self.report.levels += 1
            self.report.ranges_hashed += len(children)
            pending = list(self.mismatches(children, fingerprints))
        return self.resolve(leaves, max_fetch_rows)

    def resolve(self, leaves: list[tuple[KeyRange, int]], max_fetch_rows: int) -> list[KeyDiff]:
        """Fetch keys and row hashes of the mismatching small ranges (within the budget) and compare them."""
        fetch, budget = [], max_fetch_rows
        for r, rows in leaves:
            if rows <= budget:
                fetch.append(r)
                budget -= rows
            else:
                self.report.unresolved_rows += rows
        if not fetch:
            return []
        src, dst = self.both(_Side.row_hashes, fetch)
        diffs = [(key, "missing") for key in src.keys() - dst.keys()]
        diffs += [(key, "extra") for key in dst.keys() - src.keys()]
        diffs += [(key, "changed") for key, hashes in src.items()
                  if key in dst and hashes != dst[key] and sorted(hashes) != sorted(dst[key])]  # fmt: skip
        return sorted((KeyDiff(key=int(key) if self.integer else key, kind=kind) for key, kind in diffs),
                      key=lambda d: d.key)  # fmt: skip


def fingerprint_diff(
    source: PgTarget,
    restored: PgTarget,
    table: str,
    key: str | None = None,
    predicate: Predicate = None,
    *,
    max_keys: int = 100,
    leaf_rows: int = 64,
    fanout: int = 16,
    first_level: int = 0,
    max_fetch_rows: int = 1_000_000,
) -> DiffReport:
    """Compare `table` between source and restored copy; `predicate` restricts the rows on both sides.

    first_level: ranges of the first pass (0: about one per `leaf_rows` keys); mismatching ranges are split
    `fanout` ways until they hold at most `leaf_rows` rows, whose keys are then compared, up to `max_fetch_rows`
    rows in all. The report lists at most `max_keys` differing keys; its counts cover all of them.
    """
    condition = predicate_sql(predicate)
    started = time.monotonic()
    report = DiffReport(table=table, source=source.label, restored=restored.label)
    sides: list[_Side] = []
    try:
        for target in (source, restored):
            sides.append(_Side(target))
        schema = read_table(sides[0].conn, table)
        report.predicate = None if predicate is None else condition.as_string(sides[0].conn)
        if schema is None:
            raise DrplanError(f"{source.label}: table {table} does not exist")
        report.key = key = key or _default_key(schema)
        if key not in schema.unique_columns:
            raise DrplanError(f"{table}.{key} is not a column with a unique index; pass a unique key column")
        sides[0].q = sides[1].q = _Queries.build(schema, key, condition)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fingerprint") as pool:
            diff = _Diff(sides[0], sides[1], schema.column(key).base_type in INTEGER_TYPES, pool, report)
            found = diff.run(first_level, leaf_rows, fanout, max_fetch_rows)
        for d in found:
            setattr(report, d.kind, getattr(report, d.kind) + 1)
        report.keys = found[:max_keys]
        report.status = Status.failed if found or report.unresolved_rows else Status.passed
    except (DrplanError, psycopg.Error) as exc:
        report.status = Status.error
        report.errors.append(first_line(exc))
    finally:
        for side in sides:
            side.close()
    report.duration_s = round(time.monotonic() - started, 3)
    run_logger().info("fingerprint %s: %s, %d/%d rows, %d differing keys, %d ranges, %.2fs", table,
                      report.status.value, report.rows_source, report.rows_restored, report.differing,
                      report.ranges_hashed, report.duration_s)  # fmt: skip
    return report


def _default_key(table: TableSchema) -> str:
    if len(table.primary_key) != 1:
        raise DrplanError(f"{table.name}: no single-column primary key; pass key= (a column with a unique index)")
    return table.primary_key[0]
