"""`drplan copies list|remove`: output, refusals and confirmation with the tasks faked (fast), and a drill copy
restored on the sandbox listed and removed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from cli.main import app
from drplan import processes
from drplan.clients import db_credentials
from drplan.errors import DrplanError
from drplan.timeutil import utcnow
from tasks.copies import RecoveryCopy
from tasks.targets import PostgresArchive, scratch_name

runner = CliRunner()
T = datetime(2026, 12, 2, 12, 55, 12, 123456, tzinfo=UTC)
NAME = "devonn-postgres-recovery-20261202t125512123z"
COPY = RecoveryCopy(database="devonn-postgres", name=NAME, kind="recovery", target_time=T, created_at=T,
                    address="127.0.0.1:40001")


@pytest.fixture
def removed(monkeypatch) -> list[str]:
    names = []
    monkeypatch.setattr("tasks.copies.removable", lambda plan, name: COPY)
    monkeypatch.setattr("tasks.copies.remove_copy", lambda plan, name: names.append(name) or COPY)
    return names


def test_list_prints_each_copy_and_its_services(monkeypatch):
    used = COPY.model_copy(update={"used_by": ["service devonn-api in cluster devonn-eks-sandbox"]})
    monkeypatch.setattr("tasks.copies.list_copies", lambda plan, database: [used])

    table = runner.invoke(app, ["copies", "list"])
    assert table.exit_code == 0, table.output
    assert NAME in table.stdout and "2026-12-02 12:55:12.123Z" in table.stdout and "devonn-api" in table.stdout
    as_json = runner.invoke(app, ["copies", "list", "--json"])
    assert json.loads(as_json.stdout)[0]["used_by"] == ["service devonn-api in cluster devonn-eks-sandbox"]


def test_list_refuses_an_unknown_database_in_one_line():
    result = runner.invoke(app, ["copies", "list", "--database", "nope"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: plan: unknown database 'nope'; the plan defines: devonn-postgres, "
                                     "devonn-rds")


def test_remove_without_a_terminal_or_yes_is_refused_in_one_line(removed):
    result = runner.invoke(app, ["copies", "remove", NAME])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: removing {NAME} needs a yes: run it on a terminal or pass --yes"
    assert removed == []


def test_remove_of_a_copy_a_service_uses_is_refused_in_one_line(removed, monkeypatch):
    def serving(plan, name):
        raise DrplanError(f"copy {name} serves service devonn-api in cluster devonn-eks-sandbox; fail over or recover "
                          "elsewhere first")

    monkeypatch.setattr("tasks.copies.removable", serving)
    result = runner.invoke(app, ["copies", "remove", NAME, "--yes"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: copy {NAME} serves service devonn-api in cluster devonn-eks-sandbox; fail over or recover elsewhere "
        "first"]
    assert removed == []


def test_remove_with_yes(removed):
    result = runner.invoke(app, ["copies", "remove", NAME, "--yes"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"removed recovery copy {NAME} of devonn-postgres"
    assert removed == [NAME]


@pytest.mark.usefixtures("fresh_base_backup")
def test_a_drill_copy_is_listed_then_removed_with_a_yes(sandbox, sandbox_plan_path):
    db = sandbox.database("devonn-postgres")
    target = PostgresArchive(sandbox, db)
    when = target.window().latest - timedelta(seconds=10)
    name = scratch_name(db, utcnow())
    target.restore(name, when, db_credentials(sandbox, db))
    plan = ["--plan", str(sandbox_plan_path)]
    try:
        listed = runner.invoke(app, ["copies", "list", *plan, "--database", db.name, "--json"])
        assert listed.exit_code == 0, listed.output
        (copy,) = [c for c in json.loads(listed.stdout) if c["name"] == name]
        assert (copy["kind"], copy["used_by"], copy["unknown"]) == ("drill", [], [])
        assert datetime.fromisoformat(copy["target_time"]) == when

        unconfirmed = runner.invoke(app, ["copies", "remove", name, *plan])
        assert unconfirmed.exit_code == 2 and "needs a yes" in unconfirmed.stderr
        assert processes.running(target.work_dir, name)

        removed = runner.invoke(app, ["copies", "remove", name, *plan, "--yes"])
        assert removed.exit_code == 0, removed.output
        assert not processes.running(target.work_dir, name) and name not in [c.name for c in target.copies()]
    finally:
        target.drop(name)
