"""RPO verification at 1,000 resources: drplan's batched reads against a straightforward per-resource loop, on the
same moto, the same resources and the same latency per request.

The resources (seeded into a moto_server of its own, no RDS data plane):
- 300 RDS instances: 150 primaries, each with an available snapshot, and a read replica of each with ReplicaLag
  datapoints in CloudWatch;
- 600 buckets, each with live objects and a backup prefix in one backup bucket holding a complete backup (a stamp
  directory and its manifest) and an incomplete one;
- 100 configuration items: a prefix each in one configuration bucket.

What each way reads (the AWS side of RPO verification; the heartbeat queries need PostgreSQL behind the instances,
which this moto has not):
- loop: per instance DescribeDBInstances; per primary DescribeDBSnapshots; per replica GetMetricStatistics
  (ReplicaLag); per bucket a listing of its backup prefix and of its live data; per configuration item a listing.
  One call after another, with the functions drplan's tasks had for one resource (`tasks.rds.describe_instance`,
  `find_newest_snapshot`, `read_replica_lag`, `tasks.s3.find_newest_backup`, `find_newest_object`).
- batched: `tasks.rds.region_facts` (instances and snapshots paginated 100 a page, ReplicaLag by GetMetricData for
  up to 500 replicas a call) next to `tasks.s3.newest_under` (one listing per backup prefix and per live prefix,
  10 at a time), as `flows/rpo_verification.py` runs them.
Both must find the same facts (compared by digest; LatestRestorableTime only as present or not, since moto
answers it as the time of the call). AWS calls are counted with a botocore `before-call` hook on every client (a
page is a call), HTTP requests (retries included) with `before-send`. Each way runs in a fresh process, whose peak
RSS (VmHWM) is its peak memory. Ways alternate, the order rotating each round; medians reported.

Why added latency: moto on loopback answers far faster than AWS does from the same region (tens of milliseconds to
the first byte). A `before-send` hook sleeps `--latency` seconds before every HTTP request, in the calling thread,
as a network round trip holds it (not `sandbox/fault_proxy.py`: its own relaying added ~45 ms a request here).
Runs at 0 ms too, where only moto's and the client's CPU count.

Run: .venv/bin/python benchmarks/rpo_scale.py [--rounds 3] [--latency 0.02 --latency 0]; writes
benchmarks/results/rpo_scale.json. Starts its own moto and stops it at the end, also on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drplan.clients import new_client  # noqa: E402
from drplan.plan import AwsSettings  # noqa: E402
from drplan.s3manifest import STAMP  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "rpo_scale.json"
REGION = "us-east-1"
PRIMARIES, BUCKETS, CONFIG_ITEMS = 150, 600, 100
BACKUP_BUCKET, CONFIG_BUCKET = "bench-backup", "bench-config"
WAYS = ("loop", "batched")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")


def clients(endpoint: str, calls: Counter | None = None, latency: float = 0.0) -> dict[str, object]:
    """drplan's clients (new_client: its retry and pool settings) for s3, rds and cloudwatch; with `calls`, each
    call counted by operation (and the HTTP requests as "http"), each request sent `latency` seconds late."""
    aws = AwsSettings(region=REGION, dr_region="us-west-2", endpoint_url=endpoint)
    made = {service: new_client(aws, service, REGION) for service in ("s3", "rds", "cloudwatch")}
    if calls is not None:
        lock = threading.Lock()

        def count(model, **_) -> None:
            with lock:
                calls[f"{model.service_model.service_name}:{model.name}"] += 1

        def send(**_) -> None:
            with lock:
                calls["http"] += 1
            time.sleep(latency)
        for client in made.values():
            client.meta.events.register("before-call", count)
            client.meta.events.register("before-send", send)
    return made


def names() -> tuple[list[str], list[str], list[str], list[str]]:
    primaries = [f"bench-db-{n:03d}" for n in range(PRIMARIES)]
    return (primaries, [f"{p}-replica" for p in primaries], [f"bench-live-{n:03d}" for n in range(BUCKETS)],
            [f"s3://{CONFIG_BUCKET}/item-{n:03d}/" for n in range(CONFIG_ITEMS)])


def seed(endpoint: str) -> None:
    """The 1,000 resources (the S3 ones written 10 calls at a time)."""
    c = clients(endpoint)
    s3, rds = c["s3"], c["rds"]
    primaries, replicas, buckets, config = names()
    now = datetime.now(UTC).replace(microsecond=0)
    stamps = [(now - timedelta(hours=2)).strftime(STAMP), (now - timedelta(hours=1)).strftime(STAMP)]

    def primary(name: str) -> None:
        rds.create_db_instance(DBInstanceIdentifier=name, Engine="postgres", DBInstanceClass="db.t3.micro",
                               MasterUsername="bench", MasterUserPassword="bench-password", AllocatedStorage=20,
                               BackupRetentionPeriod=7)
        rds.create_db_snapshot(DBInstanceIdentifier=name, DBSnapshotIdentifier=f"{name}-snap")

    def replica(name: str) -> None:
        rds.create_db_instance_read_replica(DBInstanceIdentifier=f"{name}-replica", SourceDBInstanceIdentifier=name)

    def bucket(name: str) -> None:
        s3.create_bucket(Bucket=name)
        for key in ("orders/1.json", "users/1.json"):
            s3.put_object(Bucket=name, Key=key, Body=b"{}")
        for stamp in stamps:  # the older backup complete, the newer one still without its manifest
            s3.put_object(Bucket=BACKUP_BUCKET, Key=f"{name}/{stamp}/orders/1.json", Body=b"{}")
        s3.put_object(Bucket=BACKUP_BUCKET, Key=f"{name}/{stamps[0]}.manifest.json", Body=b"{}")

    def item(uri: str) -> None:
        prefix = uri.removeprefix(f"s3://{CONFIG_BUCKET}/")
        for key in ("deployments.yaml", "secrets-index.yaml"):
            s3.put_object(Bucket=CONFIG_BUCKET, Key=f"{prefix}{key}", Body=b"kind: List")

    s3.create_bucket(Bucket=BACKUP_BUCKET)
    s3.create_bucket(Bucket=CONFIG_BUCKET)
    for step in (primary, replica):  # one at a time: moto's RDS backend is not thread-safe
        for name in primaries:
            step(name)
    with ThreadPoolExecutor(10) as pool:
        for step, items in ((bucket, buckets), (item, config)):
            list(pool.map(step, items))
    put_lags(endpoint)


def put_lags(endpoint: str) -> None:
    """Two ReplicaLag datapoints per replica, 1 and 3 minutes old; the newer one is 1-7 s."""
    _, replicas, _, _ = names()
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    for start in range(0, len(replicas), 20):
        clients(endpoint)["cloudwatch"].put_metric_data(Namespace="AWS/RDS", MetricData=[
            {"MetricName": "ReplicaLag", "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": name}],
             "Timestamp": now - timedelta(minutes=minutes), "Value": float((start + n) % 7 + minutes),
             "Unit": "Seconds"} for n, name in enumerate(replicas[start:start + 20]) for minutes in (1, 3)])


def loop(c: dict) -> dict:
    """One resource after another, a call (or a listing) per measure."""
    from tasks.rds import describe_instance, find_newest_snapshot, read_replica_lag
    from tasks.s3 import find_newest_backup, find_newest_object

    primaries, replicas, buckets, config = names()
    facts = {}
    for name in primaries + replicas:
        facts[f"rds:{name}"] = describe_instance(c["rds"], name).get("LatestRestorableTime") is not None
    for name in primaries:
        facts[f"snapshot:{name}"] = find_newest_snapshot.fn(c["rds"], name)
    for name in replicas:
        facts[f"lag:{name}"] = read_replica_lag.fn(c["cloudwatch"], name)
    for name in buckets:
        facts[f"backup:{name}"] = find_newest_backup.fn(c["s3"], f"s3://{BACKUP_BUCKET}/{name}/")
        facts[f"live:{name}"] = find_newest_object.fn(c["s3"], f"s3://{name}/")
    for uri in config:
        facts[f"config:{uri}"] = find_newest_object.fn(c["s3"], uri)
    return facts


def batched(c: dict) -> dict:
    """RDS facts of the region next to the bounded listings, as the flow submits them."""
    from tasks.rds import region_facts
    from tasks.s3 import newest_under

    primaries, replicas, buckets, config = names()
    with ThreadPoolExecutor(2) as pool:
        rds = pool.submit(region_facts.fn, c["rds"], c["cloudwatch"])
        listed = newest_under.fn(c["s3"], [f"s3://{BACKUP_BUCKET}/{b}/" for b in buckets],
                                 [f"s3://{b}/" for b in buckets] + config)
        region = rds.result()
    facts = {f"rds:{name}": region.instances[name].get("LatestRestorableTime") is not None
             for name in primaries + replicas}
    facts |= {f"snapshot:{name}": region.snapshots.get(name) for name in primaries}
    facts |= {f"lag:{name}": region.lags.get(name) for name in replicas}
    facts |= {f"backup:{b}": listed[f"s3://{BACKUP_BUCKET}/{b}/"] for b in buckets}
    facts |= {f"live:{b}": listed[f"s3://{b}/"] for b in buckets}
    facts |= {f"config:{uri}": listed[uri] for uri in config}
    return facts


def run_way(way: str, endpoint: str, latency: float) -> dict:
    """One way in this (fresh) process: wall time, calls, peak RSS, digest of the facts."""
    calls: Counter = Counter()
    c = clients(endpoint, calls, latency)
    started = time.perf_counter()
    facts = (loop if way == "loop" else batched)(c)
    wall = time.perf_counter() - started
    errors = [key for key, value in facts.items() if isinstance(value, Exception)]
    text = json.dumps({k: str(v) for k, v in facts.items()}, sort_keys=True)
    http = calls.pop("http", 0)
    return {"way": way, "wall_s": round(wall, 3), "calls": sum(calls.values()), "http_requests": http,
            "by_operation": dict(calls),
            "peak_rss_mb": peak_rss_mb(),
            "cpu_s": round(time.process_time(), 2), "facts": len(facts), "errors": errors,
            "found": sum(v is not None for v in facts.values()), "digest": hashlib.sha256(text.encode()).hexdigest()}


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss is no use here: Linux carries it across exec from the
    parent, the benchmark itself)."""
    status = Path("/proc/self/status").read_text()
    return round(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024, 1)


def in_process(way: str, endpoint: str, latency: float) -> dict:
    """A way in a fresh interpreter (so that its peak RSS is its own)."""
    done = subprocess.run([sys.executable, __file__, "--way", way, "--endpoint", endpoint, "--latency",
                           str(latency)], capture_output=True,
                          text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{way} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, action="append", help="seconds added per request (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(run_way(args.way, args.endpoint, args.latency[0])))
        return

    from sandbox.launchers import moto

    latencies = args.latency or [0.02, 0.0]
    load_start = os.getloadavg()
    started = time.monotonic()
    with moto() as url:
        seed(url)
        seeded = round(time.monotonic() - started, 1)
        results = {}
        for latency in latencies:
            runs: dict[str, list[dict]] = {way: [] for way in WAYS}
            for n in range(args.rounds):
                for way in WAYS if n % 2 == 0 else WAYS[::-1]:
                    put_lags(url)  # fresh datapoints: both ways read the last 10 minutes
                    run = in_process(way, url, latency)
                    runs[way].append(run)
                    print(f"latency {latency * 1000:.0f} ms round {n + 1} {way}: {run['wall_s']} s, "
                          f"{run['calls']} calls, {run['peak_rss_mb']} MB", flush=True)
            results[f"{latency * 1000:.0f}ms"] = summarize(runs)
    report = {
        "benchmark": "rpo_scale", "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": {p: importlib.metadata.version(p) for p in ("boto3", "botocore", "moto")},
        "resources": {"rds_instances": 2 * PRIMARIES, "buckets": BUCKETS, "configuration_items": CONFIG_ITEMS,
                      "total": 2 * PRIMARIES + BUCKETS + CONFIG_ITEMS},
        "seed_s": seeded, "rounds": args.rounds, "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {w: v[w] for w in ("speedup", "calls_per_resource", "same_facts")} for k, v in
                      results.items()}, indent=2))


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians per way, the speedup (loop / batched), calls per resource, whether both found the same facts."""
    total = 2 * PRIMARIES + BUCKETS + CONFIG_ITEMS
    median = {way: statistics.median(r["wall_s"] for r in rs) for way, rs in runs.items()}
    digests = {r["digest"] for rs in runs.values() for r in rs}
    return {
        "runs": runs,
        "median_wall_s": median,
        "speedup": round(median["loop"] / median["batched"], 2),
        "calls_per_resource": {way: round(rs[0]["calls"] / total, 2) for way, rs in runs.items()},
        "peak_rss_mb": {way: max(r["peak_rss_mb"] for r in rs) for way, rs in runs.items()},
        "same_facts": len(digests) == 1 and not any(r["errors"] for rs in runs.values() for r in rs),
    }


if __name__ == "__main__":
    main()
