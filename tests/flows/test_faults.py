"""The runbooks under AWS faults: the session sandbox's plan with its AWS endpoint behind `sandbox/fault_proxy.py`
(30% of requests throttled or reset). Each run ends as it does without faults, and its report counts the retries.
One proxy for the module; the faults it injected are asserted per run. The Multi-AZ failover leaves the session's
topology as it was (same instance and endpoint, the standby promoted behind it); the region failover runs on
topologies of its own and puts the clusters and DNS records back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from drplan.clients import aws_client
from drplan.plan import load_plan
from drplan.results import Status
from flows.db_failover import db_failover
from flows.region_failover import region_failover
from flows.restore_drill import restore_drill
from flows.rpo_verification import rpo_verification
from flows.s3_backup import s3_backup
from flows.s3_recovery import s3_recovery
from sandbox.fault_proxy import FaultProxy
from tasks.rds import read_replica_lag
from tasks.route53 import switch_records
from tests.helpers import clusters_restored, own_postgres_topology, own_rds_topology, wait_for
from tests.s3_moto import listing

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure")


@pytest.fixture(scope="module")
def proxy(sandbox) -> Iterator[FaultProxy]:
    with FaultProxy(sandbox.aws.endpoint_url, fraction=0.3, seed=1) as running:
        yield running


def behind(proxy: FaultProxy, plan_path: Path, path: Path) -> Path:
    """A copy of the plan at `plan_path`, written to `path`, whose AWS endpoint is the proxy."""
    data = yaml.safe_load(plan_path.read_text())
    data["aws"]["endpoint_url"] = proxy.url
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def faulty_plan(sandbox_plan_path: Path, proxy: FaultProxy, tmp_path_factory) -> Path:
    return behind(proxy, sandbox_plan_path, tmp_path_factory.mktemp("faults") / "plan.yaml")


@pytest.fixture
def injected(proxy: FaultProxy) -> Iterator[None]:
    """The test's runs met faults of the proxy."""
    before = proxy.counts()
    yield
    during = {kind: count - before[kind] for kind, count in proxy.counts().items()}
    print(f"proxy during the test: {during}")
    assert sum(during.values()) > during["forwarded"], during


def result(state):
    assert state.is_completed(), state.message
    return state.result()


@pytest.mark.usefixtures("injected", "fresh_backups")
def test_rpo_verification_measures_the_same(sandbox_plan_path, faulty_plan):
    def statuses(report) -> dict[tuple[str, str], Status]:
        return {(m.resource, m.measure): m.status for m in report.measurements}

    clean = result(rpo_verification(plan=str(sandbox_plan_path), return_state=True))
    faulty = result(rpo_verification(plan=str(faulty_plan), return_state=True))
    assert statuses(faulty) == statuses(clean) and set(statuses(faulty).values()) == {Status.passed}
    print(f"rpo-verification: AWS retries {faulty.aws_retries}")
    assert faulty.aws_retries > 0 and f"AWS retries: {faulty.aws_retries}" in faulty.markdown()


@pytest.mark.usefixtures("injected", "fresh_base_backup")
def test_postgres_drill_replays_to_the_target(sandbox, faulty_plan):
    """barman-cloud fetches the base backup and every WAL segment through the proxy: a throttled fetch that were
    not retried would end the replay early, and the fingerprints compared with the source would differ."""
    (report,) = result(restore_drill(plan=str(faulty_plan), database="devonn-postgres", return_state=True))
    assert report.status is Status.passed, report.markdown()
    checks = {c.name: c.status for c in report.checks}
    assert checks["orders: fingerprint"] is Status.passed
    print(f"postgres drill: AWS retries {report.aws_retries}")
    assert report.cleanup == "removed" and f"AWS retries: {report.aws_retries}" in report.markdown()


@pytest.mark.usefixtures("injected", "fast_rds_polls")
def test_rds_drill_passes(faulty_plan):
    (report,) = result(restore_drill(plan=str(faulty_plan), database="devonn-rds", return_state=True))
    assert report.status is Status.passed, report.markdown()
    print(f"rds drill: AWS retries {report.aws_retries}")
    assert report.aws_retries > 0 and report.cleanup == "removed"


@pytest.mark.usefixtures("injected")
def test_s3_backup_and_restore(sandbox, faulty_plan):
    (bucket,) = sandbox.buckets
    live = bucket.live.removeprefix("s3://").rstrip("/")
    s3 = aws_client(sandbox, "s3")  # not through the proxy
    before = [(key, size, etag) for key, size, etag, _ in listing(s3, live)]

    (backup,) = result(s3_backup(plan=str(faulty_plan), return_state=True))
    print(f"s3-backup: AWS retries {backup.aws_retries}")
    assert backup.objects == len(before) and backup.aws_retries > 0

    lost = [key for key, *_ in before[:20]]
    s3.delete_objects(Bucket=live, Delete={"Objects": [{"Key": key} for key in lost]})
    report = result(s3_recovery(plan=str(faulty_plan), dry_run=False, workers=8, return_state=True))
    assert report.complete and report.copied.objects == len(lost) and report.verification.ok, report.summary
    assert [(key, size, etag) for key, size, etag, _ in listing(s3, live)] == before
    print(f"s3-restore: {report.summary}")
    assert f"{report.aws_retries} AWS retries" in report.summary


@pytest.mark.usefixtures("injected", "fast_rds_polls")
def test_multi_az_failover(sandbox, faulty_plan):
    db = sandbox.database("devonn-rds")
    before = aws_client(sandbox, "rds").describe_db_instances(DBInstanceIdentifier=db.primary)["DBInstances"][0]
    report = result(db_failover(plan=str(faulty_plan), database=db.name, mode="multi-az", approve=True,
                                return_state=True))
    assert report.outcome == "failed over", report.markdown()
    after = aws_client(sandbox, "rds").describe_db_instances(DBInstanceIdentifier=db.primary)["DBInstances"][0]
    assert (after["AvailabilityZone"], after["Endpoint"]) == (before["SecondaryAvailabilityZone"], before["Endpoint"])
    print(f"multi-az failover: AWS retries {report.aws_retries}")
    assert report.aws_retries > 0 and f"AWS retries: {report.aws_retries}" in report.markdown()


@pytest.fixture
def own_topologies(sandbox, sandbox_plan_path, sandbox_dir) -> Iterator[Path]:
    """Both databases of their own (set up without faults); afterwards the clusters and DNS records as they were."""
    with clusters_restored(sandbox), own_postgres_topology(sandbox_plan_path, sandbox_dir, "devonn-postgres") as pg, \
            own_rds_topology(pg, "devonn-rds") as path:
        plan = load_plan(path)
        db = plan.database("devonn-rds")
        cloudwatch = aws_client(plan, "cloudwatch", db.dr_replica.region)
        wait_for(lambda: read_replica_lag.fn(cloudwatch, db.dr_replica.identifier) is not None, 30,
                 "the first ReplicaLag datapoint of the RDS DR replica")
        try:
            yield path
        finally:
            switch_records(aws_client(plan, "route53"), plan.dns, plan.dns.targets[plan.aws.region])


@pytest.mark.usefixtures("injected")
def test_region_failover(proxy, own_topologies):
    plan = load_plan(own_topologies)
    report = result(region_failover(plan=str(behind(proxy, own_topologies, own_topologies.with_name("faults.yaml"))),
                                    approve=True, return_state=True))
    assert report.outcome == f"serving from {plan.aws.dr_region}" and report.validation.passed, report.markdown()
    assert report.rto_seconds < report.rto_objective_seconds
    print(f"region failover: AWS retries {report.aws_retries}")
    assert report.aws_retries > 0 and f"AWS retries: {report.aws_retries}" in report.markdown()
