"""`drplan metrics`: the report files runs leave become Prometheus metrics (parsed with prometheus_client's own
parser): data age grows at scrape time, drills pass or fail by their own verdict, the worst RTO per tier, region
readiness, runs in progress; served over HTTP and written as a textfile."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cli.main import app
from drplan.drill_report import DrillReport, Measured
from drplan.metrics import PlanCollector
from drplan.plan import load_plan
from drplan.report_files import READINESS_PREFIX, RPO_PREFIX, reports_dir, write_json
from drplan.results import CheckResult, Status
from drplan.rpo import Measurement, RpoReport
from drplan.timeutil import utcnow
from flows.dr_readiness import Finding, ReadinessReport
from tests.helpers import free_ports, prefect_api_url

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def plan_path(tmp_path) -> str:
    """The sandbox plan with its reports in a directory of the test's own."""
    data = yaml.safe_load((ROOT / "plans" / "sandbox.yaml").read_text())
    data["drill"]["report_dir"] = str(tmp_path / "reports")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def plan(plan_path):
    return load_plan(plan_path)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def drill(plan, database: str, rto_minutes: float, passed: bool, age: timedelta) -> None:
    now = utcnow() - age
    report = DrillReport(
        plan=plan.name, database=database, kind="postgres", tier=plan.database(database).tier,
        scratch=f"{database}-drill-{now:%Y%m%dt%H%M%S%fz}",
        started_at=now - timedelta(minutes=rto_minutes), finished_at=now,
        rto=Measured(measured=timedelta(minutes=rto_minutes), objective=timedelta(hours=1)),
        rpo=Measured(measured=timedelta(seconds=3), objective=timedelta(minutes=5)),
        checks=[CheckResult(name="users: row count", status=Status.passed if passed else Status.failed)])
    path = reports_dir(plan) / f"drill-{report.scratch}.json"
    path.write_text(report.model_dump_json())
    stamp = (utcnow() - age).timestamp()
    os.utime(path, (stamp, stamp))


@pytest.fixture
def reports(plan):
    """What a day of runs leaves: an RPO verification 10 min ago, two drills of devonn-postgres (the newer one
    failed) and one of devonn-rds, and readiness of us-west-2 (not ready)."""
    now = utcnow()
    write_json(plan, RPO_PREFIX, RpoReport(
        plan=plan.name, started_at=now - timedelta(minutes=11), finished_at=now - timedelta(minutes=10),
        measurements=[Measurement(resource="devonn-postgres", data_class="database", measure="WAL archive",
                                  newest=now - timedelta(minutes=12), age=timedelta(minutes=2),
                                  objective=timedelta(minutes=5), status=Status.passed),
                      Measurement(resource="data", data_class="file_storage", measure="backup trails live",
                                  objective=timedelta(minutes=15), status=Status.error, detail="no backup")]))
    drill(plan, "devonn-postgres", 20, True, timedelta(hours=2))
    drill(plan, "devonn-postgres", 30, False, timedelta(hours=1))
    drill(plan, "devonn-rds", 45, True, timedelta(hours=3))
    write_json(plan, f"{READINESS_PREFIX}us-west-2-", ReadinessReport(
        plan=plan.name, region="us-west-2", checked_at=now,
        findings=[Finding(check="DNS", ready=True, detail="ok"), Finding(check="capacity", ready=False, detail="0/2")]))
    return plan


def scrape(plan, runs=None) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlanCollector(plan, runs))
    return samples(generate_latest(registry).decode())


def test_reports_become_metrics(reports):
    first = scrape(reports, lambda: {"pitr-recovery": 1})
    key = (("data_class", "database"), ("measure", "WAL archive"), ("resource", "devonn-postgres"))
    assert 12 * 60 <= first[("drplan_data_age_seconds", key)] < 13 * 60  # now - newest, not the age measured then
    assert first[("drplan_data_age_objective_seconds", key)] == 300
    unmeasured = (("data_class", "file_storage"), ("measure", "backup trails live"), ("resource", "data"))
    assert ("drplan_data_age_seconds", unmeasured) not in first
    assert first[("drplan_data_age_objective_seconds", unmeasured)] == 900
    assert first[("drplan_drill_success", (("database", "devonn-postgres"),))] == 0  # the newest drill failed
    assert first[("drplan_drill_success", (("database", "devonn-rds"),))] == 1
    assert first[("drplan_rto_seconds", (("tier", "critical"),))] == 30 * 60
    assert first[("drplan_rto_seconds", (("tier", "secondary"),))] == 45 * 60
    assert first[("drplan_rto_objective_seconds", (("tier", "secondary"),))] == 4 * 3600
    assert first[("drplan_region_ready", (("region", "us-west-2"),))] == 0
    assert first[("drplan_runs_in_progress", (("flow", "pitr-recovery"),))] == 1
    assert first[("drplan_prefect_up", ())] == 1
    time.sleep(1.1)
    assert scrape(reports)[("drplan_data_age_seconds", key)] > first[("drplan_data_age_seconds", key)]


def test_no_prefect_and_an_unreadable_report_are_metrics_not_errors(reports):
    (reports_dir(reports) / f"{RPO_PREFIX}99999999T000000000000Z.json").write_text("{half a repo")
    got = scrape(reports, lambda: None)
    assert got[("drplan_prefect_up", ())] == 0
    assert got[("drplan_report_unreadable", (("file", f"{RPO_PREFIX}99999999T000000000000Z.json"),))] == 1


def test_textfile_and_bad_options_in_one_line(reports, plan_path, tmp_path, monkeypatch):
    nowhere = f"http://127.0.0.1:{free_ports(1)[0]}/api"  # nothing listens there
    monkeypatch.setenv("PREFECT_API_URL", nowhere)
    out = tmp_path / "drplan.prom"
    with prefect_api_url(nowhere):
        result = runner.invoke(app, ["metrics", "--plan", plan_path, "--textfile", str(out)])
    assert result.exit_code == 0, result.output
    got = samples(out.read_text())
    assert got[("drplan_prefect_up", ())] == 0 and got[("drplan_region_ready", (("region", "us-west-2"),))] == 0
    for args, message in ((["--textfile", str(tmp_path / "nope" / "x.prom")], "does not exist"),
                          (["--listen", "9464"], "is not host:port")):
        result = runner.invoke(app, ["metrics", "--plan", plan_path, *args])
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_served_over_http(reports, plan_path):
    port = free_ports(1)[0]
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "metrics", "--plan", plan_path,
                               "--listen", f"127.0.0.1:{port}"], cwd=ROOT, stderr=subprocess.PIPE,
                              env={**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_ports(1)[0]}/api"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()
                time.sleep(0.3)
        assert response.status_code == 200
        assert samples(response.text)[("drplan_drill_success", (("database", "devonn-rds"),))] == 1
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.usefixtures("prefect_server")
def test_runs_in_progress_come_from_the_prefect_api(plan):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Paused, Running

    from cli.metrics import runs_in_progress

    @flow(name="metrics-test-recovery")
    def recovery() -> None:
        """Only its name matters: runs are created through the API in the states under test."""

    before = (runs_in_progress(plan) or {}).get("metrics-test-recovery", 0)
    with get_client(sync_client=True) as client:
        for state in (Running(), Paused()):
            client.create_flow_run(recovery, state=state)
    assert runs_in_progress(plan)["metrics-test-recovery"] == before + 2
