"""WAL during a restore: stock barman-cloud-wal-restore, drplan's prefetcher and the floor, on the same base backup,
WAL and target time, with S3 behind a proxy that adds a fixed latency to every request.

- stock: restore_command `barman-cloud-wal-restore` (one process and an S3 listing plus a GET per file);
- prefetch: drplan's restore_command with its daemon (drplan/wal_prefetch.py), as drills and recoveries run it;
- floor: the same WAL staged on local disk beforehand, restore_command `cp`: replay alone.

Why a latency proxy: moto on loopback answers in well under a millisecond, which hides exactly what the prefetcher
is for. 20 ms per request stands for a request to S3 in the same region (time to first byte of a GET is tens of
milliseconds there, more across regions), added by `sandbox/fault_proxy.py` (latency only, no faults).

Each way starts PostgreSQL on a copy of one downloaded base backup (the base backup's download is not compared) with
the restore engine's own start-and-wait (`LocalPostgres._recover`), so the three differ only in restore_command;
measured from the start to the promotion. The ways alternate, the order rotating each round; every copy's
fingerprint (pgbench_accounts and pgbench_history) must equal the source's at T.

Needs root (PostgreSQL runs as the OS user drplan-pg). Starts its own moto, primary and proxy in a temp directory
and stops and deletes everything at the end, also on failure.
Run: .venv/bin/python benchmarks/wal_restore.py [--wal-mb 300] [--rounds 3]; writes benchmarks/results/wal_restore.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import boto3

from drplan import wal_restore
from drplan.pgserver import PG_BIN, VENV_BIN
from drplan.plan import WalPrefetch
from drplan.timeutil import utcnow
from drplan.wal_prefetch import Archive, cloud_config
from sandbox.fault_proxy import FaultProxy
from sandbox.launchers import moto, world_traversable_dir
from sandbox.postgres import SandboxPostgres
from tasks.targets import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "wal_restore.json"
BUCKET, SERVER = "bench-wal", "bench"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}
FINGERPRINT = ("SELECT md5(string_agg(aid::text || ':' || abalance::text, ',' ORDER BY aid)) || '/' || "
               "(SELECT count(*) || ':' || coalesce(sum(delta), 0) FROM pgbench_history) FROM pgbench_accounts")
WAYS = ("stock", "prefetch", "floor")


def engine(state: Path, endpoint: str, password: str, parallel: int) -> SandboxPostgres:
    return SandboxPostgres(state, superuser="bench", password=password, dbname="bench", endpoint_url=endpoint,
                           aws_env=AWS, destination=f"s3://{BUCKET}/", server_name=SERVER,
                           prefetch=WalPrefetch(parallel=parallel))


def generate_wal(pg: SandboxPostgres, wal_mb: int) -> tuple[datetime, str, int]:
    """pgbench after a base backup until `wal_mb` of WAL, then T; returns T, the fingerprint at T, WAL bytes."""
    port = str(pg.ports["primary"])
    bench = [PG_BIN / "pgbench", "-h", "127.0.0.1", "-p", port, "-U", pg.superuser, "-n"]
    with pg.connect("primary", "postgres") as conn:
        conn.execute(f"CREATE DATABASE {pg.dbname}")
        # Commits without waiting for their flush: pgbench then writes WAL at CPU speed, not at one fsync per
        # transaction (~1 MB/s here); the WAL itself, and so what a restore replays, is the same.
        conn.execute(f"ALTER DATABASE {pg.dbname} SET synchronous_commit = off")
    pg._run([*bench[:-1], "-i", "-s", "10", pg.dbname], "pgbench -i", timeout=600)
    pg.base_backup("primary")
    with pg.connect("primary") as conn:
        start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        while conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start,)).fetchone()[0] < wal_mb << 20:
            pg._run([*bench, "-c", "4", "-j", "2", "-t", "10000", pg.dbname], "pgbench", timeout=600)
        wal_bytes = int(conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start,)).fetchone()[0])
        fingerprint = conn.execute(FINGERPRINT).fetchone()[0]
        time.sleep(1.1)
        target = datetime.now(UTC)
        time.sleep(1.1)
        conn.execute("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())")
        last = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < last:
            time.sleep(0.5)
    return target, fingerprint, wal_bytes


def stage_wal(archive: Archive, staged: Path) -> int:
    """Every archived segment, decompressed into `staged` (the floor's local copy); returns how many."""
    staged.mkdir()
    names = [name for hash_dir in archive.cloud.list_bucket(f"{SERVER}/wals/") if hash_dir.endswith("/")
             for name in archive.listing(hash_dir.rstrip("/").rsplit("/", 1)[-1])]
    for name in names:
        archive.fetch(archive.find(name), name, staged / name)
    return len(names)


def replay(pg: SandboxPostgres, way: str, member: str, pristine: Path, staged: Path, target: datetime,
           cloud: list[str]) -> tuple[float, str]:
    """Seconds from PostgreSQL's start to its promotion on a copy of the base backup, and the copy's fingerprint."""
    pg._run(["cp", "-a", pristine, pg.data_dir(member)], "copy the base backup", timeout=600)
    pg._write_private(pg.data_dir(member) / "recovery.signal", "")
    if way == "stock":
        command = shlex.join([str(VENV_BIN / "barman-cloud-wal-restore"), *cloud]) + " %f %p"
    elif way == "prefetch":
        pg.start_prefetch(member)
        command = wal_restore.command(sys.executable, pg.spool(member), cloud)
    else:
        command = f"cp {shlex.quote(str(staged))}/%f %p"
    recovery = {"restore_command": command, "recovery_target_time": target.isoformat(),
                "recovery_target_action": "promote", "recovery_target_timeline": "latest"}
    port = free_port()
    pg.ports[member] = port
    try:
        started = time.monotonic()
        pg._recover(member, port, recovery, started + 3600)
        seconds = time.monotonic() - started
        with pg.connect(member) as conn:
            return seconds, conn.execute(FINGERPRINT).fetchone()[0]
    finally:
        pg.remove(member)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wal-mb", type=int, default=300, help="WAL to generate after the base backup")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the proxy adds to each request")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops what it started (finally)
    load_before = os.getloadavg()
    state = world_traversable_dir("drplan-bench-wal-")
    password = secrets.token_hex(12)
    try:
        with moto(state) as url:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
            pg = engine(state, url, password, args.parallel)
            pg.up_primary("primary", free_port())
            target, expected, wal_bytes = generate_wal(pg, args.wal_mb)
            pg.stop("primary")
            backup = pg.backup_for(target)
            pristine = pg.data_dir("pristine")
            pg._run([VENV_BIN / "barman-cloud-restore", *pg._cloud_args(), pg.destination, SERVER, backup.id,
                     pristine], "barman-cloud-restore", timeout=1800)
            os.environ.update(AWS)
            staged = pg.root / "staged"
            segments = stage_wal(Archive(cloud_config([*pg._cloud_args(), pg.destination, SERVER])), staged)
            shutil.chown(staged, pg.os_user)
            with FaultProxy(url, fraction=0.0, latency=args.latency) as proxy:
                slow = engine(state, proxy.url, password, args.parallel)
                cloud = [*slow._cloud_args(), slow.destination, SERVER]
                seconds: dict[str, list[float]] = {way: [] for way in WAYS}
                for round_ in range(args.rounds):
                    for way in WAYS[round_ % 3:] + WAYS[: round_ % 3]:
                        took, fingerprint = replay(slow, way, f"{way}-{round_}", pristine, staged, target, cloud)
                        assert fingerprint == expected, f"{way}: restored data differs from the source at T"
                        seconds[way].append(round(took, 2))
                        print(f"round {round_ + 1} {way}: {took:.2f}s", flush=True)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    median = {way: statistics.median(values) for way, values in seconds.items()}
    result = {
        "when": utcnow().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "versions": {p: importlib.metadata.version(p) for p in ("barman", "boto3")},
        "wal_bytes": wal_bytes, "archived_segments": segments, "latency_seconds": args.latency,
        "parallel": args.parallel, "rounds": args.rounds, "seconds": seconds, "median_seconds": median,
        "prefetch_over_floor": round(median["prefetch"] / median["floor"], 2),
        "stock_over_prefetch": round(median["stock"] / median["prefetch"], 2),
        "goals": "prefetch <= 1.2 x floor; stock >= 3 x prefetch; identical fingerprints",
        "fingerprints_identical": True,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
