"""The live topology's judgement: the writable primary, split brain, what a service really uses, protection."""

from datetime import UTC, datetime

from drplan.topology import Binding, DatabaseTopology, Member, State, Topology

DB = "orders"


def member(identifier: str, state: State, role: str | None = None, **fields) -> Member:
    fields.setdefault("archiving", True)
    return Member(database=DB, identifier=identifier, role=role, state=state, **fields)


def binding(identifier: str | None, **fields) -> Binding:
    fields.setdefault("host", "10.0.0.1")
    return Binding(service="api", cluster="eks", region="us-east-1", secret="default/api-db:DATABASE_URL", port=5432,
                   member=identifier, **fields)


def healthy(**changes) -> DatabaseTopology:
    """primary (archiving), replica and dr replica following it, the app on the primary; `changes` by identifier."""
    members = {
        "p": member("p", State.primary, "primary", timeline=1),
        "r": member("r", State.replica, "replica", upstream="p", lag_seconds=0.0),
        "dr": member("dr", State.replica, "dr_replica", upstream="p", region="us-west-2", lag_seconds=1.5),
    }
    for identifier, update in changes.items():
        members[identifier] = members[identifier].model_copy(update=update) if update else None
    return DatabaseTopology(database=DB, members=[m for m in members.values() if m], bindings=[binding("p")],
                            home_region="us-east-1", wants_replica=True, dr_region="us-west-2")


def test_the_plan_as_it_should_be_has_no_differences():
    topology = healthy()
    assert topology.differences == []
    assert topology.primary.identifier == "p" and [m.identifier for m in topology.used] == ["p"]


def test_two_writable_members_are_split_brain_the_one_serving_is_the_primary():
    topology = healthy(dr={"state": State.primary, "upstream": None, "timeline": 2})
    assert topology.primary.identifier == "p"  # the app's
    assert topology.differences[0] == "split brain: 2 members accept writes: p, dr"
    assert "live primary dr has no replica in us-east-1" in topology.differences
    assert "live primary p has no replica in us-west-2" in topology.differences
    both_serve = topology.model_copy(update={"bindings": [binding("p"), binding("dr")]})
    assert both_serve.primary is None


def test_app_on_an_unprotected_recovery_copy():
    copy = member("orders-recovery-1", State.primary, kind="recovery-copy", archiving=False, host="127.0.0.1")
    topology = healthy()
    topology = topology.model_copy(update={"members": [*topology.members, copy],
                                           "bindings": [binding("orders-recovery-1")]})
    assert topology.differences == [
        "split brain: 2 members accept writes: p, orders-recovery-1",
        "service api in eks uses recovery copy orders-recovery-1, not the plan's primary p",
        "live primary orders-recovery-1 does not archive WAL",
        "live primary orders-recovery-1 has no replica in us-east-1",
        "live primary orders-recovery-1 has no replica in us-west-2",
    ]
    assert topology.primary.identifier == "orders-recovery-1"


def test_an_unused_recovery_copy_is_not_a_writer():
    copy = member("orders-drill-1", State.primary, kind="recovery-copy", archiving=False)
    topology = healthy()
    topology = topology.model_copy(update={"members": [*topology.members, copy]})
    assert topology.primary.identifier == "p" and topology.differences == []


def test_plan_primary_fenced_after_a_failover_to_the_replica():
    topology = healthy(p={"state": State.fenced, "detail": "RDS status stopped"},
                       r={"state": State.primary, "upstream": None, "timeline": 2},
                       dr={"upstream": "r"})
    topology = topology.model_copy(update={"bindings": [binding("r")]})
    assert topology.differences == [
        "the writable primary is r, not the plan's primary p",
        "plan member primary p is fenced: RDS status stopped",
        "service api in eks uses member r, not the plan's primary p",
        "live primary r has no replica in us-east-1",  # until reprotect rebuilds one
    ]


def test_replica_following_an_old_primary_and_a_missing_member():
    topology = healthy(dr={"upstream": "r"}, r={"state": State.missing})
    assert topology.differences == [
        "plan member replica r is missing",
        "replica dr replicates from r, not from the live primary p",
        "live primary p has no replica in us-east-1",
        "live primary p has no replica in us-west-2",
    ]


def test_unprotected_primary():
    assert healthy(p={"archiving": False}).differences == ["live primary p does not archive WAL"]
    assert healthy(p={"archive_failing": True}).differences == ["live primary p: WAL archiving is failing"]
    assert healthy(r=None, dr=None).differences == ["live primary p has no replica in us-east-1",
                                                    "live primary p has no replica in us-west-2"]
    assert healthy(dr=None).differences == ["live primary p has no replica in us-west-2"]


def test_after_a_region_failover_the_dr_replica_belongs_home():
    topology = healthy(p={"state": State.fenced}, r=None, dr={"state": State.primary, "upstream": None})
    assert topology.primary.identifier == "dr"
    assert topology.other_region(topology.primary) == "us-east-1"
    assert topology.protection_gaps(topology.primary) == ["live primary dr has no replica in us-east-1"]
    home = member("home", State.replica, kind="tagged", upstream="dr")  # no region: the home region
    protected = topology.model_copy(update={"members": [*topology.members, home]})
    assert protected.protection_gaps(protected.primary) == []
    assert protected.dr_replica(protected.primary).identifier == "home"


def test_nothing_writable_and_a_service_on_something_unknown():
    topology = healthy(p={"state": State.down, "detail": "connection refused"})
    topology = topology.model_copy(update={"bindings": [binding(None, host="10.9.9.9"),
                                                        binding(None, host=None, error="no DATABASE_URL")]})
    assert topology.primary is None
    assert topology.differences == [
        "no member accepts writes",
        "plan member primary p is down: connection refused",
        "service api in eks uses 10.9.9.9:5432, which is no known member, not the plan's primary p",
        "service api in eks: cannot tell which database it uses: no DATABASE_URL",
    ]


def test_markdown_and_json_carry_members_bindings_and_differences():
    topology = Topology(plan="sandbox", discovered_at=datetime(2026, 11, 26, 12, 0, tzinfo=UTC),
                        databases=[healthy(), healthy(p={"archiving": False})])
    text = topology.markdown()
    assert text.startswith("## Live topology of sandbox at 2026-11-26 12:00:00Z")
    assert "| dr | dr_replica | plan | us-west-2 | - | replica | - | p | 1.5s | on |" in text
    assert "| api | eks | us-east-1 | default/api-db:DATABASE_URL | 10.0.0.1:5432 | p |" in text
    assert "No differences from the plan." in text and "- live primary p does not archive WAL" in text
    assert topology.differences == ["orders: live primary p does not archive WAL"]
    again = Topology.model_validate_json(topology.model_dump_json())
    assert again.databases[1].differences == ["live primary p does not archive WAL"]
