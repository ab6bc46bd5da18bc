"""`drplan config-restore` on the sandbox: the bad-config scenario recovered by the command it prints (the app's
endpoint checked directly), the Secret diff by key name only (a canary value never shown), a dry run that changes
nothing, bad input refused in one line."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from kubernetes import client as k8s

from sandbox.demo_app import ORDERS_TABLE
from sandbox.disasters import WRONG_ORDERS_TABLE
from tests.flows.test_rollback import APP, CONFIG, assert_no_canary, broken, drplan, kube, report_of, served

__all__ = ["kube"]  # the fixture, shared with the rollback tests
CANARY = "canary-value-7f3a"


@pytest.mark.usefixtures("prefect_server", "fresh_configuration_backup")
def test_bad_config_recovers_with_the_printed_restore(sandbox, sandbox_plan_path, kube):
    api, namespace = kube
    core = k8s.CoreV1Api(api)
    what, command = broken(drplan("sandbox", "break", "bad-config", "--plan", str(sandbox_plan_path)))
    assert what.startswith(f"set {ORDERS_TABLE} in ConfigMap {CONFIG} of {APP} to {WRONG_ORDERS_TABLE} (was orders)")
    assert command[:5] == ["config-restore", "--plan", str(sandbox_plan_path), "--service", APP]
    assert served(sandbox, "/health").status_code == 200
    assert served(sandbox, "/api/stats").status_code == 503
    core.patch_namespaced_secret("devonn-api-db", namespace, {"data": {"EXTRA": base64.b64encode(
        CANARY.encode()).decode()}})
    try:
        planned = drplan(*command, "--dry-run")
        assert planned.exit_code == 0, planned.output
        text = " ".join(planned.stdout.split())
        assert "planned (dry run)" in text and f"ConfigMap {CONFIG} keys {ORDERS_TABLE}" in text
        assert "Secret devonn-api-db: keys added EXTRA since the backup" in text and CANARY not in planned.output
        assert core.read_namespaced_config_map(CONFIG, namespace).data[ORDERS_TABLE] == WRONG_ORDERS_TABLE
        assert served(sandbox, "/api/stats").status_code == 503

        done = drplan(*command, "--yes")
        assert done.exit_code == 0, done.output
        assert core.read_namespaced_config_map(CONFIG, namespace).data[ORDERS_TABLE] == "orders"
        stats = served(sandbox, "/api/stats")
        assert stats.status_code == 200 and "orders" in stats.json()
        report = Path(report_of(done))
        assert CANARY not in report.read_text() and CANARY not in report.with_suffix(".json").read_text()
        assert json.loads(report.with_suffix(".json").read_text())["outcome"] == "recovered"
        assert_no_canary(sandbox, str(report), f"config-restore-{APP}-%")
    finally:
        core.patch_namespaced_secret("devonn-api-db", namespace, {"data": {"EXTRA": None}})


def test_bad_input_is_refused_in_one_line_and_changes_nothing(sandbox, sandbox_plan_path, kube):
    api, namespace = kube
    before = k8s.AppsV1Api(api).read_namespaced_deployment(APP, namespace).metadata.resource_version
    cases = {
        ("--service", "devonn-pay", "--to", "2026-01-01T00:00:00Z"): "error: unknown service 'devonn-pay'",
        ("--service", APP, "--to", "2020-01-01T00:00:00Z"):
            "error: no configuration backup of cluster devonn-eks-sandbox at or before 2020-01-01T00:00:00Z",
        ("--service", APP, "--to", "2026-01-01T00:00:00"): "error: --to: '2026-01-01T00:00:00' has no time zone",
        ("--service", APP, "--to", "2999-01-01T00:00:00Z"): "error: --to 2999-01-01T00:00:00Z is in the future",
    }
    for args, message in cases.items():
        refused = drplan("config-restore", "--plan", str(sandbox_plan_path), *args, "--yes")
        assert refused.exit_code == 2, refused.output
        assert refused.stderr.strip().startswith(message), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert k8s.AppsV1Api(api).read_namespaced_deployment(APP, namespace).metadata.resource_version == before
