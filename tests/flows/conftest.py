"""The recovery runbooks' tests share one lock per database (the Prefect global concurrency limit
`drplan-recovery-<database>`): a failed test must not leave it taken for the tests after it. RDS waits poll the
sandbox's data plane every half second."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound

from tasks.targets import RdsInstance

CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture
def recovery_lock_freed_after_a_failure(request: pytest.FixtureRequest, prefect_server: None) -> Iterator[None]:
    """After a failed test, free the recovery lock of devonn-postgres, which a flow the test abandoned (a thread
    still restoring, a run still paused) may hold: else every later recovery fails with 'another recovery of
    devonn-postgres is in progress'. After a passing test the lock is left as it is, so a leak still shows."""
    yield
    if request.node.stash.get(CALL_FAILED, False):
        with get_client(sync_client=True) as client:
            try:
                client.update_global_concurrency_limit("drplan-recovery-devonn-postgres",
                                                       GlobalConcurrencyLimitUpdate(active_slots=0))
            except ObjectNotFound:
                pass  # no recovery ever took it


@pytest.fixture
def fast_rds_polls(monkeypatch):
    """RDS waits poll every half second (the sandbox's data plane changes within a second, not minutes)."""
    monkeypatch.setattr(RdsInstance, "poll_seconds", 0.5)
    monkeypatch.setattr("flows.shared.promotion.RDS_POLL_SECONDS", 0.5)
    monkeypatch.setattr("flows.db_failover.RDS_POLL_SECONDS", 0.5)
