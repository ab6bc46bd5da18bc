"""`drplan sandbox break leaked-credentials`, then the commands it prints: the old database password and API token
are refused (a direct login, a direct HTTP request to the app), the new ones work, the app is healthy, and neither
new value appears in any log, report, event, server log or process argument (canary search).

The database is a PostgreSQL topology of this test's own (logging every statement) with devonn-api cut over to it,
and the plan copy's secrets are this test's own Secrets Manager secrets: the session's sandbox keeps its
credentials; its clusters' Secrets are put back afterwards."""

from __future__ import annotations

import json
import os
import shlex
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from cli.main import app
from drplan.clients import DbCredentials, PgTarget, api_token, aws_client, db_credentials, pg_target
from drplan.plan import load_plan
from drplan.report_files import reports_dir
from flows.credential_rotation import RotationReport, chosen, rotate_credentials
from flows.shared.cutover import database_url
from flows.shared.gates import recovery_lock
from flows.shared.report import run_report
from sandbox import stack
from tasks.k8s import cut_over
from tests.helpers import clusters_restored, own_postgres_topology

pytestmark = pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure")
DB, SERVICE, HOME = "devonn-postgres", "devonn-api", "devonn-eks-sandbox"


def drplan(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def leaky(sandbox, sandbox_plan_path, sandbox_dir):
    """(plan path, the password and token before): devonn-postgres a topology of its own logging every statement,
    devonn-api on it, the database's and the token's secrets this test's own."""
    values = stack.sandbox_secrets(sandbox_dir)
    with clusters_restored(sandbox), own_postgres_topology(sandbox_plan_path, sandbox_dir, DB) as own:
        data = yaml.safe_load(own.read_text())
        prefix = f"test/rotation-{uuid.uuid4().hex[:8]}"
        sm = aws_client(sandbox, "secretsmanager")
        sm.create_secret(Name=f"{prefix}/db", SecretString=json.dumps(
            {"username": "devonn_admin", "password": values["db_password"]}))
        sm.create_secret(Name=f"{prefix}/token", SecretString=json.dumps({"token": values["api_token"]}))
        next(d for d in data["databases"] if d["name"] == DB)["credentials_secret"] = f"{prefix}/db"
        next(s for s in data["services"] if s["name"] == SERVICE)["token_secret"] = f"{prefix}/token"
        own.write_text(yaml.safe_dump(data, sort_keys=False))
        plan = load_plan(own)
        db = plan.database(DB)
        primary = pg_target(plan, db, "primary", db_credentials(plan, db))
        with primary.connect(autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET log_statement = 'all'")
            conn.execute("SELECT pg_reload_conf()")
        cut_over(plan, plan.cluster(HOME), SERVICE, database_url(primary.credentials, primary.host, primary.port,
                                                                 db.dbname))
        yield own, values["db_password"], values["api_token"]


def me(plan, token: str) -> int:
    url = httpx.URL(plan.services[0].health).join("/api/me")
    return httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code


def login(target: PgTarget, password: str) -> str:
    """'ok', or the server's reason for refusing."""
    try:
        with psycopg.connect(host=target.host, port=target.port, dbname=target.dbname, user="devonn_admin",
                             password=password, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
        return "ok"
    except psycopg.OperationalError as exc:
        return str(exc)


def test_leaked_credentials_are_rotated_and_refused(sandbox, leaky, asserting_and_emitting_events_worker):
    path, old_password, old_token = leaky
    plan = load_plan(path)
    db, service = plan.database(DB), plan.service(SERVICE)
    target = pg_target(plan, db, "primary", DbCredentials("devonn_admin", db_credentials(plan, db).password))
    assert me(plan, old_token) == 200 and login(target, old_password) == "ok"  # the leak works until rotated

    result = drplan("sandbox", "break", "leaked-credentials", "--plan", str(path))
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    commands = [shlex.split(c) for c in lines["recover"].split(" && ")]
    assert commands == [["drplan", "rotate-credentials", "--plan", str(path), "--database", DB],
                        ["drplan", "rotate-credentials", "--plan", str(path), "--service", SERVICE]]
    planned = drplan(*commands[0][1:], "--dry-run")
    assert planned.exit_code == 0 and "planned (dry run)" in planned.stdout, planned.output
    assert login(target, old_password) == "ok"  # the dry run changed nothing
    outputs = []
    for command in commands:
        done = drplan(*command[1:], "--yes")
        assert done.exit_code == 0, done.output
        assert "rotated: the old credential is refused" in done.stdout
        outputs.append(done.output)

    new_password = db_credentials(plan, db).password.get_secret_value()
    new_token = api_token(plan, service).get_secret_value()  # AWSCURRENT (moto's unlabelled read lags a move)
    assert new_password != old_password and new_token != old_token and len(new_password) >= 32
    assert "password authentication failed" in login(target, old_password)
    assert login(target, new_password) == "ok"
    assert me(plan, old_token) == 401 and me(plan, new_token) == 200
    assert httpx.get(service.health, timeout=5).json()["status"] == "ok"
    sm = aws_client(plan, "secretsmanager")
    for ref, old in ((db.credentials_secret, old_password), (service.token_secret, old_token)):
        assert old in sm.get_secret_value(SecretId=ref, VersionStage="AWSPREVIOUS")["SecretString"]
        stages = sm.describe_secret(SecretId=ref)["VersionIdsToStages"]
        assert sorted(sum(stages.values(), [])) == ["AWSCURRENT", "AWSPREVIOUS"]  # no AWSPENDING left

    canaries = (new_password, new_token)
    asserting_and_emitting_events_worker.drain()
    events = [e for e in asserting_and_emitting_events_worker._client.events
              if e.event.startswith("drplan.recovery.")]
    assert {"drplan.recovery.staged", "drplan.recovery.set", "drplan.recovery.rewritten",
            "drplan.recovery.made-current"} <= {e.event for e in events}
    logs: list[str] = []
    with get_client(sync_client=True) as client:  # every log line of the session's server, page by page
        while page := client.read_logs(limit=200, offset=len(logs)):
            logs += [log.message for log in page]
    assert any("made current" in line for line in logs)
    reports = [p.read_text() for p in reports_dir(plan).glob("rotate-credentials-*")]
    server_logs = [p.read_text(errors="replace") for directory in (plan.state_dir(), sandbox.state_dir())
                   for p in Path(directory).rglob("*.log") if p.is_file()]
    args = [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for pid in os.listdir("/proc")
            if pid.isdigit() and Path(f"/proc/{pid}/cmdline").exists()]
    for where, texts in (("event", [e.model_dump_json() for e in events]), ("log", logs), ("report", reports),
                         ("server log", server_logs), ("process argument", args), ("command output", outputs)):
        leaked = [w for w in texts for canary in canaries if canary in w]
        assert not leaked, f"a new credential in a {where}"
    assert reports and any("pg_terminate_backend" in text for text in server_logs)  # every statement logged
    assert not any("ALTER ROLE" in text for text in server_logs)  # but not the password change, not even its hash


def test_bad_input_and_a_running_recovery_are_refused(leaky):
    path, old_password, _ = leaky
    plan = load_plan(path)
    for args, line in (
        (["--service", "nope"], "unknown service 'nope'"),
        (["--database", DB, "--service", SERVICE], "name exactly one of --database NAME"),
        (["--service", "devonn-worker"], "service devonn-worker has no API token"),
    ):
        refused = drplan("rotate-credentials", "--plan", str(path), *args, "--yes")
        assert refused.exit_code == 2 and line in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    with recovery_lock(plan.database(DB)):
        report = run_report(rotate_credentials, RotationReport, plan=str(path), database=DB, approve=True)
    assert report.outcome == "failed" and "another recovery of devonn-postgres is in progress" in report.error
    target = pg_target(plan, plan.database(DB), "primary", db_credentials(plan, plan.database(DB)))
    assert login(target, old_password) == "ok"  # nothing changed
    assert chosen(plan, DB, "") is plan.database(DB)
