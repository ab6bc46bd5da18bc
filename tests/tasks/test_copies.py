"""Listing and removing copies: PostgreSQL copies from markers written here, RDS copies as instances on a real
moto_server, and the services' bindings faked (which Kubernetes Secret each service uses)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from drplan.clients import aws_client
from drplan.errors import DrplanError
from drplan.plan import DrillSettings, load_plan
from drplan.topology import Binding
from tasks import copies
from tasks.targets import PostgresArchive, Scratch
from tests.rds_moto import create_copy, on_moto

T = datetime(2026, 12, 2, 12, 55, 12, 123456, tzinfo=UTC)
API = "service devonn-api in cluster devonn-eks-sandbox"
RECOVERY = "devonn-postgres-recovery-20261202t125512123z"
DRILL = "devonn-postgres-drill-20261202t130000000z"


@pytest.fixture
def plan(tmp_path, monkeypatch, moto_rds):
    """The sandbox plan with two devonn-postgres copies restored here (the recovery copy served since T), devonn-api
    bound to the recovery copy, and no RDS copy (its RDS on moto, emptied)."""
    plan = load_plan("plans/sandbox.yaml").model_copy(update={"drill": DrillSettings(work_dir=str(tmp_path))})
    plan = on_moto(plan, moto_rds)
    (tmp_path / "drills").mkdir()
    for name, port, served in ((RECOVERY, 40001, T), (DRILL, 40002, None)):
        scratch = Scratch(name=name, host="127.0.0.1", port=port, created_at=T, target_time=T, served_at=served)
        (tmp_path / "drills" / f"{name}.json").write_text(scratch.model_dump_json())
    monkeypatch.setattr(copies, "bindings", lambda plan, db, members_at: [
        Binding(service="devonn-api", cluster="devonn-eks-sandbox", region="us-east-1", host="127.0.0.1", port=40001,
                member=members_at.get(("127.0.0.1", 40001)))] if db.name == "devonn-postgres" else [])
    return plan


@pytest.fixture
def dropped(monkeypatch) -> list[str]:
    names = []
    monkeypatch.setattr(PostgresArchive, "drop", lambda self, name: names.append(name) or True)
    return names


def test_every_copy_with_its_kind_target_time_and_the_service_using_it(plan):
    name = "devonn-rds-drill-20261202t125512123z"
    endpoint = create_copy(aws_client(plan, "rds"), name, T)["Endpoint"]

    listed = copies.list_copies(plan)

    assert [(c.database, c.name, c.kind, c.address, c.used_by) for c in listed] == [
        ("devonn-postgres", DRILL, "drill", "127.0.0.1:40002", []),
        ("devonn-postgres", RECOVERY, "recovery", "127.0.0.1:40001", [API]),
        ("devonn-rds", name, "drill", f"{endpoint['Address']}:5432", []),
    ]
    assert listed[1].row == {
        "copy": RECOVERY, "kind": "recovery", "target time": "2026-12-02 12:55:12.123Z",
        "created": "2026-12-02 12:55:12.123Z", "served since": "2026-12-02 12:55:12.123Z", "address": "127.0.0.1:40001",
        "used by": API}
    assert [c.name for c in copies.list_copies(plan, "devonn-rds")] == [name]


def test_a_copy_a_service_uses_is_not_removed(plan, dropped):
    with pytest.raises(DrplanError) as refused:
        copies.remove_copy(plan, RECOVERY)
    assert str(refused.value) == f"copy {RECOVERY} serves {API}; fail over or recover elsewhere first"
    assert dropped == []


@pytest.mark.parametrize("name", ["devonn-postgres-recovery-20991231t000000000z", "devonn-postgres-production",
                                  "nope"])
def test_a_name_that_is_no_copy_of_the_plan_is_refused(plan, dropped, name):
    with pytest.raises(DrplanError, match=f"^{name} is no recovery or drill copy of plan sandbox; `drplan copies list` "
                                          "shows them$"):
        copies.remove_copy(plan, name)
    assert dropped == []


def test_an_unreadable_binding_refuses_the_removal(plan, dropped, monkeypatch):
    monkeypatch.setattr(copies, "bindings", lambda plan, db, members_at: [
        Binding(service="devonn-api", cluster="devonn-eks-sandbox", region="us-east-1", error="connection refused")])
    with pytest.raises(DrplanError, match=f"^cannot tell whether copy {DRILL} serves service devonn-api in cluster "
                                          r"devonn-eks-sandbox \(connection refused\); make that cluster readable"):
        copies.remove_copy(plan, DRILL)
    assert dropped == []


def test_a_copy_no_service_uses_is_dropped(plan, dropped):
    removed = copies.remove_copy(plan, DRILL)
    assert (removed.name, removed.kind, dropped) == (DRILL, "drill", [DRILL])
