"""Live topology discovery: RDS members and recovery copies found from fakes (fast), and against the real sandbox
the healthy topology, `drplan topology --json`, and a split brain on an own primary + replicas."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from botocore.exceptions import ClientError
from typer.testing import CliRunner

from drplan.clients import db_credentials, pg_target
from drplan.plan import DrillSettings, load_plan
from drplan.topology import State
from sandbox import stack
from tasks import topology as discovery
from tasks.targets import Scratch
from tests.helpers import logged_text, own_postgres_topology

DB = "devonn-postgres"


class FakeRds:
    """describe_db_instances of one region: these instances, or this error."""

    def __init__(self, *instances: dict, error: Exception | None = None):
        self.instances, self.error = list(instances), error

    def get_paginator(self, operation: str) -> FakeRds:
        assert operation == "describe_db_instances"
        return self

    def paginate(self) -> list[dict]:
        if self.error:
            raise self.error
        return [{"DBInstances": self.instances}]


def instance(identifier: str, status: str = "available", source: str | None = None, tags: dict | None = None,
             retention: int = 7) -> dict:
    found = {"DBInstanceIdentifier": identifier, "DBInstanceStatus": status, "BackupRetentionPeriod": retention,
             "Endpoint": {"Address": f"{identifier}.rds.example", "Port": 5432},
             "TagList": [{"Key": k, "Value": v} for k, v in (tags or {}).items()]}
    return found | ({"ReadReplicaSourceDBInstanceIdentifier": source} if source else {})


def test_rds_members_tagged_copies_replica_chains_and_fences(monkeypatch):
    plan = load_plan("plans/sandbox.yaml")
    db = plan.database("devonn-rds")
    regions = {
        "us-east-1": FakeRds(
            instance("devonn-rds-production"),
            instance("devonn-rds-replica-production", "stopped", source="devonn-rds-production"),
            instance("devonn-rds-drill-1", tags={"drplan:drill": "true", "drplan:database": "devonn-rds"}),
            instance("devonn-rds-extra", tags={"drplan:database": "devonn-rds", "drplan:fenced-from": "sg-1"},
                     retention=0),
            instance("cascade", source="devonn-rds-replica-production"),
            instance("someone-else"),
        ),
        "us-west-2": FakeRds(instance("dr-copy", source="arn:aws:rds:us-east-1:123456789012:db:devonn-rds-production")),
    }
    monkeypatch.setattr(discovery, "aws_client", lambda plan, service, region: regions[region])

    members = {m.identifier: m for m in discovery.rds_members(plan, db)}

    assert {i: (m.kind, m.role, m.region) for i, m in members.items()} == {
        "devonn-rds-production": ("plan", "primary", "us-east-1"),
        "devonn-rds-replica-production": ("plan", "replica", "us-east-1"),
        "devonn-rds-dr-production": ("plan", "dr_replica", "us-west-2"),
        "devonn-rds-drill-1": ("recovery-copy", None, "us-east-1"),
        "devonn-rds-extra": ("tagged", None, "us-east-1"),
        "cascade": ("replica-chain", None, "us-east-1"),
        "dr-copy": ("replica-chain", None, "us-west-2"),
    }
    primary = members["devonn-rds-production"]
    assert (primary.address, primary.archiving, primary.state) == ("devonn-rds-production.rds.example:5432", True,
                                                                   State.down)
    assert (members["devonn-rds-replica-production"].state, members["devonn-rds-replica-production"].detail) == (
        State.fenced, "RDS status stopped")
    assert members["devonn-rds-dr-production"].state is State.missing
    assert members["dr-copy"].upstream == "devonn-rds-production"
    assert (members["devonn-rds-extra"].address, members["devonn-rds-extra"].archiving) == (
        "devonn-rds-extra.rds.example:5432", False)
    assert (members["devonn-rds-extra"].state, members["devonn-rds-extra"].detail) == (
        State.fenced, "cut off (security group drplan-fence)")

    regions["us-west-2"] = FakeRds(error=ClientError({"Error": {"Code": "Throttling", "Message": "slow down"}},
                                                     "DescribeDBInstances"))
    dr = next(m for m in discovery.rds_members(plan, db) if m.role == "dr_replica")
    assert dr.state is State.down and dr.detail.startswith("RDS in us-west-2 unreadable: An error occurred (Throttl")


def test_postgres_members_with_the_recovery_copies_restored_here(tmp_path):
    plan = load_plan("plans/sandbox.yaml").model_copy(update={"drill": DrillSettings(work_dir=str(tmp_path))})
    (tmp_path / "drills").mkdir()
    for name, port in (("devonn-postgres-recovery-20261126t120000z", 40001),
                       ("devonn-postgres-x-drill-20261126t120000z", 40002)):  # another database's copy
        copy = Scratch(name=name, host="127.0.0.1", port=port, created_at=datetime(2026, 11, 26, tzinfo=UTC),
                       target_time=datetime(2026, 11, 26, tzinfo=UTC))
        (tmp_path / "drills" / f"{name}.json").write_text(copy.model_dump_json())

    members = discovery.postgres_members(plan, plan.database(DB))

    assert [(m.identifier, m.role, m.kind, m.address) for m in members] == [
        ("devonn-postgres-production", "primary", "plan", "127.0.0.1:15932"),
        ("devonn-postgres-replica-production", "replica", "plan", "127.0.0.1:15933"),
        ("devonn-postgres-dr-production", "dr_replica", "plan", "127.0.0.1:15934"),
        ("devonn-postgres-recovery-20261126t120000z", None, "recovery-copy", "127.0.0.1:40001"),
    ]


def test_upstream_is_the_member_at_the_address_a_replica_streams_from(monkeypatch):
    plan = load_plan("plans/sandbox.yaml")
    db = plan.database(DB)
    answers = {"devonn-postgres-production": (State.primary, None),
               "devonn-postgres-replica-production": (State.replica, ("127.0.0.1", 15932)),
               "devonn-postgres-dr-production": (State.replica, ("10.0.0.9", 5432))}

    def probe(member, db, credentials):
        state, sender = answers[member.identifier]
        return member.model_copy(update={"state": state, "archiving": True}), sender

    monkeypatch.setattr(discovery, "probe", probe)
    monkeypatch.setattr(discovery, "db_credentials", lambda plan, db: object())
    monkeypatch.setattr(discovery, "bindings", lambda plan, db, members_at: [])
    monkeypatch.setattr(discovery.PostgresArchive, "copies", lambda self: [])

    found = discovery.discover_database(plan, db)

    assert [m.upstream for m in found.members] == [None, "devonn-postgres-production", "10.0.0.9:5432"]
    assert found.differences == ["replica devonn-postgres-dr-production replicates from 10.0.0.9:5432, not from the "
                                 "live primary devonn-postgres-production",
                                 "live primary devonn-postgres-production has no replica in us-west-2"]


def test_the_healthy_sandbox_is_as_planned(sandbox, sandbox_dir, caplog):
    caplog.set_level("INFO")
    db = sandbox.database(DB)

    found = discovery.discover(sandbox, [DB])

    topology = found.databases[0]
    members = {m.role: m for m in topology.members if m.role}
    primary = members["primary"]
    assert (primary.identifier, primary.state, primary.archiving, primary.archive_failing) == (
        db.primary, State.primary, True, False)
    assert topology.primary is primary and primary.timeline >= 1
    for role in ("replica", "dr_replica"):
        replica = members[role]
        assert (replica.state, replica.upstream, replica.timeline) == (State.replica, db.primary, primary.timeline)
        assert replica.lag_seconds is not None and replica.lag_seconds < 20
    assert members["dr_replica"].region == db.dr_replica.region
    assert [(b.service, b.cluster, b.member) for b in topology.bindings] == [("devonn-api", "devonn-eks-sandbox",
                                                                              db.primary)]  # DR: nothing deployed
    assert topology.differences == []
    password = stack.sandbox_secrets(sandbox_dir)["db_password"]
    assert password not in found.model_dump_json() and password not in logged_text(caplog)


def test_the_sandbox_rds_database_runs_as_planned_on_its_data_plane(sandbox):
    db = sandbox.database("devonn-rds")

    topology = discovery.discover(sandbox, ["devonn-rds"]).databases[0]

    members = {m.role: m for m in topology.members if m.role}
    assert (members["primary"].state, members["primary"].archiving) == (State.primary, True)
    for role in ("replica", "dr_replica"):  # streaming through the primary's endpoint, as RDS replicas do
        assert (members[role].state, members[role].upstream) == (State.replica, db.primary)
    assert [(b.service, b.member) for b in topology.bindings] == [("devonn-worker", db.primary)]
    assert topology.differences == []


def test_topology_command_as_json(sandbox, sandbox_plan_path):
    from cli.main import app

    result = CliRunner().invoke(app, ["topology", "--plan", str(sandbox_plan_path), "--json", "--database", DB])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["database"] for d in data["databases"]] == [DB] and data["differences"] == []


def test_a_promoted_dr_replica_is_split_brain_and_a_stopped_replica_is_down(sandbox, sandbox_plan_path, sandbox_dir):
    with own_postgres_topology(sandbox_plan_path, sandbox_dir, DB) as path:
        plan = load_plan(path)
        db = plan.database(DB)
        with pg_target(plan, db, "dr_replica", db_credentials(plan, db)).connect(autocommit=True) as conn:
            conn.execute("SELECT pg_promote(true, 60)")
        stack.sandbox_postgres(plan, db).stop(db.replica)

        topology = discovery.discover(plan, [DB]).databases[0]  # pg_promote(wait=true) returned once it was done

        members = {m.role: m for m in topology.members if m.role}
        assert members["dr_replica"].timeline == members["primary"].timeline + 1
        assert members["dr_replica"].upstream is None
        app = sandbox.database(DB).endpoints[sandbox.database(DB).primary]  # the app stays on the session sandbox
        assert topology.differences[:3] == [
            f"split brain: 2 members accept writes: {db.primary}, {db.dr_replica.identifier}",
            f"plan member replica {db.replica} is down: {members['replica'].detail}",
            f"service devonn-api in devonn-eks-sandbox uses {app}, which is no known member, not the plan's primary "
            f"{db.primary}",
        ]
        assert members["replica"].detail.startswith(f"{DB}/{db.replica} (")
        assert f"live primary {db.primary} has no replica in us-east-1" in topology.differences
