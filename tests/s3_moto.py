"""S3 test support: a plan pointing at a moto_server (`sandbox.launchers.moto`), and fault injection two ways:
through botocore's `before-send` event (the request never leaves the client; botocore parses the injected HTTP
response, applies its standard retry policy to it and raises a real ClientError), and through a loopback proxy in
front of moto that answers some copies 503 SlowDown (for the request path that bypasses botocore,
drplan/s3fastcopy.py)."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from botocore.awsrequest import AWSResponse

from drplan.plan import load_plan


def s3_plan(directory: Path, endpoint: str, buckets: list[dict]) -> Path:
    path = directory / "s3-plan.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s3-test",
        "aws": {"region": "us-east-1", "dr_region": "us-west-2", "endpoint_url": endpoint},
        "buckets": buckets,
    }))
    load_plan(path)
    return path


class _Body:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self.body


def inject(s3, operation: str, status: int, code: str, when: Callable[[str], bool] = lambda url: True,
           times: int | None = None) -> list[str]:
    """Answer `operation` requests whose URL satisfies `when` with an S3 error (at most `times` times).
    Returns the list of URLs answered so, which grows as requests arrive."""
    answered: list[str] = []
    body = f"<Error><Code>{code}</Code><Message>injected {code}</Message></Error>".encode()

    def handler(request, **_: object) -> AWSResponse | None:
        if when(request.url) and (times is None or len(answered) < times):
            answered.append(request.url)
            return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Body(body))
        return None

    s3.meta.events.register(f"before-send.s3.{operation}", handler, unique_id=f"inject-{operation}-{code}")
    return answered


def uninject(s3, operation: str, code: str) -> None:
    s3.meta.events.unregister(f"before-send.s3.{operation}", unique_id=f"inject-{operation}-{code}")


def listing(s3, bucket: str) -> list[tuple]:
    """Every object of a bucket with its size, ETag and modification time: for before/after comparisons."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [(o["Key"], o["Size"], o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])]


def put_objects(s3, bucket: str, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


class _SlowDownHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        server: SlowDownProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and self.headers.get("x-amz-copy-source") and server.take():
            status, headers = 503, [("Content-Type", "application/xml")]
            data = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        else:
            upstream = http.client.HTTPConnection("127.0.0.1", server.upstream, timeout=30)
            upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
            response = upstream.getresponse()
            status, headers, data = response.status, response.getheaders(), response.read()
            upstream.close()
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer


class SlowDownProxy(ThreadingHTTPServer):
    """Forwards to moto on loopback; answers the first `count` copy requests 503 SlowDown."""

    daemon_threads = True

    def __init__(self, upstream: int, count: int) -> None:
        super().__init__(("127.0.0.1", 0), _SlowDownHandler)
        self.upstream, self.left, self.lock = upstream, count, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            self.left -= 1
            return self.left >= 0


@contextmanager
def slow_down_proxy(moto_url: str, count: int) -> Iterator[str]:
    proxy = SlowDownProxy(int(moto_url.rsplit(":", 1)[1]), count)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()
        proxy.server_close()
