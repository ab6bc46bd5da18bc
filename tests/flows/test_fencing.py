"""A fence that cannot be applied (the old primary unreachable, as in a region loss) is recorded as pending, shown
by readiness, and applied by the fence keeper once the old primary answers again: it then refuses writes."""

from __future__ import annotations

import psycopg
import pytest

from drplan.clients import db_credentials, kube_client, pg_target
from drplan.plan import load_plan
from flows.db_failover import db_failover
from flows.dr_readiness import dr_readiness
from flows.fence_keeper import fence_keeper
from sandbox import stack
from tasks.fencing import forget_pending, pending_fences
from tasks.k8s import PREVIOUS_SUFFIX, find_database_secret, read_secret_value, roll_back
from tests.helpers import own_postgres_topology

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure")
DB = "devonn-postgres"


def test_an_unreachable_old_primary_is_fenced_as_soon_as_it_answers_again(sandbox, sandbox_plan_path, sandbox_dir):
    with own_postgres_topology(sandbox_plan_path, sandbox_dir, DB, rpo="1m") as path:
        plan = load_plan(path)
        db = plan.database(DB)
        servers = stack.sandbox_postgres(plan, db)
        servers.stop(db.primary)  # the primary region is lost
        try:
            report = db_failover(plan=str(path), database=DB, mode="promote-replica", approve=True)
            assert report.outcome == "failed over", report.markdown()
            assert [s.action for s in report.steps] == ["found", "lag guard passed", "exposure not measured",
                                                        "approval", "fence pending", "promoted", "cut over"]
            exposure = report.validation.checks[-1]  # the old primary was down: nothing to compare, said so
            assert exposure.status == "skipped" and exposure.observed.startswith(f"not measured: {db.primary} ")
            assert report.fence == "pending"
            assert [(f.member, f.status) for f in pending_fences()] == [(db.primary, "pending")]
            readiness = dr_readiness(plan=str(path), region=plan.aws.region, return_state=True).result(
                raise_on_failure=False)
            shown = next(f for f in readiness.findings if f.check == f"fence of {DB} {db.primary}")
            assert not shown.ready and "fenced as soon as it answers" in shown.detail

            servers._start(db.primary, servers.ports[db.primary])  # the region comes back
            fences = fence_keeper(plan=str(path))
            assert [(f.member, f.status) for f in fences] == [(db.primary, "fenced")]
            assert pending_fences() == []
            with pg_target(plan, db, "primary", db_credentials(plan, db)).connect(autocommit=True) as conn:
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    conn.execute("INSERT INTO drplan_heartbeat (source) VALUES ('after the region came back')")
        finally:
            forget_pending(DB, db.primary)
            cluster = sandbox.cluster("devonn-eks-sandbox")  # the app back on the session's primary
            api = kube_client(sandbox, cluster)
            secret, key = find_database_secret(api, cluster.namespace, "devonn-api")
            if read_secret_value(api, cluster.namespace, secret, key + PREVIOUS_SUFFIX) is not None:
                roll_back(sandbox, cluster, "devonn-api", timeout=60)
