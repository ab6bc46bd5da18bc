"""A fault-injecting HTTP proxy on loopback, between drplan and an AWS endpoint (the sandbox's moto_server).

A seeded random fraction of requests (default 0.3) gets a fault instead of being forwarded:

- `slowdown`: S3's `503 SlowDown` (S3 requests: the credential scope of their signature names `s3`);
- `throttling`: `400 ThrottlingException` in the request's protocol: JSON (`X-Amz-Target`), RPC v2 CBOR
  (`Smithy-Protocol`, CloudWatch), query (a form body: RDS, STS) or REST (Route 53, EKS: the `ErrorResponse` XML
  with code `Throttling`, and the `x-amzn-ErrorType` header REST-JSON clients read);
- `reset`: the connection closed with a TCP RST (SO_LINGER 0) before any answer.

Two more kinds, only when asked for (`kinds=`) and only for S3 object GETs: `corrupt` (the answer forwarded with one
byte of its body flipped, headers intact: what a client's checksum must catch) and `cut` (the headers and part of
the body, then a reset: a connection lost mid-download), for keys matching `body_match` (a regex; default any).
`limit` caps the faults injected; `latency` (seconds) delays every request, as a distant store would; `bandwidth`
(bytes per second, 0 unlimited) caps each connection's answer, as one connection to S3 is capped.

The others go to the upstream byte for byte (the request body buffered, the answer streamed back, so barman-cloud
can fetch WAL and base backups through it). `GET /__faults` answers the counts as JSON; `counts()` returns them.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

KINDS = ("slowdown", "throttling", "reset")
BODY_KINDS = ("corrupt", "cut")
FAULTS_PATH = "/__faults"
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
               "expect"}
_SCOPE = re.compile(r"Credential=[^/,]+/\d{8}/[^/]+/([^/]+)/")
_BLOCK = 1 << 16
_BODY_OK = (200, 206)  # an object, or a range of it


class FaultProxy:
    """`with FaultProxy(upstream) as proxy:` proxy.url is the endpoint to use; stopped (every connection and
    thread ended) on exit. `kinds` limits the faults it picks from; a request no kind fits is forwarded."""

    def __init__(self, upstream: str, fraction: float = 0.3, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 limit: int | None = None, body_match: str = "", latency: float = 0.0, bandwidth: float = 0.0
                 ) -> None:
        if not set(kinds) <= {*KINDS, *BODY_KINDS} or not kinds:
            raise ValueError(f"kinds must be among {KINDS + BODY_KINDS}")
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.fraction = fraction
        self.kinds = kinds
        self.limit = limit
        self.body_match = re.compile(body_match)
        self.latency = latency
        self.bandwidth = bandwidth
        self.forwarded = 0
        self.faults: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def counts(self) -> dict[str, int]:
        """Faults injected by kind, and the requests forwarded."""
        with self._lock:
            return {**{kind: self.faults[kind] for kind in dict.fromkeys((*KINDS, *self.kinds))},
                    "forwarded": self.forwarded}

    @property
    def injected(self) -> int:
        with self._lock:
            return sum(self.faults.values())

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = False  # server_close() joins the connection threads
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            for conn in self._connections:  # idle keep-alive connections: their threads wait in readline
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _pick(self, s3: bool, object_get: bool) -> str | None:
        """The fault for the next request, or None: forward it."""
        fitting = [k for k in self.kinds if k != ("throttling" if s3 else "slowdown")
                   and (object_get or k not in BODY_KINDS)]
        with self._lock:
            spent = self.limit is not None and sum(self.faults.values()) >= self.limit
            if self._random.random() >= self.fraction or not fitting or spent:
                self.forwarded += 1
                return None
            kind = self._random.choice(fitting)
            self.faults[kind] += 1
            return kind


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"proxy": proxy})


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    timeout = 300

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the connection was reset

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # every method: GET, PUT, POST, HEAD, DELETE, ...
            return self._proxy
        raise AttributeError(name)

    def _proxy(self) -> None:
        body = self._body()
        if self.command == "GET" and self.path == FAULTS_PATH:
            self._answer(200, "application/json", json.dumps(self.proxy.counts()).encode())
            return
        s3 = _service(self) == "s3"
        parts = urlsplit(self.path)
        object_get = (s3 and self.command == "GET" and "/" in parts.path.strip("/") and "list-type" not in parts.query
                      and self.proxy.body_match.search(unquote(parts.path)) is not None)
        time.sleep(self.proxy.latency)
        kind = self.proxy._pick(s3, object_get)
        if kind == "reset":
            self._reset()
        elif kind == "slowdown":
            self._answer(503, "application/xml", b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown'
                         b"</Code><Message>Please reduce your request rate.</Message></Error>")
        elif kind == "throttling":
            self._throttle()
        else:
            self._forward(body, kind)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _throttle(self) -> None:
        error = {"__type": "ThrottlingException", "message": "Rate exceeded"}
        if self.headers.get("Smithy-Protocol") == "rpc-v2-cbor":
            self._answer(400, "application/cbor", _cbor(error), {"Smithy-Protocol": "rpc-v2-cbor"})
        elif self.headers.get("X-Amz-Target"):
            self._answer(400, "application/x-amz-json-1.1", json.dumps(error).encode())
        else:
            self._answer(400, "text/xml", b"<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>"
                                          b"<Message>Rate exceeded</Message></Error></ErrorResponse>",
                         {"x-amzn-ErrorType": "ThrottlingException"})

    def _answer(self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response_only(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        socket.close(self.connection.detach())  # close at once (not after makefile's references): an RST
        self.close_connection = True

    def _forward(self, body: bytes, fault: str | None = None) -> None:
        """Send the request upstream and stream its answer back; `corrupt` flips a byte of the body's first block,
        `cut` resets the connection after half of it."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=300)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            self.send_response_only(response.status, response.reason)
            length = response.getheader("Content-Length")
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            bodiless = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
            chunked = length is None and not bodiless
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if bodiless:
                return
            while block := response.read(_BLOCK):
                if fault == "cut" and response.status in _BODY_OK:
                    self.wfile.write(block[: len(block) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                if fault == "corrupt" and response.status in _BODY_OK:
                    block, fault = block[: len(block) // 2] + bytes([block[len(block) // 2] ^ 0xFF]) \
                        + block[len(block) // 2 + 1:], None
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                if self.proxy.bandwidth:
                    time.sleep(len(block) / self.proxy.bandwidth)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            upstream.close()


def _service(request: BaseHTTPRequestHandler) -> str | None:
    """The service a SigV4 request is signed for (`s3`, `rds`, ...): its Authorization header's credential scope, or
    a presigned URL's X-Amz-Credential."""
    match = _SCOPE.search(request.headers.get("Authorization", ""))
    if match:
        return match.group(1)
    credential = re.search(r"[?&]X-Amz-Credential=([^&]+)", request.path)
    parts = unquote(credential.group(1)).split("/") if credential else []
    return parts[3] if len(parts) > 3 else None


def _cbor(mapping: dict[str, str]) -> bytes:
    """A CBOR map of short text strings (RFC 8949: major types 5 and 3, lengths below 256)."""
    def text(value: str) -> bytes:
        data = value.encode()
        return (bytes([0x60 + len(data)]) if len(data) < 24 else bytes([0x78, len(data)])) + data

    return bytes([0xA0 + len(mapping)]) + b"".join(text(k) + text(v) for k, v in mapping.items())
