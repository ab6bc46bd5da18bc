"""The `drplan` command line: `plan validate`."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_plan_validate_cli(tmp_path):
    """Offline (no Prefect API: the notification blocks are not looked up; see tests/flows/shared/test_dr_room)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        ok = runner.invoke(app, ["plan", "validate", "plans/devonn.yaml"])
    assert ok.exit_code == 0 and "valid (1 databases" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("aws: {region: us-east-1, dr_region: us-west-2, password: hunter2}\n")
    result = runner.invoke(app, ["plan", "validate", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"{bad}: aws.password: inline secrets are not allowed in a plan; store it in AWS Secrets Manager or a "
        "Prefect Secret block and reference it with credentials_secret / token_secret"
    ]


def test_topology_refuses_an_unknown_database_in_one_line():
    result = runner.invoke(app, ["topology", "--database", "nope"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: plan: unknown database 'nope'; the plan defines: devonn-postgres, devonn-rds"]


def test_topology_prints_members_and_differences_and_exits_1_on_a_difference(monkeypatch):
    from datetime import UTC, datetime

    from drplan.topology import DatabaseTopology, Member, State, Topology

    down = Member(database="db", identifier="db-dr", role="dr_replica", state=State.down,
                  detail="cannot connect: [Errno 111] refused")
    primary = Member(database="db", identifier="db-1", role="primary", state=State.primary, archiving=True)
    replica = Member(database="db", identifier="db-2", role="replica", state=State.replica, upstream="db-1")
    found = Topology(plan="p", discovered_at=datetime(2026, 11, 26, tzinfo=UTC),
                     databases=[DatabaseTopology(database="db", members=[primary, replica, down])])
    monkeypatch.setattr("tasks.topology.discover", lambda plan, databases: found)

    result = runner.invoke(app, ["topology"])

    assert result.exit_code == 1
    assert "[Errno 111]" in result.stdout and "1 difference(s) from the plan" in result.stdout
    assert result.stderr.strip() == "db: plan member dr_replica db-dr is down: cannot connect: [Errno 111] refused"
    as_json = runner.invoke(app, ["topology", "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["differences"] == [
        "db: plan member dr_replica db-dr is down: cannot connect: [Errno 111] refused"]


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    """The entry point's own handling of an error no command turned into a refusal (the command itself is replaced
    by one that fails; everything else is the real entry point)."""
    from cli import main as entry

    def failing() -> None:
        raise RuntimeError("the disk is on fire\nsecond line of the message")

    monkeypatch.setattr(entry, "app", failing)
    monkeypatch.setattr(sys, "argv", ["drplan", "verify-rpo"])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: RuntimeError: the disk is on fire (--debug shows the traceback)")
    monkeypatch.setattr(sys, "argv", ["drplan", "verify-rpo", "--debug"])
    with pytest.raises(RuntimeError, match="the disk is on fire"):
        entry.main()
