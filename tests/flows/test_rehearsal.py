"""The cross-region rehearsal on the sandbox: the stack from scratch in a new namespace of the DR cluster against
copies of the DR replicas, validated through its own load balancer, and nothing left afterwards (namespace, copies,
app processes), what a killed rehearsal had left removed first; a broken manifest (an image that never becomes
ready) fails it naming the deployment, and still leaves nothing behind. The pilot-light DR app is untouched
throughout."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta

import pytest
from kubernetes.client import AppsV1Api, CoreV1Api

from drplan import processes
from drplan.clients import aws_client, db_credentials, kube_client
from drplan.results import Status
from drplan.timeutil import utcnow
from flows.rehearsal import NAMESPACE_LABEL, dr_rehearsal
from sandbox import stack
from tasks.clones import clone_dr_replica
from tasks.namespaces import create_namespace, delete_namespace
from tasks.targets import copy_stamp, scratch_name
from tests.helpers import REPO, wait_for

DR_CLUSTER = "devonn-eks-dr-sandbox"


def leftovers(plan, sandbox_dir) -> dict:
    """What a rehearsal could leave: the DR cluster's namespaces and app processes, RDS instances in the DR
    region, servers in the drill work directory."""
    cluster = plan.cluster(DR_CLUSTER)
    pods = sandbox_dir / stack.kubelet_of(cluster)
    work = plan.resolve_path(plan.drill.work_dir)
    return {
        "namespaces": sorted(n.metadata.name for n in CoreV1Api(kube_client(plan, cluster)).list_namespace().items),
        "pods": sorted(n for n in processes.tracked_names(pods) if processes.running(pods, n)) if pods.is_dir() else [],
        "rds": sorted(i["DBInstanceIdentifier"] for i in aws_client(plan, "rds", plan.aws.dr_region)
                      .describe_db_instances()["DBInstances"]),
        "servers": sorted(n for n in processes.tracked_names(work) if processes.running(work, n))
        if work.is_dir() else [],
    }


def nothing_new(now: dict, before: dict) -> bool:
    """Nothing is there that was not before (what earlier tests were still removing may have gone meanwhile)."""
    return all(set(now[kind]) <= set(before[kind]) for kind in now)


def pilot_light(plan) -> dict[str, tuple]:
    """The DR cluster's own Deployments as specified (replicas, images, generation): what a rehearsal, in a namespace
    of its own, must leave alone. Not the DR app's answer, which follows what earlier tests of the session scaled."""
    cluster = plan.cluster(DR_CLUSTER)
    deployments = AppsV1Api(kube_client(plan, cluster)).list_namespaced_deployment(cluster.namespace).items
    return {d.metadata.name: (d.spec.replicas, [c.image for c in d.spec.template.spec.containers],
                              d.metadata.generation) for d in deployments}


def killed_rehearsal(plan, made: datetime) -> list[str]:
    """What a rehearsal killed at `made` leaves: its namespace in the DR cluster (with a Secret) and its copy of
    devonn-postgres, running; as the next rehearsal names them when it removes them."""
    api = kube_client(plan, plan.cluster(DR_CLUSTER))
    namespace = f"drplan-rehearsal-{copy_stamp(made)}"
    create_namespace(api, namespace, {NAMESPACE_LABEL: "true"})
    CoreV1Api(api).create_namespaced_secret(namespace, {"metadata": {"name": "devonn-api-db"}, "data": {}})
    db = plan.database("devonn-postgres")
    copy = scratch_name(db, made, "rehearsal")
    clone_dr_replica.fn(plan, db, copy, db_credentials(plan, db))
    return [f"namespace {namespace} in {DR_CLUSTER}", f"copy {copy}"]


@pytest.mark.usefixtures("prefect_server")
def test_rehearsal_removes_what_a_killed_one_left_brings_the_stack_up_in_the_dr_region_and_leaves_nothing(
        sandbox, sandbox_plan_path, sandbox_dir):
    left = killed_rehearsal(sandbox, utcnow() - sandbox.drill.sweep_after - timedelta(minutes=1))
    api = kube_client(sandbox, sandbox.cluster(DR_CLUSTER))
    running = f"drplan-rehearsal-{copy_stamp(utcnow() - timedelta(minutes=1))}"  # a rehearsal still running: kept
    create_namespace(api, running, {NAMESPACE_LABEL: "true"})
    try:
        before, idle = leftovers(sandbox, sandbox_dir), pilot_light(sandbox)
        report = dr_rehearsal(plan=str(sandbox_plan_path))
        assert report.swept == left
        assert running in leftovers(sandbox, sandbox_dir)["namespaces"]
    finally:
        delete_namespace(api, running, 60)
    assert report.status is Status.passed, report.markdown()
    assert f"- removed, left by an earlier rehearsal: {left[1]}" in report.markdown()
    assert not any(left[1] in name for name in leftovers(sandbox, sandbox_dir)["servers"])
    assert not (sandbox.resolve_path(sandbox.drill.work_dir) / "postgres" / left[1].split()[-1]).exists()
    assert set(report.copies) == {"devonn-postgres", "devonn-rds"}
    assert all("-rehearsal-" in name for name in report.copies.values())
    names = {c.name for c in report.checks}
    assert {"devonn-api: health", "devonn-api: database", "devonn-api: GET /api/me with token",
            "devonn-api: GET /api/me without token", "devonn-worker: GET /api/stats"} <= names
    assert all(c.passed for c in report.checks) and report.rto.met and not report.findings
    assert set(report.load_balancers) == {"devonn-api", "devonn-worker"}
    assert f"{DR_CLUSTER}: namespace {report.namespace}" in report.teardown
    assert {f"copy {name}" for name in report.copies.values()} <= set(report.teardown)
    assert report.summary.endswith("torn down")
    wait_for(lambda: nothing_new(leftovers(sandbox, sandbox_dir), before), 30, "nothing left behind")
    assert pilot_light(sandbox) == idle


@pytest.mark.usefixtures("prefect_server")
def test_broken_manifest_fails_the_rehearsal_naming_it_and_leaves_nothing(sandbox, sandbox_dir, plan_variant,
                                                                          tmp_path):
    manifests = tmp_path / "manifests"
    shutil.copytree(REPO / "kubernetes" / "manifests", manifests)
    api = manifests / "devonn-api.yaml"
    api.write_text(api.read_text().replace("devonn-api:1.0", "devonn-api:broken"))

    def broken_dr_manifests(data: dict) -> None:
        next(c for c in data["clusters"] if c["name"] == DR_CLUSTER)["manifests"] = str(manifests)

    before = leftovers(sandbox, sandbox_dir)
    state = dr_rehearsal(plan=str(plan_variant(broken_dr_manifests)), timeout=15, return_state=True)
    assert state.is_failed()
    report = state.result(raise_on_failure=False)
    assert report.status is Status.failed and not report.error and not report.teardown_error, report.markdown()
    [finding] = report.findings
    assert finding.startswith(f"deployment devonn-api in namespace {report.namespace} not available after 15s: ")
    assert "ProgressDeadlineExceeded: " in finding and "devonn-api:broken is the sandbox's broken build" in finding
    assert f"**finding**: {finding}" in report.markdown() and finding in state.message
    assert f"{DR_CLUSTER}: namespace {report.namespace}" in report.teardown
    wait_for(lambda: nothing_new(leftovers(sandbox, sandbox_dir), before), 30, "nothing left behind")


def test_report_status_and_summary_without_the_sandbox():
    from datetime import timedelta

    from drplan.drill_report import Measured
    from drplan.results import CheckResult
    from drplan.timeutil import utcnow
    from flows.rehearsal import RehearsalReport

    report = RehearsalReport(plan="p", region="us-west-2", started_at=utcnow(), namespace="drplan-rehearsal-x",
                             checks=[CheckResult(name="devonn-api: health", status=Status.passed)],
                             rto=Measured(measured=timedelta(seconds=42), objective=timedelta(hours=1)),
                             teardown=["c: namespace drplan-rehearsal-x"])
    assert report.status is Status.passed
    assert report.summary == "RTO 42.0s (objective 1h00m, met); 1/1 checks passed; torn down"
    report.findings.append("deployment devonn-api in namespace drplan-rehearsal-x not available after 15s: ...")
    assert report.status is Status.failed and "; deployment devonn-api in namespace" in report.summary
    report.teardown_error = "copy devonn-rds-rehearsal-x (RDS instance still exists)"
    assert report.status is Status.error and report.summary.endswith("left behind: copy devonn-rds-rehearsal-x "
                                                                     "(RDS instance still exists)")
    assert "**Left behind**: copy devonn-rds-rehearsal-x" in report.markdown()
