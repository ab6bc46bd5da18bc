"""Database failover on a throwaway real PostgreSQL topology (primary, streaming replica, DR replica, heartbeat)
beside the session sandbox, with the sandbox's demo app cut over to the promoted server and back afterwards.
Promotions are destructive, so the tests run in order on one topology: dry run, lag guard (refuse, force),
Multi-AZ (stop primary, promote replica), rerun. RDS: the lag guard on CloudWatch ReplicaLag and the promotion on
moto."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

from drplan.clients import aws_client, db_credentials, kube_client, pg_target
from drplan.plan import load_plan
from flows.db_failover import db_failover
from sandbox import aws_seed, stack
from tasks.k8s import PREVIOUS_SUFFIX, find_database_secret, read_secret_value, roll_back
from tests.helpers import in_recovery, own_postgres_topology, stack_snapshot, wait_for

pytestmark = pytest.mark.usefixtures("prefect_server")
DB = "devonn-postgres"
CLUSTER = "devonn-eks-sandbox"


@pytest.fixture(scope="module")
def topology(sandbox, sandbox_plan_path, sandbox_dir):
    """Plan path of a copy of the sandbox plan whose devonn-postgres is a new primary + replica + DR replica (own
    WAL archive prefix, RPO objective 5 s) in its own state dir; torn down afterwards."""
    with own_postgres_topology(sandbox_plan_path, sandbox_dir, DB) as path:
        try:
            yield path
        finally:
            restore_app(sandbox)


def restore_app(plan) -> None:
    """Put the demo app back on the sandbox primary if a test left it cut over."""
    cluster = plan.cluster(CLUSTER)
    api = kube_client(plan, cluster)
    secret, key = find_database_secret(api, cluster.namespace, "devonn-api")
    if read_secret_value(api, cluster.namespace, secret, key + PREVIOUS_SUFFIX) is not None:
        roll_back(plan, cluster, "devonn-api", timeout=30)


def app_port(plan) -> int:
    """Port of the database the demo app's Secret points at."""
    cluster = plan.cluster(CLUSTER)
    api = kube_client(plan, cluster)
    secret, key = find_database_secret(api, cluster.namespace, "devonn-api")
    return int(read_secret_value(api, cluster.namespace, secret, key).rsplit(":", 1)[1].split("/")[0])


def app_users(plan) -> int | None:
    body = httpx.get(plan.services[0].health.removesuffix("/health") + "/api/stats", timeout=5).json()
    return body.get("users")


def test_dry_run_changes_nothing(topology, sandbox):
    plan = load_plan(topology)
    before = stack_snapshot(plan, DB)
    for mode in ("multi-az", "promote-replica"):
        report = db_failover(plan=str(topology), database=DB, mode=mode, dry_run=True)
        assert report.outcome == "planned (dry run)"
        assert [s.action for s in report.steps] == ["found", "lag guard passed", *(
            ["would stop"] if mode == "multi-az" else []), "would ask approval", "would promote", "would rewrite",
            "would restart"]
    assert stack_snapshot(plan, DB) == before
    assert stack.sandbox_postgres(plan, plan.database(DB)).status(plan.database(DB).primary).running


def test_lag_guard_refuses_a_lagging_replica_and_force_promotes_it(topology, sandbox):
    plan = load_plan(topology)
    db = plan.database(DB)
    dr = pg_target(plan, db, "dr_replica", db_credentials(plan, db))
    with dr.connect() as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    time.sleep(7)  # the primary's heartbeat moves on, the paused replica's does not: lag > 5 s
    before = app_port(sandbox)
    state = db_failover(plan=str(topology), database=DB, mode="promote-replica", approve=True, return_state=True)
    assert state.is_failed()
    report = state.result(raise_on_failure=False)
    assert "promoting would lose more than the RPO allows" in report.error and "--force" in report.error
    assert float(re.search(r"lag (\d+(?:\.\d+)?)s", report.error).group(1)) > 5
    assert in_recovery(plan, DB, "dr_replica") and app_port(sandbox) == before  # refused: nothing changed

    report = db_failover(plan=str(topology), database=DB, mode="promote-replica", approve=True, force=True)
    assert report.outcome == "failed over", report.markdown()
    assert [s.action for s in report.steps] == ["found", "lag guard overridden", "approval", "promoted", "cut over"]
    assert report.validation.passed
    assert not in_recovery(plan, DB, "dr_replica")
    assert app_port(sandbox) == int(db.endpoints[db.dr_replica.identifier].split(":")[1])
    assert wait_for(lambda: app_users(sandbox) == plan.sandbox.demo_rows, 15, "the app on the promoted replica")
    restore_app(sandbox)
    assert app_port(sandbox) == before


def test_multi_az_stops_the_primary_and_promotes_the_replica_and_a_rerun_changes_nothing(
        topology, sandbox, asserting_and_emitting_events_worker):
    plan = load_plan(topology)
    db = plan.database(DB)
    pg = stack.sandbox_postgres(plan, db)
    report = db_failover(plan=str(topology), database=DB, mode="multi-az", approve=True)
    assert report.outcome == "failed over", report.markdown()
    assert [s.action for s in report.steps] == ["found", "lag guard passed", "approval", "stopped", "promoted",
                                                "cut over"]
    asserting_and_emitting_events_worker.drain()
    events = {e.event: e for e in asserting_and_emitting_events_worker._client.events
              if e.event.startswith("drplan.recovery.")}
    assert {"drplan.recovery.stopped", "drplan.recovery.promoted", "drplan.recovery.cut-over"} <= set(events)
    promoted = events["drplan.recovery.promoted"]
    assert promoted.resource.id == f"drplan.database.{DB}"
    assert (promoted.payload["before"], promoted.payload["after"]) == ("standby", "primary")
    assert promoted.payload["actor"].startswith("db-failover run ")
    assert "***" in events["drplan.recovery.cut-over"].payload["after"]  # the URL, password redacted
    assert not pg.status(db.primary).running
    assert not in_recovery(plan, DB, "replica")
    assert app_port(sandbox) == int(db.endpoints[db.replica].split(":")[1])
    assert wait_for(lambda: app_users(sandbox) == plan.sandbox.demo_rows, 15, "the app on the promoted replica")

    again = db_failover(plan=str(topology), database=DB, mode="multi-az")  # no approve: nothing left to approve
    assert again.outcome == "failed over", again.markdown()
    assert [s.action for s in again.steps] == ["found", "found promoted", "cut over"]
    assert again.steps[-1].detail.endswith("already set")
    assert again.validation.passed


def put_rds_metrics(plan, region: str, identifier: str, **values: float) -> None:
    """moto publishes no RDS metrics: the test publishes what RDS would."""
    aws_client(plan, "cloudwatch", region).put_metric_data(Namespace="AWS/RDS", MetricData=[
        {"MetricName": name, "Value": value, "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": identifier}]}
        for name, value in values.items()])


def test_rds_lag_guard_needs_replica_lag_data_and_promotes_on_moto(sandbox, plan_variant):
    identifier = f"devonn-rds-dr-failover-{uuid.uuid4().hex[:6]}"

    def own_dr_replica(data: dict) -> None:  # a replica of this test's own: the session's stays a replica
        db = next(d for d in data["databases"] if d["name"] == "devonn-rds")
        db["endpoints"][identifier] = db["endpoints"].pop(db["dr_replica"]["identifier"])
        db["dr_replica"]["identifier"] = identifier

    path = plan_variant(own_dr_replica)
    db = sandbox.database("devonn-rds")
    region = db.dr_replica.region
    rds = aws_client(sandbox, "rds", region)
    network = aws_seed.ensure_rds_network(sandbox, region)
    source = aws_client(sandbox, "rds").describe_db_instances(DBInstanceIdentifier=db.primary)["DBInstances"][0]
    rds.create_db_instance_read_replica(
        DBInstanceIdentifier=identifier, SourceDBInstanceIdentifier=source["DBInstanceArn"],
        SourceRegion=sandbox.aws.region, DBSubnetGroupName=network["DBSubnetGroupName"],
        VpcSecurityGroupIds=network["VpcSecurityGroupIds"])

    def replica_source() -> str | None:
        instance = rds.describe_db_instances(DBInstanceIdentifier=identifier)["DBInstances"][0]
        return instance.get("ReadReplicaSourceDBInstanceIdentifier")

    assert replica_source()
    state = db_failover(plan=str(path), database="devonn-rds", mode="promote-replica", approve=True,
                        return_state=True)
    assert state.is_failed()
    assert "lag unknown (CloudWatch ReplicaLag)" in state.result(raise_on_failure=False).error
    assert replica_source(), "refused, yet promoted"

    put_rds_metrics(sandbox, region, identifier, ReplicaLag=2.0, CPUUtilization=12.0, DatabaseConnections=3.0)
    report = db_failover(plan=str(path), database="devonn-rds", mode="promote-replica", approve=True)
    assert report.outcome == "failed over", report.markdown()
    assert [s.action for s in report.steps] == ["lag guard passed", "approval", "promoted", "no cutover"]
    assert report.lag_seconds == 2.0
    assert replica_source() is None
    assert {c.name for c in report.validation.checks} == {
        "database", "cloudwatch CPUUtilization", "cloudwatch DatabaseConnections"}
    rds.delete_db_instance(DBInstanceIdentifier=identifier, SkipFinalSnapshot=True)


def test_rds_multi_az_reboots_with_forced_failover_and_reads_metrics(sandbox, sandbox_plan_path):
    calls = []
    rds = aws_client(sandbox, "rds")
    rds.meta.events.register("provide-client-params.rds.RebootDBInstance",
                             lambda params, **_: calls.append(dict(params)))
    db = sandbox.database("devonn-rds")
    state = db_failover(plan=str(sandbox_plan_path), database="devonn-rds", mode="multi-az", approve=True,
                        return_state=True)
    report = state.result(raise_on_failure=False)
    assert [c["ForceFailover"] for c in calls] == [True]
    assert report.outcome == "validation failed"  # no CloudWatch data yet: "no data" is not a pass
    assert {c.name: c.status.value for c in report.validation.checks}["cloudwatch CPUUtilization"] == "no data"

    put_rds_metrics(sandbox, sandbox.aws.region, db.primary, CPUUtilization=20.0, DatabaseConnections=4.0)
    report = db_failover(plan=str(sandbox_plan_path), database="devonn-rds", mode="multi-az", approve=True)
    assert report.outcome == "failed over", report.markdown()
    assert [s.action for s in report.steps] == ["approval", "rebooted", "available"]
    assert report.validation.passed and len(calls) == 2
