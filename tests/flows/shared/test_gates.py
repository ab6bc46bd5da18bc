"""The approval gate: an approval nobody gives within the plan's approval.timeout is a refusal, not a run that
waits forever or fails."""

from __future__ import annotations

import threading
import time
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


@flow
def gated_long() -> RecoveryReport:
    report = RecoveryReport(flow="gated", plan="test", subject="db", dry_run=False)
    decision = request_approval(report, "gated-approval", "## Promote db-replica?\n\nfence: db-primary read-only",
                                approve=False, timeout=timedelta(seconds=120))
    report.outcome = "approved" if decision.approve else "refused: nothing changed"
    return report


@pytest.mark.usefixtures("prefect_server")
def test_the_resume_form_says_what_it_approves_and_its_answer_ends_the_run():
    """The UI's resume dialog shows the run input's description: the summary and the timeline, not a bare form."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.flow_runs import resume_flow_run
    from prefect.input import keyset_from_paused_state

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(state=gated_long(return_state=True)))
    runner.start()
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["gated-long"])))
                    if r.state and r.state.is_paused()]
            if runs:
                break
            assert time.monotonic() < deadline, "the run never paused"
            time.sleep(0.5)
        (run,) = runs
        keys = keyset_from_paused_state(run.state)
        description = client.read_flow_run_input(run.id, keys["description"])
    assert "Promote db-replica?" in description and "fence: db-primary read-only" in description
    assert "Timeline so far" in description
    resume_flow_run(run.id, run_input={"approve": True, "reason": "checked the lag", "approver": "alice"})
    runner.join(60)
    report = result["state"].result()
    assert report.outcome == "approved"
    assert report.steps[-1].detail == "approve=True (by alice) checked the lag"
