"""RPO verification end to end on the real sandbox: all met, breaches when the heartbeat or the WAL archiver
stops, one-line errors (exit 2) for a refusing database, a missing secret, an unknown instance."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from drplan import rpo
from drplan.clients import aws_client
from drplan.plan import load_plan
from drplan.results import Status
from drplan.timeutil import utcnow
from flows.rpo_verification import rpo_verification
from sandbox import stack
from sandbox.launchers import moto
from tasks.s3 import back_up_prefix
from tests.helpers import free_ports
from tests.s3_moto import put_objects, s3_plan

runner = CliRunner()


def run_report(plan_path) -> tuple[object, rpo.RpoReport]:
    state = rpo_verification(plan=str(plan_path), return_state=True)
    return state, state.result(raise_on_failure=False)


def by_measure(report: rpo.RpoReport) -> dict[tuple[str, str], rpo.Measurement]:
    return {(m.resource, m.measure): m for m in report.measurements}


def wait_until_archiving(pg, member: str, timeout: float = 120) -> None:
    """Leave the sandbox as found: the archiver has caught up and archives again."""
    deadline = time.monotonic() + timeout
    with pg.connect(member) as conn:
        conn.execute("SELECT pg_switch_wal()")
        while pg.archiver_problem(member) is not None:
            assert time.monotonic() < deadline, pg.archiver_problem(member)
            time.sleep(1)


@pytest.mark.usefixtures("prefect_server", "fresh_backups")
def test_every_objective_met_on_a_healthy_sandbox(sandbox, sandbox_plan_path):
    state, report = run_report(sandbox_plan_path)
    assert state.is_completed(), state.message
    assert report.exit_code == 0, report.markdown()
    measured = by_measure(report)
    for db in ("devonn-postgres", "devonn-rds"):
        for role in ("primary", "replica", "dr_replica"):
            m = measured[(db, f"{role} newest heartbeat")]
            assert m.age is not None and m.age.total_seconds() < 20
    assert measured[("devonn-postgres", "WAL archive")].status is Status.passed
    assert measured[("devonn-postgres", "base backup")].status is Status.passed
    assert measured[("devonn-rds", "latest restorable time")].status is Status.passed
    assert measured[("devonn-rds", "snapshot")].status is Status.passed
    assert measured[("data", "backup trails live")].status is Status.passed
    assert measured[("configuration", "newest configuration backup")].status is Status.passed
    artifact = run_artifact(state.state_details.flow_run_id)
    assert artifact.type == "table" and "12 met, 0 breached, 0 errors" in artifact.description
    rows = json.loads(artifact.data)  # stored as JSON text
    assert len(rows) == 12 and {row["status"] for row in rows} == {"met"}


def run_artifact(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["rpo-verification"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return artifact


@pytest.mark.usefixtures("prefect_server", "fresh_backups")
def test_cli_json_report_and_exit_code(sandbox, sandbox_plan_path):
    result = runner.invoke(app, ["verify-rpo", "--plan", str(sandbox_plan_path), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["plan"] == "test-sandbox" and len(document["measurements"]) == 12
    assert {m["status"] for m in document["measurements"]} == {"met"}


@pytest.mark.usefixtures("prefect_server")
def test_stopped_heartbeat_and_archiver_are_breaches(
    sandbox, sandbox_plan_path, sandbox_dir, asserting_and_emitting_events_worker
):
    db = sandbox.database("devonn-postgres")
    pg = stack.postgres_of(sandbox, db, sandbox_dir, stack.sandbox_secrets(sandbox_dir)["db_password"])
    with pg.connect(db.primary) as conn:
        conn.execute("ALTER SYSTEM SET archive_command = '/bin/false'")
        conn.execute("SELECT pg_reload_conf()")
    pg.stop_heartbeat(db.primary)
    try:
        with pg.connect(db.primary) as conn:  # keep WAL flowing so the archiver has something to fail on
            for _ in range(26):
                conn.execute("CREATE TABLE IF NOT EXISTS churn (n int); INSERT INTO churn VALUES (1)")
                time.sleep(1)
        state, report = run_report(sandbox_plan_path)
    finally:
        with pg.connect(db.primary) as conn:
            conn.execute("ALTER SYSTEM RESET archive_command")
            conn.execute("SELECT pg_reload_conf()")
        pg.start_heartbeat(db.primary, interval=1, table=db.integrity.heartbeat_table)
        wait_until_archiving(pg, db.primary)

    assert state.is_failed() and "breached" in state.message
    assert report.exit_code == 1, report.markdown()
    measured = by_measure(report)
    heartbeat = measured[("devonn-postgres", "primary newest heartbeat")]
    assert heartbeat.status is Status.failed and heartbeat.age.total_seconds() > 20
    wal = measured[("devonn-postgres", "WAL archive")]
    assert wal.status is Status.failed and "archiver failing since" in wal.detail
    assert not report.errors

    asserting_and_emitting_events_worker.drain()
    events = [e for e in asserting_and_emitting_events_worker._client.events if e.event == "drplan.rpo.breached"]
    breached = {(e.resource.get("prefect.resource.name"), e.resource.get("drplan.measure")) for e in events}
    assert ("devonn-postgres", "WAL archive") in breached
    assert ("devonn-postgres", "primary newest heartbeat") in breached


@pytest.mark.usefixtures("prefect_server")
def test_refusing_database_is_an_error_not_a_crash(sandbox, plan_variant):
    closed = free_ports(1)[0]
    path = plan_variant(lambda d: d["databases"][0]["endpoints"].update(
        {"devonn-postgres-dr-production": f"127.0.0.1:{closed}"}))
    result = runner.invoke(app, ["verify-rpo", "--plan", str(path)])
    assert result.exit_code == 2, result.output
    assert (f"error: devonn-postgres dr_replica newest heartbeat: devonn-postgres/devonn-postgres-dr-production "
            f"(127.0.0.1:{closed}/devonn): cannot connect: Connection refused; check that it is up and reachable"
            ) in result.stderr


@pytest.mark.usefixtures("prefect_server")
def test_missing_secret_is_an_error(sandbox, plan_variant):
    path = plan_variant(lambda d: d["databases"][1].update(credentials_secret="devonn/db/missing"))
    result = runner.invoke(app, ["verify-rpo", "--plan", str(path), "--json"])
    assert result.exit_code == 2
    errors = [m for m in json.loads(result.stdout)["measurements"] if m["status"] == "error"]
    assert errors and all(m["resource"] == "devonn-rds" for m in errors)
    assert "secret devonn/db/missing: not found in Secrets Manager" in errors[0]["detail"]


@pytest.mark.usefixtures("prefect_server", "fresh_backups")
def test_a_plan_naming_a_missing_primary_is_measured_on_the_live_one(sandbox, plan_variant):
    """The plan's names are where discovery starts: its replicas lead to the primary that really serves."""
    def rename(d):
        d["databases"][1]["primary"] = "devonn-rds-nope"
    result = runner.invoke(app, ["verify-rpo", "--plan", str(plan_variant(rename)), "--json"])
    document = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    assert "devonn-rds: plan member primary devonn-rds-nope is missing" in document["differences"]
    restorable = next(m for m in document["measurements"]
                      if (m["resource"], m["measure"]) == ("devonn-rds", "latest restorable time"))
    assert restorable["status"] == "met" and restorable["detail"] == "on devonn-rds-production"


def test_broken_plan_is_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("aws: {region: us-east-1, dr_region: us-west-2}\ndatabases: [{name: x, kind: mysql}]\n")
    result = runner.invoke(app, ["verify-rpo", "--plan", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}: databases[0].kind: 'mysql' is not allowed" in result.stderr


@pytest.mark.usefixtures("prefect_server")
def test_unreachable_aws_endpoint_is_one_line(plan_variant):
    closed = free_ports(1)[0]
    path = plan_variant(lambda d: d["aws"].update(endpoint_url=f"http://127.0.0.1:{closed}"))
    result = runner.invoke(app, ["verify-rpo", "--plan", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: RPO verification did not complete: http://127.0.0.1:{closed} is unreachable; "
        "is the sandbox up? (drplan sandbox up)"
    )


@pytest.mark.usefixtures("prefect_server")
def test_each_data_class_is_judged_against_its_own_objective(tmp_path):
    """A bucket whose live data changed after its backup, against files 2s and configuration 1h: the bucket is
    breached, the configuration backup met (each measure keeps its own class's objective)."""
    with moto() as url:
        path = s3_plan(tmp_path, url, [{"name": "data", "live": "s3://live/", "backup": "s3://backup/data/"}])
        data = yaml.safe_load(path.read_text())
        data["objectives"] = {"rpo": {"file_storage": "2s", "configuration": "1h"}}
        data["configuration"] = {"backup": "s3://backup/config/"}
        path.write_text(yaml.safe_dump(data))
        s3 = aws_client(load_plan(path), "s3")
        for bucket in ("live", "backup"):
            s3.create_bucket(Bucket=bucket)
        put_objects(s3, "live", {"a": b"1"})
        back_up_prefix(s3, "s3://live/", "s3://backup/data/", utcnow())
        s3.put_object(Bucket="backup", Key="config/manifests.json", Body=b"{}")
        time.sleep(1.5)  # S3 times are whole seconds
        put_objects(s3, "live", {"b": b"2"})  # not in the backup
        time.sleep(3)
        _, report = run_report(path)
    found = by_measure(report)
    files = found[("data", "backup trails live")]
    configuration = found[("configuration", "newest configuration backup")]
    assert (files.status, files.objective) == (Status.failed, timedelta(seconds=2)), files
    assert (configuration.status, configuration.objective) == (Status.passed, timedelta(hours=1)), configuration
