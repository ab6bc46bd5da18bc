"""The sandbox's real PostgreSQL 18: primary, replicas, barman-cloud archive and backups in moto S3, heartbeat.

Real processes, no mocks. Needs root (it creates the OS user and runs PostgreSQL through runuser).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from botocore.config import Config

from drplan import processes
from drplan.pgserver import PostgresError
from drplan.plan import WalPrefetch
from sandbox import demo_data
from sandbox.fault_proxy import FaultProxy
from sandbox.launchers import moto, world_traversable_dir
from sandbox.postgres import SandboxPostgres
from tests.helpers import REPO, free_port, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root and runuser")

TOKEN = secrets.token_hex(3)  # in every member/bucket name, so our processes are recognisable in /proc
PASSWORD = f"pw:{secrets.token_hex(12)}'\\"  # unique and awkward (pgpass and conf escaping)
PRIMARY, REPLICA, DR = f"t{TOKEN}-primary", f"t{TOKEN}-replica", f"t{TOKEN}-dr"
BUCKET, PREFIX, SERVER = f"drplan-test-{TOKEN}", "postgres/", "devonn-postgres"
ROWS = 1000
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def our_processes(state_dir: Path) -> list[str]:
    """Command lines of live processes that belong to this test run."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if TOKEN in cmdline or str(state_dir) in cmdline:
            found.append(f"{path.parent.name}: {cmdline}")
    return found


def cmdlines_with_password() -> list[str]:
    hits = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if PASSWORD.encode() in path.read_bytes():
                hits.append(path.parent.name)
        except OSError:
            continue
    return hits


def make_sandbox(state_dir: Path, endpoint_url: str, **overrides: Any) -> SandboxPostgres:
    kwargs = dict(
        superuser="drplan_admin",
        password=PASSWORD,
        dbname="devonn",
        endpoint_url=endpoint_url,
        aws_env=AWS,
        destination=f"s3://{BUCKET}/{PREFIX}",
        server_name=SERVER,
        archive_timeout=60,
    )
    return SandboxPostgres(state_dir, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def state_dir():
    path = world_traversable_dir(f"drplan-pg-{TOKEN}-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def moto_s3(state_dir):
    with moto(state_dir) as url:
        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS["AWS_DEFAULT_REGION"],
            config=Config(retries={"mode": "standard"}, request_checksum_calculation="when_required"),
        )
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture(scope="module")
def pg(state_dir, moto_s3):
    sandbox = make_sandbox(state_dir, moto_s3.meta.endpoint_url)
    sandbox.up_primary(PRIMARY, free_port())
    try:
        yield sandbox
    finally:
        for member in (PRIMARY, REPLICA, DR, f"t{TOKEN}-broken"):
            sandbox.stop_heartbeat(member)
            sandbox.stop(member)
        assert not our_processes(state_dir), f"processes left behind: {our_processes(state_dir)}"


@pytest.fixture(scope="module")
def replicas(pg):
    primary_port = pg.ports[PRIMARY]
    pg.up_replica(REPLICA, free_port(), primary_port)
    pg.up_replica(DR, free_port(), primary_port)
    return pg


def scalar(pg: SandboxPostgres, member: str, query: str, params: tuple = (), dbname: str | None = None) -> Any:
    with pg.connect(member, dbname) as conn:
        return conn.execute(query, params).fetchone()[0]


def test_primary_up_with_demo_data(pg):
    assert pg.status(PRIMARY).running and pg.status(PRIMARY).in_recovery is False
    assert demo_data.create_and_load(pg, PRIMARY, ROWS) is True
    assert demo_data.create_and_load(pg, PRIMARY, ROWS) is False  # already loaded: skipped
    assert scalar(pg, PRIMARY, "SELECT count(*) FROM users") == ROWS
    assert scalar(pg, PRIMARY, "SELECT count(*) FROM orders") == 2 * ROWS
    assert scalar(pg, PRIMARY, "SELECT count(*) FROM orders o LEFT JOIN users u ON u.id = o.user_id "
                  "WHERE u.id IS NULL") == 0  # fmt: skip
    assert scalar(pg, PRIMARY, "SHOW data_checksums") == "on"
    assert scalar(pg, PRIMARY, "SHOW password_encryption") == "scram-sha-256"
    assert PASSWORD not in pg.dsn(PRIMARY) and PASSWORD not in repr(pg)
    with psycopg.connect(pg.dsn(PRIMARY), password=PASSWORD) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == "devonn"
    data = pg.data_dir(PRIMARY)
    assert {p.owner() for p in data.iterdir()} == {pg.os_user}  # nothing root-owned inside the data dir


def test_base_backup_done_and_listed(pg):
    backup_id = pg.base_backup(PRIMARY)
    listed = {b.id: b for b in pg.list_backups()}
    assert listed[backup_id].status == "DONE"
    assert listed[backup_id].end_time.utcoffset().total_seconds() == 0
    assert abs(time.time() - listed[backup_id].end_time.timestamp()) < 120
    assert listed[backup_id].systemid == pg.system_id(PRIMARY)


def test_wal_segments_archived_to_s3(pg, moto_s3):
    with pg.connect(PRIMARY) as conn:
        conn.execute("INSERT INTO drplan_heartbeat (source) VALUES ('wal-test')")
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]

    def archived() -> bool:
        last = scalar(pg, PRIMARY, "SELECT last_archived_wal FROM pg_stat_archiver")
        return last is not None and last >= segment

    wait_for(archived, 30, f"archiver to pass {segment}")
    keys = [
        o["Key"]
        for page in moto_s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}{SERVER}/wals/")
        for o in page.get("Contents", [])
    ]
    assert any(key.rsplit("/", 1)[-1].startswith(segment) for key in keys), keys


def test_replicas_stream(replicas):
    pg = replicas
    for member in (REPLICA, DR):
        assert pg.status(member).running and pg.status(member).in_recovery is True
    with pg.connect(PRIMARY) as conn:
        streaming = {
            row[0] for row in conn.execute("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
        }
        assert {REPLICA, DR} <= streaming
        conn.execute(
            "INSERT INTO users (id, email, name, created_at, updated_at) VALUES (%s, %s, 'New', now(), now())",
            (ROWS + 1, f"new-{TOKEN}@example.test"),
        )
    for member in (REPLICA, DR):
        wait_for(lambda m=member: scalar(pg, m, "SELECT count(*) FROM users WHERE id = %s", (ROWS + 1,)), 10,
                 f"the new row on {member}")  # fmt: skip
    conninfo = (pg.data_dir(REPLICA) / "postgresql.auto.conf").read_text()
    assert "passfile=" in conninfo and PASSWORD not in conninfo


def test_up_twice_is_a_noop(replicas):
    pg = replicas
    before = {m: processes.get(pg.state_dir, m) for m in (PRIMARY, REPLICA, DR)}
    started = time.monotonic()
    pg.up_primary(PRIMARY, pg.ports[PRIMARY])
    pg.up_replica(REPLICA, pg.ports[REPLICA], pg.ports[PRIMARY])
    pg.up_replica(DR, pg.ports[DR], pg.ports[PRIMARY])
    assert time.monotonic() - started < 1
    assert {m: processes.get(pg.state_dir, m) for m in before} == before


def test_heartbeat_writes_every_interval(replicas):
    pg = replicas
    pg.start_heartbeat(PRIMARY, interval=1, source="hb-test")
    assert pg.start_heartbeat(PRIMARY, interval=1, source="hb-test") == processes.running(
        pg.state_dir, f"heartbeat-{PRIMARY}"
    )  # already running: left alone
    query = "SELECT count(*) FROM drplan_heartbeat WHERE source = 'hb-test'"
    wait_for(lambda: scalar(pg, PRIMARY, query) >= 4, 10, "4 heartbeats")
    with pg.connect(PRIMARY) as conn:
        stamps = [r[0] for r in conn.execute("SELECT ts FROM drplan_heartbeat WHERE source = 'hb-test' ORDER BY id")]
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    assert 0.8 < statistics.median(gaps) < 1.5, gaps
    wait_for(lambda: scalar(pg, REPLICA, query) >= 4, 10, "heartbeats on the replica")


def test_password_never_in_argv_or_logs(replicas, state_dir):
    """Scan every process's argv while a base backup, WAL archiving and the heartbeat run; then the logs."""
    pg = replicas
    assert processes.running(state_dir, f"heartbeat-{PRIMARY}")
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(id=pg.base_backup(PRIMARY)))
    worker.start()
    hits, scans = set(), 0
    while worker.is_alive():
        hits.update(cmdlines_with_password())
        scans += 1
        time.sleep(0.02)
    worker.join()
    assert result.get("id") and scans > 10
    assert not hits, f"password in the argv of processes {sorted(hits)}"
    for log in [*state_dir.glob("logs/*.log"), *state_dir.glob("postgres/*.log")]:
        assert PASSWORD not in log.read_text(errors="replace"), log


def test_heartbeat_reconnects_after_primary_restart(replicas, state_dir):
    pg = replicas
    pg.stop(PRIMARY)
    time.sleep(1.5)  # at least one insert fails meanwhile
    pg.up_primary(PRIMARY, pg.ports[PRIMARY])
    since = datetime.now(UTC)
    query = "SELECT count(*) FROM drplan_heartbeat WHERE source = 'hb-test' AND ts > %s"
    wait_for(lambda: scalar(pg, PRIMARY, query, (since,)) >= 2, 10, "heartbeats after the restart")
    log = (state_dir / "logs" / f"heartbeat-{PRIMARY}.log").read_text()
    assert "insert failed" in log and PASSWORD not in log


def test_heartbeat_exits_on_sigterm(replicas, state_dir):
    pg = replicas
    started = time.monotonic()
    assert pg.stop_heartbeat(PRIMARY) is True
    assert time.monotonic() - started < 3  # exited on SIGTERM, not SIGKILLed after the grace period
    assert (state_dir / "logs" / f"heartbeat-{PRIMARY}.log").read_text().rstrip().endswith("stopped")


def test_new_cluster_refused_on_used_prefix(pg, state_dir):
    with pytest.raises(PostgresError, match="already holds WAL of another cluster"):
        pg.up_primary(f"t{TOKEN}-intruder", free_port())
    assert not pg.data_dir(f"t{TOKEN}-intruder").exists()


def test_unreachable_state_dir_is_one_clear_line(moto_s3):
    hidden = Path(tempfile.mkdtemp(prefix=f"drplan-pg-{TOKEN}-hidden-", dir="/tmp"))  # 0700: OS user is locked out
    try:
        with pytest.raises(PostgresError, match=r"cannot reach .*chmod o\+x") as caught:
            make_sandbox(hidden / "state", moto_s3.meta.endpoint_url).up_primary(f"t{TOKEN}-x", free_port())
        assert "\n" not in str(caught.value)
    finally:
        shutil.rmtree(hidden)


def test_failing_archive_is_an_error_not_a_hang(pg, moto_s3):
    """With archiving broken, a base backup would wait forever in pg_backup_stop: it must fail fast and say why."""
    member = f"t{TOKEN}-broken"
    broken = make_sandbox(pg.state_dir, moto_s3.meta.endpoint_url, server_name=f"broken-{TOKEN}")
    broken.up_primary(member, free_port())
    broken.stop(member)
    broken.endpoint_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every archive call fails
    broken.up_primary(member, broken.ports[member])
    with broken.connect(member, "postgres") as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS x")
        conn.execute("SELECT pg_switch_wal()")
    wait_for(lambda: broken.archiver_problem(member), 30, "the archiver to report a failure")
    started = time.monotonic()
    with pytest.raises(PostgresError, match="WAL archiving of .* is failing"):
        broken.base_backup(member, timeout=30)
    assert time.monotonic() - started < 5
    broken.stop(member)


def test_100k_demo_rows_load_fast(pg):
    bulk = make_sandbox(pg.state_dir, pg.endpoint_url, dbname="bulk", ports=pg.ports)
    started = time.monotonic()
    assert demo_data.create_and_load(bulk, PRIMARY, 100_000) is True
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"100k demo rows took {elapsed:.1f}s"
    assert scalar(bulk, PRIMARY, "SELECT count(*) FROM users") == 100_000
    assert scalar(bulk, PRIMARY, "SELECT count(*) FROM orders") == 200_000


PROBE_SEGMENTS = 40  # WAL segments to replay: enough WAL downloads that the fault proxy hits some mid-body


def probe_fingerprint(pg: SandboxPostgres, member: str) -> tuple:
    return tuple(scalar(pg, member, "SELECT ARRAY[count(*)::text, md5(string_agg(payload, ',' ORDER BY id))] "
                        "FROM prefetch_probe"))


@pytest.fixture(scope="module")
def probe_wal(pg) -> tuple[datetime, tuple]:
    """A fresh base backup, then PROBE_SEGMENTS segments of WAL with rows in each, a target time T, rows after T, all
    archived; returns T and the table's fingerprint at T."""
    demo_data.create_and_load(pg, PRIMARY, ROWS)  # the database (loaded already when the whole module runs)
    pg.base_backup(PRIMARY)
    with pg.connect(PRIMARY) as conn:
        conn.execute("CREATE TABLE prefetch_probe (id int PRIMARY KEY, payload text)")
        for batch in range(PROBE_SEGMENTS):
            conn.execute("INSERT INTO prefetch_probe SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                         (batch * 100 + 1, batch * 100 + 100))
            conn.execute("SELECT pg_switch_wal()")
    at_target = probe_fingerprint(pg, PRIMARY)
    time.sleep(1.1)
    target = datetime.now(UTC)
    time.sleep(1.1)
    with pg.connect(PRIMARY) as conn:
        conn.execute("INSERT INTO prefetch_probe SELECT g, 'after T' FROM generate_series(100001, 100100) g")
        last = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
    wait_for(lambda: (scalar(pg, PRIMARY, "SELECT last_archived_wal FROM pg_stat_archiver") or "") >= last, 240,
             f"the archiver to pass {last}")
    return target, at_target


def restorer(pg: SandboxPostgres, endpoint_url: str) -> SandboxPostgres:
    """A restore engine on the same archive through `endpoint_url`, with botocore's standard retries (as
    drplan.clients.child_aws_env gives it) and a small spool."""
    aws = {**AWS, "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}
    return make_sandbox(pg.state_dir, endpoint_url, aws_env=aws, prefetch=WalPrefetch(parallel=4, spool="64MiB"))


def test_restore_through_a_faulty_store_matches_the_source_at_t(pg, moto_s3, probe_wal):
    """Throttles and resets on any request; WAL downloads also corrupted or cut mid-body: the prefetcher fetches
    those again, and the copy holds exactly the rows committed by T."""
    target, at_target = probe_wal
    member = f"t{TOKEN}-restored"
    with FaultProxy(moto_s3.meta.endpoint_url, fraction=0.3, seed=19, body_match="/wals/",
                    kinds=("slowdown", "reset", "corrupt", "cut")) as proxy:
        engine = restorer(pg, proxy.url)
        try:
            restored = engine.restore(member, free_port(), target, engine.backup_for(target))
            assert restored is not None  # restored now, not found from an earlier run
            assert not processes.running(pg.state_dir, f"wal-prefetch-{member}")  # stopped with the restore...
            assert not engine.spool(member).exists()  # ...and its spool removed
            assert probe_fingerprint(engine, member) == at_target
            counts = proxy.counts()
        finally:
            engine.remove(member)
    assert counts["slowdown"] and counts["reset"] and counts["corrupt"] + counts["cut"], counts
    log = (pg.state_dir / "logs" / f"wal-prefetch-{member}.log").read_text()
    assert "fetching again" in log and "stopped:" in log


def test_a_wal_spool_the_os_user_cannot_write_is_refused_before_the_restore(pg, probe_wal):
    hidden = Path(tempfile.mkdtemp(prefix=f"drplan-pg-{TOKEN}-spool-", dir="/tmp"))  # 0700 root: locked out
    engine = make_sandbox(pg.state_dir, pg.endpoint_url, spool_dir=hidden)
    member = f"t{TOKEN}-unspooled"
    try:
        with pytest.raises(PostgresError, match=r"WAL spool .* is not writable by OS user drplan-pg; ") as caught:
            engine.restore(member, free_port(), probe_wal[0], engine.backup_for(probe_wal[0]))
        assert "\n" not in str(caught.value)
        assert not engine.data_dir(member).exists()  # nothing downloaded
    finally:
        shutil.rmtree(hidden)


KILLED_RESTORE = """
import json, os, sys
from datetime import datetime
from drplan.pgserver import LocalPostgres
a = json.loads(sys.argv[1])
pg = LocalPostgres(a["state"], superuser="drplan_admin", password=os.environ["PROBE_PASSWORD"], dbname="devonn",
                   endpoint_url=a["endpoint"], aws_env=a["aws"], destination=a["destination"], server_name=a["server"])
target = datetime.fromisoformat(a["target"])
pg.restore(a["member"], a["port"], target, pg.backup_for(target))
"""


@pytest.mark.parametrize("helper", ["base-download", "wal-prefetch"])
def test_a_killed_restore_leaves_no_helper_behind(pg, moto_s3, probe_wal, state_dir, helper):
    """Killed while the base backup downloads, or while WAL is replayed: its helper process dies with it."""
    member = f"t{TOKEN}-killed-{helper}"
    slow = {"bandwidth": 256 * 1024} if helper == "base-download" else {}  # so that the download takes a while
    with FaultProxy(moto_s3.meta.endpoint_url, fraction=0.0, latency=0.05, **slow) as proxy:  # a slower store
        args = {"state": str(state_dir), "endpoint": proxy.url, "aws": AWS, "destination": f"s3://{BUCKET}/{PREFIX}",
                "server": SERVER, "target": probe_wal[0].isoformat(), "member": member, "port": free_port()}
        child = subprocess.Popen([sys.executable, "-c", KILLED_RESTORE, json.dumps(args)],
                                 env={**os.environ, "PROBE_PASSWORD": PASSWORD, "PYTHONPATH": str(REPO)})
        try:
            running = wait_for(lambda: processes.running(state_dir, f"{helper}-{member}"), 120,
                               f"the restore's {helper} process", interval=0.02)
            child.kill()
            child.wait()
            wait_for(lambda: not running.alive, 10, f"the {helper} process to die with its restore")
        finally:
            child.kill()
            make_sandbox(state_dir, proxy.url).remove(member)  # the postmaster outlives it: a rerun starts over
