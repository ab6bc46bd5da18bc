"""The fleet drill's report: the most runs open at once from their start and end times, the fleet's status, the
databases it names; and `drplan fleet-drill` refusing bad input and a missing Prefect API before anything runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from cli.main import app
from drplan.fleet_report import FleetDrill, FleetReport, max_overlap
from drplan.results import Status
from tests.helpers import REPO, prefect_api_url

T0 = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)


def span(start_s: int, end_s: int) -> tuple[datetime, datetime]:
    return T0 + timedelta(seconds=start_s), T0 + timedelta(seconds=end_s)


@pytest.mark.parametrize("spans, peak", [
    ([], 0),
    ([span(0, 10)], 1),
    ([span(0, 10), span(10, 20), span(20, 30)], 1),  # one ends as the next starts: never two at once
    ([span(0, 10), span(5, 15), span(12, 20)], 2),
    ([span(0, 30), span(1, 29), span(2, 28), span(29, 40)], 3),
])
def test_max_overlap(spans, peak):
    assert max_overlap(spans) == peak


def test_report_names_every_database_that_did_not_pass():
    drills = [FleetDrill(database="a", status=Status.passed, started_at=span(0, 10)[0], finished_at=span(0, 10)[1]),
              FleetDrill(database="b", status=Status.failed, message="restore drill: b failed",
                         started_at=span(2, 12)[0], finished_at=span(2, 12)[1]),
              FleetDrill(database="c", status=Status.error, message="restore drill: c error (no base backup)")]
    report = FleetReport(plan="p", limit=2, concurrency_limit="drplan-fleet-drill", deployment="restore-drill/x",
                         started_at=T0, drills=drills)
    assert report.status is Status.error and report.exit_code == 2
    assert report.summary() == "fleet drill of 3 databases: b failed, c error"
    assert report.peak_concurrency == 2
    markdown = report.markdown()
    assert "at most 2 at once" in markdown and "c error (no base backup)" in markdown


@pytest.mark.parametrize("args, message", [
    (["--database", "nope"], "unknown database 'nope'"),
    (["--target-time", "2026-11-26T12:00:00"], "has no time zone; add one"),
    ([], "export PREFECT_API_URL"),
])
def test_cli_refuses_before_anything_runs(args, message, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with prefect_api_url(None):
        result = CliRunner().invoke(app, ["fleet-drill", "--plan", str(REPO / "plans/sandbox.yaml"), *args])
    assert result.exit_code == 2 and message in result.stderr, result.output
