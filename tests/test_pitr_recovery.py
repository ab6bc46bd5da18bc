"""PITR recovery on the sandbox: real restore to T, the demo app cut over through its Kubernetes Secret and
serving the rows as they were at T; dry run changes nothing; failed validation rolls the Secret back."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from drplan.clients import db_credentials, kube_client
from drplan.sandbox import stack
from drplan.targets import PostgresArchive
from flows.pitr_recovery import pitr_recovery
from tasks.k8s import find_database_secret, read_secret_value
from tests.helpers import wait_for

pytestmark = pytest.mark.usefixtures("prefect_server")


def app_secret(plan) -> str:
    cluster = plan.cluster("devonn-eks-sandbox")
    api = kube_client(plan, cluster)
    secret, key = find_database_secret(api, cluster.namespace, "devonn-api")
    return read_secret_value(api, cluster.namespace, secret, key)


def stats(plan) -> dict:
    """The app's counts, once it answers them (right after a cutover or rollback it may be reconnecting)."""
    url = plan.services[0].health.removesuffix("/health") + "/api/stats"

    def answer() -> dict | None:
        body = httpx.get(url, timeout=5).json()
        return body if "orders" in body else None

    return wait_for(answer, 20, "the app to answer /api/stats", interval=0.5)


@pytest.fixture
def point_in_time(sandbox, sandbox_dir):
    """Orders deleted after T; yields (T, orders at T); afterwards the rows are back and copies dropped."""
    db = sandbox.database("devonn-postgres")
    pg = stack.postgres_of(sandbox, db, sandbox_dir, stack.sandbox_secrets(sandbox_dir)["db_password"])
    orders_at_t = stats(sandbox)["orders"]
    time.sleep(1)
    at_t = datetime.now(UTC)
    time.sleep(1)
    with pg.connect(db.primary) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders_removed AS SELECT * FROM orders WHERE false")
        conn.execute("WITH gone AS (DELETE FROM orders WHERE id % 7 = 0 RETURNING *) "
                     "INSERT INTO orders_removed SELECT * FROM gone")
        conn.execute("SELECT pg_switch_wal()")
    time.sleep(12)  # past the 10 s margin, archived
    yield at_t, orders_at_t
    with pg.connect(db.primary) as conn:
        conn.execute("INSERT INTO orders SELECT * FROM orders_removed; DROP TABLE orders_removed")
    target = PostgresArchive(sandbox, db)
    for marker in (target.markers).glob("devonn-postgres-recovery-*.json"):
        target.drop(marker.stem)


def test_dry_run_changes_nothing(sandbox, sandbox_plan_path, point_in_time):
    at_t, _ = point_in_time
    before = app_secret(sandbox)
    report = pitr_recovery(plan=str(sandbox_plan_path), database="devonn-postgres", target_time=at_t.isoformat(),
                           promote=True, dry_run=True)
    assert report.outcome == "planned (dry run)"
    assert [s.action for s in report.steps] == ["found", "would restore", "would check", "would ask approval",
                                                "would rewrite", "would restart"]
    assert app_secret(sandbox) == before
    assert not list(PostgresArchive(sandbox, sandbox.database("devonn-postgres")).markers.glob("*recovery*"))


def test_recover_to_t_and_promote_moves_the_app_to_the_rows_at_t(sandbox, sandbox_plan_path, point_in_time):
    at_t, orders_at_t = point_in_time
    before = app_secret(sandbox)
    assert stats(sandbox)["orders"] < orders_at_t  # the "corruption" is live
    try:
        report = pitr_recovery(plan=str(sandbox_plan_path), database="devonn-postgres",
                               target_time=at_t.isoformat(), promote=True, approve=True)
        assert report.outcome == "promoted", report.markdown()
        assert report.validation.passed
        # the live source lost 1/7 of its orders after T: the copy at T differs from it by more than 5%
        assert [c.name for c in report.checks if c.status.value != "passed"] == ["orders: row count"]
        assert wait_for(lambda: stats(sandbox)["orders"] == orders_at_t, 15, "the app serving the rows at T")
        password = db_credentials(sandbox, sandbox.database("devonn-postgres")).password.get_secret_value()
        assert password not in report.model_dump_json()
    finally:
        from tasks.k8s import roll_back

        roll_back(sandbox, sandbox.cluster("devonn-eks-sandbox"), "devonn-api")
    assert app_secret(sandbox) == before


def test_refused_approval_changes_nothing(sandbox, sandbox_plan_path, point_in_time):
    at_t, _ = point_in_time
    before = app_secret(sandbox)
    result = {}

    def run():
        result["state"] = pitr_recovery(plan=str(sandbox_plan_path), database="devonn-postgres",
                                        target_time=at_t.isoformat(), promote=True, return_state=True)

    worker = threading.Thread(target=run)
    worker.start()

    def paused_run():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
        return next((r for r in runs if r.state and r.state.is_paused()), None)

    paused = wait_for(paused_run, 120, "the recovery to pause for approval", interval=0.5)
    resume_flow_run(paused.id, run_input={"approve": False, "reason": "wrong target time"})
    worker.join(120)
    assert "state" in result, "the recovery did not finish after the refusal"
    report = result["state"].result()
    assert report.outcome == "refused: nothing changed"
    assert report.steps[-1].detail == "approve=False wrong target time"
    assert app_secret(sandbox) == before
