"""PITR recovery on the sandbox: real restore to T, the demo app cut over through its Kubernetes Secret and
serving the rows as they were at T; dry run changes nothing; failed validation rolls the Secret back."""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from kubernetes import client as k8s
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from cli.main import app
from drplan import processes
from drplan.clients import db_credentials, kube_client
from drplan.errors import DrplanError
from flows.pitr_recovery import pitr_recovery
from flows.shared.gates import lock_name
from sandbox import stack
from tasks.k8s import find_database_secret, read_secret_value, roll_back
from tasks.targets import PostgresArchive
from tests.helpers import REPO, free_port, logged_text, stack_snapshot, wait_for

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure")


def app_secret(plan) -> str:
    cluster = plan.cluster("devonn-eks-sandbox")
    api = kube_client(plan, cluster)
    secret, key = find_database_secret(api, cluster.namespace, "devonn-api")
    return read_secret_value(api, cluster.namespace, secret, key)


def stats(plan) -> dict:
    """The app's counts, once it answers them (right after a cutover or rollback it may be reconnecting)."""
    url = plan.services[0].health.removesuffix("/health") + "/api/stats"

    def answer() -> dict | None:
        body = httpx.get(url, timeout=5).json()
        return body if "orders" in body else None

    return wait_for(answer, 20, "the app to answer /api/stats", interval=0.5)


@pytest.fixture
def point_in_time(sandbox, sandbox_dir):
    """Orders deleted after T; yields (T, orders at T); afterwards the rows are back and copies dropped."""
    db = sandbox.database("devonn-postgres")
    pg = stack.postgres_of(sandbox, db, sandbox_dir, stack.sandbox_secrets(sandbox_dir)["db_password"])
    pg.base_backup(db.primary)  # the restore replays seconds of WAL, not all since the session's first backup
    orders_at_t = stats(sandbox)["orders"]
    time.sleep(1)
    at_t = datetime.now(UTC)
    time.sleep(1)
    with pg.connect(db.primary) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders_removed AS SELECT * FROM orders WHERE false")
        conn.execute("WITH gone AS (DELETE FROM orders WHERE id % 7 = 0 RETURNING *) "
                     "INSERT INTO orders_removed SELECT * FROM gone")
        switched = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        time.sleep(11)  # past the 10 s margin
        wait_for(lambda: conn.execute("SELECT last_archived_wal >= %s FROM pg_stat_archiver", (switched,))
                 .fetchone()[0], 120, "the WAL after T to be archived", interval=0.5)
    yield at_t, orders_at_t
    with pg.connect(db.primary) as conn:  # a promotion fenced it
        conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")
    with pg.connect(db.primary) as conn:
        conn.execute("INSERT INTO orders SELECT * FROM orders_removed; DROP TABLE orders_removed")
    target = PostgresArchive(sandbox, db)
    for marker in (target.markers).glob("devonn-postgres-recovery-*.json"):
        target.drop(marker.stem)


def test_dry_run_changes_nothing(sandbox, sandbox_plan_path, point_in_time):
    at_t, _ = point_in_time
    before, snapshot = app_secret(sandbox), stack_snapshot(sandbox, "devonn-postgres")
    planned = CliRunner().invoke(app, ["recover", "--plan", str(sandbox_plan_path), "--database", "devonn-postgres",
                                       "--to", at_t.isoformat(), "--promote", "--dry-run", "--json"])
    assert planned.exit_code == 0, planned.output
    report = json.loads(planned.stdout)  # the whole report, nothing cut off the way a narrow table would be
    assert report["outcome"] == "planned (dry run)"
    assert [s["action"] for s in report["steps"]] == ["found", "would restore", "would check", "would ask approval",
                                                      "would fence", "would rewrite", "would restart"]
    assert app_secret(sandbox) == before and stack_snapshot(sandbox, "devonn-postgres") == snapshot
    assert not list(PostgresArchive(sandbox, sandbox.database("devonn-postgres")).markers.glob("*recovery*"))


def approved_through_resume(run_input: dict, **parameters):
    """Start a recovery, answer its approval gate with `resume_flow_run(run_input=...)`, return its final state."""
    result = {}
    name = f"approved-through-resume-{uuid.uuid4().hex[:8]}"  # its own run, not one an earlier test left paused

    def run():
        result["state"] = pitr_recovery.with_options(flow_run_name=name)(**parameters, return_state=True)

    worker = threading.Thread(target=run)
    worker.start()

    def paused_run():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return next((r for r in runs if r.state and r.state.is_paused()), None)

    paused = wait_for(paused_run, 120, "the recovery to pause for approval", interval=0.5)
    resume_flow_run(paused.id, run_input=run_input)
    worker.join(180)
    assert "state" in result, "the recovery did not finish after the approval gate was answered"
    return result["state"]


def test_recover_to_t_and_promote_moves_the_app_to_the_rows_at_t(sandbox, sandbox_plan_path, point_in_time):
    at_t, orders_at_t = point_in_time
    before = app_secret(sandbox)
    assert stats(sandbox)["orders"] < orders_at_t  # the "corruption" is live
    try:
        state = approved_through_resume({"approve": True, "reason": "orders deleted after T"},
                                        plan=str(sandbox_plan_path), database="devonn-postgres",
                                        target_time=at_t.isoformat(), promote=True)
        report = state.result()
        assert report.outcome == "promoted", report.markdown()
        assert next(s for s in report.steps if s.action == "approval").detail == "approve=True orders deleted after T"
        assert report.validation.passed
        exposure = next(c for c in report.validation.checks if c.name == "database devonn-postgres: network exposure")
        assert exposure.observed == "unchanged"  # the copy is exposed as the live primary was
        # the live source lost 1/7 of its orders after T: the copy at T differs from it by more than 5%
        assert [c.name for c in report.checks if c.status.value != "passed"] == ["orders: row count"]
        assert wait_for(lambda: stats(sandbox)["orders"] == orders_at_t, 15, "the app serving the rows at T")
        password = db_credentials(sandbox, sandbox.database("devonn-postgres")).password.get_secret_value()
        assert password not in report.model_dump_json()
    finally:
        roll_back(sandbox, sandbox.cluster("devonn-eks-sandbox"), "devonn-api")
    assert app_secret(sandbox) == before


def test_refused_approval_changes_nothing(sandbox, sandbox_plan_path, point_in_time):
    at_t, _ = point_in_time
    before = app_secret(sandbox)
    state = approved_through_resume({"approve": False, "reason": "wrong target time"},
                                    plan=str(sandbox_plan_path), database="devonn-postgres",
                                    target_time=at_t.isoformat(), promote=True)
    report = state.result()
    assert report.outcome == "refused: nothing changed"
    assert report.steps[-1].detail == "approve=False wrong target time"
    assert app_secret(sandbox) == before


def test_failed_validation_rolls_the_secret_back(sandbox, plan_variant, point_in_time):
    at_t, orders_at_t = point_in_time

    def impossible_expectation(data: dict) -> None:
        data["services"][0]["endpoints"][1]["expect_contains"] = "a-field-no-database-has"

    before, orders_now = app_secret(sandbox), stats(sandbox)["orders"]
    state = pitr_recovery(plan=str(plan_variant(impossible_expectation)), database="devonn-postgres",
                          target_time=at_t.isoformat(), promote=True, approve=True, return_state=True)
    assert state.is_failed()
    report = state.result(raise_on_failure=False)
    assert report.outcome == "validation failed: rolled back"
    assert [s.action for s in report.steps][-4:] == ["fenced", "cut over", "unfenced", "rolled back"]
    assert [c.name for c in report.validation.checks if not c.passed] == ["GET /api/stats"]
    assert app_secret(sandbox) == before
    assert wait_for(lambda: stats(sandbox)["orders"] == orders_now != orders_at_t, 15, "the app on the old database")
    assert httpx.get(sandbox.services[0].health, timeout=5).status_code == 200


def test_killed_after_restore_rerun_completes_without_a_second_restore(sandbox, sandbox_plan_path, point_in_time,
                                                                     caplog):
    """One run restores and waits for approval; a second recovery of the database is refused at once; the first is
    killed (SIGKILL); after its lock is freed, a rerun finds the restored copy and completes. The database password
    is in no process argument, flow run parameter, log or plain container env value throughout."""
    at_t, orders_at_t = point_in_time
    db = sandbox.database("devonn-postgres")
    password = db_credentials(sandbox, db).password.get_secret_value()
    name = f"killed-recovery-{uuid.uuid4().hex[:8]}"
    script = ("import sys; from flows.pitr_recovery import pitr_recovery; pitr_recovery.with_options("
              "flow_run_name=sys.argv[1])(plan=sys.argv[2], database='devonn-postgres', target_time=sys.argv[3], "
              "promote=True)")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    first = subprocess.Popen([sys.executable, "-c", script, name, str(sandbox_plan_path), at_t.isoformat()],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with get_client(sync_client=True) as client:
            paused = wait_for(lambda: next((r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[name]))) if r.state and r.state.is_paused()), None),
                180, "the first recovery to restore and pause for approval", interval=0.5)
        target = PostgresArchive(sandbox, db)
        copy = next(target.markers.glob("devonn-postgres-recovery-*.json")).stem
        restored_pid = processes.running(target.work_dir, copy).pid
        assert_no_canary(sandbox, password, paused.id)

        second = pitr_recovery(plan=str(sandbox_plan_path), database="devonn-postgres", target_time=at_t.isoformat(),
                               promote=True, approve=True, return_state=True)
        assert second.is_failed()
        assert second.result(raise_on_failure=False).error.startswith(
            "another recovery of devonn-postgres is in progress (Prefect concurrency limit drplan-recovery-")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    with get_client(sync_client=True) as client:  # what the operator does once the other run is known dead
        client.update_global_concurrency_limit(lock_name(db), GlobalConcurrencyLimitUpdate(active_slots=0))
    try:
        with caplog.at_level(logging.DEBUG):
            report = pitr_recovery(plan=str(sandbox_plan_path), database="devonn-postgres",
                                   target_time=at_t.isoformat(), promote=True, approve=True)
        assert report.outcome == "promoted", report.markdown()
        actions = [s.action for s in report.steps]
        assert "found restored" in actions and "restored" not in actions
        assert processes.running(target.work_dir, copy).pid == restored_pid  # the same server: not restored again
        assert wait_for(lambda: stats(sandbox)["orders"] == orders_at_t, 15, "the app serving the rows at T")
        assert password not in logged_text(caplog)
        assert_no_canary(sandbox, password, paused.id)
    finally:
        roll_back(sandbox, sandbox.cluster("devonn-eks-sandbox"), "devonn-api")


def assert_no_canary(plan, password: str, flow_run_id) -> None:
    """The password is in no process's arguments, no flow run's parameters or logs, no plain container env."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert password.encode() not in cmdline.read_bytes(), f"password in the arguments of {cmdline.parent}"
        except OSError:
            continue  # the process ended meanwhile
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        assert password not in json.dumps([r.parameters for r in runs], default=str)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        assert password not in "\n".join(entry.message for entry in logs)
    cluster = plan.cluster("devonn-eks-sandbox")
    deployment = k8s.AppsV1Api(kube_client(plan, cluster)).read_namespaced_deployment("devonn-api", cluster.namespace)
    env = [e for c in deployment.spec.template.spec.containers for e in (c.env or [])]
    assert all(password not in (e.value or "") for e in env)
    assert next(e for e in env if e.name == "DATABASE_URL").value_from.secret_key_ref is not None


def test_cli_refuses_bad_input_in_one_line_before_anything_runs(sandbox, sandbox_plan_path):
    cases = {
        ("recover", "--to", "2026-11-26T03:00:00"): "has no time zone",
        ("recover", "--to", ""): "the target time is empty",
        ("recover", "--to", "2999-01-01T00:00:00Z"): "in the future",
        ("recover", "--to", "2020-01-01T00:00:00Z"): "outside the restorable window",
        ("failover", "--mode", "sideways"): "mode 'sideways' is not one of: multi-az, promote-replica",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, [args[0], "--plan", str(sandbox_plan_path), "--database", "devonn-postgres",
                                          *args[1:]])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.output  # the one line, nothing before it
    unknown = CliRunner().invoke(app, ["recover", "--plan", str(sandbox_plan_path), "--database", "nope", "--to",
                                       "latest"])
    assert unknown.exit_code == 2 and "nope" in unknown.stderr
    assert not list(PostgresArchive(sandbox, sandbox.database("devonn-postgres")).markers.glob("*recovery*"))


def test_cli_with_an_unreachable_aws_endpoint_says_so_in_one_line(plan_variant):
    closed = free_port()
    path = plan_variant(lambda d: d["aws"].update(endpoint_url=f"http://127.0.0.1:{closed}"))
    started = time.monotonic()
    result = CliRunner().invoke(app, ["recover", "--plan", str(path), "--database", "devonn-postgres", "--to",
                                      "latest"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: http://127.0.0.1:{closed} is unreachable; is the sandbox up? (drplan sandbox up)"], result.stderr
    assert time.monotonic() - started < 30  # at once, not after the ten attempts (a minute and a half) of a call


def test_cli_waits_for_approval_and_a_refusal_changes_nothing(sandbox, sandbox_plan_path, point_in_time):
    at_t, _ = point_in_time
    before = app_secret(sandbox)
    result = CliRunner().invoke(app, ["recover", "--plan", str(sandbox_plan_path), "--database", "devonn-postgres",
                                      "--to", at_t.isoformat(), "--promote"], input="n\nwrong target time\n")
    assert result.exit_code == 1, result.output
    assert "Approve PITR recovery of devonn-postgres?" in result.stderr
    assert "PITR recovery of devonn-postgres: refused" in result.stdout
    written = max(sandbox.resolve_path(sandbox.drill.report_dir).glob("pitr-recovery-devonn-postgres-*.json"),
                  key=lambda p: p.stat().st_mtime)
    report = json.loads(written.read_text())
    assert report["outcome"] == "refused: nothing changed"
    approval = next(s for s in report["steps"] if s["action"] == "approval")
    assert approval["detail"] == f"approve=False (by {getpass.getuser()} at the terminal) wrong target time"
    assert app_secret(sandbox) == before


def test_without_a_terminal_the_cli_waits_and_an_api_answer_ends_the_run(sandbox, sandbox_plan_path, point_in_time):
    """No terminal to answer on (stdin at EOF, as under cron or nohup): the CLI says where to approve and keeps
    waiting; the answer given through the API (here a refusal: nothing changes) ends the run and the command."""
    at_t, _ = point_in_time
    before = app_secret(sandbox)
    answered, started = {}, datetime.now(UTC)

    def answer_through_the_api() -> None:
        def paused_run():
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="recover-")))
            return next((r for r in runs if r.state and r.state.is_paused() and r.created > started), None)

        with get_client(sync_client=True) as client:
            paused = wait_for(paused_run, 180, "the paused recovery", interval=0.5)
        time.sleep(3)  # the CLI has met the end of its stdin by now, and goes on waiting
        answered["reply"] = resume_flow_run(paused.id, run_input={"approve": False, "reason": "answered by API"})

    threading.Thread(target=answer_through_the_api, daemon=True).start()
    result = CliRunner().invoke(app, ["recover", "--plan", str(sandbox_plan_path), "--database", "devonn-postgres",
                                      "--to", at_t.isoformat(), "--promote"], input="")
    assert result.exit_code == 1, result.output
    assert "waiting for the approval in the UI or through the API" in result.stderr
    assert "refused: nothing changed" in result.stdout and "answered by API" in result.stdout
    assert app_secret(sandbox) == before


def test_missing_app_deployment_is_refused_before_any_restore(sandbox, plan_variant):
    def renamed(data: dict) -> None:
        data["services"][0]["name"] = "devonn-api-gone"

    markers = PostgresArchive(sandbox, sandbox.database("devonn-postgres")).markers
    before = sorted(markers.glob("*.json")) if markers.is_dir() else []
    with pytest.raises(DrplanError) as refused:
        pitr_recovery(plan=str(plan_variant(renamed)), database="devonn-postgres", target_time="latest", promote=True)
    assert str(refused.value) == ("deployment devonn-api-gone in namespace default does not exist; "
                                  "check clusters[].deployments")
    assert (sorted(markers.glob("*.json")) if markers.is_dir() else []) == before


def test_approval_in_advance_does_not_cover_a_copy_failing_its_checks(sandbox, plan_variant, point_in_time):
    """Only the row count may differ from the damaged source; any other failed check stops a pre-approved cutover."""
    at_t, _ = point_in_time

    def unknown_table(data: dict) -> None:  # neither the source nor the copy has it: its checks cannot pass
        data["databases"][0]["integrity"]["tables"].append("no_such_table")

    before = app_secret(sandbox)
    state = pitr_recovery(plan=str(plan_variant(unknown_table)), database="devonn-postgres",
                          target_time=at_t.isoformat(), promote=True, approve=True, return_state=True)
    assert state.is_failed()
    report = state.result(raise_on_failure=False)
    assert "did not pass no_such_table: " in report.error and "approval in advance (--yes)" in report.error
    assert "cut over" not in [s.action for s in report.steps]
    assert app_secret(sandbox) == before
