"""A bad week, as one chained game day on a PostgreSQL topology of its own (primary, replica, DR replica) with the
sandbox's devonn-api on it and a heartbeat writer that follows the app's Secret in each region. Every step acts on
the live topology the step before left, is dry-run first (nothing changes), and is verified through the app and by
direct queries:

orders deleted -> recover --promote (the app on the copy, the damaged primary fenced) -> topology and verify-rpo
say unprotected -> reprotect -> objectives met on the copy -> Multi-AZ failover keeps the recovered rows ->
reprotect -> region failover (the old primary refuses writes, no row lost) -> reprotect toward home -> failback
(no heartbeat row written before the fence is lost, both regions at their normal sizes) -> reprotect -> a PITR to
a time after the failback holds the orders the app wrote then."""

from __future__ import annotations

import os
import sys
import time
from contextlib import suppress
from datetime import UTC, datetime

import httpx
import psycopg
import pytest
from botocore.exceptions import ClientError
from kubernetes import client as k8s

from drplan import processes
from drplan.clients import PgTarget, aws_client, db_credentials, kube_client, pg_target
from drplan.plan import load_plan
from flows.db_failover import db_failover
from flows.dns_failover import dns_failover
from flows.dr_readiness import dr_readiness
from flows.pitr_recovery import pitr_recovery
from flows.region_failover import region_failover
from flows.reprotect import reprotect
from flows.rpo_verification import rpo_verification
from flows.shared.cutover import database_url
from sandbox import stack
from sandbox.disasters import delete_dns
from tasks.eks import ready_nodes
from tasks.k8s import DATABASE_ENV, cut_over
from tasks.route53 import read_record, switch_records, zone_id
from tasks.targets import PostgresArchive
from tasks.topology import discover
from tests.helpers import clusters_restored, own_postgres_topology, own_rds_topology, stack_snapshot, wait_for

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure")
DB, RDS = "devonn-postgres", "devonn-rds"
SERVICE = "devonn-api"
HOME, DR = "devonn-eks-sandbox", "devonn-eks-dr-sandbox"


@pytest.fixture
def week(sandbox, sandbox_plan_path, sandbox_dir):
    """The topology of this test with devonn-api on its primary and a heartbeat writer per region following the
    app's Secret there (the sandbox's own writer stopped); afterwards clusters, DNS and copies as they were."""
    rds_before = rds_instances(sandbox)
    with clusters_restored(sandbox), own_postgres_topology(sandbox_plan_path, sandbox_dir, DB, rpo="30s",
                                                           archive_timeout="5s") as own, \
            own_rds_topology(own, RDS) as path:
        plan = load_plan(path)
        db = plan.database(DB)
        credentials = db_credentials(plan, db)
        primary = pg_target(plan, db, "primary", credentials)
        cut_over(plan, plan.cluster(HOME), SERVICE, database_url(credentials, primary.host, primary.port, db.dbname))
        directory = plan.state_dir()
        processes.stop(directory, f"heartbeat-{db.primary}")
        for name in (HOME, DR):  # the DR region has the Secret (pilot light), not yet the Deployment
            cluster = plan.cluster(name)
            secret = stack.db_secret(next(s for s in plan.services if s.name == SERVICE))
            processes.start(directory, f"heartbeat-follows-{name}", [
                sys.executable, "-m", "drplan.heartbeat", "--secret", f"{cluster.namespace}/{secret}:{DATABASE_ENV}",
                "--kubeconfig", str(plan.resolve_path(cluster.kubeconfig)), "--context", cluster.context,
                "--interval", "1", "--source", f"app-{name}"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
        dns = dns_target(plan)
        try:
            yield path
        finally:
            if dns_target(plan) != dns:  # a failed step left the traffic elsewhere
                switch_records(aws_client(plan, "route53"), plan.dns, dns)
            archive = PostgresArchive(plan, db)
            for copy in archive.copies():
                archive.drop(copy.name)
            for region, identifier in rds_instances(sandbox) - rds_before:  # the replicas reprotect made
                with suppress(ClientError):
                    aws_client(plan, "rds", region).delete_db_instance(DBInstanceIdentifier=identifier,
                                                                       SkipFinalSnapshot=True)


def rds_instances(plan) -> set[tuple[str, str]]:
    return {(region, i["DBInstanceIdentifier"]) for region in (plan.aws.region, plan.aws.dr_region)
            for i in aws_client(plan, "rds", region).describe_db_instances()["DBInstances"]}


def dns_target(plan) -> str:
    r53 = aws_client(plan, "route53")
    return read_record(r53, zone_id(r53, plan.dns.zone), plan.dns.records[0])[0]


def app(plan, cluster: str = HOME) -> str:
    service = next(s for s in plan.services if s.name == SERVICE)
    return (service.health if cluster == HOME else service.dr.health).removesuffix("/health")


def orders_through_app(plan, cluster: str = HOME) -> int | None:
    try:
        return httpx.get(app(plan, cluster) + "/api/stats", timeout=5).json().get("orders")
    except httpx.HTTPError:
        return None


def write_orders(plan, count: int, cluster: str = HOME) -> list[int]:
    """Orders placed through the app; their ids."""
    return [wait_for(lambda: (r := httpx.post(app(plan, cluster) + "/api/orders", timeout=5)).status_code == 201
                     and r.json()["id"], 20, "the app to take an order") for _ in range(count)]


def query(plan, role: str, sql: str, params: tuple = ()):
    db = plan.database(DB)
    with pg_target(plan, db, role, db_credentials(plan, db)).connect() as conn:
        return conn.execute(sql, params).fetchone()[0]


def measured(report, measure: str):
    return next(m for m in report.measurements if (m.resource, m.measure) == (DB, measure))


def dry_run_changes_nothing(dr_plan, flow, **parameters):
    before = stack_snapshot(dr_plan, DB)
    report = flow(**parameters, dry_run=True)
    assert report.outcome == "planned (dry run)", report.markdown()
    assert stack_snapshot(dr_plan, DB) == before
    return report


def reprotected(plan, path, database: str = DB) -> None:
    dry_run_changes_nothing(plan, reprotect, plan=str(path), database=database)
    report = reprotect(plan=str(path), database=database, approve=True)
    assert report.outcome == "protected", report.markdown()
    live = discover(plan, [database]).databases[0]
    assert live.protection_gaps(live.primary) == []


def test_a_bad_week_loses_no_data(week, sandbox):
    plan = load_plan(week)
    db = plan.database(DB)

    # 1. orders deleted after T, found the next morning
    placed = write_orders(plan, 5)
    time.sleep(1)
    at_t = datetime.now(UTC)
    orders_at_t = orders_through_app(plan)
    time.sleep(1)
    with pg_target(plan, db, "primary", db_credentials(plan, db)).connect(autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE id = ANY(%s)", (placed,))
        switched = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        wait_for(lambda: conn.execute("SELECT last_archived_wal >= %s FROM pg_stat_archiver", (switched,))
                 .fetchone()[0], 120, "the WAL after T to be archived", interval=0.5)
    time.sleep(plan.drill.target_margin.total_seconds() + 1)

    # 2. recover --promote: the app on the copy at T, the damaged primary fenced
    dry_run_changes_nothing(plan, pitr_recovery, plan=str(week), database=DB, target_time=at_t.isoformat(),
                            promote=True)
    recovered = pitr_recovery(plan=str(week), database=DB, target_time=at_t.isoformat(), promote=True, approve=True)
    assert recovered.outcome == "promoted", recovered.markdown()
    assert wait_for(lambda: orders_through_app(plan) == orders_at_t, 20, "the app serving the orders at T")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        query(plan, "primary", "INSERT INTO drplan_heartbeat (source) VALUES ('after the fence') RETURNING 1")

    # 3. the live topology: the app on an unprotected copy; verify-rpo says so
    live = discover(plan, [DB]).databases[0]
    assert live.primary.identifier == recovered.recovery_copy and live.primary.kind == "recovery-copy"
    assert f"live primary {recovered.recovery_copy} does not archive WAL" in live.differences
    rpo = rpo_verification(plan=str(week), return_state=True).result(raise_on_failure=False)
    assert measured(rpo, "WAL archive").label == "breached"
    assert "does not archive WAL; run drplan reprotect" in measured(rpo, "WAL archive").detail
    assert measured(rpo, "replica newest heartbeat").label == "breached"
    readiness = dr_readiness(plan=str(week), return_state=True).result(raise_on_failure=False)
    unready = {f.check: f.detail for f in readiness.unready}
    assert unready[f"{DB}: protected"].startswith(f"not protected: live primary {recovered.recovery_copy} does not")

    # 4. reprotect: archiving, a base backup of its lineage, the plan's replica and DR replica rebuilt from it
    reprotected(plan, week)
    time.sleep(6)  # a WAL segment switched and archived, heartbeats replayed
    rpo = rpo_verification(plan=str(week), return_state=True).result(raise_on_failure=False)
    for measure in ("primary newest heartbeat", "replica newest heartbeat", "dr_replica newest heartbeat",
                    "WAL archive", "base backup"):
        assert measured(rpo, measure).label == "met", rpo.markdown()
    assert measured(rpo, "primary newest heartbeat").detail == f"on {recovered.recovery_copy}"

    # 5. Multi-AZ failover: the copy stopped, its in-region replica promoted; the recovered rows stay
    dry_run_changes_nothing(plan, db_failover, plan=str(week), database=DB, mode="multi-az")
    multi_az = db_failover(plan=str(week), database=DB, mode="multi-az", approve=True)
    assert multi_az.outcome == "failed over", multi_az.markdown()
    assert multi_az.member == "replica" and query(plan, "replica", "SELECT NOT pg_is_in_recovery()")
    assert wait_for(lambda: orders_through_app(plan) == orders_at_t, 20, "the recovered orders on the new primary")
    delete_dns(plan, str(week))  # and the DNS record is lost: the app is validated where its Secret points now
    dns = dns_failover(plan=str(week), to=plan.aws.region, approve=True)
    assert dns.outcome == "DNS on us-east-1" and dns.validation.passed, dns.markdown()
    reprotected(plan, week)

    # 6. region failover: the old primary refuses writes, no row committed before its fence is lost
    dry_run_changes_nothing(plan, region_failover, plan=str(week))
    away = region_failover(plan=str(week), approve=True)
    assert away.outcome == "serving from us-west-2", away.markdown()
    assert away.lost_rows == {DB: 0, RDS: 0}
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        query(plan, "replica", "INSERT INTO drplan_heartbeat (source) VALUES ('after the fence') RETURNING 1")
    written_away = write_orders(plan, 3, DR)
    reprotected(plan, week)  # toward home: the plan's primary rebuilt as the DR primary's replica
    reprotected(plan, week, RDS)  # toward home: a new read replica in us-east-1 of the promoted RDS DR replica

    # 7. failback as a planned switchover
    dry_run_changes_nothing(plan, region_failover, plan=str(week), to=plan.aws.region)
    back = region_failover(plan=str(week), to=plan.aws.region, approve=True)
    assert back.outcome == "serving from us-east-1", back.markdown()
    assert back.lost_rows == {DB: 0, RDS: 0}
    assert query(plan, "primary", "SELECT count(*) FROM orders WHERE id = ANY(%s)", (written_away,)) == 3
    assert dns_target(plan) == plan.dns.targets[plan.aws.region]
    primary_cluster, dr_cluster = plan.cluster(HOME), plan.cluster(DR)
    shrunk = dr_cluster.nodegroups["dev_nodes"].desired
    wait_for(lambda: ready_nodes(kube_client(plan, dr_cluster), "dev_nodes") == shrunk, 60,
             f"the DR node group back to its {shrunk} node(s)")
    worker = k8s.AppsV1Api(kube_client(plan, primary_cluster)).read_namespaced_deployment(
        "devonn-worker", primary_cluster.namespace).spec.replicas
    assert worker == 2 != plan.failover.scale["devonn-worker"]  # its manifest's size, not the failover's
    reprotected(plan, week)
    reprotected(plan, week, RDS)

    # 8. PITR to a time after the failback gives the history that served the app then
    written_home = write_orders(plan, 3)
    time.sleep(1)
    after_failback = datetime.now(UTC)
    time.sleep(plan.drill.target_margin.total_seconds() + 6)
    restored = pitr_recovery(plan=str(week), database=DB, target_time=after_failback.isoformat())
    assert restored.outcome == "restored", restored.markdown()
    copy = next(c for c in PostgresArchive(plan, db).copies() if c.name == restored.recovery_copy)
    with PgTarget("copy", copy.host, copy.port, db.dbname, db_credentials(plan, db)).connect() as conn:
        found = conn.execute("SELECT count(*) FROM orders WHERE id = ANY(%s)",
                             (written_away + written_home,)).fetchone()[0]
    assert found == 6
