"""Fleet drill across workers: six databases of a sandbox plan variant (the two sandbox databases, three more
entries restored from devonn-postgres's archive, one whose archive prefix holds nothing), drilled as runs of the
real `restore-drill` deployment (prefect.yaml, deployed by `drplan serve`) by two external process workers on the
`drplan` pool, at most drill.fleet_concurrency = 2 at once. Proven from the runs the API recorded: their start and
end times never overlap more than twice, both workers took runs (their own log line in each run), the broken
database failed only its own run and the fleet report (CLI output and JSON file) names it. And a run that no
worker takes is cancelled after drill.sweep_after and reported."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService
from rich.console import Console
from typer.testing import CliRunner

from cli import serve
from cli.main import app
from drplan import processes
from drplan.drill_report import DrillReport
from drplan.fleet_report import FleetReport, max_overlap
from drplan.plan import load_plan
from drplan.report_files import DRILL_PREFIX, reports_dir
from drplan.results import Status
from flows.fleet_drill import FLEET_LIMIT, FLEET_PREFIX, fleet_drill
from tests.helpers import REPO, free_port, processes_with_env

WORKERS = ["fleet-worker-1", "fleet-worker-2"]
COPIES = ["fleet-pg-1", "fleet-pg-2", "fleet-pg-3"]
BROKEN = "fleet-broken"


def six_databases(data: dict) -> None:
    source = next(db for db in data["databases"] if db["name"] == "devonn-postgres")
    for name in [*COPIES, BROKEN]:
        data["databases"].append({**copy.deepcopy(source), "name": name})
    broken = data["databases"][-1]
    broken["backup"]["destination"] = broken["backup"]["destination"].rstrip("/") + "-none/"  # no backup there
    data["drill"]["fleet_concurrency"] = 2


@pytest.fixture
def fleet(sandbox, fresh_base_backup, plan_variant, monkeypatch) -> Iterator[tuple[Path, serve.Platform]]:
    """`drplan serve` for the variant (scheduler off: only the runs the test asks for), its worker replaced by two
    external workers of at most one run each, tracked by PID file and stopped at the end with everything they
    started. A fresh base backup: each of the six drills replays seconds of WAL, not all since the session began."""
    plan_path = plan_variant(six_databases)
    plan = load_plan(plan_path)
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED", "false")
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
    platform = serve.platform_of(plan)
    ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout=30)  # none bound to another test's server
    try:
        platform = serve.up(str(plan_path), Console(quiet=True), port=free_port())
        processes.stop(platform.directory, serve.WORKER)
        for name in WORKERS:
            processes.start(platform.directory, name, [serve.PREFECT, "worker", "start", "--pool", serve.POOL, "--type",
                                                       "process", "--name", name, "--limit", "1"],
                            env=platform.env(), cwd=serve.ROOT)
        yield plan_path, platform
    finally:
        # Prefect keeps one slot-acquiring service per limit name in this process, bound to the API of its first
        # use: stopped here, or a later test of the session would reach this test's server, stopped below.
        ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout=30)
        for name in WORKERS:
            processes.stop(platform.directory, name)
        serve.down(plan)
        leftovers = [n for n in processes.tracked_names(platform.directory) if processes.running(platform.directory, n)]
        runs = processes_with_env("PREFECT_HOME", str(platform.home))  # flow runs: each in a session of its own
        for run in runs:  # a drill still running when the test failed: named below, and not left behind
            os.kill(int(run.partition(":")[0]), signal.SIGKILL)
        assert not leftovers + runs, f"processes left running: {leftovers + runs}"


def test_fleet_drill_shares_the_limit_across_workers_and_names_the_failed_database(fleet):
    plan_path, platform = fleet
    plan = load_plan(plan_path)
    with platform.client_settings():
        result = CliRunner().invoke(app, ["fleet-drill", "--plan", str(plan_path), "--json"])
        assert result.exit_code == 2, result.output  # the broken database's drill could not complete
        report = FleetReport.model_validate_json(result.stdout)
        with get_client(sync_client=True) as client:
            ids = [d.flow_run.split()[-1] for d in report.drills]
            runs = {r.parameters["database"]: r for r in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))}
            workers = {db: submitter(client, run.id) for db, run in runs.items()}
            limit = client.read_global_concurrency_limit_by_name(FLEET_LIMIT)
            deployment = client.read_deployment_by_name("restore-drill/restore-drill")

    databases = [db.name for db in plan.databases]
    assert sorted(runs) == sorted(databases), "one restore-drill run per database"
    assert {r.deployment_id for r in runs.values()} == {deployment.id}
    for db, run in runs.items():
        assert run.state.is_failed() if db == BROKEN else run.state.is_completed(), (db, run.state)
    spans = [(r.start_time, r.end_time) for r in runs.values()]
    assert max_overlap(spans) <= 2 == limit.limit, spans
    assert limit.active_slots == 0, "every slot given back"
    assert set(workers.values()) == set(WORKERS), workers

    rows = {d.database: d for d in report.drills}
    assert [d.database for d in report.not_passed] == [BROKEN]
    assert "fleet-broken error" in rows[BROKEN].message, rows[BROKEN].message
    assert report.peak_concurrency <= 2
    written = sorted(reports_dir(plan).glob(f"{FLEET_PREFIX}*.json"))[-1]
    assert json.loads(written.read_text())["drills"] == json.loads(report.model_dump_json())["drills"]
    for db in databases:  # each drill's own report, written by its run on a worker (the report dir is the session's)
        (drill,) = [d for p in reports_dir(plan).glob(f"{DRILL_PREFIX}{db}-drill-*.json")
                    if (d := DrillReport.model_validate_json(p.read_text())).started_at >= report.started_at]
        assert drill.status is (Status.error if db == BROKEN else Status.passed), (db, drill.error)
    print(report.markdown())  # the evidence, shown with pytest -rP


def submitter(client, run_id) -> str | None:
    """The worker that started the run, from the line it logs into the run ("Worker 'NAME' submitting ...")."""
    for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))):
        if found := re.match(r"Worker '([^']+)' submitting flow run", log.message):
            return found.group(1)
    return None


@pytest.mark.usefixtures("prefect_server")
def test_a_run_no_worker_takes_is_cancelled_and_reported(tmp_path):
    """A deployment whose pool has no worker: after drill.sweep_after the run is cancelled, the fleet report names
    it as an error, and the fleet's slot is given back."""
    @flow(name="fleet-never-taken")
    def never_taken(plan: str = "", database: str = "") -> None:
        raise AssertionError("no worker serves this pool")

    data = yaml.safe_load((REPO / "plans/sandbox.yaml").read_text())
    data["drill"].update(report_dir=str(tmp_path), sweep_after="5s")
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(data))
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="fleet-nobody", type="process"))
        client.create_deployment(flow_id=client.create_flow(never_taken), name="nobody", work_pool_name="fleet-nobody")
    state = asyncio.run(fleet_drill(plan=str(plan_path), databases=["devonn-postgres"],
                                    deployment="fleet-never-taken/nobody", return_state=True))
    report = state.result(raise_on_failure=False)
    assert state.is_failed() and report.exit_code == 2
    (row,) = report.drills
    assert row.status is Status.error and row.message == (
        "devonn-postgres error: not finished within 5.0s (still Scheduled); cancelled"), row
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(row.flow_run.split()[-1])
        assert run.state.type.value in ("CANCELLING", "CANCELLED"), run.state
        assert client.read_global_concurrency_limit_by_name(FLEET_LIMIT).active_slots == 0
