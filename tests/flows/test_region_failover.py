"""Readiness and full region failover on the sandbox: moto (EKS, Route 53, RDS with its real data plane), both
Kubernetes API emulators (nodes follow the node groups), a real PostgreSQL topology and an RDS topology of this
module's own (their DR replicas are promoted), the DR demo apps. In order: readiness ready; unready (lagging
replica, node group at zero) and the failover refused; dry run changes nothing; a forced failover killed after the
promotion and rerun (the old primaries fenced, the old region scaled to zero); failback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import psycopg
import pytest
from kubernetes import client as k8s
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.settings import PREFECT_API_URL
from typer.testing import CliRunner

from cli.main import app
from drplan.clients import aws_client, db_credentials, kube_client, pg_target
from drplan.errors import DrplanError
from drplan.plan import PROTECT_TAG, load_plan
from flows.dr_readiness import dr_readiness
from flows.region_failover import region_failover
from flows.shared.gates import lock_name
from tasks.eks import ready_nodes
from tasks.k8s import find_database_secret, read_secret_value
from tasks.rds import read_replica_lag
from tasks.route53 import read_record, switch_records, zone_id
from tests.helpers import (
    REPO,
    clusters_restored,
    in_recovery,
    own_postgres_topology,
    own_rds_topology,
    stack_snapshot,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure")
DB = "devonn-postgres"
RDS = "devonn-rds"
DR = "devonn-eks-dr-sandbox"
PRIMARY_CLUSTER = "devonn-eks-sandbox"


@pytest.fixture(scope="module")
def topology(sandbox, sandbox_plan_path, sandbox_dir):
    """This module's PostgreSQL topology; afterwards both clusters are as they were (the DR region a pilot light
    again: no deployments, one node, its Secrets unchanged), for the tests that run after this module."""
    with clusters_restored(sandbox), own_postgres_topology(sandbox_plan_path, sandbox_dir, DB) as postgres, \
            own_rds_topology(postgres, RDS) as path:
        plan = load_plan(path)
        db = plan.database(RDS)
        cloudwatch = aws_client(plan, "cloudwatch", db.dr_replica.region)
        wait_for(lambda: read_replica_lag.fn(cloudwatch, db.dr_replica.identifier) is not None, 30,
                 "the first ReplicaLag datapoint of the RDS DR replica")
        try:
            yield path
        finally:  # the records back on the primary region, as the session's sandbox has them
            switch_records(aws_client(plan, "route53"), plan.dns, plan.dns.targets[plan.aws.region])


def dns_target(plan) -> str:
    r53 = aws_client(plan, "route53")
    return read_record(r53, zone_id(r53, plan.dns.zone), plan.dns.records[0])[0]


def set_dr_nodes(plan, desired: int) -> None:
    cluster = plan.cluster(DR)
    aws_client(plan, "eks", cluster.region).update_nodegroup_config(
        clusterName=DR, nodegroupName="dev_nodes", scalingConfig={"minSize": 0, "maxSize": 5, "desiredSize": desired})
    wait_for(lambda: ready_nodes(kube_client(plan, cluster), "dev_nodes") == desired, 30,
             f"{desired} Ready nodes in {DR}")


def test_readiness_of_a_ready_dr_region(topology):
    report = dr_readiness(plan=str(topology))
    assert report.ready, report.markdown()
    assert [f.check for f in report.findings] == [
        "AWS credentials", "AWS permissions", f"{DB}: protected", f"{RDS}: protected",
        f"devonn-api: database {DB} (dr_replica)", "devonn-api: cluster capacity",
        "devonn-api: manifests and Secrets", f"devonn-worker: database {RDS} (dr_replica)",
        "devonn-worker: cluster capacity", "devonn-worker: manifests and Secrets", "DNS", "plan drift"]
    assert report.findings[1].detail.startswith("not checked: "), report.findings[1]  # moto cannot simulate
    assert report.findings[-1].detail.startswith(f"0 tagged {PROTECT_TAG} but not in the plan, 0 plan entries gone")
    shown = CliRunner().invoke(app, ["readiness", "--plan", str(topology)])
    assert shown.exit_code == 0 and "Region us-west-2: ready to take over" in shown.stdout, shown.output
    wrong = CliRunner().invoke(app, ["readiness", "--plan", str(topology), "--region", "eu-west-9"])
    assert wrong.exit_code == 2 and wrong.stderr.strip().startswith("error: region eu-west-9 is neither")


def test_unready_region_is_reported_and_refused(topology, asserting_and_emitting_events_worker):
    plan = load_plan(topology)
    db = plan.database(DB)
    dr_member = pg_target(plan, db, "dr_replica", db_credentials(plan, db))
    with dr_member.connect() as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    set_dr_nodes(plan, 0)
    try:
        time.sleep(7)  # the paused replica falls behind the 5 s objective
        state = dr_readiness(plan=str(topology), return_state=True)
        assert state.is_failed()
        report = state.result(raise_on_failure=False)
        assert {f.check for f in report.unready} == {f"devonn-api: database {DB} (dr_replica)",
                                                      "devonn-api: cluster capacity", "devonn-worker: cluster capacity"}
        assert "0 Ready nodes (need 1)" in next(f.detail for f in report.unready if "capacity" in f.check)
        asserting_and_emitting_events_worker.drain()
        unready = [e for e in asserting_and_emitting_events_worker._client.events
                   if e.event == "drplan.readiness.unready"]
        assert unready and unready[-1].resource.id == "drplan.region.us-west-2"

        before = stack_snapshot(plan, DB)
        refused = region_failover(plan=str(topology), approve=True, return_state=True)
        assert refused.is_failed()
        assert "is not ready to take over" in refused.result(raise_on_failure=False).error
        assert stack_snapshot(plan, DB) == before
    finally:
        with dr_member.connect() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
        set_dr_nodes(plan, 1)


def test_dry_run_prints_the_plan_and_changes_nothing(topology):
    plan = load_plan(topology)
    before = stack_snapshot(plan, DB)
    report = region_failover(plan=str(topology), dry_run=True)
    assert report.outcome == "planned (dry run)", report.markdown()
    actions = [(s.action, s.resource) for s in report.steps]
    postgres, rds = plan.database(DB), plan.database(RDS)
    assert actions[:10] == [
        ("readiness", "us-west-2"), ("would ask approval", "us-west-2"),
        ("would scale to 0", f"{PRIMARY_CLUSTER}/devonn-api"), ("would scale to 0", f"{PRIMARY_CLUSTER}/devonn-worker"),
        ("would fence", postgres.primary), ("would promote", postgres.dr_replica.identifier),
        ("would fence", rds.primary), ("would promote", rds.dr_replica.identifier),
        ("would rewrite", f"{DR} Secret of devonn-api"), ("would rewrite", f"{DR} Secret of devonn-worker")]
    assert ("would create", f"{DR}: Deployment devonn-api") in actions
    assert ("would switch", f"DNS {plan.dns.records[0]}") == actions[-1]
    assert (report.steps[-1].before, report.steps[-1].after) == (plan.dns.targets["us-east-1"],
                                                                 plan.dns.targets["us-west-2"])
    printed = CliRunner().invoke(app, ["region-failover", "--plan", str(topology), "--dry-run"])
    assert printed.exit_code == 0, printed.output
    for line in ("would fence", "would promote", "devonn-postgres-dr-production", "would create", "would scale",
                 "would validate", "UPSERT CNAME", "dr.us-west-2.devonn.test"):
        assert line in printed.stdout
    assert stack_snapshot(plan, DB) == before


def test_failover_killed_after_promotion_resumes_without_a_second_promotion(topology):
    plan = load_plan(topology)
    set_dr_nodes(plan, 0)  # not ready: the failover must be forced (and scales the node group itself)
    name = f"region-failover-{uuid.uuid4().hex[:8]}"
    script = ("import sys; from flows.region_failover import region_failover; region_failover.with_options("
              "flow_run_name=sys.argv[1])(plan=sys.argv[2], force=True, approve=True)")
    first = subprocess.Popen([sys.executable, "-c", script, name, str(topology)], cwd=REPO,
                             env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: not in_recovery(plan, DB, "dr_replica"), 180, "the DR replica to be promoted", interval=0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    with get_client(sync_client=True) as client:  # the operator frees the dead run's locks
        for name in (DB, RDS):
            client.update_global_concurrency_limit(lock_name(plan.database(name)),
                                                   GlobalConcurrencyLimitUpdate(active_slots=0))

    report = region_failover(plan=str(topology), force=True, approve=True)
    assert report.outcome == "serving from us-west-2", report.markdown()
    actions = [(s.action, s.resource) for s in report.steps]
    postgres, rds = plan.database(DB), plan.database(RDS)
    assert ("kept", postgres.dr_replica.identifier) in actions  # the killed run promoted it: not again
    assert ("promoted", postgres.dr_replica.identifier) not in actions
    assert {("kept", rds.dr_replica.identifier), ("promoted", rds.dr_replica.identifier)} & set(actions)
    assert report.validation.passed
    assert dns_target(plan) == plan.dns.targets["us-west-2"]
    assert report.rto_seconds and report.rto_seconds < report.rto_objective_seconds
    dr = plan.cluster(DR)
    api = kube_client(plan, dr)
    secret, key = find_database_secret(api, dr.namespace, "devonn-api")
    assert read_secret_value(api, dr.namespace, secret, key).endswith(
        plan.database(DB).endpoints["devonn-postgres-dr-production"] + "/devonn")
    apps = k8s.AppsV1Api(api)
    assert {d: apps.read_namespaced_deployment(d, dr.namespace).status.available_replicas
            for d in ("devonn-api", "devonn-worker")} == {"devonn-api": 3, "devonn-worker": 5}
    assert ready_nodes(api, "dev_nodes") == 3
    for service in plan.services:  # each DR app serves from its promoted replica
        stats = httpx.get(service.dr.health.removesuffix("/health") + "/api/stats", timeout=5).json()
        assert stats["users"] == plan.sandbox.demo_rows, service.name
    assert "ReadReplicaSourceDBInstanceIdentifier" not in aws_client(plan, "rds", rds.dr_replica.region
                                                                     ).describe_db_instances(
        DBInstanceIdentifier=rds.dr_replica.identifier)["DBInstances"][0]
    # the region traffic left writes no more: both old primaries fenced, its apps scaled to zero
    with pg_target(plan, postgres, "primary", db_credentials(plan, postgres)).connect(autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO drplan_heartbeat (source) VALUES ('after the fence')")
    with pytest.raises(DrplanError, match="cannot connect"):
        pg_target(plan, rds, "primary", db_credentials(plan, rds)).connect()
    primary = k8s.AppsV1Api(kube_client(plan, plan.cluster(PRIMARY_CLUSTER)))
    assert {d: primary.read_namespaced_deployment(d, "default").spec.replicas
            for d in ("devonn-api", "devonn-worker")} == {"devonn-api": 0, "devonn-worker": 0}
    assert wait_for(lambda: httpx.get(plan.services[0].health, timeout=5).status_code == 503, 15,
                    "the old region's app to stop serving")


def test_failback_without_a_replica_in_the_primary_region_is_refused_and_changes_nothing(topology):
    """A failback is a planned switchover: it promotes the DR primary's replica in the primary region, which only
    `reprotect` makes (the full failback: tests/flows/test_game_day.py)."""
    plan = load_plan(topology)
    before = stack_snapshot(plan, DB)
    state = region_failover(plan=str(topology), to=plan.aws.region, approve=True, return_state=True)
    assert state.is_failed()
    report = state.result(raise_on_failure=False)
    postgres = plan.database(DB)
    assert report.error == (f"{DB}: the primary {postgres.dr_replica.identifier} has no replica in us-east-1 to "
                            f"promote; run drplan reprotect --database {DB} first"), report.markdown()
    assert report.steps == []
    assert stack_snapshot(plan, DB) == before
    assert dns_target(plan) == plan.dns.targets["us-west-2"]
