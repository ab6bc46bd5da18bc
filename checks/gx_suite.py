"""Run Great Expectations 1.x suites against a restored copy: an ephemeral context, one PostgreSQL data source.

The SQLAlchemy URL (password URL-quoted) exists only in memory; every message that leaves this module is
scrubbed of the password. A metric GX could not compute comes back as success=False with exception_info:
that is an ERROR, not a failed check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from checks.catalog import TableSchema
from drplan.clients import PgTarget
from drplan.results import CheckResult, Status

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # read when great_expectations is first imported
SAMPLE = 5


@dataclass(frozen=True)
class Planned:
    """One expectation and how to report it: `noun` names what its count counts (`NULLs`, `rows`)."""

    table: str
    check: str
    expectation: str
    gx: Any
    noun: str


def _url(target: PgTarget) -> str:
    user, password = (quote(v, safe="") for v in (target.credentials.username,
                                                   target.credentials.password.get_secret_value()))
    return f"postgresql+psycopg://{user}:{password}@{target.host}:{target.port}/{quote(target.dbname, safe='')}"


def scrub(text: str, target: PgTarget) -> str:
    """The text without the target's password (plain or URL-quoted)."""
    secret = target.credentials.password.get_secret_value()
    for form in {secret, quote(secret, safe="")} - {""}:
        text = text.replace(form, "***")
    return text


@contextmanager
def gx_datasource(target: PgTarget) -> Iterator[Any]:
    """A GX PostgreSQL data source on `target` in a fresh ephemeral context; its connections closed on exit."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from sqlalchemy.pool import NullPool

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)  # a temp dir per context
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    connect_args = {"connect_timeout": 10, "application_name": "drplan-checks"}
    datasource = context.data_sources.add_postgres(
        "restored", connection_string=_url(target), kwargs={"poolclass": NullPool, "connect_args": connect_args}
    )
    try:
        yield datasource
    finally:
        datasource.get_execution_engine().close()
        datasource.get_engine().dispose()


def _short(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    return str(value)


def _observed(result: dict, noun: str) -> str:
    count = result.get("unexpected_count", result.get("observed_value"))
    if count is None:  # e.g. an empty table: nothing to count
        return "no rows"
    sample = result.get("partial_unexpected_list") or result.get("details", {}).get("unexpected_rows") or []
    sample = [_short(v) for v in sample[:SAMPLE] if v is not None]
    text = f"{count} {noun}"
    if count and sample:
        text += ", e.g. " + "; ".join(dict.fromkeys(sample))
    return text


def _exception_messages(info: dict | None) -> list[str]:
    """exception_info is either one {raised_exception, exception_message, ...} or a dict of them per metric."""
    if not info:
        return []
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    return [str(e.get("exception_message") or "metric failed").removeprefix("Error: ")
            for e in entries if e.get("raised_exception")]  # fmt: skip


def _result(planned: Planned, outcome: Any, target: PgTarget) -> CheckResult:
    base = {"table": planned.table, "check": planned.check, "expectation": planned.expectation,
            "gx_expectation": type(planned.gx).__name__}  # fmt: skip
    errors = _exception_messages(outcome.exception_info)
    if errors:
        return CheckResult.errored(scrub("; ".join(dict.fromkeys(errors)), target), **base)
    status = Status.passed if outcome.success else Status.failed
    observed = scrub(_observed(outcome.result or {}, planned.noun), target)
    return CheckResult.of_table(**base, status=status, observed=observed)


def run_suite(datasource: Any, target: PgTarget, table: TableSchema, planned: list[Planned]) -> list[CheckResult]:
    """Validate the planned expectations on the whole table. Query expectations run with COMPLETE results (their
    rows are capped by GX), column expectations with SUMMARY (a sample, never every unexpected value)."""
    import great_expectations as gx
    from great_expectations.expectations import UnexpectedRowsExpectation

    try:
        quoted = '"' + table.name.replace('"', '""') + '"'  # GX keeps a quoted name's case; it lowercases schemas
        asset = datasource.add_table_asset(f"{table.schema}.{table.name}", table_name=quoted, schema_name=table.schema)
        batch = asset.add_batch_definition_whole_table("whole table").get_batch()
        results: dict[int, CheckResult] = {}
        for complete in (False, True):
            indices = [i for i, p in enumerate(planned) if isinstance(p.gx, UnexpectedRowsExpectation) == complete]
            if not indices:
                continue
            suite = gx.ExpectationSuite(name=f"{table.schema}.{table.name}{'-query' * complete}")
            for i in indices:
                planned[i].gx.meta = {"drplan_check": i}
                suite.add_expectation(planned[i].gx)
            fmt = {"result_format": "COMPLETE" if complete else "SUMMARY", "partial_unexpected_count": SAMPLE}
            for outcome in batch.validate(suite, result_format=fmt).results:
                i = outcome.expectation_config.meta["drplan_check"]
                results[i] = _result(planned[i], outcome, target)
        return [results[i] for i in range(len(planned))]
    except Exception as exc:  # GX raises many types; any of them means these checks could not be evaluated
        message = scrub(f"{type(exc).__name__}: {exc}".splitlines()[0], target)
        return [CheckResult.errored(message, table=p.table, check=p.check, expectation=p.expectation,
                                    gx_expectation=type(p.gx).__name__) for p in planned]  # fmt: skip
