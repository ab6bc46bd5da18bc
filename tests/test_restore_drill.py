"""Restore drill on the sandbox: real PITR of PostgreSQL (barman-cloud + WAL replay), the RDS control plane on
moto, checks that catch overshoot and corruption, measured RTO/RPO, cleanup after success, failure and crash."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from drplan.cli import app
from drplan.clients import aws_client, db_credentials
from drplan.drill_report import CheckStatus, DrillReport
from drplan.errors import DrplanError
from drplan.sandbox import stack
from drplan.targets import DRILL_TAG, PostgresArchive, RdsInstance, RestorableWindow
from flows.restore_drill import choose_target_time, restore_drill

pytestmark = pytest.mark.usefixtures("prefect_server")
runner = CliRunner()
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def run_drill(plan_path, **params) -> list[DrillReport]:
    state = restore_drill(plan=str(plan_path), return_state=True, **params)
    return state.result(raise_on_failure=False)


def primary(sandbox, sandbox_dir):
    db = sandbox.database("devonn-postgres")
    return db, stack.postgres_of(sandbox, db, sandbox_dir, stack.sandbox_secrets(sandbox_dir)["db_password"])


def drill_instances(plan) -> list[dict]:
    rds = aws_client(plan, "rds").describe_db_instances()["DBInstances"]
    return [i for i in rds if any(t["Key"] == DRILL_TAG for t in i.get("TagList", []))]


def test_target_time_choice():
    window = RestorableWindow(earliest=NOW - timedelta(hours=2), latest=NOW)
    assert choose_target_time(window, None, None, timedelta(minutes=1)) == NOW - timedelta(minutes=1)
    assert choose_target_time(window, NOW - timedelta(hours=1), None, timedelta(minutes=1)) == NOW - timedelta(hours=1)
    for _ in range(20):
        picked = choose_target_time(window, None, timedelta(minutes=30), timedelta(minutes=1))
        assert NOW - timedelta(minutes=31) <= picked <= NOW - timedelta(minutes=1)
    with pytest.raises(DrplanError, match="outside the restorable window"):
        choose_target_time(window, NOW - timedelta(hours=3), None, timedelta(minutes=1))
    with pytest.raises(DrplanError, match="shorter than the target margin"):
        choose_target_time(RestorableWindow(earliest=NOW, latest=NOW), None, None, timedelta(minutes=1))


@pytest.mark.parametrize("args,message", [
    (["--target-time", "2026-11-26T12:00:00"], "has no time zone; add one"),
    (["--target-time", "yesterday"], "is not an ISO 8601 time"),
    (["--target-time", "2099-01-01T00:00:00Z"], "is in the future; choose a past time"),
    (["--random-within", "a day"], "is not a duration"),
    (["--database", "nope"], "unknown database 'nope'; the plan defines: devonn-postgres, devonn-rds"),
    (["--target-time", "latest", "--random-within", "1h"], "pass either target_time or random_within"),
])
def test_bad_input_is_refused_before_anything_runs(sandbox_plan_path, args, message):
    result = runner.invoke(app, ["drill", "--plan", str(sandbox_plan_path), *args])
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_rds_restore_carries_source_settings_and_drill_tags(sandbox):
    target = RdsInstance(sandbox, sandbox.database("devonn-rds"))
    source = target._source()
    when = target.window().latest - timedelta(seconds=1)
    request = target.restore_request("devonn-rds-drill-settings", when)
    assert request["DBSubnetGroupName"] == source["DBSubnetGroup"]["DBSubnetGroupName"] == "devonn-db-subnets"
    assert request["DBParameterGroupName"] == "devonn-postgres16"
    assert request["VpcSecurityGroupIds"] == [g["VpcSecurityGroupId"] for g in source["VpcSecurityGroups"]]
    assert {t["Key"]: t["Value"] for t in request["Tags"]}[DRILL_TAG] == "true"
    target.poll_seconds = 0.2
    scratch = target.restore("devonn-rds-drill-settings", when, db_credentials(sandbox, target.db))
    try:
        restored = target._describe(scratch.name)
        assert restored["DBSubnetGroup"]["DBSubnetGroupName"] == "devonn-db-subnets"
        assert restored["DBParameterGroups"][0]["DBParameterGroupName"] == "devonn-postgres16"
        assert any(t["Key"] == DRILL_TAG for t in restored["TagList"])
    finally:
        assert target.drop(scratch.name)
    assert not drill_instances(sandbox)


def test_rds_time_outside_the_window_fails_before_any_restore_call(sandbox, sandbox_plan_path):
    calls = []
    rds = aws_client(sandbox, "rds")
    rds.meta.events.register("before-call.rds.*", lambda model, **_: calls.append(model.name))
    too_old = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (report,) = run_drill(sandbox_plan_path, database="devonn-rds", target_time=too_old)
    assert report.status is CheckStatus.error and "outside the restorable window" in report.error
    assert "RestoreDBInstanceToPointInTime" not in calls and "DeleteDBInstance" not in calls
    assert report.cleanup == "nothing restored"


def test_rds_failure_after_the_restore_leaves_no_scratch_instance(sandbox, sandbox_plan_path, monkeypatch):
    monkeypatch.setattr(RdsInstance, "poll_seconds", 0.2)
    (report,) = run_drill(sandbox_plan_path, database="devonn-rds")
    # moto restores the control plane only: the scratch endpoint holds no database, so the checks error out
    assert report.status is CheckStatus.error and report.scratch.startswith("devonn-rds-drill-")
    assert report.cleanup == "removed"
    assert not drill_instances(sandbox)


def test_crashed_drill_leftover_is_swept_by_the_next_drill(sandbox, sandbox_plan_path, plan_variant):
    db = sandbox.database("devonn-postgres")
    target = PostgresArchive(sandbox, db)
    window = target.window()
    leftover = target.restore("devonn-postgres-drill-crashed", window.latest - timedelta(seconds=10),
                              db_credentials(sandbox, db))  # what a run killed mid-drill leaves running
    assert [x.name for x in target.leftovers()] == [leftover.name]
    time.sleep(1)
    path = plan_variant(lambda d: d.setdefault("drill", {}).update(sweep_after="1s"))
    (report,) = run_drill(path, database="devonn-postgres")
    assert leftover.name in report.swept
    assert target.leftovers() == [] and not target._local().data_dir(leftover.name).exists()
    assert report.cleanup == "removed"
