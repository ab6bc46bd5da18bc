"""The failover test's verdict: passed only when every run succeeded, no committed row was lost, writes resumed and
the database ended protected; no measurement is an error."""

from __future__ import annotations

from datetime import timedelta

import pytest

from drplan.failover_report import FailoverTestReport, Run, approval_summary
from drplan.plan import PLANS_DIR, load_plan
from drplan.results import Status
from drplan.timeutil import utcnow
from drplan.write_probe import ProbeResult

START = utcnow()


def probe(lost: list[int] | None = None, outage_until: float = 3.0) -> ProbeResult:
    return ProbeResult(table="drplan_write_probe_x", started_at=START, finished_at=START + timedelta(seconds=10),
                       attempts=100, committed=90, errors=10, downtime_seconds=outage_until - 2,
                       outage_from=START + timedelta(seconds=2), outage_to=START + timedelta(seconds=outage_until),
                       lost=lost or [])


def report(**changes) -> FailoverTestReport:
    runs = [Run(flow="db-failover", outcome="failed over", failed=False, markdown="# failover"),
            Run(flow="reprotect", outcome="already protected: x", failed=False, markdown="# reprotect")]
    return FailoverTestReport(database="db", kind="rds", probe=probe(), runs=runs, protected=True).model_copy(
        update=changes)


def test_a_clean_failover_passes_and_says_what_the_client_saw():
    passed = report()
    assert passed.status is Status.passed
    assert passed.summary.startswith("downtime 1.0s (")
    assert "0 rows lost of 90 committed (10 failed writes); db-failover: failed over, reprotect: already " \
           "protected: x; protected" in passed.summary
    assert "# failover" in passed.markdown() and "# reprotect" in passed.markdown()


@pytest.mark.parametrize(("changes", "says"), [
    ({"probe": probe(lost=[7, 8])}, "2 rows lost (seq 7, 8)"),
    ({"probe": probe(outage_until=10.0)}, "writes did NOT resume"),
    ({"protected": False}, "NOT protected afterwards"),
    ({"runs": [Run(flow="db-failover", outcome="validation failed", failed=True, markdown="")]},
     "db-failover: validation failed"),
])
def test_a_lost_row_writes_that_never_resumed_no_protection_or_a_failed_run_fail_it(changes, says):
    failed = report(**changes)
    assert failed.status is Status.failed and says in failed.summary


def test_no_measurement_is_an_error():
    assert report(probe=None, error="write probe: boom").status is Status.error
    assert report(probe=None, error="write probe: boom").summary == "error: write probe: boom"


def test_the_approval_summary_names_each_database_and_what_it_does():
    plan = load_plan(PLANS_DIR / "devonn.yaml")
    summary = approval_summary(plan.databases)
    assert "**its connections drop**" in summary
    for db in plan.databases:
        assert f"- **{db.name}** ({db.kind.value}): " in summary
