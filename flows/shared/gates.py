"""The gates before a destructive step: the one-recovery-per-database lock, the one-change-per-service lock and
the approval.

The lock is a Prefect global concurrency limit `drplan-recovery-<database>` (limit 1, created on first use): a
second recovery of the same database is refused within LOCK_RECHECK_SECONDS. Its lease is renewed while the run
lives; a killed run's slot is freed when the lease expires (LOCK_LEASE_SECONDS, plus the server's repossessor loop;
drplan's servers keep leases on disk, so this holds across a server restart and for a killed CLI), or at once with
`prefect gcl update drplan-recovery-<database> --active-slots 0` once you know the other run is dead."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from drplan.errors import DrplanError
from drplan.plan import Database
from drplan.timeutil import format_duration
from flows.shared import dr_room
from flows.shared.report import RecoveryReport

LOCK_LEASE_SECONDS = 60
"""Prefect's shortest lease: how long a killed recovery keeps its database locked."""
DRILL_LEASE_SECONDS = 300
"""Lease of a drill's lock and of a fleet drill's slots: renewed while the run lives (a renewal late by minutes on a
starved machine keeps the slot), so a killed drill holds them at most this long."""
LOCK_RECHECK_SECONDS = 10
"""How long a taken lock is looked at again before refusing: a lease that expired while no server ran (a killed
CLI's temporary server died with it) is freed by the next server's repossessor within its first loop."""



class Approval(RunInput):
    approve: bool
    reason: str = ""
    approver: str = ""
    """Who decided (for the post-mortem's decisions)."""


def lock_name(db: Database) -> str:
    return f"drplan-recovery-{db.name}"


def ensure_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit `name` with `limit` slots, or set an existing one's to `limit`."""
    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
                return
            except Exception:  # created concurrently by another run: fine, it exists now
                found = client.read_global_concurrency_limit_by_name(name)
        if found.limit != limit:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))


@contextmanager
def drill_lock(db: Database) -> Iterator[None]:
    """Hold the database's drill lock `drplan-drill-<database>` for the block, waiting while another drill of the
    same database holds it (two drills of one database would sweep each other's scratch copies; drills of different
    databases run side by side)."""
    name = f"drplan-drill-{db.name}"
    ensure_limit(name, 1)
    with concurrency(name, occupy=1, lease_duration=DRILL_LEASE_SECONDS, strict=True,
                     raise_on_lease_renewal_failure=False):  # a lost lease must not end a drill
        yield


@contextmanager
def recovery_lock(db: Database) -> Iterator[None]:
    """Hold the database's recovery lock for the block; refuse at once if another recovery holds it."""
    with exclusive(lock_name(db), f"another recovery of {db.name}"):
        yield


@contextmanager
def service_lock(service: str) -> Iterator[None]:
    """Hold the service's change lock `drplan-service-<service>` (rollback, config-restore, token rotation) for the
    block; refuse at once if another change of the service holds it."""
    with exclusive(f"drplan-service-{service}", f"another change of service {service}"):
        yield


@contextmanager
def exclusive(name: str, holder: str) -> Iterator[None]:
    """Hold the global concurrency limit `name` (one slot) for the block; refused, naming `holder`, when it stays
    taken for LOCK_RECHECK_SECONDS."""
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError  # not exported publicly in 3.9

    ensure_limit(name, 1)
    deadline = time.monotonic() + LOCK_RECHECK_SECONDS
    while True:
        try:
            with concurrency(name, occupy=1, max_retries=0, lease_duration=LOCK_LEASE_SECONDS, strict=True,
                             raise_on_lease_renewal_failure=False):
                yield
                return
        except ConcurrencySlotAcquisitionError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423):  # 423: taken
                raise
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    raise DrplanError(
        f"{holder} is in progress (Prefect concurrency limit {name} is taken); wait for it to finish, or if that "
        f"run is dead, wait {LOCK_LEASE_SECONDS}s for its lease to expire or free it with "
        f"`prefect gcl update {name} --active-slots 0`")


def request_approval(report: RecoveryReport, key: str, summary: str, approve: bool, timeout: timedelta) -> Approval:
    """The gate before the first destructive step: pre-approved (`--yes` / approve=True), or pause for an
    Approval given in the UI (its resume dialog shows `summary` and the timeline so far), through the REST API or by
    the CLI prompt; none within `timeout` (the plan's approval.timeout) is a refusal."""
    if approve:
        decision = Approval(approve=True, reason="approved in advance (--yes / approve=true)")
    else:
        text = f"{summary}\n\n## Timeline so far\n\n{report.timeline()}"
        create_markdown_artifact(key=key, markdown=text)
        form = Approval.with_initial_data(description=text, approve=False)  # the UI's resume dialog shows it
        waiting = f"{report.flow} of {report.subject}"
        dr_room.post(f"waiting for approval: {waiting}: {summary.splitlines()[0].lstrip('# ')}: approve at "
                     f"{dr_room.run_address()}")
        try:
            with dr_room.escalating(waiting):
                decision = pause_flow_run(wait_for_input=form, timeout=int(timeout.total_seconds()),
                                          poll_interval=2)
        except FlowPauseTimeout:
            decision = Approval(approve=False, reason=f"no approval within {format_duration(timeout)}")
    by = f" (by {decision.approver})" if decision.approver else ""
    report.record("approval", report.subject, f"approve={decision.approve}{by} {decision.reason}".strip())
    return decision
