"""The approval gate: an approval nobody gives within the plan's approval.timeout is a refusal, not a run that
waits forever or fails."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prefect import flow

from flows.shared.gates import request_approval
from flows.shared.report import RecoveryReport


@flow
def gated() -> RecoveryReport:
    report = RecoveryReport(flow="gated", plan="test", subject="db", dry_run=False)
    decision = request_approval(report, "gated-approval", "## Approve?", approve=False, timeout=timedelta(seconds=2))
    report.outcome = "approved" if decision.approve else "refused: nothing changed"
    return report


@pytest.mark.usefixtures("prefect_server")
def test_no_approval_within_the_timeout_is_a_refusal():
    report = gated()
    assert report.outcome == "refused: nothing changed"
    assert (report.steps[-1].action, report.steps[-1].detail) == ("approval", "approve=False no approval within 2.0s")
