"""Cheap flows that tests/cli/test_serve.py deploys next to prefect.yaml's: the recovery flows' approval gate (the
same RunInput) without a restore before it, and a synthetic RPO breach published by the real
`flows.rpo_verification.publish`."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta

from prefect import flow, pause_flow_run

from drplan.plan import Database
from drplan.results import Status
from drplan.rpo import Measurement, RpoReport
from drplan.timeutil import utcnow
from flows.rpo_verification import publish
from flows.shared.gates import Approval, recovery_lock


@flow(name="platform-approval-probe")
def approval_probe(change: str = "promote the replica", database: str = "", first_alarm: str | None = None) -> str:
    """Pause until someone answers with an Approval (holding `database`'s recovery lock, if given, as the recovery
    flows do); fail when they refuse. `first_alarm` as the alarm-triggered runbooks take it (echoed in the result)."""
    with recovery_lock(Database.model_construct(name=database)) if database else nullcontext():
        answer = pause_flow_run(wait_for_input=Approval, timeout=180, poll_interval=2)  # default 10 s: slow tests
    if not answer.approve:
        raise RuntimeError(f"{change}: refused ({answer.reason})")
    return f"{change}: approved ({answer.reason})" + (f", alarm since {first_alarm}" if first_alarm else "")


@flow(name="platform-breach-probe")
def breach_probe(resource: str = "probe-db", age_s: int = 600) -> None:
    """Publish an RPO report with one breached database measurement (emits drplan.rpo.breached)."""
    now = utcnow()
    age = timedelta(seconds=age_s)
    publish(RpoReport(plan="platform-test", started_at=now, finished_at=now, measurements=[Measurement(
        resource=resource, data_class="database", measure="primary newest heartbeat", newest=now - age, age=age,
        objective=timedelta(minutes=5), status=Status.failed)]))
