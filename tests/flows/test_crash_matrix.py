"""Crash matrix: each recovery command is run once uninterrupted to learn the events it emits, then, for several of
those events, started again, killed (SIGKILL, its whole process group) as soon as the event appears, and rerun
to completion; the rerun must reach the uninterrupted run's end state: the app healthy on the expected database,
one recovery copy / no second promotion, nothing of the killed run left running, the recovery lock free.

The test Prefect server runs no repossessor, so after a kill the test frees the lock as the operator would
(`tests.crash.free_lock`); with drplan's own temporary server the lease expires by itself (tests/cli/
test_prefect_api.py).

About 8 minutes by default; DRPLAN_FULL_CRASH_MATRIX=1 adds db-failover's last kill point and the region failover
(5 to 13 minutes more, by the load: a PostgreSQL and an RDS topology per run)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from kubernetes import client as k8s

from drplan import processes
from drplan.clients import aws_client, db_credentials, kube_client, pg_target
from drplan.errors import DrplanError
from drplan.plan import load_plan
from drplan.s3manifest import resolve_backup
from drplan.s3store import list_objects, parse_prefix
from flows.shared.gates import lock_name
from tasks.eks import ready_nodes
from tasks.k8s import find_database_secret, read_secret_value, roll_back
from tasks.rds import read_replica_lag
from tasks.route53 import read_record, switch_records, zone_id
from tasks.targets import PostgresArchive
from tests.crash import Kill, Run, Scene, at_events, crash_matrix, drplan, lock_slots
from tests.flows.test_pitr_recovery import app_secret, point_in_time, stats  # noqa: F401 - fixture
from tests.helpers import clusters_restored, own_postgres_topology, own_rds_topology, wait_for

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure")
DB = "devonn-postgres"
RDS = "devonn-rds"
CLUSTER = "devonn-eks-sandbox"
DR = "devonn-eks-dr-sandbox"
STRAYS = 20
FULL = os.environ.get("DRPLAN_FULL_CRASH_MATRIX") == "1"


def postgres_server(cmdline: str) -> bool:
    """A restored copy's server (and its children): started in a session of its own, it outlives the run."""
    return cmdline.startswith(("postgres", "/usr/lib/postgresql/"))


def read_only(plan, role: str) -> bool:
    db = plan.database(DB)
    with pg_target(plan, db, role, db_credentials(plan, db)).connect() as conn:
        return conn.execute("SELECT current_setting('default_transaction_read_only')").fetchone()[0] == "on"


def pitr_state(plan) -> dict:
    db = plan.database(DB)
    target = PostgresArchive(plan, db)
    copies = target.copies()
    app_on = app_secret(plan).rsplit("@", 1)[1]
    return {
        "orders": stats(plan)["orders"],
        "copies": [(c.name, c.served_at is not None) for c in copies],
        "running copies": [c.name for c in copies if processes.running(target.work_dir, c.name)],
        "app on": "the copy" if [app_on] == [f"{c.host}:{c.port}/{db.dbname}" for c in copies] else app_on,
        "primary fenced": read_only(plan, "primary"),
        "lock slots": lock_slots(lock_name(db)),
    }


@contextmanager
def pitr_scene(plan, plan_path: Path, at_t: datetime) -> Iterator[Scene]:
    """`drplan recover --promote --yes` to T; afterwards the app back on the primary, its fence lifted, no copy."""
    db = plan.database(DB)
    try:
        yield Scene(drplan("recover", "--plan", str(plan_path), "--database", DB, "--to", at_t.isoformat(),
                           "--promote", "--yes"), lambda: pitr_state(plan), [lock_name(db)], postgres_server)
    finally:
        try:
            roll_back(plan, plan.cluster(CLUSTER), "devonn-api")
        except DrplanError:
            pass  # nothing was cut over
        with pg_target(plan, db, "primary", db_credentials(plan, db)).connect(autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")
        target = PostgresArchive(plan, db)
        for copy in target.copies():
            target.drop(copy.name)


def test_pitr_recovery_with_promote(sandbox, sandbox_plan_path, point_in_time):  # noqa: F811 - the fixture
    at_t, orders_at_t = point_in_time

    def check(state: dict) -> None:
        assert state["orders"] == orders_at_t and state["app on"] == "the copy" and len(state["copies"]) == 1

    crash_matrix(lambda: pitr_scene(sandbox, sandbox_plan_path, at_t), at_events, check)


def app_users(plan) -> bool:
    """Whether the sandbox's demo app serves the demo rows (right after a cutover it may be reconnecting)."""
    url = plan.services[0].health.removesuffix("/health") + "/api/stats"
    try:
        return wait_for(lambda: httpx.get(url, timeout=5).json().get("users") == plan.sandbox.demo_rows, 20,
                        "the app to serve the demo rows", interval=0.5)
    except AssertionError:
        return False


def member_states(plan) -> dict[str, str]:
    """Each member of the plan's devonn-postgres: standby, primary, fenced (a read-only primary) or down."""
    db = plan.database(DB)
    states = {}
    for role in db.members:
        try:
            with pg_target(plan, db, role, db_credentials(plan, db)).connect() as conn:
                standby, read_only = conn.execute(
                    "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on'").fetchone()
            states[role] = "standby" if standby else "fenced" if read_only else "primary"
        except DrplanError:
            states[role] = "down"
    return states


def app_member(plan, cluster: str, service: str) -> str:
    """The role of the member whose endpoint the service's Secret in `cluster` names (or the URL's host:port)."""
    api = kube_client(plan, plan.cluster(cluster))
    secret, key = find_database_secret(api, plan.cluster(cluster).namespace, service)
    where = read_secret_value(api, plan.cluster(cluster).namespace, secret, key).rsplit("@", 1)[1].split("/")[0]
    db = plan.database(DB)
    return next((role for role, member in db.members.items() if db.endpoints.get(member) == where), where)


def running(plan) -> list[str]:
    directory = plan.state_dir()
    return sorted(name for name in processes.tracked_names(directory) if processes.running(directory, name))


@contextmanager
def failover_scene(sandbox, sandbox_plan_path: Path, sandbox_dir: Path) -> Iterator[Scene]:
    """`drplan failover --mode promote-replica --yes` on a fresh topology of its own; the app's Secret put back."""
    with clusters_restored(sandbox), own_postgres_topology(sandbox_plan_path, sandbox_dir, DB) as path:
        plan = load_plan(path)

        def state() -> dict:
            return {"app on": app_member(plan, CLUSTER, "devonn-api"), "app serves": app_users(plan),
                    "members": member_states(plan), "running": running(plan),
                    "lock slots": lock_slots(lock_name(plan.database(DB)))}

        yield Scene(drplan("failover", "--plan", str(path), "--database", DB, "--mode", "promote-replica", "--yes"),
                    state, [lock_name(plan.database(DB))])


def test_db_failover_promote_replica(sandbox, sandbox_plan_path, sandbox_dir):
    def check(state: dict) -> None:
        assert state["app on"] == "dr_replica" and state["app serves"]
        assert state["members"] == {"primary": "fenced", "replica": "standby", "dr_replica": "primary"}

    crash_matrix(lambda: failover_scene(sandbox, sandbox_plan_path, sandbox_dir),
                 lambda clean: at_events(clean) if FULL else at_events(clean)[:2], check)


def bucket(s3, uri: str) -> dict[str, str]:
    return {key: obj.etag for key, obj in list_objects(s3, uri).items()}


@contextmanager
def s3_scene(plan, plan_path: Path, backup: str) -> Iterator[Scene]:
    """`drplan s3-restore --delete` (one worker: seconds, not a blink) of a live bucket emptied and given strays."""
    s3 = aws_client(plan, "s3")
    live = plan.buckets[0].live
    name, prefix = parse_prefix(live)
    for key in bucket(s3, live):
        s3.delete_object(Bucket=name, Key=prefix + key)
    for n in range(STRAYS):
        s3.put_object(Bucket=name, Key=f"{prefix}stray-{n}", Body=b"not in the backup")
    yield Scene(drplan("s3-restore", "--plan", str(plan_path), "--from", backup, "--to", live, "--delete",
                       "--workers", "1"), lambda: {"live": bucket(s3, live)})


def test_s3_restore(sandbox, sandbox_plan_path):
    """s3-restore runs in the CLI's process, no flow run and no event: its kill points are progress the
    uninterrupted run showed in the live bucket (a first object back, half of them, nine tenths: all of them is the
    end, the stray objects' deletion a single request right after)."""
    s3 = aws_client(sandbox, "s3")
    backup = resolve_backup(s3, sandbox.buckets[0].backup)
    objects = bucket(s3, backup)
    live = sandbox.buckets[0].live

    def restored() -> int:
        now = bucket(s3, live)
        return sum(now.get(key) == etag for key, etag in objects.items())

    def check(state: dict) -> None:
        assert state["live"] == objects

    def points(clean: Run) -> list[tuple[str, Kill]]:
        return [(f"{n} of {len(objects)} objects restored", lambda _, n=n: restored() >= n)
                for n in (1, len(objects) // 2, len(objects) * 9 // 10)]

    crash_matrix(lambda: s3_scene(sandbox, sandbox_plan_path, backup), points, check)


@contextmanager
def region_scene(sandbox, sandbox_plan_path: Path, sandbox_dir: Path) -> Iterator[Scene]:
    """`drplan region-failover --force --yes` on a PostgreSQL and an RDS topology of its own (forced: on 2 shared
    cores the 5 s lag objective may flap); afterwards both clusters and the DNS records as they were."""
    with clusters_restored(sandbox), own_postgres_topology(sandbox_plan_path, sandbox_dir, DB) as postgres, \
            own_rds_topology(postgres, RDS) as path:
        plan = load_plan(path)
        rds = plan.database(RDS)
        wait_for(lambda: read_replica_lag.fn(aws_client(plan, "cloudwatch", rds.dr_replica.region),
                                             rds.dr_replica.identifier) is not None, 30,
                 "the first ReplicaLag datapoint of the RDS DR replica")
        r53 = aws_client(plan, "route53")

        def state() -> dict:
            dr, primary = (k8s.AppsV1Api(kube_client(plan, plan.cluster(name))) for name in (DR, CLUSTER))
            return {
                "dns": read_record(r53, zone_id(r53, plan.dns.zone), plan.dns.records[0])[0],
                "api on": app_member(plan, DR, "devonn-api"),
                "dr apps serve": {s.name: wait_for(lambda s=s: httpx.get(
                    s.dr.health.removesuffix("/health") + "/api/stats", timeout=5).json().get("users"), 30,
                    f"{s.name} in {DR} to answer", interval=0.5) for s in plan.services},
                "dr available": {d.metadata.name: d.status.available_replicas
                                 for d in dr.list_namespaced_deployment("default").items},
                "primary replicas": {d.metadata.name: d.spec.replicas
                                     for d in primary.list_namespaced_deployment("default").items},
                "dr nodes": ready_nodes(kube_client(plan, plan.cluster(DR)), "dev_nodes"),
                "members": member_states(plan),
                "rds dr replica of": aws_client(plan, "rds", rds.dr_replica.region).describe_db_instances(
                    DBInstanceIdentifier=rds.dr_replica.identifier)["DBInstances"][0].get(
                    "ReadReplicaSourceDBInstanceIdentifier"),
                "running": [name.replace(rds.primary, RDS) for name in running(plan)],  # its heartbeat
                "lock slots": [lock_slots(lock_name(plan.database(name))) for name in (DB, RDS)],
            }

        try:
            yield Scene(drplan("region-failover", "--plan", str(path), "--force", "--yes"), state,
                        [lock_name(plan.database(name)) for name in (DB, RDS)])
        finally:
            switch_records(r53, plan.dns, plan.dns.targets[plan.aws.region])


@pytest.mark.skipif(not FULL, reason="the slowest matrix: DRPLAN_FULL_CRASH_MATRIX=1")
def test_region_failover(sandbox, sandbox_plan_path, sandbox_dir):
    """The slowest matrix (a PostgreSQL and an RDS topology per run): one kill point, after the Secrets are
    rewritten and before the DR cluster is deployed and DNS switched (the promotions: test_region_failover.py)."""
    def check(state: dict) -> None:
        assert state["dns"] == "dr.us-west-2.devonn.test" and state["api on"] == "dr_replica"
        assert state["members"]["dr_replica"] == "primary" and state["rds dr replica of"] is None
        assert set(state["dr apps serve"].values()) == {sandbox.sandbox.demo_rows}

    crash_matrix(lambda: region_scene(sandbox, sandbox_plan_path, sandbox_dir),
                 lambda clean: [("rewrote", lambda events: "rewrote" in events)], check)
