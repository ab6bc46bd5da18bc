"""Database failover on a throwaway real PostgreSQL topology (primary, streaming replica, DR replica, heartbeat)
beside the session sandbox, with the sandbox's demo app cut over to the promoted server and back afterwards.
Promotions are destructive, so the tests run in order on one topology, each acting on the live topology the one
before left: dry run, Multi-AZ (stop primary, promote replica) killed after the promotion and finished by a rerun,
a promotion refused until `reprotect` rebuilds replicas of the new primary, lag guard (refuse, force) on the DR
replica. RDS failovers:
tests/flows/test_rds_recovery.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.settings import PREFECT_API_URL

from drplan.clients import db_credentials, kube_client, pg_target
from drplan.plan import load_plan
from flows.db_failover import db_failover
from flows.reprotect import reprotect
from flows.shared.gates import lock_name
from sandbox import stack
from tasks.k8s import find_database_secret, read_secret_value
from tests.helpers import REPO, clusters_restored, in_recovery, own_postgres_topology, stack_snapshot, wait_for

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure")
DB = "devonn-postgres"
CLUSTER = "devonn-eks-sandbox"


@pytest.fixture(scope="module")
def topology(sandbox, sandbox_plan_path, sandbox_dir):
    """Plan path of a copy of the sandbox plan whose devonn-postgres is a new primary + replica + DR replica (own
    WAL archive prefix, RPO objective 5 s) in its own state dir; torn down afterwards."""
    with clusters_restored(sandbox), own_postgres_topology(sandbox_plan_path, sandbox_dir, DB) as path:
        yield path


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
            ["would stop"] if mode == "multi-az" else []), "would ask approval", *(
            ["would fence"] if mode == "promote-replica" else []), "would promote", "would rewrite", "would restart"]
    assert stack_snapshot(plan, DB) == before
    assert stack.sandbox_postgres(plan, plan.database(DB)).status(plan.database(DB).primary).running


def test_multi_az_killed_after_the_promotion_is_finished_by_a_rerun_without_a_second_promotion(
        topology, sandbox, asserting_and_emitting_events_worker):
    plan = load_plan(topology)
    db = plan.database(DB)
    pg = stack.sandbox_postgres(plan, db)
    script = ("import sys; from flows.db_failover import db_failover; db_failover(plan=sys.argv[1], "
              "database=sys.argv[2], mode='multi-az', approve=True)")
    first = subprocess.Popen([sys.executable, "-c", script, str(topology), DB], cwd=REPO,
                             env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: not in_recovery(plan, DB, "replica"), 120, "the replica to be promoted", interval=0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    with get_client(sync_client=True) as client:  # the operator frees the dead run's lock
        client.update_global_concurrency_limit(lock_name(db), GlobalConcurrencyLimitUpdate(active_slots=0))

    report = db_failover(plan=str(topology), database=DB, mode="multi-az")  # no approve: nothing left to approve
    assert report.outcome == "failed over", report.markdown()
    assert [s.action for s in report.steps] == ["found", "found promoted", "cut over"]
    assert report.validation.passed
    written = Path(report.written_to)  # the evidence outlives the run: markdown and JSON in drill.report_dir
    assert "failed over" in written.read_text()
    assert json.loads(written.with_suffix(".json").read_text())["outcome"] == "failed over"
    postmortem = written.with_name(f"{written.stem}-postmortem.md").read_text()
    assert "## Root cause" in postmortem and "cut over" in postmortem and ", met)" in postmortem
    asserting_and_emitting_events_worker.drain()
    events = {e.event: e for e in asserting_and_emitting_events_worker._client.events
              if e.event.startswith("drplan.recovery.")}
    assert "drplan.recovery.promoted" not in events  # (the killed run's events went from its own process)
    assert "***" in events["drplan.recovery.cut-over"].payload["after"]  # the URL, password redacted
    assert not pg.status(db.primary).running
    assert app_port(sandbox) == int(db.endpoints[db.replica].split(":")[1])
    assert wait_for(lambda: app_users(sandbox) == plan.sandbox.demo_rows, 15, "the app on the promoted replica")


def test_after_the_promotion_the_new_primary_is_unprotected_until_reprotect(topology, sandbox):
    plan = load_plan(topology)
    db = plan.database(DB)
    state = db_failover(plan=str(topology), database=DB, mode="promote-replica", approve=True, return_state=True)
    assert state.is_failed()  # the DR replica follows the stopped old primary: promoting it would fork history
    assert str(state.result(raise_on_failure=False)) == (
        f"{DB}: the primary {db.replica} has no replica in us-west-2 to promote; run drplan reprotect --database "
        f"{DB} first")

    before = stack_snapshot(plan, DB)
    dry = reprotect(plan=str(topology), database=DB, dry_run=True)
    assert [(s.action, s.resource) for s in dry.steps] == [
        ("would ask approval", DB), ("would back up", db.replica), ("would rebuild", db.primary),
        ("would rebuild", db.dr_replica.identifier)]
    assert stack_snapshot(plan, DB) == before

    report = reprotect(plan=str(topology), database=DB, approve=True)
    assert report.outcome == "protected", report.markdown()
    assert report.gaps == [f"live primary {db.replica} has no replica in us-east-1",
                           f"live primary {db.replica} has no replica in us-west-2"]
    assert in_recovery(plan, DB, "primary") and in_recovery(plan, DB, "dr_replica")  # rebuilt as its standbys
    with pg_target(plan, db, "replica", db_credentials(plan, db)).connect(autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")
        conn.execute("CREATE TABLE IF NOT EXISTS written_after_reprotect (n int); "
                     "INSERT INTO written_after_reprotect VALUES (1)")
    for role in ("primary", "dr_replica"):  # both stream from the new primary
        with pg_target(plan, db, role, db_credentials(plan, db)).connect(autocommit=True) as conn:
            wait_for(lambda c=conn: c.execute("SELECT to_regclass('public.written_after_reprotect') IS NOT NULL")
                     .fetchone()[0], 15, f"the {role} to replay the new primary's write")
    again = reprotect(plan=str(topology), database=DB)  # no approve needed: nothing to do
    assert again.outcome.startswith(f"already protected: {db.replica} archives WAL")


def test_lag_guard_refuses_a_lagging_replica_and_force_promotes_it(topology, sandbox,
                                                                   asserting_and_emitting_events_worker):
    plan = load_plan(topology)
    db = plan.database(DB)
    pg = stack.sandbox_postgres(plan, db)
    pg.stop_heartbeat(db.primary)  # it wrote to the old primary: now the heartbeat goes to the live one
    pg.start_heartbeat(db.replica, interval=1, table=db.integrity.heartbeat_table)
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
    state = db_failover(plan=str(topology), database=DB, mode="promote-replica", approve=True, fence=False,
                        return_state=True)
    assert "skipping the fence of the old primary needs force" in str(state.result(raise_on_failure=False))

    report = db_failover(plan=str(topology), database=DB, mode="promote-replica", approve=True, force=True)
    assert report.outcome == "failed over", report.markdown()
    assert [s.action for s in report.steps] == ["found", "lag guard overridden", "approval", "fenced", "promoted",
                                                "cut over"]
    assert report.fence == "fenced"
    asserting_and_emitting_events_worker.drain()
    events = {e.event: e for e in asserting_and_emitting_events_worker._client.events
              if e.event.startswith("drplan.recovery.")}
    assert {"drplan.recovery.fenced", "drplan.recovery.promoted", "drplan.recovery.cut-over"} <= set(events)
    promoted = events["drplan.recovery.promoted"]
    assert promoted.resource.id == f"drplan.database.{DB}"
    assert (promoted.payload["before"], promoted.payload["after"]) == ("standby", "primary")
    assert promoted.payload["actor"].startswith("db-failover run ")
    with pg_target(plan, db, "replica", db_credentials(plan, db)).connect(autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # the old primary (since Multi-AZ) refuses writes
            conn.execute("CREATE TABLE written_after_the_fence ()")
    assert report.validation.passed
    exposure = next(c for c in report.validation.checks if c.name == f"database {DB}: network exposure")
    assert exposure.observed == "unchanged"  # the DR replica (another port) is exposed as the old primary was
    assert not in_recovery(plan, DB, "dr_replica")
    assert app_port(sandbox) == int(db.endpoints[db.dr_replica.identifier].split(":")[1])
    assert wait_for(lambda: app_users(sandbox) == plan.sandbox.demo_rows, 15, "the app on the promoted replica")
