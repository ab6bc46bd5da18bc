"""RDS recovery on the sandbox's RDS data plane (real PostgreSQL behind every instance), verified through the
devonn-worker app (it uses devonn-rds) and by direct queries: point-in-time recovery with promotion, a Multi-AZ
failover while the app takes writes, the promotion of a read replica of this module's own; each dry run first,
changing nothing."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from drplan.clients import PgTarget, aws_client, db_credentials, kube_client, pg_target
from drplan.errors import DrplanError
from drplan.plan import load_plan
from flows.db_failover import db_failover
from sandbox import aws_seed
from tasks.fencing import unfence_rds
from tasks.k8s import PREVIOUS_SUFFIX, find_database_secret, read_secret_value, roll_back
from tasks.rds import read_replica_lag
from tests.helpers import stack_snapshot, wait_for

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure", "worker_rolled_back")
runner = CliRunner()
DB = "devonn-rds"
SERVICE = "devonn-worker"
CLUSTER = "devonn-eks-sandbox"


def base_url(plan) -> str:
    return next(s for s in plan.services if s.name == SERVICE).health.removesuffix("/health")


def app_secret(plan) -> str:
    cluster = plan.cluster(CLUSTER)
    api = kube_client(plan, cluster)
    secret, key = find_database_secret(api, cluster.namespace, SERVICE)
    return read_secret_value(api, cluster.namespace, secret, key)


def app_orders(plan) -> int | None:
    body = httpx.get(base_url(plan) + "/api/stats", timeout=5).json()
    return body.get("orders")


def orders(plan, role: str = "primary", where: str = "true") -> int:
    db = plan.database(DB)
    with pg_target(plan, db, role, db_credentials(plan, db)).connect(autocommit=True) as conn:
        return conn.execute(f"SELECT count(*) FROM orders WHERE {where}").fetchone()[0]


def instance(plan, identifier: str, region: str | None = None) -> dict:
    return aws_client(plan, "rds", region).describe_db_instances(DBInstanceIdentifier=identifier)["DBInstances"][0]


@pytest.fixture
def worker_rolled_back(sandbox):
    """Put devonn-worker back on the sandbox's devonn-rds primary if a test left it cut over."""
    yield
    cluster = sandbox.cluster(CLUSTER)
    api = kube_client(sandbox, cluster)
    secret, key = find_database_secret(api, cluster.namespace, SERVICE)
    if read_secret_value(api, cluster.namespace, secret, key + PREVIOUS_SUFFIX) is not None:
        roll_back(sandbox, cluster, SERVICE, timeout=60)


@pytest.fixture
def orders_deleted_after_t(sandbox):
    """2 % of the orders deleted after T (the copy at T still passes the ±5 % row-count check against the live
    source); yields (T, orders at T) once RDS can restore past T by the drill margin; afterwards the rows are back
    and the recovery instances deleted."""
    db = sandbox.database(DB)
    target = pg_target(sandbox, db, "primary", db_credentials(sandbox, db))
    orders_at_t = orders(sandbox)
    time.sleep(1)
    at_t = datetime.now(UTC)
    time.sleep(1)
    with target.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE orders_removed AS SELECT * FROM orders WHERE false")
        conn.execute("WITH gone AS (DELETE FROM orders WHERE id % 50 = 0 RETURNING *) "
                     "INSERT INTO orders_removed SELECT * FROM gone")
    wait_for(lambda: (instance(sandbox, db.primary).get("LatestRestorableTime") or at_t) > at_t
             + sandbox.drill.target_margin, 120, "RDS to be restorable past T", interval=0.5)
    yield at_t, orders_at_t
    unfence_rds(sandbox, sandbox.aws.region, db.primary)  # a promotion fenced it
    wait_for(lambda: orders(sandbox) > 0, 10, "the primary to answer again")
    with target.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO orders SELECT * FROM orders_removed; DROP TABLE orders_removed")
    rds = aws_client(sandbox, "rds")
    for i in rds.describe_db_instances()["DBInstances"]:
        if i["DBInstanceIdentifier"].startswith(f"{DB}-recovery-"):
            rds.delete_db_instance(DBInstanceIdentifier=i["DBInstanceIdentifier"], SkipFinalSnapshot=True)


@pytest.mark.usefixtures("fast_rds_polls")
def test_recover_to_t_and_promote_moves_the_worker_to_the_rows_at_t(sandbox, sandbox_plan_path,
                                                                    orders_deleted_after_t):
    at_t, orders_at_t = orders_deleted_after_t
    args = ["recover", "--plan", str(sandbox_plan_path), "--database", DB, "--to", at_t.isoformat(), "--promote"]
    before, snapshot = app_secret(sandbox), stack_snapshot(sandbox, DB)
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert app_secret(sandbox) == before and stack_snapshot(sandbox, DB) == snapshot
    assert app_orders(sandbox) < orders_at_t  # the "corruption" is live

    result = runner.invoke(app, [*args, "--yes"])
    assert result.exit_code == 0, result.output
    assert wait_for(lambda: app_orders(sandbox) == orders_at_t, 20, "the worker serving the rows at T")
    copy = next(i for i in aws_client(sandbox, "rds").describe_db_instances()["DBInstances"]
                if i["DBInstanceIdentifier"].startswith(f"{DB}-recovery-"))
    assert app_secret(sandbox).endswith(f"@127.0.0.1:{copy['Endpoint']['Port']}/devonn")
    credentials = db_credentials(sandbox, sandbox.database(DB))
    copy_target = PgTarget("copy", copy["Endpoint"]["Address"], copy["Endpoint"]["Port"], "devonn", credentials)
    with copy_target.connect(autocommit=True) as conn:  # a direct query of the restored instance
        assert conn.execute("SELECT count(*), bool_or(pg_is_in_recovery()) FROM orders").fetchone() == (
            orders_at_t, False)
    written = next(line.removeprefix("report: ") for line in result.stderr.splitlines() if line.startswith("report: "))
    steps = {s["action"]: s for s in json.loads(Path(written).with_suffix(".json").read_text())["steps"]}
    assert steps["fenced"]["resource"] == sandbox.database(DB).primary
    assert steps["offered"]["resource"] == f"drplan reprotect --database {DB}"
    with pytest.raises(DrplanError, match="cannot connect"):  # the damaged primary is cut off: no more writes
        orders(sandbox)
    assert unfence_rds(sandbox, sandbox.aws.region, sandbox.database(DB).primary)
    assert wait_for(lambda: orders(sandbox) < orders_at_t, 10, "the damaged primary, left as it was for forensics")


@pytest.mark.usefixtures("fast_rds_polls")
def test_multi_az_failover_while_the_worker_takes_writes_loses_no_committed_row(sandbox, sandbox_plan_path):
    db = sandbox.database(DB)
    args = ["failover", "--plan", str(sandbox_plan_path), "--database", DB, "--mode", "multi-az"]
    snapshot = stack_snapshot(sandbox, DB)
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0 and "would reboot" in dry.output, dry.output
    assert stack_snapshot(sandbox, DB) == snapshot
    before = instance(sandbox, db.primary)

    committed: list[int] = []
    refused: list[int] = []
    stop = threading.Event()

    def write() -> None:
        with httpx.Client(timeout=5) as http:
            while not stop.is_set():
                try:
                    response = http.post(base_url(sandbox) + "/api/orders")
                except httpx.HTTPError:
                    refused.append(0)
                    continue
                (committed.append(response.json()["id"]) if response.status_code == 201
                 else refused.append(response.status_code))
                time.sleep(0.02)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_for(lambda: len(committed) >= 20, 30, "the worker to take writes")
        result = runner.invoke(app, [*args, "--yes"])
        during = len(committed)
        wait_for(lambda: len(committed) >= during + 20, 30, "the worker to take writes after the failover")
    finally:
        stop.set()
        writer.join(10)
    assert result.exit_code == 0, result.output
    after = instance(sandbox, db.primary)
    assert (after["AvailabilityZone"], after["Endpoint"]) == (before["SecondaryAvailabilityZone"], before["Endpoint"])
    ids = ",".join(map(str, committed))
    assert orders(sandbox, where=f"id IN ({ids})") == len(committed), "a committed order was lost"
    print(f"{len(committed)} orders committed through the app, {len(refused)} refused during the failover")


@pytest.mark.usefixtures("fast_rds_polls")
def test_promote_replica_of_its_own_moves_the_worker_and_takes_its_writes(sandbox, plan_variant):
    identifier = f"{DB}-dr-own-{uuid.uuid4().hex[:6]}"
    path = plan_variant(lambda data: next(d for d in data["databases"] if d["name"] == DB)["dr_replica"].update(
        identifier=identifier))  # a replica of this test's own: the session's stays a replica
    plan = load_plan(path)
    db = plan.database(DB)
    region = db.dr_replica.region
    rds = aws_client(plan, "rds", region)
    network = aws_seed.ensure_rds_network(plan, region)
    rds.create_db_instance_read_replica(
        DBInstanceIdentifier=identifier, SourceDBInstanceIdentifier=instance(plan, db.primary)["DBInstanceArn"],
        SourceRegion=plan.aws.region, DBSubnetGroupName=network["DBSubnetGroupName"],
        VpcSecurityGroupIds=network["VpcSecurityGroupIds"])
    try:
        aws_seed.wait_available(rds, identifier)
        wait_for(lambda: read_replica_lag.fn(aws_client(plan, "cloudwatch", region), identifier) is not None, 30,
                 "the data plane's first ReplicaLag datapoint")
        before, snapshot = app_secret(plan), stack_snapshot(plan, DB)
        dry = db_failover(plan=str(path), database=DB, mode="promote-replica", dry_run=True)
        assert dry.outcome == "planned (dry run)"
        assert app_secret(plan) == before and stack_snapshot(plan, DB) == snapshot

        report = db_failover(plan=str(path), database=DB, mode="promote-replica", approve=True)
        assert report.outcome == "failed over", report.markdown()
        assert [s.action for s in report.steps] == ["found", "lag guard passed", "approval", "fenced", "promoted",
                                                    "cut over"]
        exposure = next(c for c in report.validation.checks if c.name == f"database {DB}: network exposure")
        assert exposure.observed == "unchanged"  # read before the fence; the DR region's group has the same ingress
        with pytest.raises(DrplanError, match="cannot connect"):  # the old primary is cut off
            orders(plan, "primary")
        promoted = instance(plan, identifier, region)
        assert "ReadReplicaSourceDBInstanceIdentifier" not in promoted
        assert app_secret(plan).endswith(f"@127.0.0.1:{promoted['Endpoint']['Port']}/devonn")
        new_order = wait_for(lambda: httpx.post(base_url(plan) + "/api/orders", timeout=5).json().get("id"), 20,
                             "the worker to write to the promoted replica")
        assert orders(plan, "dr_replica", f"id = {new_order}") == 1  # written on the promoted replica ...
        assert unfence_rds(plan, plan.aws.region, db.primary)  # (the session's primary, for the tests after this)
        wait_for(lambda: orders(plan, "primary") > 0, 10, "the old primary to answer again")
        assert orders(plan, "primary", f"id = {new_order}") == 0  # ... not on the old primary
    finally:
        unfence_rds(plan, plan.aws.region, db.primary)
        rds.delete_db_instance(DBInstanceIdentifier=identifier, SkipFinalSnapshot=True)
