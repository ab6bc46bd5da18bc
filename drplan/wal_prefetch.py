"""WAL prefetch for restores of self-managed PostgreSQL: one small daemon per restore fetches the archived segments
after the one recovery asks for, several at a time, into a bounded spool directory; `drplan.wal_restore` is the
restore_command that hands them to PostgreSQL.

Why this shape (the sturdiest we found): the spool is the interface. A segment appears in `<spool>/<name>` only
complete and verified (written to a hidden temporary file, checked, then renamed), so the restore_command's fast
path is a shell `mv` of that file into `%p`: no interpreter start, no round trip. Only when the segment is not there
does it start `python -m drplan.wal_restore`, which asks the daemon over the unix socket `<spool>/prefetch.sock` for
it: the daemon fetches it at once (or waits for the fetch already running), answers `ready`, `missing` (not in the
archive, after a fresh listing: recovery ends there, without waiting) or `error`, and moves its prefetch window to
start there (another timeline, or a second pass of recovery). With no daemon answering (it died, or never ran) the
client fetches the segment itself, so a dead daemon costs speed, never correctness. The daemon learns that
PostgreSQL took a segment when its file leaves the spool.

Bounded: spooled plus in-flight segments never exceed `spool_bytes` (at least one segment; one more may be fetched
on demand). History files and `.partial` segments are fetched on demand only, never ahead. Verified before
handing over: the object's bytes against its ETag when that is their MD5 (single-part uploads without SSE-KMS, as
barman-cloud-wal-archive writes them), its length against Content-Length, the compression's own check (gzip's
CRC), and a segment's first page header (long header, the segment's own start address, the segment size equal to
the file size). A failed check or a connection cut mid-body is fetched again (FETCH_ATTEMPTS).

The archive is read in-process through barman-cloud's own CloudInterface (its layout: `<prefix><server>/wals/
<timeline+log>/<segment>[.gz|.bz2|...]`, history files in `wals/`), one per thread; its options are barman-cloud's
(`--cloud-provider`, `--endpoint-url`, ...). Credentials come from the environment, never the arguments.

Run by drplan/pgserver.py: `python -m drplan.wal_prefetch --spool DIR --parallel N --spool-bytes B
[barman-cloud options] SOURCE_URL SERVER_NAME`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from barman import xlog
from barman.clients.cloud_cli import create_argument_parser
from barman.clients.cloud_compression import decompress_to_file
from barman.cloud import ALLOWED_COMPRESSIONS
from barman.cloud_providers import get_cloud_interface
from botocore.config import Config

from drplan.wal_restore import SOCKET, socket_path

FETCH_ATTEMPTS = 5
"""Downloads of one file before it counts as failed: a check that fails, or a connection cut mid-body, is fetched
again (botocore retries throttles and resets before the body itself)."""
RELIST_SECONDS = 1.0
"""A directory listing that lacks the next segment is read again at most this often (the source still archives)."""
TICK_SECONDS = 0.05
"""How often the daemon looks for segments PostgreSQL took from the spool."""
_LONG_HEADER = 0x0002  # XLP_LONG_HEADER: the first page of every segment
_PAGE_HEADER = struct.Struct("=HHIQI4xQII")  # XLogLongPageHeaderData: magic, info, tli, pageaddr, rem_len, sysid,
# seg_size, xlog_blcksz

log = logging.getLogger("drplan.wal_prefetch")
STATS: Counter[str] = Counter()
"""What this process did (prefetched, on demand, taken from the spool, failed attempts by error), logged at the end."""


class Missing(Exception):
    """The file is not in the archive."""


class Corrupt(Exception):
    """A download failed its check."""


def cloud_config(argv: list[str], extra: Any = None):
    """barman-cloud's options and positionals (SOURCE_URL SERVER_NAME), parsed by barman's own parser; `extra` adds
    arguments to it."""
    parser, *_ = create_argument_parser(description="drplan WAL prefetch")
    if extra:
        extra(parser)
    return parser.parse_args(argv)


def s3_client(cloud: Any, connections: int) -> Any:
    """A boto3 S3 client configured as barman's CloudInterface `cloud` is (thread-safe, unlike barman's resource), with
    a connection for each of `connections` threads."""
    client = cloud.s3.meta.client
    return boto3.Session(profile_name=cloud.profile_name).client(
        "s3", endpoint_url=cloud.endpoint_url, region_name=client.meta.region_name,
        config=client.meta.config.merge(Config(max_pool_connections=max(10, connections))))


class Archive:
    """One barman-cloud WAL archive (S3), read through barman's CloudInterface, built once: every thread uses its
    boto3 client (thread-safe, unlike the resource around it), with a connection for each of `connections` threads."""

    def __init__(self, config: Any, connections: int = 10) -> None:
        self.server_name = config.server_name
        self.cloud = get_cloud_interface(config)
        self._client = s3_client(self.cloud, connections)

    def _dir(self, hash_dir: str) -> str:
        return "/".join(p.strip("/") for p in (self.cloud.path, self.server_name, "wals", hash_dir) if p) + "/"

    def listing(self, hash_dir: str) -> dict[str, str]:
        """The complete segments in one directory of the archive: name -> key (no .partial, .backup or history)."""
        found: dict[str, str] = {}
        for key in sorted(self.cloud.list_bucket(self._dir(hash_dir))):
            name = _plain(key.rsplit("/", 1)[-1])
            if xlog.is_wal_file(name):
                found.setdefault(name, key)
        return found

    def find(self, name: str) -> str | None:
        """The key of `name` as the archive holds it now (a fresh listing): the file itself, else a segment's
        `.partial` (what barman-cloud-wal-restore hands over too), else None."""
        prefix = self._dir(xlog.hash_dir(name)) + name
        keys = {_plain(k.rsplit("/", 1)[-1]): k for k in sorted(self.cloud.list_bucket(prefix), reverse=True)}
        return keys.get(name) or keys.get(name + xlog.PARTIAL_EXTENSION)

    def fetch(self, key: str, name: str, dest: Path) -> int | None:
        """Download `key` into `dest` (decompressed, checked, then renamed into place); FETCH_ATTEMPTS tries. Returns a
        segment's size (None for a history file). Missing when the key is gone; the last error otherwise."""
        for attempt in range(1, FETCH_ATTEMPTS):
            try:
                return self._download(key, name, dest)
            except Missing:
                raise
            except Exception as exc:  # noqa: BLE001 - a cut body, a failed check, an exhausted retry: fetch again
                STATS[type(exc).__name__] += 1
                log.warning("%s: attempt %d failed (%s: %s); fetching again", name, attempt, type(exc).__name__,
                            _first_line(exc))
                time.sleep(0.2 * 2**attempt)
        return self._download(key, name, dest)  # the last attempt: its error is the caller's

    def _download(self, key: str, name: str, dest: Path) -> int | None:
        try:
            response = self._client.get_object(Bucket=self.cloud.bucket_name, Key=key)
        except self._client.exceptions.NoSuchKey:
            raise Missing(key) from None
        body = _Counted(response["Body"])
        temp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temp, "wb") as out:
                compression = next((c for ext, c in ALLOWED_COMPRESSIONS.items() if key.endswith(ext)), None)
                if compression:
                    decompress_to_file(body, out, compression)
                else:
                    shutil.copyfileobj(body, out, 1 << 20)
            body.drain()
            body.check(response, key)
            size = None if xlog.is_history_file(name) else check_segment(temp, name)
            os.rename(temp, dest)
            return size
        finally:
            temp.unlink(missing_ok=True)


class _Counted:
    """A response body that counts and hashes the bytes read from it."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self.length = 0
        self._md5 = hashlib.md5(usedforsecurity=False)

    def read(self, size: int = -1) -> bytes:
        data = self._body.read(size) if size is not None and size >= 0 else self._body.read()
        self.length += len(data)
        self._md5.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def check(self, response: dict, key: str) -> None:
        """Length against Content-Length; MD5 against the ETag where it is one (not multipart, not SSE-KMS/-C)."""
        if self.length != response["ContentLength"]:
            raise Corrupt(f"{key}: {self.length} bytes read, {response['ContentLength']} sent")
        etag = response.get("ETag", "").strip('"')
        plain = "kms" not in response.get("ServerSideEncryption", "") and not response.get("SSECustomerAlgorithm")
        if plain and re.fullmatch(r"[0-9a-f]{32}", etag) and self._md5.hexdigest() != etag:
            raise Corrupt(f"{key}: MD5 {self._md5.hexdigest()} differs from its ETag {etag}")


def check_segment(path: Path, name: str) -> int:
    """A WAL segment's first page header against its name and size; returns the segment size. Corrupt otherwise."""
    with open(path, "rb") as f:
        head = f.read(_PAGE_HEADER.size)
    size = path.stat().st_size
    if len(head) < _PAGE_HEADER.size:
        raise Corrupt(f"{name}: {size} bytes, not a WAL segment")
    _, info, _, pageaddr, _, _, seg_size, _ = _PAGE_HEADER.unpack(head)
    if not info & _LONG_HEADER or seg_size != size or seg_size & (seg_size - 1) or not 1 << 20 <= seg_size <= 1 << 30:
        raise Corrupt(f"{name}: {size} bytes, first page header info {info:#x}, segment size {seg_size}")
    if pageaddr != segment_number(name, seg_size) * seg_size:
        raise Corrupt(f"{name}: its first page is at {pageaddr:#x}, not at the segment's start")
    return seg_size


def segment_number(name: str, seg_size: int) -> int:
    _, log_id, seg = xlog.decode_segment_name(name)
    return log_id * ((1 << 32) // seg_size) + seg


def _plain(filename: str) -> str:
    """A file name without barman's compression suffix."""
    return next((filename[: -len(ext)] for ext in ALLOWED_COMPRESSIONS if filename.endswith(ext)), filename)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


class Prefetcher:
    """The daemon's state: a window of segments after the one recovery asked for last (`cursor`), fetched by a
    thread pool into the spool, bounded by `spool_bytes`."""

    def __init__(self, archive: Archive, spool: Path, parallel: int, spool_bytes: int) -> None:
        self.archive, self.spool, self.parallel, self.spool_bytes = archive, spool, parallel, spool_bytes
        self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="prefetch")
        self._lock = threading.Lock()
        self._cursor: str | None = None
        self._seg_size: int | None = None  # learnt from the first segment's header
        self._spooled: set[str] = set()
        self._fetching: dict[str, Future] = {}
        self._failed: set[str] = set()  # prefetches that failed: fetched again only when asked for
        self._listings: dict[str, tuple[float, dict[str, str]]] = {}

    @property
    def slots(self) -> int:
        """Segments the spool holds (spooled and in flight together)."""
        return max(1, self.spool_bytes // (self._seg_size or 1 << 24))

    def request(self, name: str) -> str:
        """PostgreSQL's restore_command asks for `name`: `ready` (in the spool now), `missing` or `error <why>`. The
        window moves there; `tick` fills it."""
        if not xlog.is_wal_file(name):  # history files: on demand only
            return self._fetch_now(name)
        with self._lock:
            self._move_to(name)
            self._failed.discard(name)
            running = self._fetching.get(name)
        if running is not None:
            running.exception()  # wait; a failed prefetch is fetched again below
        if (self.spool / name).exists():
            STATS["ready"] += 1
            return "ready"
        return self._fetch_now(name)

    def _fetch_now(self, name: str) -> str:
        try:
            key = self.archive.find(name)
            if key is None:
                STATS["missing"] += 1
                return "missing"
            size = self.archive.fetch(key, name, self.spool / name)
        except Missing:
            STATS["missing"] += 1
            return "missing"
        except Exception as exc:  # noqa: BLE001 - the answer carries it; recovery stops on it
            log.error("%s: %s: %s", name, type(exc).__name__, _first_line(exc))
            return f"error {type(exc).__name__}: {_first_line(exc)}"
        STATS["on demand"] += 1
        if size is not None:
            with self._lock:
                self._seg_size = self._seg_size or size
                self._spooled.add(name)
        return "ready"

    def tick(self) -> None:
        """Note the segments PostgreSQL took, then fill the window."""
        with self._lock:
            for name in [n for n in self._spooled if not (self.spool / n).exists()]:
                self._spooled.discard(name)
                STATS["taken"] += 1
                if self._cursor and self._same_timeline(name) and name > self._cursor:
                    self._cursor = name
            self._fill()

    def _same_timeline(self, name: str) -> bool:
        return self._cursor is not None and name[:8] == self._cursor[:8]

    def _window(self) -> list[str]:
        """The segments after the cursor that the spool may hold."""
        if self._cursor is None or self._seg_size is None:
            return []
        names, name = [], self._cursor
        for _ in range(self.slots):
            name = xlog.next_segment_name(name, self._seg_size)
            names.append(name)
        return names

    def _move_to(self, name: str) -> None:
        """Recovery asked for `name`: the window starts there; spooled segments outside it are dropped."""
        self._cursor = name
        keep = {name, *self._window()}
        for stale in self._spooled - keep:
            (self.spool / stale).unlink(missing_ok=True)
            self._spooled.discard(stale)
            STATS["dropped"] += 1

    def _fill(self) -> None:
        for name in self._window():
            if len(self._spooled) + len(self._fetching) >= self.slots or len(self._fetching) >= self.parallel:
                return
            if name in self._spooled or name in self._fetching or name in self._failed:
                continue
            key = self._key(name)
            if key is None:  # the end of the archive as listed: recovery asks for it, and then we look again
                return
            future = self._pool.submit(self._prefetch, name, key)
            self._fetching[name] = future

    def _key(self, name: str) -> str | None:
        hash_dir = xlog.hash_dir(name)
        listed_at, keys = self._listings.get(hash_dir, (0.0, {}))
        if name not in keys and time.monotonic() - listed_at > RELIST_SECONDS:
            keys = self.archive.listing(hash_dir)
            self._listings[hash_dir] = (time.monotonic(), keys)
        return keys.get(name)

    def _prefetch(self, name: str, key: str) -> None:
        try:
            self.archive.fetch(key, name, self.spool / name)
        except Exception as exc:  # noqa: BLE001 - asked for later, it is fetched on demand (and then reported)
            log.warning("prefetch of %s failed (%s: %s)", name, type(exc).__name__, _first_line(exc))
            with self._lock:
                self._fetching.pop(name, None)
                self._failed.add(name)
            return
        STATS["prefetched"] += 1
        with self._lock:
            self._fetching.pop(name, None)
            if name == self._cursor or name in self._window():
                self._spooled.add(name)
            else:  # recovery moved elsewhere meanwhile
                (self.spool / name).unlink(missing_ok=True)
                STATS["dropped"] += 1
            self._fill()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def serve(prefetcher: Prefetcher, stop: threading.Event) -> None:
    """Answer requests on `<spool>/prefetch.sock` (one line in: a file name; one line out) until `stop` is set."""
    path = prefetcher.spool / SOCKET
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket_path(prefetcher.spool) as short:
        server.bind(short)
    server.listen(64)
    server.settimeout(TICK_SECONDS)
    log.info("listening on %s: %d in parallel, spool %d bytes", path, prefetcher.parallel, prefetcher.spool_bytes)
    try:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                prefetcher.tick()
                continue
            threading.Thread(target=_answer, args=(prefetcher, conn), daemon=True).start()
    finally:
        server.close()
        path.unlink(missing_ok=True)


def _answer(prefetcher: Prefetcher, conn: socket.socket) -> None:
    with conn, conn.makefile("rwb") as stream:
        name = stream.readline(64).decode(errors="replace").strip()
        if not xlog.is_any_xlog_file(name) or "/" in name:
            answer = f"error {name!r} is not a WAL file name"
        else:
            answer = prefetcher.request(name)
        stream.write(answer.encode() + b"\n")
    prefetcher.tick()  # after the answer: recovery goes on while the window fills


def main(argv: list[str] | None = None) -> int:
    def options(parser: Any) -> None:
        parser.add_argument("--spool", required=True, type=Path, help="the spool directory (emptied first)")
        parser.add_argument("--parallel", type=int, default=8)
        parser.add_argument("--spool-bytes", type=int, default=1 << 30)

    config = cloud_config(sys.argv[1:] if argv is None else argv, options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    spool: Path = config.spool
    spool.mkdir(parents=True, exist_ok=True)
    for leftover in spool.iterdir():  # a killed run's files
        leftover.unlink()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    archive = Archive(config, config.parallel + 2)
    archive.listing("")  # credentials, endpoint and bucket checked (and botocore warmed up) before the socket exists
    prefetcher = Prefetcher(archive, spool, config.parallel, config.spool_bytes)
    try:
        serve(prefetcher, stop)
    finally:
        prefetcher.close()
        log.info("stopped: %s", ", ".join(f"{k} {v}" for k, v in sorted(STATS.items())) or "nothing fetched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
