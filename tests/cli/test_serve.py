"""The Prefect platform surface against a real `prefect server start` with API auth, started by `drplan serve`
(cli/serve.py) into a temp dir: prefect.yaml deployed against a test plan, REST-triggered runs executed by the
process worker, a paused run approved through the REST resume endpoint, automations notifying the local webhook
receiver, 401 without credentials, `drplan trigger`, `drplan serve` idempotent and leaving no process behind.

The server's scheduler is off (runs happen only when a test asks) and the worker polls every second. The test plan
points at free loopback ports where nothing listens, so prefect.yaml's own flows fail fast and touch nothing.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
import yaml
from prefect.client.orchestration import get_client
from prefect.flows import load_flow_from_entrypoint
from rich.console import Console
from typer.testing import CliRunner

from cli import platform as cli_platform
from cli import serve
from deployments import automations, receiver
from drplan import processes
from drplan.plan import load_plan
from tests.conftest import sandbox_plan_data
from tests.helpers import REPO, free_port, processes_with_env, wait_for

DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
PROBE = "probe"  # deployment name of the flows in tests/cli/platform_flows.py


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serve.Platform]:
    directory = tmp_path_factory.mktemp("platform")
    plan_path = directory / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(sandbox_plan_data(directory), sort_keys=False))
    plan = load_plan(plan_path)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("DRPLAN_SANDBOX_DIR", raising=False)
        env.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED", "false")
        env.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
        try:
            platform = serve.up(str(plan_path), Console(quiet=True), port=free_port())
            with platform.client_settings():
                deploy_probes()
            yield platform
        finally:
            serve.down(plan)
            directory = serve.platform_of(plan).directory
            leftovers = [n for n in processes.tracked_names(directory) if processes.running(directory, n)]
            leftovers += processes_with_env("PREFECT_HOME", str(serve.platform_of(plan).home))  # flow runs too
            assert not leftovers, f"processes left running: {leftovers}"


def deploy_probes() -> None:
    from prefect import Flow

    for name, tags in (("approval_probe", [automations.RECOVERY_TAG]), ("breach_probe", [])):
        Flow.from_source(source=str(REPO), entrypoint=f"tests/cli/platform_flows.py:{name}").deploy(
            PROBE, work_pool_name=serve.POOL, tags=tags, print_next_steps=False, ignore_warnings=True)


@pytest.fixture
def api(platform: serve.Platform) -> Iterator[httpx.Client]:
    user, _, password = platform.auth().partition(":")
    with RetryingClient(base_url=platform.api_url(), auth=(user, password), timeout=10) as client:
        yield client


class RetryingClient(httpx.Client):
    """Retries 429/502/503 with backoff, as Prefect's own client does (the server answers 503 while its SQLite
    database is busy) and as any script against the REST API should."""

    RETRY_STATUSES = frozenset({429, 502, 503})

    def send(self, request: httpx.Request, **kwargs) -> httpx.Response:
        for attempt in range(5):
            response = super().send(request, **kwargs)
            if response.status_code not in self.RETRY_STATUSES:
                return response
            response.close()
            time.sleep(0.5 * 2 ** attempt)
        return super().send(request, **kwargs)


def run_deployment(api: httpx.Client, name: str, parameters: dict | None = None) -> str:
    """What an SRE's script does: look the deployment up, create a run with parameters. Returns the run id."""
    found = api.get(f"/deployments/name/{name}")
    assert found.status_code == 200, found.text
    created = api.post(f"/deployments/{found.json()['id']}/create_flow_run", json={"parameters": parameters or {}})
    assert created.status_code == 201, created.text
    return created.json()["id"]


def wait_for_state(api: httpx.Client, run_id: str, types: set[str], timeout: float = 90) -> dict:
    def state() -> dict | None:
        current = api.get(f"/flow_runs/{run_id}").json()["state"]
        return current if current and current["type"] in types else None
    return wait_for(state, timeout, f"flow run {run_id} to reach {types}", interval=0.5)


def notification(platform: serve.Platform, *fragments: str, timeout: float = 60) -> str:
    def find() -> str | None:
        texts = [r["text"] for r in receiver.received(platform.notifications)]
        return next((t for t in texts if all(f in t for f in fragments)), None)
    return wait_for(find, timeout, f"a notification containing {fragments}", interval=0.5)


def test_requests_without_credentials_are_refused(platform: serve.Platform) -> None:
    url = f"{platform.api_url()}/deployments/name/rpo-verification/rpo-verification"
    wrong = base64.b64encode(b"admin:wrong").decode()
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    assert httpx.get(url, auth=tuple(platform.auth().split(":", 1))).status_code == 200
    assert httpx.get(f"{platform.api_url()}/health").status_code == 200  # liveness stays open for probes
    assert platform.auth_file.stat().st_mode & 0o777 == 0o600
    secret = platform.auth().encode()
    in_args = [p.name for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, secret)]
    assert not in_args, f"the auth string is on the command line of processes {in_args}"


def _cmdline_has(proc: Path, secret: bytes) -> bool:
    try:
        return secret in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_prefect_yaml_is_deployed_against_the_plan(platform: serve.Platform, api: httpx.Client) -> None:
    plan_path = str(platform.directory.parent / "plan.yaml")
    for spec in DEPLOYMENTS:
        flow_name = load_flow_from_entrypoint(str(REPO / spec["entrypoint"])).name
        deployed = api.get(f"/deployments/name/{flow_name}/{spec['name']}").json()
        assert deployed["parameters"] == {"plan": plan_path}, spec["name"]
        assert deployed["enforce_parameter_schema"] is True
        assert deployed["work_pool_name"] == serve.POOL
        assert [s["schedule"]["cron"] for s in deployed["schedules"]] == [s["cron"] for s in spec.get("schedules", [])]
        if "concurrency_limit" not in spec:  # the recovery flows lock per database instead (flows/shared/gates.py)
            assert deployed["global_concurrency_limit"] is None, spec["name"]
            continue
        assert deployed["global_concurrency_limit"]["limit"] == spec["concurrency_limit"]["limit"]
        assert deployed["concurrency_options"]["collision_strategy"] == spec["concurrency_limit"]["collision_strategy"]


def test_a_prefect_yaml_flow_runs_on_the_worker_with_the_plan(platform: serve.Platform, api: httpx.Client) -> None:
    run_id = run_deployment(api, "rpo-verification/rpo-verification")
    state = wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"})
    assert state["type"] == "FAILED"  # the plan's AWS endpoint is a closed port: the preflight says so
    assert "unreachable" in state["message"], state["message"]


def test_failed_restore_drill_notifies_the_channel(platform: serve.Platform, api: httpx.Client) -> None:
    run_id = run_deployment(api, "restore-drill/restore-drill")
    assert wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"})["type"] == "FAILED"
    assert "unreachable" in notification(platform, "restore drill Failed", run_id)


def test_unready_dr_region_notifies_the_channel(platform: serve.Platform, api: httpx.Client) -> None:
    run_id = run_deployment(api, "dr-readiness/dr-readiness")  # the plan's AWS is unreachable: nothing is ready
    assert wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"})["type"] == "FAILED"
    text = notification(platform, "drplan: region us-west-2 not ready to take over")
    assert "AWS credentials: " in text and "devonn-api: cluster capacity: " in text


def test_paused_recovery_is_announced_and_approved_through_rest(platform: serve.Platform, api: httpx.Client) -> None:
    run_id = run_deployment(api, f"platform-approval-probe/{PROBE}", {"change": "fail over devonn-postgres"})
    wait_for_state(api, run_id, {"PAUSED"})
    announced = notification(platform, "recovery platform-approval-probe Paused", run_id)
    assert "fail over devonn-postgres" in announced

    refused = api.post(f"/flow_runs/{run_id}/resume", json={"run_input": {"approve": "maybe"}}).json()
    assert refused["status"] == "REJECT", refused  # the input is validated against the RunInput schema
    accepted = api.post(f"/flow_runs/{run_id}/resume",
                        json={"run_input": {"approve": True, "reason": "sre-on-call: checked the plan"}}).json()
    assert accepted["status"] == "ACCEPT", accepted
    assert wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"})["type"] == "COMPLETED"


def test_a_server_restart_keeps_a_paused_recovery_and_its_lock(platform: serve.Platform, api: httpx.Client) -> None:
    """The Prefect server restarts while a recovery holds its database's lock and waits for approval: the lock is
    still held afterwards (its lease is on disk, not in the old server's memory), the approval given to the new
    server completes the run, and the lock is free again."""
    def active_slots() -> int:
        return api.get("/v2/concurrency_limits/drplan-recovery-probe-db").json()["active_slots"]

    run_id = run_deployment(api, f"platform-approval-probe/{PROBE}", {"change": "restart", "database": "probe-db"})
    wait_for_state(api, run_id, {"PAUSED"})
    assert active_slots() == 1
    assert processes.stop(platform.directory, serve.SERVER)
    serve.start_server(platform, None, Console(quiet=True))  # the same port and database
    assert active_slots() == 1
    accepted = api.post(f"/flow_runs/{run_id}/resume", json={"run_input": {"approve": True, "reason": "restarted"}})
    assert accepted.json()["status"] == "ACCEPT", accepted.text
    assert wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"})["type"] == "COMPLETED"
    assert active_slots() == 0


def test_rpo_breach_event_notifies_the_channel(platform: serve.Platform, api: httpx.Client) -> None:
    resource = f"db-{uuid.uuid4().hex[:8]}"
    run_id = run_deployment(api, f"platform-breach-probe/{PROBE}", {"resource": resource, "age_s": 900})
    assert wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"})["type"] == "COMPLETED"
    text = notification(platform, f"RPO breached: {resource}")
    assert "primary newest heartbeat: age 900.0 s, objective 300.0 s" in text


def test_trigger_command(platform: serve.Platform) -> None:
    app = typer.Typer()
    app.command()(cli_platform.trigger)
    runner = CliRunner()
    with platform.client_settings():
        ok = runner.invoke(app, [f"platform-breach-probe/{PROBE}", "--param", "age_s=30", "--wait"])
        bad_type = runner.invoke(app, [f"platform-breach-probe/{PROBE}", "--param", "age_s=soon"])
        unknown = runner.invoke(app, [f"platform-breach-probe/{PROBE}", "--param", "colour=red"])
        missing = runner.invoke(app, ["platform-breach-probe/nope"])
    assert ok.exit_code == 0, ok.output
    assert "Completed" in ok.output
    assert bad_type.exit_code == 2 and "not valid JSON" in bad_type.output
    assert unknown.exit_code == 2 and "takes resource, age_s" in unknown.output
    assert missing.exit_code == 2 and "no deployment" in missing.output


def test_an_alarm_starts_its_runbook_once_and_it_waits_for_approval(platform: serve.Platform, api: httpx.Client,
                                                                    tmp_path: Path) -> None:
    """CloudWatch alarm in ALARM (moto) -> alarm-watch on the worker emits drplan.alarm.firing -> the automation runs
    the mapped deployment (here the approval probe, standing in for db-failover) with first_alarm -> it waits for
    approval -> approved -> done. The alarm still firing at the next watch (flapping) starts no second run."""
    import boto3

    from sandbox.launchers import moto

    alarm = f"primary-unavailable-{uuid.uuid4().hex[:6]}"
    with moto(tmp_path) as endpoint:
        cloudwatch = boto3.client("cloudwatch", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id="sandbox", aws_secret_access_key="sandbox")
        cloudwatch.put_metric_alarm(AlarmName=alarm, MetricName="DatabaseConnections", Namespace="AWS/RDS",
                                    Statistic="Maximum", Period=60, EvaluationPeriods=1, Threshold=1,
                                    ComparisonOperator="LessThanThreshold")
        cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="ALARM", StateReason="no connections for 1 minute")
        since = cloudwatch.describe_alarms(AlarmNames=[alarm])["MetricAlarms"][0]["StateUpdatedTimestamp"]
        data = yaml.safe_load((platform.directory.parent / "plan.yaml").read_text())
        data["aws"]["endpoint_url"] = endpoint
        data["alarms"] = [{"alarm": alarm, "runbook": "db-failover", "deployment": f"platform-approval-probe/{PROBE}",
                           "parameters": {"change": "fail over devonn-rds"}}]
        variant = tmp_path / "alarm-plan.yaml"
        variant.write_text(yaml.safe_dump(data))
        with platform.client_settings():
            assert automations.ensure_alarm_runbooks(load_plan(variant)) == [
                f"created automation '{automations.ALARM_PREFIX}{alarm} -> platform-approval-probe/{PROBE}'"]

        def probe_runs() -> list[dict]:
            runs = api.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["platform-approval-probe"]}}}).json()
            return [r for r in runs if r["parameters"].get("change") == "fail over devonn-rds"]

        for _ in range(2):  # the second watch sees the alarm still firing
            watch = run_deployment(api, "alarm-watch/alarm-watch", {"plan": str(variant)})
            assert wait_for_state(api, watch, {"COMPLETED", "FAILED", "CRASHED"})["type"] == "COMPLETED"
            (run,) = wait_for(probe_runs, 60, "the alarm's runbook run")
        run_id = run["id"]
        wait_for_state(api, run_id, {"PAUSED"})
        assert run["parameters"]["first_alarm"] == since.isoformat()
        accepted = api.post(f"/flow_runs/{run_id}/resume",
                            json={"run_input": {"approve": True, "reason": "on call: primary is down"}}).json()
        assert accepted["status"] == "ACCEPT", accepted
        assert wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"})["type"] == "COMPLETED"
        time.sleep(3)  # room for a second automation firing to show up
        assert len(probe_runs()) == 1


def test_serve_again_changes_nothing(platform: serve.Platform, api: httpx.Client) -> None:
    pids = {name: processes.running(platform.directory, name).pid
            for name in (serve.SERVER, serve.WORKER, serve.RECEIVER)}
    deployments = sorted(d["name"] for d in api.post("/deployments/filter", json={}).json())
    with platform.client_settings(), get_client(sync_client=True) as client:  # a duplicate, as if made by hand
        client.create_automation(automations.automations(automations.find_notification_block("dr-response").id)[0])
    serve.up(str(platform.directory.parent / "plan.yaml"), Console(quiet=True))
    assert {name: processes.running(platform.directory, name).pid for name in pids} == pids
    assert sorted(d["name"] for d in api.post("/deployments/filter", json={}).json()) == deployments
    names = sorted(a["name"] for a in api.post("/automations/filter", json={}).json())
    assert names == sorted(a.name for a in automations.automations(uuid.uuid4()))
    blocks = [b for b in api.post("/block_documents/filter", json={}).json() if b["name"] == "dr-response"]
    assert len(blocks) == 1


def test_the_auth_string_stays_out_of_logs_and_this_process(platform: serve.Platform) -> None:
    logs = "".join(p.read_text(errors="replace") for p in (platform.directory / "logs").glob("*.log"))
    assert platform.auth().split(":", 1)[1] not in logs
    assert "PREFECT_SERVER_API_AUTH_STRING" not in os.environ and "PREFECT_API_AUTH_STRING" not in os.environ


def test_sandbox_status_shows_and_sandbox_down_stops_serve(platform: serve.Platform) -> None:
    """Last in this module: it stops the platform. While `drplan serve` runs, `sandbox status` lists its processes;
    `sandbox down` stops them too (and every flow run process of its worker)."""
    from cli.main import app

    plan_path = platform.directory.parent / "plan.yaml"
    rows = {c.name: c for c in serve.status(load_plan(plan_path))}
    assert set(rows) == {serve.SERVER, serve.WORKER, serve.RECEIVER}
    assert all(c.healthy and c.pid for c in rows.values()), rows
    shown = CliRunner().invoke(app, ["sandbox", "status", "--plan", str(plan_path)])
    assert serve.WORKER in shown.stdout
    down = CliRunner().invoke(app, ["sandbox", "down", "--plan", str(plan_path)])
    assert down.exit_code == 0, down.output
    assert {f"stopped {name}" for name in rows} <= set(down.stdout.splitlines())
    assert serve.status(load_plan(plan_path)) == []
    assert not processes_with_env("PREFECT_HOME", str(platform.home))
