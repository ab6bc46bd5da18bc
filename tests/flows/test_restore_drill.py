"""Restore drill on the sandbox: real PITR of PostgreSQL (barman-cloud + WAL replay) and of RDS (the sandbox's RDS
data plane), checks that catch overshoot and corruption, measured RTO/RPO, cleanup after success, failure and crash."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from cli.main import app
from drplan import processes
from drplan.clients import aws_client, db_credentials
from drplan.drill_report import DrillReport
from drplan.pgserver import TARGET_NOT_REACHED
from drplan.results import Status
from flows.restore_drill import restore_drill
from sandbox import stack
from tasks.rds import find_instance
from tasks.targets import DRILL_TAG, PostgresArchive, RdsInstance, copy_stamp
from tests.helpers import REPO, wait_for

runner = CliRunner()


def run_drill(plan_path, **params) -> list[DrillReport]:
    state = restore_drill(plan=str(plan_path), return_state=True, **params)
    return state.result(raise_on_failure=False)


def primary(sandbox, sandbox_dir):
    db = sandbox.database("devonn-postgres")
    return db, stack.postgres_of(sandbox, db, sandbox_dir, stack.sandbox_secrets(sandbox_dir)["db_password"])


def drill_instances(plan) -> list[dict]:
    rds = aws_client(plan, "rds").describe_db_instances()["DBInstances"]
    return [i for i in rds if any(t["Key"] == DRILL_TAG for t in i.get("TagList", []))]


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
        restored = find_instance(target.rds, scratch.name)
        assert restored["DBSubnetGroup"]["DBSubnetGroupName"] == "devonn-db-subnets"
        assert restored["DBParameterGroups"][0]["DBParameterGroupName"] == "devonn-postgres16"
        assert any(t["Key"] == DRILL_TAG for t in restored["TagList"])
    finally:
        assert target.drop(scratch.name)
    assert not drill_instances(sandbox)


@pytest.mark.usefixtures("prefect_server")
def test_rds_time_outside_the_window_fails_before_any_restore_call(sandbox, sandbox_plan_path):
    calls = []
    rds = aws_client(sandbox, "rds")
    rds.meta.events.register("before-call.rds.*", lambda model, **_: calls.append(model.name))
    too_old = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (report,) = run_drill(sandbox_plan_path, database="devonn-rds", target_time=too_old)
    assert report.status is Status.error and "outside the restorable window" in report.error
    assert "RestoreDBInstanceToPointInTime" not in calls and "DeleteDBInstance" not in calls
    assert report.cleanup == "nothing restored"


@pytest.mark.usefixtures("prefect_server")
def test_rds_drill_restores_real_data_and_measures_the_rpo_from_the_heartbeat(sandbox, sandbox_plan_path,
                                                                               monkeypatch):
    monkeypatch.setattr(RdsInstance, "poll_seconds", 0.5)
    result = runner.invoke(app, ["drill", "--plan", str(sandbox_plan_path), "--database", "devonn-rds", "--json"])
    assert result.exit_code == 0, result.output
    (report,) = [DrillReport.model_validate(r) for r in json.loads(result.stdout)]
    assert report.status is Status.passed and report.kind == "rds" and report.scratch.startswith("devonn-rds-drill-")
    assert report.rpo.measured <= sandbox.objectives.rpo.database  # target time minus the copy's newest heartbeat
    checks = {c.name: c for c in report.checks}
    assert checks["users: row count"].observed == f"{sandbox.sandbox.demo_rows} rows"
    assert checks["orders: fingerprint"].status is Status.passed
    assert report.cleanup == "removed" and not drill_instances(sandbox)


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup")
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
    assert target.leftovers() == [] and not target.local().data_dir(leftover.name).exists()
    assert report.cleanup == "removed"


def snapshot_database(pg, member: str, name: str) -> None:
    """A logical copy of users and orders, as they are now, in database `name` on the same server."""
    from sandbox import demo_data

    with pg.connect(member, "postgres") as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    with pg.connect(member) as src, pg.connect(member, name) as dst:
        dst.execute(demo_data.SCHEMA)
        for table in ("users", "orders"):
            with src.cursor().copy(f"COPY {table} TO STDOUT") as out, \
                    dst.cursor().copy(f"COPY {table} FROM STDIN") as into:
                for chunk in out:
                    into.write(chunk)


def kept_scratch(plan, report: DrillReport):
    db = plan.database(report.database)
    credentials = db_credentials(plan, db)
    scratch = PostgresArchive(plan, db).restore(report.scratch, report.target_time, credentials)  # running: no-op
    return scratch.target(db, credentials)


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup")
def test_drill_to_t_equals_the_snapshot_at_t_and_a_later_drill_finds_exactly_the_changes(sandbox, sandbox_dir):
    from checks import fingerprint_diff
    from drplan.clients import PgTarget

    db, pg = primary(sandbox, sandbox_dir)
    snapshot_database(pg, db.primary, "snapshot_t")
    time.sleep(1)
    at_t = datetime.now(UTC)
    time.sleep(1)
    with pg.connect(db.primary) as conn:
        changed = sorted(r[0] for r in conn.execute(  # RETURNING comes in heap order, the diff in key order
            "UPDATE users SET name = name || ' (edited)', updated_at = now() WHERE id % 97 = 0 RETURNING id"))
        deleted = sorted(r[0] for r in conn.execute("DELETE FROM orders WHERE id % 89 = 0 RETURNING id"))
        conn.execute("SELECT pg_switch_wal()")
    time.sleep(12)  # archive_timeout 5s: the changes reach the archive, and the margin passes
    snapshot = PgTarget("snapshot at T", "127.0.0.1", pg.ports[db.primary], "snapshot_t",
                        db_credentials(sandbox, db))
    at_t_text = at_t.isoformat()
    (report,) = run_drill(sandbox_dir / "plan.yaml", database="devonn-postgres", target_time=at_t_text, keep=True)
    (later,) = run_drill(sandbox_dir / "plan.yaml", database="devonn-postgres", keep=True)
    target = PostgresArchive(sandbox, db)
    try:
        assert report.status is Status.passed, report.markdown()
        assert report.target_time == at_t and report.rpo.measured < timedelta(seconds=5)
        assert report.rto_split.startswith("download ") and ", replay " in report.markdown()
        work = sandbox.resolve_path(sandbox.drill.work_dir)  # WAL came through the prefetcher, which stopped after
        assert "stopped: " in (work / "logs" / f"wal-prefetch-{report.scratch}.log").read_text()
        assert not processes.running(work, f"wal-prefetch-{report.scratch}")
        assert not list((work / "postgres" / "spool").glob(f"{report.scratch}*"))
        copy_at_t, copy_later = kept_scratch(sandbox, report), kept_scratch(sandbox, later)
        for table in ("users", "orders"):
            assert fingerprint_diff(snapshot, copy_at_t, table).differing == 0
        users = fingerprint_diff(snapshot, copy_later, "users")
        orders = fingerprint_diff(snapshot, copy_later, "orders", max_keys=10_000)
        assert sorted(d.key for d in users.keys) == changed and {d.kind for d in users.keys} == {"changed"}
        assert sorted(d.key for d in orders.keys) == deleted and {d.kind for d in orders.keys} == {"missing"}
    finally:
        for r in (report, later):
            target.drop(r.scratch)
    assert target.leftovers() == []


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup")
def test_overshoot_missing_table_and_orphans_fail_the_drill_by_name(sandbox, sandbox_plan_path, sandbox_dir,
                                                                    monkeypatch):
    real_restore = PostgresArchive.restore

    def corrupted(self, name, target_time, credentials, serving=False):
        scratch = real_restore(self, name, target_time, credentials, serving)
        with scratch.target(self.db, credentials).connect(autocommit=True) as conn:
            conn.execute("UPDATE users SET updated_at = %s WHERE id = 1", (target_time + timedelta(hours=1),))
            conn.execute("ALTER TABLE orders DROP CONSTRAINT orders_user_id_fkey")
            conn.execute("INSERT INTO orders SELECT 999999, 424242, 1, 'x', now() - interval '1 day', "
                         "now() - interval '1 day'")
            conn.execute("DROP TABLE drplan_heartbeat")
        return scratch

    monkeypatch.setattr(PostgresArchive, "restore", corrupted)
    result = runner.invoke(app, ["drill", "--plan", str(sandbox_plan_path), "--database", "devonn-postgres", "--json"])
    (report,) = json.loads(result.stdout)
    not_passed = {c["name"]: c["status"] for c in report["checks"] if c["status"] != "passed"}
    assert not_passed["users: no rows after target time: updated_at"] == "failed"
    assert not_passed["orders: foreign key orders_user_id_fkey"] == "failed"
    assert not_passed["drplan_heartbeat: table exists"] == "failed"
    assert report["cleanup"] == "removed"
    assert report["rpo"]["measured"] is None  # no heartbeat table: RPO not measurable, so not met
    assert result.exit_code == 1
    evidence = json.loads((sandbox_dir / "reports" / f"drill-{report['scratch']}.json").read_text())
    assert evidence["checks"] == report["checks"] and evidence["cleanup"] == "removed"


def downloads_of(name: str) -> list[int]:
    """PIDs of the base backup downloads (drplan.base_restore) writing copy `name`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"drplan.base_restore" in argv and any(a.endswith(name.encode()) for a in argv):
            found.append(int(cmdline.parent.name))
    return found


def test_restore_killed_during_the_download_leaves_no_helper_and_the_rerun_restores(sandbox, sandbox_plan_path):
    """The process restoring a copy is killed while the base backup downloads: the downloader dies with it (nothing
    keeps writing into the directory), and the same restore rerun starts over and finishes."""
    db = sandbox.database("devonn-postgres")
    target, credentials = PostgresArchive(sandbox, db), db_credentials(sandbox, db)
    at = target.window().latest
    name = f"devonn-postgres-recovery-{copy_stamp(at)}"
    script = ("import sys; from datetime import datetime; from drplan.clients import db_credentials; "
              "from drplan.plan import load_plan; from tasks.targets import PostgresArchive; "
              "plan = load_plan(sys.argv[1]); db = plan.database('devonn-postgres'); "
              "PostgresArchive(plan, db).restore(sys.argv[2], datetime.fromisoformat(sys.argv[3]), "
              "db_credentials(plan, db))")
    restorer = subprocess.Popen([sys.executable, "-c", script, str(sandbox_plan_path), name, at.isoformat()],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: downloads_of(name), 60, "the base backup download to start", interval=0.02)
    finally:
        restorer.kill()
        restorer.wait(10)
    try:
        wait_for(lambda: not downloads_of(name), 5, "the download to die with the killed restore")
        scratch = target.restore(name, at, credentials)
        assert not scratch.reused  # a half-done download is never reused: restored again from a clean state
        with psycopg.connect(host=scratch.host, port=scratch.port, dbname=db.dbname, user=credentials.username,
                             password=credentials.password.get_secret_value()) as conn:
            assert conn.execute("SELECT count(*) FROM users").fetchone()[0] > 0
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
    finally:
        target.drop(name)


def test_the_window_end_is_a_time_a_restore_reaches(sandbox, sandbox_dir):
    """With the archiver paused, no WAL in the archive holds a commit after the newest segment was archived (the
    window's end, which S3 gives to the second: the test asks for one second later). PostgreSQL's recovery to that
    time runs out of WAL before it meets its target; drplan then replays the whole archive, which is the state at
    that time: heartbeats up to it, none after it."""
    db, pg = primary(sandbox, sandbox_dir)
    target, credentials = PostgresArchive(sandbox, db), db_credentials(sandbox, db)
    name = None
    with pg.connect(db.primary) as conn:
        conn.execute("ALTER SYSTEM SET archive_command = 'false'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            time.sleep(2)  # an archive_command already running finishes
            at = target.window().latest + timedelta(seconds=1)
            name = f"devonn-postgres-drill-{copy_stamp(at)}"
            scratch = target.restore(name, at, credentials)
            with psycopg.connect(host=scratch.host, port=scratch.port, dbname=db.dbname, user=credentials.username,
                                 password=credentials.password.get_secret_value()) as copy:
                newest = copy.execute("SELECT max(ts) FROM drplan_heartbeat").fetchone()[0]
                assert copy.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
            assert at - sandbox.sandbox.archive_timeout - timedelta(seconds=3) < newest <= at
            assert TARGET_NOT_REACHED in target.local().log_file(name).read_text()
        finally:
            conn.execute("ALTER SYSTEM RESET archive_command")
            conn.execute("SELECT pg_reload_conf()")
            if name:
                target.drop(name)
