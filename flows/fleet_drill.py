"""Fleet drill: a restore drill of every database (or those named), each a run of the `restore-drill` deployment,
so that the work pool's workers share them (one machine or many), at most `drill.fleet_concurrency` at once.

The limit is the Prefect global concurrency limit `drplan-fleet-drill`, set to the plan's value at the start. This
flow takes one slot per database before it creates that database's run and gives it back when the run has ended,
so no more runs exist at once than the limit, whichever worker takes them, and two fleet drills at once share the
limit; a slot whose holder died comes back when its lease (DRILL_LEASE_SECONDS) expires. A deployment concurrency
limit would be static (prefect.yaml, not the plan) and would also bind the daily drill; a work pool or queue limit
would bind every runbook on the pool (a recovery waiting behind drills). Each run also holds its database's drill
lock (restore-drill), so a fleet drill never races the daily drill of the same database.

A run not finished within drill.sweep_after (no worker took it, or it hangs) is cancelled and reported as an
error. A failed drill fails only its own run; the fleet report (artifact `fleet-drill`, JSON in `drill.report_dir`) has
one row per database and names every one that did not pass.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.concurrency.asyncio import concurrency
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.states import Cancelling, Failed

from drplan.errors import DrplanError, first_line
from drplan.fleet_report import FleetDrill, FleetReport
from drplan.plan import DEFAULT_PLAN
from drplan.report_files import write_json
from drplan.results import Status
from drplan.timeutil import format_duration, utcnow
from flows.shared.gates import DRILL_LEASE_SECONDS, ensure_limit
from flows.shared.requests import validate_request

FLEET_LIMIT = "drplan-fleet-drill"
DRILL_DEPLOYMENT = "restore-drill/restore-drill"
FLEET_PREFIX = "fleet-drill-"


def outcome(database: str, run: FlowRun) -> FleetDrill:
    """The row of one finished (or not) restore-drill run. Its Failed message names each database's status."""
    state = run.state
    if state is not None and state.is_completed():
        status = Status.passed
    elif state is not None and state.is_failed() and f"{database} failed" in (state.message or ""):
        status = Status.failed  # a check failed or an objective was missed; anything else is an error
    else:
        status = Status.error
    return FleetDrill(database=database, status=status, flow_run=f"{run.name} {run.id}",
                      state=state.name if state else "-", message=(state.message or "") if state else "",
                      started_at=run.start_time, finished_at=run.end_time)


async def drill_one(database: str, deployment: str, parameters: dict, wait: timedelta) -> FleetDrill:
    """One slot of the fleet limit for the whole life of `database`'s restore-drill run. A run not finished within
    `wait` of its creation (no worker took it, or it hangs) is cancelled and reported: the fleet goes on."""
    try:
        async with concurrency(FLEET_LIMIT, occupy=1, lease_duration=DRILL_LEASE_SECONDS, strict=True,
                               raise_on_lease_renewal_failure=False):  # the runs go on: keep waiting for them
            run = await run_deployment(deployment, parameters={**parameters, "database": database},
                                       timeout=wait.total_seconds(), poll_interval=2,
                                       flow_run_name=f"fleet-drill-{database}")
            if run.state is None or not run.state.is_final():
                return await cancelled(database, run, wait)
    except Exception as exc:  # noqa: BLE001 - the report names it; the other databases go on
        return FleetDrill(database=database, status=Status.error, message=first_line(exc))
    get_run_logger().info("drill of %s: %s", database, run.state.name if run.state else "no state")
    return outcome(database, run)


async def cancelled(database: str, run: FlowRun, wait: timedelta) -> FleetDrill:
    """Cancel a run that outlived the fleet's wait (before its slot is given back) and report it as an error."""
    state = run.state.name if run.state else "no state"
    message = f"{database} error: not finished within {format_duration(wait)} (still {state}); cancelled"
    async with get_client() as client:
        await client.set_flow_run_state(run.id, Cancelling(message=message), force=True)
    get_run_logger().warning("drill of %s: %s", database, message)
    return FleetDrill(database=database, status=Status.error, flow_run=f"{run.name} {run.id}", state="Cancelling",
                      message=message, started_at=run.start_time)


@flow(name="fleet-drill")
async def fleet_drill(
    plan: str = DEFAULT_PLAN,
    databases: list[str] | None = None,
    target_time: str | None = None,
    deployment: str = DRILL_DEPLOYMENT,
) -> FleetReport:
    """Drill every database (or `databases`) as runs of the restore-drill deployment on the pool's workers, at most
    the plan's drill.fleet_concurrency at once; report which passed. target_time as restore-drill takes it."""
    dr_plan, selected, _, _ = validate_request(plan, None, target_time, None)
    if databases:
        selected = [dr_plan.database(name) for name in databases]  # an unknown name: refused, naming the plan's
    if "/" not in deployment:
        raise DrplanError(f"deployment {deployment!r}: write FLOW/DEPLOYMENT, e.g. {DRILL_DEPLOYMENT}")
    limit = dr_plan.drill.fleet_concurrency
    ensure_limit(FLEET_LIMIT, limit)
    report = FleetReport(plan=dr_plan.name, limit=limit, concurrency_limit=FLEET_LIMIT, deployment=deployment,
                         started_at=utcnow())
    parameters = {"plan": plan} | ({"target_time": target_time} if target_time else {})
    wait = dr_plan.drill.sweep_after  # a drill older than that is abandoned: the next one sweeps its copies
    report.drills = list(await asyncio.gather(*(drill_one(db.name, deployment, parameters, wait)
                                                for db in selected)))
    report.finished_at = utcnow()
    path = write_json(dr_plan, FLEET_PREFIX, report)
    await acreate_markdown_artifact(key="fleet-drill", markdown=report.markdown(), description=report.summary())
    emit_event(event=f"drplan.fleet_drill.{report.status.value}",
               resource={"prefect.resource.id": f"drplan.plan.{dr_plan.name}"},
               payload={"report": str(path), "not_passed": [d.database for d in report.not_passed]})
    get_run_logger().info("%s (report %s)", report.summary(), path)
    if report.exit_code:
        return Failed(message=report.summary(), data=report)
    return report
