"""Base backup download during a restore: stock `barman-cloud-restore` against drplan's parallel downloader
(`python -m drplan.base_restore`, as restores run it), on the same barman-cloud backup, with S3 behind a proxy that
adds a fixed latency to every request and caps each connection's throughput.

Why the cap: one connection to S3 delivers a fraction of what S3 serves in parallel (AWS's guidance for large
objects is parallel byte-range GETs); moto on loopback has no such limit and would hide what parallel ranges are
for. 16 MiB/s per connection (`--bandwidth`) is that limit scaled down so that this 2-core machine's CPU (moto, the
proxy, gzip and tar, all Python) does not become the bound first; 20 ms per request stands for a request to S3 in the
same region. Both ways run as the PostgreSQL OS user into an empty directory; measured from the start to the exit.

The backup: a primary with `pgbench -i -s --scale` and a table of random bytes (`--random-mb`, hex text, so that
the gzip'd tar is not mostly zeros), one barman-cloud base backup (gzip, multipart). Ways alternate, the order
rotating each round; every restored directory must be identical (SHA-256 over every file's path, mode and bytes).

Needs root (PostgreSQL runs as the OS user drplan-pg). Starts its own moto, primary and proxy in a temp directory
and stops and deletes everything at the end, also on failure.
Run: .venv/bin/python benchmarks/base_download.py [--rounds 3]; writes benchmarks/results/base_download.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path

import boto3

from drplan.pgserver import PG_BIN, VENV_BIN
from drplan.plan import BaseDownload
from drplan.timeutil import utcnow
from sandbox.fault_proxy import FaultProxy
from sandbox.launchers import moto, world_traversable_dir
from sandbox.postgres import SandboxPostgres
from tasks.targets import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "base_download.json"
BUCKET, SERVER = "bench-base", "bench"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}
WAYS = ("stock", "drplan")


def engine(state: Path, endpoint: str, password: str, parallel: int) -> SandboxPostgres:
    return SandboxPostgres(state, superuser="bench", password=password, dbname="bench", endpoint_url=endpoint,
                           aws_env=AWS, destination=f"s3://{BUCKET}/", server_name=SERVER,
                           download=BaseDownload(parallel=parallel))


def make_backup(pg: SandboxPostgres, scale: int, random_mb: int) -> tuple[str, int]:
    """pgbench data and random bytes, then a base backup; returns its id and the size of its files in S3."""
    with pg.connect("primary", "postgres") as conn:
        conn.execute(f"CREATE DATABASE {pg.dbname}")
    port = str(pg.ports["primary"])
    pg._run([PG_BIN / "pgbench", "-h", "127.0.0.1", "-p", port, "-U", pg.superuser, "-i", "-s", str(scale),
             pg.dbname], "pgbench -i", timeout=1200)
    with pg.connect("primary") as conn:
        conn.execute("CREATE TABLE noise AS SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') "
                     "FROM generate_series(1, 32) i) AS bytes FROM generate_series(1, %s) g", (random_mb * 1024,))
    backup = pg.base_backup("primary", timeout=1800)
    s3 = boto3.client("s3", endpoint_url=pg.endpoint_url, region_name="us-east-1", aws_access_key_id="bench",
                      aws_secret_access_key="bench")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{SERVER}/base/{backup}/")["Contents"]
    return backup, sum(o["Size"] for o in listed)


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        digest.update(f"{path.relative_to(directory)}:{path.stat().st_mode:o}\n".encode())
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def download(pg: SandboxPostgres, way: str, backup: str, member: str) -> tuple[float, str]:
    """Seconds the way took to put the backup into `member`'s data directory, and that directory's digest."""
    data = pg.data_dir(member)
    cloud = [*pg._cloud_args(), pg.destination, SERVER]
    if way == "stock":
        argv = [VENV_BIN / "barman-cloud-restore", *cloud, backup, data]
    else:
        argv = [sys.executable, "-m", "drplan.base_restore", "--backup-id", backup, "--destination", data,
                "--parallel", str(pg.download.parallel), *cloud]
    try:
        started = time.monotonic()
        pg._run(argv, way, timeout=3600)
        seconds = time.monotonic() - started
        return seconds, tree_digest(data)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale")
    parser.add_argument("--random-mb", type=int, default=128, help="MB of random hex text in a table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the proxy adds to each request")
    parser.add_argument("--bandwidth", type=float, default=16.0, help="MiB/s the proxy allows each connection")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    load_before = os.getloadavg()
    state = world_traversable_dir("drplan-bench-base-")
    password = secrets.token_hex(12)
    try:
        with moto(state) as url:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
            pg = engine(state, url, password, args.parallel)
            pg.up_primary("primary", free_port())
            backup, stored = make_backup(pg, args.scale, args.random_mb)
            pg.stop("primary")
            with FaultProxy(url, fraction=0.0, latency=args.latency, bandwidth=args.bandwidth * (1 << 20)) as proxy:
                slow = engine(state, proxy.url, password, args.parallel)
                seconds: dict[str, list[float]] = {way: [] for way in WAYS}
                digests: dict[str, set[str]] = {way: set() for way in WAYS}
                for round_ in range(args.rounds):
                    for way in WAYS[round_ % 2:] + WAYS[: round_ % 2]:
                        took, digest = download(slow, way, backup, f"{way}-{round_}")
                        seconds[way].append(round(took, 2))
                        digests[way].add(digest)
                        print(f"round {round_ + 1} {way}: {took:.2f}s", flush=True)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    identical = len(digests["stock"] | digests["drplan"]) == 1
    assert identical, f"restored directories differ: {digests}"
    median = {way: statistics.median(values) for way, values in seconds.items()}
    result = {
        "when": utcnow().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "versions": {p: importlib.metadata.version(p) for p in ("barman", "boto3")},
        "backup_bytes_in_s3": stored, "latency_seconds": args.latency, "bandwidth_mib_per_connection": args.bandwidth,
        "parallel": args.parallel, "rounds": args.rounds, "seconds": seconds, "median_seconds": median,
        "stock_over_drplan": round(median["stock"] / median["drplan"], 2),
        "restored_directories_identical": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
