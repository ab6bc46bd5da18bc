"""The fault-injecting proxy in front of a real moto_server: each fault kind in each protocol drplan's clients speak,
the seeded fraction, calls that succeed through it with every fault retried and counted, byte-exact bodies
(chunked uploads included), a real TCP reset, and nothing left running."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import socket
import threading
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ResponseStreamingError

from drplan.clients import aws_client, retries_since
from drplan.plan import load_plan
from sandbox.fault_proxy import FaultProxy
from sandbox.launchers import moto
from tests.s3_moto import s3_plan


@pytest.fixture(scope="module")
def moto_env():
    with moto() as url:
        yield url


def connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def test_every_protocol_succeeds_through_faults_and_each_retry_is_counted(moto_env, tmp_path):
    with FaultProxy(moto_env, fraction=0.3, seed=7) as proxy:
        plan = load_plan(s3_plan(tmp_path, proxy.url, []))
        s3, rds = aws_client(plan, "s3"), aws_client(plan, "rds")
        retries = retries_since()
        s3.create_bucket(Bucket="faults")
        for i in range(12):
            s3.put_object(Bucket="faults", Key=f"k{i}", Body=b"x" * i)
            assert s3.get_object(Bucket="faults", Key=f"k{i}")["Body"].read() == b"x" * i
        for _ in range(5):
            assert rds.describe_db_instances()["DBInstances"] == []  # query
            aws_client(plan, "secretsmanager").list_secrets()  # JSON (X-Amz-Target)
            aws_client(plan, "cloudwatch").list_metrics()  # RPC v2 CBOR
            aws_client(plan, "route53").list_hosted_zones()  # REST-XML
            aws_client(plan, "eks").list_clusters()  # REST-JSON
        counts = proxy.counts()
    requests = sum(counts.values())
    assert counts["slowdown"] and counts["throttling"] and counts["reset"], counts
    assert 0.15 < proxy.injected / requests < 0.45, counts
    assert retries() == proxy.injected  # every fault cost its call one retry, and no call gave up


def test_the_fraction_is_seeded_and_counts_are_served_as_json(moto_env):
    def run(seed: int) -> dict[str, int]:
        with FaultProxy(moto_env, fraction=0.5, seed=seed, kinds=("throttling",)) as proxy:
            for _ in range(40):
                conn = connection(proxy.url)
                conn.request("POST", "/", body="Action=DescribeDBInstances&Version=2014-10-31",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
                conn.getresponse().read()
                conn.close()
            conn = connection(proxy.url)
            conn.request("GET", "/__faults")
            served = json.loads(conn.getresponse().read())
            conn.close()
            assert served == proxy.counts()
            return served

    first = run(3)
    assert first == run(3) and 10 < first["throttling"] < 30 and first["forwarded"] == 40 - first["throttling"]
    assert first["reset"] == first["slowdown"] == 0


def test_bodies_pass_byte_exact_both_ways(moto_env, tmp_path):
    payload = os.urandom(12 * 1024 * 1024 + 17)
    with FaultProxy(moto_env, fraction=0.0) as proxy:
        s3 = aws_client(load_plan(s3_plan(tmp_path, proxy.url, [])), "s3")
        s3.create_bucket(Bucket="bodies")
        s3.upload_fileobj(io.BytesIO(payload), "bodies", "multipart")  # 8 MiB parts, Expect: 100-continue
        s3.put_object(Bucket="bodies", Key="single", Body=payload)
        for key in ("multipart", "single"):
            streamed = hashlib.sha256()
            for chunk in s3.get_object(Bucket="bodies", Key=key)["Body"].iter_chunks(1 << 16):
                streamed.update(chunk)
            assert streamed.digest() == hashlib.sha256(payload).digest()
        conn = connection(proxy.url)  # a chunked upload
        conn.request("PUT", "/bodies/chunked", body=iter([payload[:1000], payload[1000:70000]]), encode_chunked=True)
        assert conn.getresponse().status == 200
        conn.close()
        assert s3.get_object(Bucket="bodies", Key="chunked")["Body"].read() == payload[:70000]


def test_a_reset_is_a_tcp_reset_and_stop_leaves_nothing_running(moto_env):
    with FaultProxy(moto_env, fraction=1.0, kinds=("reset",)) as proxy:
        address = ("127.0.0.1", urlsplit(proxy.url).port)
        idle = socket.create_connection(address)  # a keep-alive connection stop() must end
        with socket.create_connection(address) as sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(ConnectionResetError):
                sock.recv(1024)
        assert proxy.counts()["reset"] == 1
    idle.close()
    assert not [t for t in threading.enumerate() if t.name == "fault-proxy" or "process_request" in t.name]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2)


def test_body_faults_hit_only_matching_object_gets_and_at_most_limit_times(moto_env, tmp_path):
    payload = os.urandom(200_000)
    with FaultProxy(moto_env, fraction=0.0) as plain:
        s3 = aws_client(load_plan(s3_plan(tmp_path, plain.url, [])), "s3")
        s3.create_bucket(Bucket="body-faults")
        for key in ("wals/a", "base/b"):
            s3.put_object(Bucket="body-faults", Key=key, Body=payload)
    with FaultProxy(moto_env, fraction=1.0, kinds=("corrupt",), limit=1, body_match="/wals/") as proxy:
        s3 = aws_client(load_plan(s3_plan(tmp_path, proxy.url, [])), "s3")
        assert s3.list_objects_v2(Bucket="body-faults")["KeyCount"] == 2  # a listing: never a body fault
        assert s3.get_object(Bucket="body-faults", Key="base/b")["Body"].read() == payload  # not matching
        corrupted = s3.get_object(Bucket="body-faults", Key="wals/a")["Body"].read()
        assert len(corrupted) == len(payload) and corrupted != payload  # headers intact, one byte flipped
        assert s3.get_object(Bucket="body-faults", Key="wals/a")["Body"].read() == payload  # the limit is spent
        assert proxy.counts()["corrupt"] == 1
    with FaultProxy(moto_env, fraction=1.0, kinds=("cut",), limit=1) as proxy:
        s3 = aws_client(load_plan(s3_plan(tmp_path, proxy.url, [])), "s3")
        with pytest.raises(ResponseStreamingError, match="Connection reset by peer"):
            s3.get_object(Bucket="body-faults", Key="wals/a")["Body"].read()
        assert proxy.counts()["cut"] == 1
