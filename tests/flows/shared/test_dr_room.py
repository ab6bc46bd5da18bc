"""The DR room, through real Prefect notification blocks and the local receiver (deployments/receiver.py): a
recovery run posts its start, its changes, the approval it waits for (escalated level by level while nobody
answers) and its end; a failed one also reaches the secondary channel; a channel that is down never fails the
run."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from prefect import flow

from deployments.receiver import make_server, received
from drplan.plan import load_plan
from flows.shared.gates import request_approval
from flows.shared.report import RecoveryReport, published
from tests.helpers import free_ports

ROOT = Path(__file__).resolve().parents[3]
BLOCKS = {"room": "test-dr-room", "lead": "test-team-lead", "manager": "test-eng-manager", "sms": "test-dr-sms"}


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """The local receiver on a free port, and one webhook block per channel, each naming itself in its posts."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    out = tmp_path_factory.mktemp("receiver") / "received.jsonl"
    server = make_server(free_ports(1)[0], out)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for channel, block in BLOCKS.items():
        CustomWebhookNotificationBlock(name=block, url=f"http://127.0.0.1:{server.server_port}/",
                                       json_data={"channel": channel, "text": "{{subject}}: {{body}}"}
                                       ).save(block, overwrite=True)
    yield out
    server.shutdown()


def room_plan(tmp_path: Path, **notifications) -> str:
    data = yaml.safe_load((ROOT / "plans" / "sandbox.yaml").read_text())
    data["drill"]["report_dir"] = str(tmp_path / "reports")
    data["notifications"] = notifications
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@flow(name="room-recovery")
def room_recovery(plan: str, fail_after_approval: bool) -> RecoveryReport:
    dr_plan = load_plan(plan)
    report = RecoveryReport(flow="room-recovery", plan=dr_plan.name, subject="devonn-rds", dry_run=False)
    with published(report, "room-recovery-devonn-rds", dr_plan):
        decision = request_approval(report, "room-approval", "## Promote devonn-rds-replica?", approve=False,
                                    timeout=timedelta(seconds=120))
        report.record("promoted", "devonn-rds-replica", "pg_promote()", before="replica", after="primary",
                      mutating=True)
        if fail_after_approval:
            raise RuntimeError("the new primary did not answer")
        report.outcome = "recovered" if decision.approve else "refused"
    return report


def posts(out: Path, channel: str, since: int) -> list[str]:
    return [r["text"] for r in received(out)[since:] if r.get("channel") == channel]


def approve_when(out: Path, since: int, channel: str, expected: int) -> None:
    """Wait until `channel` got `expected` posts, then approve the paused run through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + 90
    while len(posts(out, channel, since)) < expected:
        assert time.monotonic() < deadline, f"{channel} got {posts(out, channel, since)}"
        time.sleep(0.3)
    with get_client(sync_client=True) as client:
        (run,) = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["room-recovery"])))
                  if r.state and r.state.is_paused()]
    resume_flow_run(run.id, run_input={"approve": True, "reason": "lag 0s", "approver": "alice"})


@pytest.mark.usefixtures("prefect_server")
def test_the_room_follows_the_run_and_an_unanswered_approval_escalates(receiver, tmp_path):
    plan = room_plan(tmp_path, slack_webhook_block=BLOCKS["room"], secondary_block=BLOCKS["sms"],
                     escalation=[{"name": "Team Lead", "block": BLOCKS["lead"]},
                                 {"name": "Engineering Manager", "block": BLOCKS["manager"]}],
                     escalation_interval="2s")
    since = len(received(receiver))
    approver = threading.Thread(target=approve_when, args=(receiver, since, "manager", 1))
    approver.start()
    report = room_recovery(plan=plan, fail_after_approval=False)
    approver.join(10)
    assert report.outcome == "recovered"
    room = posts(receiver, "room", since)
    assert [p.split(": ")[1].split(" ")[0] for p in room] == ["started", "waiting", "promoted", "finished"], room
    assert room[0].startswith("room-recovery of devonn-rds: started: room-recovery of devonn-rds by ")
    assert "Promote devonn-rds-replica?" in room[1] and "/runs/flow-run/" in room[1]  # where to approve
    assert "(replica -> primary)" in room[2]
    assert "recovered" in room[3] and "tier secondary, met)" in room[3]
    lead, manager = posts(receiver, "lead", since), posts(receiver, "manager", since)
    assert len(lead) == 1 and "ESCALATED to Team Lead" in lead[0]
    assert len(manager) == 1 and "ESCALATED to Engineering Manager" in manager[0]
    assert posts(receiver, "sms", since) == []  # a recovery that worked wakes nobody


@pytest.mark.usefixtures("prefect_server")
def test_a_failed_recovery_reaches_the_secondary_channel_and_a_dead_channel_fails_nothing(receiver, tmp_path):
    plan = room_plan(tmp_path, slack_webhook_block=BLOCKS["room"], secondary_block=BLOCKS["sms"],
                     escalation=[{"name": "Team Lead", "block": "no-such-block"}], escalation_interval="1s")
    since = len(received(receiver))
    approver = threading.Thread(target=approve_when, args=(receiver, since, "room", 2))  # started, waiting
    approver.start()
    state = room_recovery(plan=plan, fail_after_approval=True, return_state=True)
    approver.join(10)
    report = state.result(raise_on_failure=False)
    assert report.outcome == "failed" and report.error == "the new primary did not answer"
    (sms,) = posts(receiver, "sms", since)
    assert "finished: room-recovery of devonn-rds: failed (the new primary did not answer)" in sms
    assert "RTO: not restored by this run" in sms


@pytest.mark.usefixtures("prefect_server")
def test_plan_validate_names_an_escalation_level_whose_block_does_not_exist(receiver, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    good = room_plan(tmp_path, slack_webhook_block=BLOCKS["room"],
                     escalation=[{"name": "Team Lead", "block": BLOCKS["lead"]}])
    assert CliRunner().invoke(app, ["plan", "validate", good]).exit_code == 0
    bad = room_plan(tmp_path, slack_webhook_block=BLOCKS["room"],
                    escalation=[{"name": "Team Lead", "block": BLOCKS["lead"]}, {"name": "CTO", "block": "cto-pager"}])
    result = CliRunner().invoke(app, ["plan", "validate", bad])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "notifications.escalation[1].block: no notification block named 'cto-pager'" in line
