"""Integrity checks of a restored copy against its source at target time T: the suites come from the plan's
`integrity` section and the source's catalog (columns, types, NOT NULL, primary and foreign keys)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from checks.catalog import ForeignKey, TableSchema, count_rows, read_table
from checks.gx_suite import Planned, gx_datasource, run_suite, scrub
from checks.report import IntegrityReport
from drplan.clients import PgTarget
from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.plan import Integrity
from drplan.results import CheckResult, Status

HEARTBEAT_COLUMN = "ts"  # drplan/heartbeat.py writes rows whose `ts` defaults to now()


def _exists_check(name: str, source: TableSchema | None, restored: TableSchema | None) -> CheckResult:
    check = {"table": name, "check": "table exists", "expectation": "present in the restored copy"}
    if source is None:
        return CheckResult.errored("not in the source database; fix databases[].integrity.tables", **check)
    if restored is None:
        return CheckResult.of_table(**check, status=Status.failed, observed="missing")
    return CheckResult.of_table(**check, status=Status.passed, observed="present")


def _schema_check(name: str, source: TableSchema, restored: TableSchema) -> CheckResult:
    want = {c.name: c for c in source.columns}
    have = {c.name: c for c in restored.columns}
    problems = [f"missing {n}" for n in want if n not in have] + [f"extra {n}" for n in have if n not in want]
    for n in want.keys() & have.keys():
        if want[n].type != have[n].type:
            problems.append(f"{n}: {want[n].type} → {have[n].type}")
        if want[n].not_null and not have[n].not_null:
            problems.append(f"{n}: NOT NULL dropped")
    if not problems and list(want) != list(have):
        problems.append("column order differs: " + ", ".join(have))
    return CheckResult.of_table(
        table=name, check="columns and types", expectation=f"the source's {len(want)} columns, in order, same types",
        status=Status.failed if problems else Status.passed,
        observed="; ".join(sorted(problems)) or f"{len(have)} columns match",
    )


def _timestamp_check(name: str, table: TableSchema, column: str, target_time: datetime) -> Planned:
    import great_expectations.expectations as gxe

    bound, note = target_time, ""
    found = table.column(column)
    if found is not None and found.type == "timestamp without time zone":
        bound, note = target_time.astimezone(UTC).replace(tzinfo=None), " (naive column read as UTC)"
    return Planned(name, f"no rows after target time: {column}", f"{column} <= {target_time.isoformat()}{note}",
                   gxe.ExpectColumnValuesToBeBetween(column=column, max_value=bound), "rows after the target time")


def _heartbeat_near_check(name: str, target_time: datetime, rpo: timedelta) -> Planned:
    """The copy holds the history that was serving at T: its newest heartbeat is at most the RPO older than T (a
    restore of another lineage, or of a member nobody wrote to, has none that recent)."""
    import great_expectations.expectations as gxe

    oldest = target_time - rpo
    return Planned(name, f"heartbeat near target time: {HEARTBEAT_COLUMN}",
                   f"newest {HEARTBEAT_COLUMN} >= {oldest.isoformat()} (T minus the RPO objective)",
                   gxe.ExpectColumnMaxToBeBetween(column=HEARTBEAT_COLUMN, min_value=oldest), "(newest heartbeat)")


def _foreign_key_check(conn: psycopg.Connection, name: str, table: TableSchema, fk: ForeignKey) -> Planned:
    from great_expectations.expectations import UnexpectedRowsExpectation

    def gx_safe(part: sql.Composable) -> sql.SQL:  # GX fills {batch} with str.format: double braces in names
        return sql.SQL(part.as_string(conn).replace("{", "{{").replace("}", "}}"))

    child = [sql.Identifier("c", col) for col in fk.columns]
    parent = [sql.Identifier("p", col) for col in fk.parent_columns]
    query = sql.SQL(
        "SELECT {cols} FROM {{batch}} AS c LEFT JOIN {parent} AS p ON {on} WHERE {present} AND {missing} IS NULL"
    ).format(
        cols=gx_safe(sql.SQL(", ").join(child)),
        parent=gx_safe(sql.Identifier(fk.parent_schema, fk.parent_table)),
        on=gx_safe(sql.SQL(" AND ").join(sql.SQL("{} = {}").format(c, p) for c, p in zip(child, parent, strict=True))),
        present=gx_safe(sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(c) for c in child)),
        missing=gx_safe(parent[0]),
    )
    expectation = (f"every {table.name}({', '.join(fk.columns)}) has its "
                   f"{fk.parent_table}({', '.join(fk.parent_columns)}) row")  # fmt: skip
    return Planned(name, f"foreign key {fk.name}", expectation,
                   UnexpectedRowsExpectation(unexpected_rows_query=query.as_string(conn)), "rows without parent")


ROW_COUNT = "row count"
"""Compares the copy with the source as it is now: after data loss the copy at T is expected to differ."""


def plan_table_checks(conn: psycopg.Connection, name: str, table: TableSchema, source_rows: int,
                      integrity: Integrity, target_time: datetime) -> list[Planned]:  # fmt: skip
    """The expectations for one table of the plan, from the source's schema and row count."""
    import great_expectations.expectations as gxe

    low = math.ceil(source_rows * (1 - integrity.row_count_tolerance))
    high = math.floor(source_rows * (1 + integrity.row_count_tolerance))
    checks = [Planned(name, ROW_COUNT, f"{low}..{high} rows (source {source_rows} ± "
                      f"{integrity.row_count_tolerance:.0%})",
                      gxe.ExpectTableRowCountToBeBetween(min_value=low, max_value=high), "rows")]  # fmt: skip
    if table.primary_key:
        unique = (gxe.ExpectColumnValuesToBeUnique(column=table.primary_key[0]) if len(table.primary_key) == 1
                  else gxe.ExpectCompoundColumnsToBeUnique(column_list=list(table.primary_key)))
        checks.append(Planned(name, "primary key unique", f"({', '.join(table.primary_key)}) unique", unique,
                              "duplicate rows"))
    checks += [Planned(name, f"not null: {c.name}", f"{c.name} has no NULLs",
                       gxe.ExpectColumnValuesToNotBeNull(column=c.name), "NULLs")
               for c in table.columns if c.not_null]  # fmt: skip
    checks += [_foreign_key_check(conn, name, table, fk) for fk in table.foreign_keys]
    checks.append(_timestamp_check(name, table, integrity.timestamp_column, target_time))
    return checks


def run_integrity_checks(source: PgTarget, restored: PgTarget, integrity: Integrity,
                         target_time: datetime, rpo: timedelta | None = None) -> IntegrityReport:  # fmt: skip
    """Check the restored copy (restored to `target_time`) against the source, table by table; every check is
    reported separately; with `rpo`, also that the copy's newest heartbeat is within it of T. Problems that stop
    the run (unreachable database) land in `errors`."""
    if target_time.tzinfo is None:
        raise ValueError("target_time must be timezone-aware (UTC)")
    log = run_logger()
    started = time.monotonic()
    report = IntegrityReport(source=source.label, restored=restored.label, target_time=target_time)
    names = list(dict.fromkeys([*integrity.tables, integrity.heartbeat_table]))
    try:
        with source.connect() as src, restored.connect() as dst:
            tables: list[tuple[list[CheckResult], TableSchema | None, list[Planned]]] = []
            for name in names:
                src_table, dst_table = read_table(src, name), read_table(dst, name)
                catalog = [_exists_check(name, src_table, dst_table)]
                if src_table is None or dst_table is None:
                    tables.append((catalog, None, []))
                    continue
                catalog.append(_schema_check(name, src_table, dst_table))
                if name in integrity.tables:
                    planned = plan_table_checks(dst, name, src_table, count_rows(src, src_table), integrity,
                                                target_time)  # fmt: skip
                else:  # the heartbeat table: whether the restore overshot T, or fell short of it
                    planned = [_timestamp_check(name, src_table, HEARTBEAT_COLUMN, target_time)]
                    if rpo is not None:
                        planned.append(_heartbeat_near_check(name, target_time, rpo))
                tables.append((catalog, dst_table, planned))
        with gx_datasource(restored) as datasource:
            for catalog, table, planned in tables:
                report.checks += catalog + (run_suite(datasource, restored, table, planned) if table else [])
    except (DrplanError, psycopg.Error) as exc:
        stopped = first_line(exc)
    except Exception as exc:  # GX failing to build its context or data source
        stopped = f"Great Expectations: {type(exc).__name__}: {exc}".splitlines()[0]
    else:
        stopped = None
    if stopped:  # also as a check, so that consumers reading only `checks` see it
        report.checks.append(CheckResult.errored(scrub(stopped, restored), table="(all)", check="run the checks",
                                                 expectation="both databases reachable, checks evaluated"))
    report.errors = [f"{c.name}: {c.error}" for c in report.checks if c.error]
    report.duration_s = round(time.monotonic() - started, 3)
    bad = report.failures()
    log.info("integrity of %s vs %s at %s: %s (%d checks, %d not passed)%s", restored.label, source.label,
             target_time.isoformat(), report.status.value, len(report.checks), len(bad),
             "".join(f"; {c.name}: {c.status.value}" for c in bad[:10]))  # fmt: skip
    return report
