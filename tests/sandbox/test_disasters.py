"""`drplan sandbox break`: each scenario breaks what it says, and the command it prints recovers it (or, for the
destructive failover, is accepted as a dry run)."""

from __future__ import annotations

import shlex
from datetime import datetime

import pytest
from typer.testing import CliRunner

from drplan.clients import aws_client, kube_client
from drplan.plan import load_plan
from drplan.s3store import parse_prefix
from drplan.timeutil import utcnow
from flows.dr_readiness import dr_readiness
from sandbox import stack
from tasks.eks import scale_nodegroup
from tasks.route53 import read_records, switch_records
from tests.helpers import own_postgres_topology, wait_for

DB = "devonn-postgres"


def drplan(*args: str):
    from cli.main import app

    return CliRunner().invoke(app, list(args))


def broken(result) -> tuple[str, list[str]]:
    """(the `broken:` line, the `recover:` command as arguments without `drplan` and the trailing remark)."""
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    command = shlex.split(lines["recover"].split("   (")[0])
    assert command[0] == "drplan"
    return lines["broken"], command[1:]


def live_keys(plan) -> set[str]:
    s3 = aws_client(plan, "s3")
    name, prefix = parse_prefix(plan.buckets[0].live)
    return {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
            for o in page.get("Contents", [])}


@pytest.mark.usefixtures("prefect_server")
def test_deleted_objects_come_back_with_the_printed_restore(sandbox, sandbox_plan_path):
    assert drplan("s3-backup", "--plan", str(sandbox_plan_path)).exit_code == 0  # the backup holds every live key
    before = live_keys(sandbox)
    what, command = broken(drplan("sandbox", "break", "delete-objects", "--plan", str(sandbox_plan_path)))
    gone = before - live_keys(sandbox)
    assert gone and what == f"deleted {len(gone)} of {len(before)} objects from {sandbox.buckets[0].live}"
    assert command[0] == "s3-restore"
    restored = drplan(*command)
    assert restored.exit_code == 0, restored.output
    assert live_keys(sandbox) == before


@pytest.mark.usefixtures("prefect_server")
def test_deleted_orders_name_the_time_to_recover_to(sandbox, sandbox_plan_path):
    db = sandbox.database(DB)
    pg = stack.sandbox_postgres(sandbox, db)
    with pg.connect(db.primary) as conn:
        conn.execute("CREATE TABLE orders_stash AS SELECT * FROM orders WHERE id % 7 = 0")
        stashed = conn.execute("SELECT count(*) FROM orders_stash").fetchone()[0]
    try:
        started = utcnow()
        what, command = broken(drplan("sandbox", "break", "delete-orders", "--plan", str(sandbox_plan_path)))
        assert what.startswith(f"deleted {stashed} orders of {DB} on {db.primary} after ")
        assert command[:5] == ["recover", "--plan", str(sandbox_plan_path), "--database", DB]
        at = datetime.fromisoformat(command[command.index("--to") + 1])
        assert started.replace(microsecond=0) <= at < utcnow() and command[-1] == "--promote"
        with pg.connect(db.primary) as conn:
            assert conn.execute("SELECT count(*) FROM orders WHERE id % 7 = 0").fetchone()[0] == 0
    finally:
        with pg.connect(db.primary) as conn:
            conn.execute("INSERT INTO orders SELECT * FROM orders_stash ON CONFLICT DO NOTHING")
            conn.execute("DROP TABLE orders_stash")


@pytest.mark.usefixtures("prefect_server")
def test_stopped_primary_names_a_failover_the_plan_accepts(sandbox, sandbox_plan_path, sandbox_dir):
    with own_postgres_topology(sandbox_plan_path, sandbox_dir, DB, rpo="5m") as path:
        plan = load_plan(path)
        primary, heartbeat = plan.database(DB).primary, f"heartbeat-{plan.database(DB).primary}"
        writing = wait_for(lambda: next((c for c in stack.status(plan) if c.name == heartbeat and c.healthy), None),
                           10, "the heartbeat writing")
        assert writing.detail.startswith("writing (last row "), writing
        what, command = broken(drplan("sandbox", "break", "stop-primary", "--plan", str(path)))
        again, _ = broken(drplan("sandbox", "break", "stop-primary", "--plan", str(path)))
        assert (what, again) == (f"stopped the primary {primary} of {DB}", f"{primary} was already stopped")
        stalled = wait_for(lambda: next((c for c in stack.status(plan) if c.name == heartbeat and not c.healthy),
                                        None), 15, "sandbox status to see the heartbeat stall")
        assert stalled.pid and stalled.detail.startswith("not writing: last row "), stalled
        assert command == ["failover", "--plan", str(path), "--database", DB, "--mode", "multi-az"]
        planned = drplan(*command, "--dry-run")
        assert planned.exit_code == 0, planned.output
        assert "planned (dry run)" in planned.stdout and "would promote" in planned.stdout
        assert "heartbeat age on the replica; the primary: " in " ".join(planned.stdout.split())


@pytest.mark.usefixtures("prefect_server")
def test_lost_dr_capacity_comes_back_with_the_printed_eks_recovery(sandbox, sandbox_plan_path):
    path, cluster = str(sandbox_plan_path), sandbox.cluster("devonn-eks-dr-sandbox")
    try:
        what, command = broken(drplan("sandbox", "break", "dr-nodes-zero", "--plan", path))
        assert what == f"scaled node groups of {cluster.name} to 0 (dev_nodes was 1)"
        unready = dr_readiness(plan=path, return_state=True).result(raise_on_failure=False)
        assert [f.check for f in unready.unready] == ["devonn-api: cluster capacity", "devonn-worker: cluster capacity"]
        assert command == ["eks-recover", "--plan", path, "--cluster", cluster.name, "--nodes", "dev_nodes=1",
                           "--no-manifests"]
        recovered = drplan(*command)
        assert recovered.exit_code == 0, recovered.output
        assert "EKS recovery of devonn-eks-dr-sandbox: recovered" in recovered.stdout
        assert dr_readiness(plan=path, return_state=True).result(raise_on_failure=False).ready
    finally:  # the DR region's pilot light, as the other tests expect it
        scale_nodegroup(aws_client(sandbox, "eks", "us-west-2"), kube_client(sandbox, cluster), cluster.name,
                        "dev_nodes", 1, timeout=60)


@pytest.mark.usefixtures("prefect_server")
def test_lost_dns_records_come_back_with_the_printed_dns_failover(sandbox, sandbox_plan_path):
    path, r53 = str(sandbox_plan_path), aws_client(sandbox, "route53")
    before = read_records(r53, sandbox.dns)
    try:
        what, command = broken(drplan("sandbox", "break", "delete-dns", "--plan", path))
        assert what == f"deleted the DNS records {', '.join(sandbox.dns.records)}"
        assert read_records(r53, sandbox.dns) == dict.fromkeys(sandbox.dns.records)
        unready = dr_readiness(plan=path, return_state=True).result(raise_on_failure=False)
        assert [f.check for f in unready.unready] == ["DNS"]
        assert command == ["dns-failover", "--plan", path, "--to", "us-east-1"]
        planned = drplan(*command, "--dry-run")
        assert planned.exit_code == 0, planned.output
        assert "planned (dry run)" in planned.stdout and "would switch" in planned.stdout
        assert read_records(r53, sandbox.dns) == dict.fromkeys(sandbox.dns.records)
        switched = drplan(*command, "--yes")
        assert switched.exit_code == 0, switched.output
        assert "DNS failover to us-east-1: DNS on us-east-1" in switched.stdout
        assert read_records(r53, sandbox.dns) == before
        assert dr_readiness(plan=path, return_state=True).result(raise_on_failure=False).ready
        again = drplan(*command, "--yes")  # nothing left to do: no validation, no approval, no change
        assert again.exit_code == 0 and "already switched" in again.stdout, again.output
    finally:
        switch_records(r53, sandbox.dns, before[sandbox.dns.records[0]][0])


@pytest.mark.usefixtures("prefect_server")
def test_dns_failover_refuses_a_region_whose_services_fail_validation(sandbox, sandbox_plan_path):
    """The DR app is not deployed (pilot light): sending the traffic there is refused while the records stay."""
    r53 = aws_client(sandbox, "route53")
    before = read_records(r53, sandbox.dns)
    refused = drplan("dns-failover", "--plan", str(sandbox_plan_path), "--to", "us-west-2", "--yes")
    assert refused.exit_code == 2, refused.output
    assert "the services in us-west-2 do not pass validation (devonn-api: health" in refused.stderr
    assert read_records(r53, sandbox.dns) == before


def test_eks_recover_refuses_bad_counts_in_one_line(sandbox_plan_path):
    bad = drplan("eks-recover", "--plan", str(sandbox_plan_path), "--cluster", "devonn-eks-dr-sandbox",
                 "--nodes", "dev_nodes=many")
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: --nodes 'dev_nodes=many': write NAME=COUNT, e.g. --nodes dev_nodes=3"


def test_refusals_are_one_line(sandbox_plan_path):
    unknown = drplan("sandbox", "break", "meteor", "--plan", str(sandbox_plan_path))
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == ("error: no scenario 'meteor'; choose one of: delete-orders, stop-primary, "
                                      "delete-objects, dr-nodes-zero, delete-dns, bad-deploy, bad-config, "
                                      "leaked-credentials")
    production = drplan("sandbox", "break", "stop-primary", "--plan", "plans/devonn.yaml")
    assert production.exit_code == 2 and "has no sandbox section" in production.stderr


def test_a_sandbox_that_is_not_up_is_refused_and_left_alone(plan_variant, tmp_path):
    def elsewhere(data: dict) -> None:
        data["sandbox"]["state_dir"] = str(tmp_path / "never-up")

    refused = drplan("sandbox", "break", "stop-primary", "--plan", str(plan_variant(elsewhere)))
    assert refused.exit_code == 2 and "is not up; start it first: drplan sandbox up" in refused.stderr
    assert not (tmp_path / "never-up").exists()
