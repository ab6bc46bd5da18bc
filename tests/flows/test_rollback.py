"""`drplan rollback` on the sandbox: the bad-deploy scenario recovered by the command it prints (checked through the
app and the Deployment), a dry run that changes nothing, a validation failure that undoes the run's own change,
bad input refused in one line, and no secret value in the reports or logs."""

from __future__ import annotations

import base64
import json
import shlex
from pathlib import Path

import httpx
import pytest
from kubernetes import client as k8s
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId
from typer.testing import CliRunner

from cli.main import app
from drplan.clients import kube_client
from drplan.timeutil import utcnow
from flows.config_backup import export_configuration
from flows.shared.gates import service_lock
from sandbox.demo_app import ORDERS_TABLE
from tasks.k8s import availability, wait_deployment_available
from tasks.revisions import (
    KNOWN_GOOD,
    PendingUndo,
    apply_revision,
    known_good,
    live_revision,
    pending_undo,
    set_pending_undo,
)
from tests.helpers import wait_for

APP, CLUSTER, CONFIG = "devonn-api", "devonn-eks-sandbox", "devonn-api-config"


def drplan(*args: str):
    return CliRunner().invoke(app, list(args))


def broken(result) -> tuple[str, list[str]]:
    """(the `broken:` line, the printed recovery command as arguments without `drplan`)."""
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    command = shlex.split(lines["recover"])
    assert command[0] == "drplan"
    return lines["broken"], command[1:]


@pytest.fixture
def kube(sandbox):
    """(api client, namespace); the app's revision and known-good history as they were are put back afterwards."""
    cluster = sandbox.cluster(CLUSTER)
    api = kube_client(sandbox, cluster)
    before = live_revision(api, cluster.namespace, APP)
    history = k8s.AppsV1Api(api).read_namespaced_deployment(APP, cluster.namespace).metadata.annotations[KNOWN_GOOD]
    yield api, cluster.namespace
    apply_revision(api, cluster.namespace, APP, before)
    k8s.AppsV1Api(api).patch_namespaced_deployment(APP, cluster.namespace, {"metadata": {"annotations": {
        KNOWN_GOOD: history}}})
    wait_deployment_available(api, cluster.namespace, APP, timeout=120)


def deployment(api, namespace: str):
    return k8s.AppsV1Api(api).read_namespaced_deployment(APP, namespace)


def served(plan, path: str) -> httpx.Response:
    """A direct request to the app through its load balancer (the plan's health URL address)."""
    service = next(s for s in plan.services if s.name == APP)
    return httpx.get(httpx.URL(service.health).join(path), timeout=5)


def sandbox_secrets(plan) -> list[str]:
    """The sandbox's secret values (database password, API token) as written and as Kubernetes stores them."""
    values = json.loads((plan.state_dir() / "secrets.json").read_text())
    raw = [values["db_password"], values["api_token"]]
    return raw + [base64.b64encode(v.encode()).decode() for v in raw]


def assert_no_canary(plan, report_path: str, run_name_prefix: str) -> None:
    """No secret value in the report (markdown, JSON), nor in the logs and parameters of the CLI's flow runs."""
    texts = [Path(report_path).read_text(), Path(report_path).with_suffix(".json").read_text()]
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=run_name_prefix)))]
        assert runs
        for run in runs:
            texts.append(json.dumps(run.parameters, default=str))
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            texts.append("\n".join(entry.message for entry in logs))
    for value in sandbox_secrets(plan):
        assert all(value not in text for text in texts)


def report_of(result) -> str:
    return next(line.removeprefix("report: ") for line in result.stderr.splitlines() if line.startswith("report: "))


@pytest.mark.usefixtures("prefect_server")
def test_bad_deploy_recovers_with_the_printed_rollback(sandbox, sandbox_plan_path, kube):
    api, namespace = kube
    good = known_good(api, namespace, APP)
    assert good, "sandbox up's configuration backup records the validated app as known-good"
    what, command = broken(drplan("sandbox", "break", "bad-deploy", "--plan", str(sandbox_plan_path)))
    assert what.startswith(f"deployed registry.example/devonn/devonn-api:broken to {APP} (was ")
    assert command == ["rollback", "--plan", str(sandbox_plan_path), "--service", APP]
    wait_for(lambda: "broken build" in availability(deployment(api, namespace))[1], 30, "the rollout to stall")
    export_configuration(sandbox)  # a backup meanwhile: the stalled release (old pods serving) is not known-good
    assert known_good(api, namespace, APP)[-1].revision == good[-1].revision
    stalled = deployment(api, namespace).metadata.resource_version

    planned = drplan(*command, "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert "planned (dry run)" in planned.stdout and "image registry.example/devonn/devonn-api:broken -> " in \
        " ".join(planned.stdout.split())
    assert deployment(api, namespace).metadata.resource_version == stalled

    done = drplan(*command, "--yes")
    assert done.exit_code == 0, done.output
    after = deployment(api, namespace)
    assert [c.image for c in after.spec.template.spec.containers] == good[-1].images
    assert availability(after)[0], availability(after)[1]
    assert served(sandbox, "/health").status_code == 200
    stats = served(sandbox, "/api/stats")
    assert stats.status_code == 200 and "users" in stats.json()
    steps = json.loads(Path(report_of(done)).with_suffix(".json").read_text())["steps"]
    assert [s["action"] for s in steps][-2:] == ["changed", "known-good already"]  # the newest, as it was
    assert_no_canary(sandbox, report_of(done), f"rollback-{APP}-%")

    again = drplan(*command, "--yes")  # at the revision already: nothing to change, validated
    assert again.exit_code == 0 and "it runs the target already" in " ".join(again.stdout.split()), again.output
    export_configuration(sandbox)  # the newest backup holds the recovered app again (for restores to later times)
    assert known_good(api, namespace, APP)[-1].revision == good[-1].revision


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("killed", [False, True], ids=["in-one-run", "rerun-after-a-kill"])
def test_failed_validation_undoes_the_rollback(sandbox, sandbox_plan_path, kube, killed):
    """A known-good revision whose ConfigMap names a table that is gone: validation fails, the run's own change is
    undone, the app serves again. Killed after its change (the bad revision applied, its undo on the Deployment),
    the rerun finds the service at the target and still undoes to where it was before the killed run."""
    api, namespace = kube
    history = known_good(api, namespace, APP)
    bad = history[-1].model_copy(update={"revision": history[-1].revision + 1, "configmaps": {
        CONFIG: {ORDERS_TABLE: "orders_dropped"}}})
    k8s.AppsV1Api(api).patch_namespaced_deployment(APP, namespace, {"metadata": {"annotations": {KNOWN_GOOD: json.dumps(
        [r.model_dump(mode="json") for r in [*history, bad]])}}})
    if killed:
        set_pending_undo(api, namespace, APP, PendingUndo(revision=live_revision(api, namespace, APP), by="rollback",
                                                          started_at=utcnow()))
        apply_revision(api, namespace, APP, bad)
    failed = drplan("rollback", "--plan", str(sandbox_plan_path), "--service", APP, "--to-revision",
                    str(bad.revision), "--yes")
    assert failed.exit_code == 1, failed.output
    report = json.loads(Path(report_of(failed)).with_suffix(".json").read_text())
    assert report["outcome"] == "validation failed: rolled back", report
    actions = [s["action"] for s in report["steps"]]
    if killed:
        assert "an unfinished rollback of " in next(s["detail"] for s in report["steps"] if s["action"] == "found")
        assert actions[-2:] == ["found", "rolled back"] and "changed" not in actions
    else:
        assert actions[-2:] == ["changed", "rolled back"]
    assert pending_undo(api, namespace, APP) is None
    assert report["steps"][-1]["detail"].startswith("validation failed (GET /api/stats): ConfigMap devonn-api-config")
    assert not report["error"]
    config = k8s.CoreV1Api(api).read_namespaced_config_map(CONFIG, namespace)
    assert config.data[ORDERS_TABLE] == "orders"
    wait_deployment_available(api, namespace, APP, timeout=60)
    assert wait_for(lambda: served(sandbox, "/api/stats").status_code == 200, 15, "the app serving its stats again")


@pytest.mark.usefixtures("prefect_server")
def test_a_second_change_of_the_service_is_refused(sandbox, sandbox_plan_path, kube):
    api, namespace = kube
    before = deployment(api, namespace).metadata.resource_version
    with service_lock(APP):
        result = drplan("rollback", "--plan", str(sandbox_plan_path), "--service", APP, "--to-revision", "1", "--yes")
    assert result.exit_code != 0 and "another change of service devonn-api is in progress" in result.output
    assert deployment(api, namespace).metadata.resource_version == before


def test_bad_input_is_refused_in_one_line_and_changes_nothing(sandbox, sandbox_plan_path, kube):
    api, namespace = kube
    before = deployment(api, namespace).metadata.resource_version
    newest = known_good(api, namespace, APP)[-1].revision
    cases = {
        ("--service", "devonn-pay"): "error: unknown service 'devonn-pay'; the plan defines: devonn-api, devonn-worker",
        ("--service", APP, "--to-revision", "999"): f"error: deployment {APP} has no known-good revision 999; it keeps",
        ("--service", APP, "--to-revision", "0"): "error: --to-revision 0: revisions count from 1",
    }
    for args, message in cases.items():
        refused = drplan("rollback", "--plan", str(sandbox_plan_path), *args, "--yes")
        assert refused.exit_code == 2, refused.output
        assert refused.stderr.strip().startswith(message) and len(refused.stderr.strip().splitlines()) == 1
    assert deployment(api, namespace).metadata.resource_version == before
    assert known_good(api, namespace, APP)[-1].revision == newest
