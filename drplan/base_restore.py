"""Base backup download for restores of self-managed PostgreSQL: each tar file of a barman-cloud backup is fetched in
byte ranges by a pool of connections and extracted as a stream, in order, while the next ranges are already on
their way; verified against the store's checksum; with progress.

Why not `barman-cloud-restore`: it reads each tar file through one GET, one connection, strictly in sequence. An S3
connection delivers far less than what S3 serves in parallel (AWS's guidance for large objects is parallel
byte-range fetches), so the download of a big backup is bounded by one connection's throughput. This module keeps
barman's layout and semantics (its catalogue finds the files, its decompressors and tar modes read them; PGDATA
into the destination, each tablespace into its recorded location with its `pg_tblspc` link, `pg_wal` created when
the backup left it out) and changes only how the bytes arrive.

Pieces: a file is read in ranges of at most `--piece-bytes` (8 MiB, AWS's usual range size) that never straddle
two of its upload parts (barman-cloud uploads multipart, its parts vary in size: each part's length comes from a
HEAD with its part number), so that the bytes, consumed in order, give each part's MD5 and the composite ETag (MD5
of the parts' MD5s, `-<parts>`) is checked at the end; a single-part file against its MD5 ETag. Under SSE-KMS/-C the
ETag is no MD5: lengths only, and the compression's own checks. A piece cut mid-body or short is
fetched again (FETCH_ATTEMPTS); a file whose checksum fails is downloaded again from an emptied destination (the
whole backup: ATTEMPTS). At most `parallel + 2` pieces are held in memory.

Run by drplan/pgserver.py as the PostgreSQL OS user, tracked by PID and killed with its parent:
`python -m drplan.base_restore --backup-id ID --destination DIR --parallel N [barman-cloud options] SOURCE_URL
SERVER_NAME`. Its output is JSON lines: `{"files": n, "bytes": total}` first, then `{"done": bytes}` as the download
advances, and last `{"ok": true}` or `{"error": "..."}`. Credentials come from the environment, never arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import RawIOBase
from pathlib import Path
from typing import Any

from barman.clients.cloud_compression import get_compressor, get_streaming_tar_mode
from barman.cloud import CloudBackupCatalog, DecompressingStreamingIO
from barman.cloud_providers import get_cloud_interface

from drplan.wal_prefetch import FETCH_ATTEMPTS, Corrupt, cloud_config, s3_client

ATTEMPTS = 2
"""Whole downloads of the backup before a checksum failure is final."""
PROGRESS_SECONDS = 0.5
"""How often a `{"done": ...}` line is written."""
_MULTIPART = re.compile(r"([0-9a-f]{32})-(\d+)")
_MD5 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Layout:
    """One object of the backup as it will be read: its byte ranges (inclusive ends) and how to check it."""

    key: str
    size: int
    ranges: list[tuple[int, int, bool]]  # first byte, last byte, whether it ends an upload part
    etag: str
    parts: int | None  # upload parts of a multipart upload (its ETag: the MD5 of the parts' MD5s, `-<parts>`)
    checked: bool  # the ETag is an MD5 (of the object, or of its parts' MD5s)


def log(message: str) -> None:
    """A line for the log (not JSON: the parent reads only JSON lines)."""
    print(message, flush=True)


def layout(client: Any, bucket: str, key: str, piece_bytes: int, pool: ThreadPoolExecutor) -> Layout:
    """How to read `key`: in ranges of at most `piece_bytes` that never straddle two of its upload parts."""
    head = client.head_object(Bucket=bucket, Key=key)
    size, etag = head["ContentLength"], head.get("ETag", "").strip('"')
    plain = "kms" not in head.get("ServerSideEncryption", "") and not head.get("SSECustomerAlgorithm")
    multipart = _MULTIPART.fullmatch(etag)
    sizes = [size]
    if multipart:
        parts = int(multipart.group(2))
        sizes = list(pool.map(lambda n: client.head_object(Bucket=bucket, Key=key, PartNumber=n)["ContentLength"],
                              range(1, parts + 1)))
        if sum(sizes) != size:  # a store that ignores partNumber (S3 honours it): the parts' MD5s are out of reach
            log(f"{key}: the store did not give its {parts} parts' lengths; its ETag cannot be checked (lengths are)")
            sizes, multipart, plain = [size], None, False
    ranges, start = [], 0
    for part in sizes:
        end = start + part
        ranges += [(s, min(s + piece_bytes, end) - 1, s + piece_bytes >= end) for s in range(start, end, piece_bytes)]
        start = end
    checked = plain and (multipart is not None or bool(_MD5.fullmatch(etag)))
    return Layout(key, size, ranges, etag, len(sizes) if multipart else None, checked)


class Pieces(RawIOBase):
    """An object read front to back while up to `ahead` of its ranges are fetched in parallel; `verify()` after the
    last byte checks it against its ETag. `advanced(n)` is called as bytes are handed on."""

    def __init__(self, client: Any, bucket: str, plan: Layout, pool: ThreadPoolExecutor, ahead: int,
                 advanced: Callable[[int], None]) -> None:
        super().__init__()
        self._client, self._bucket, self._plan, self._pool, self._advanced = client, bucket, plan, pool, advanced
        self._futures: dict[int, Future[bytes]] = {}
        self._next = 0  # the next range handed on
        self._buffer = memoryview(b"")
        self._md5 = hashlib.md5(usedforsecurity=False)  # of the object, or of the parts' digests
        self._part = hashlib.md5(usedforsecurity=False)  # of the current upload part (multipart objects)
        for index in range(min(ahead, len(plan.ranges))):
            self._submit(index)

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        if not self._buffer:
            if self._next == len(self._plan.ranges):
                return 0
            piece = self._futures.pop(self._next).result()
            self._submit(self._next + len(self._futures) + 1)
            if self._plan.parts is not None:  # one part too: its ETag is still the MD5 of an MD5, `-1`
                self._part.update(piece)
                if self._plan.ranges[self._next][2]:  # the part is complete
                    self._md5.update(self._part.digest())
                    self._part = hashlib.md5(usedforsecurity=False)
            else:
                self._md5.update(piece)
            self._next += 1
            self._buffer = memoryview(piece)
            self._advanced(len(piece))
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def verify(self) -> None:
        """Read what the consumer left (tar padding, the compression's trailer), then check the whole object."""
        while self.read(1 << 20):
            pass
        if self._plan.checked:
            digest = self._md5.hexdigest() + (f"-{self._plan.parts}" if self._plan.parts is not None else "")
            if digest != self._plan.etag:
                raise Corrupt(f"{self._plan.key}: checksum {digest} differs from its ETag {self._plan.etag}")

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        super().close()

    def _submit(self, index: int) -> None:
        if index < len(self._plan.ranges) and index not in self._futures and index >= self._next:
            self._futures[index] = self._pool.submit(self._fetch, *self._plan.ranges[index][:2])

    def _fetch(self, start: int, end: int) -> bytes:
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=self._plan.key,
                                                   Range=f"bytes={start}-{end}")
                data = response["Body"].read()
                if len(data) == end - start + 1:
                    return data
                error: Exception = Corrupt(f"{self._plan.key} bytes {start}-{end}: {len(data)} bytes read")
            except Exception as exc:  # noqa: BLE001 - a cut body or an exhausted retry: fetch the range again
                error = exc
            if attempt == FETCH_ATTEMPTS:
                raise error
            time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")


@dataclass
class Job:
    """One tar file of the backup and the directory it is extracted into."""

    key: str
    target: Path

    @property
    def compression(self) -> str | None:
        """As barman's own extraction reads it: the file's extension (`gz`, `bz2`, `xz`, `snappy`, `lz4`...)."""
        extension = os.path.splitext(self.key)[1]
        return None if extension == ".tar" else extension[1:]


def jobs(catalog: CloudBackupCatalog, backup_id: str, destination: Path) -> tuple[list[Job], list[tuple[Path, Path]],
                                                                                  Path]:
    """The backup's tar files with their directories, the tablespace links to create, and the WAL directory."""
    info = catalog.get_backup_info(backup_id)
    if info is None:
        raise SystemExit(f"backup {backup_id} of {catalog.server_name} is not in the catalogue")
    found, links = [], []
    for oid, file_info in catalog.get_backup_files(info).items():
        target = destination
        if oid is not None:
            space = next(t for t in info.tablespaces if t.oid == oid)
            target = Path(space.location)
            links.append((destination / "pg_tblspc" / str(oid), target))
        if target.exists() and any(target.iterdir()):
            raise SystemExit(f"{target} is not empty; a restore needs an empty directory")
        found += [Job(f.path, target) for f in (file_info, *file_info.additional_files)]
    return found, links, destination / info.wal_directory()


def download(config: Any, emit: Callable[[dict], None]) -> None:
    """Download and extract the backup into config.destination (see the module docstring)."""
    cloud = get_cloud_interface(config)
    catalog = CloudBackupCatalog(cloud, config.server_name)
    destination = Path(config.destination)
    found, links, wal_dir = jobs(catalog, config.backup_id, destination)
    client = s3_client(cloud, config.parallel + 2)
    destination.mkdir(mode=0o700, exist_ok=True)  # PostgreSQL starts only on a private data directory
    with ThreadPoolExecutor(config.parallel, thread_name_prefix="download") as pool:
        layouts = list(pool.map(lambda j: layout(client, cloud.bucket_name, j.key, config.piece_bytes, pool), found))
        emit({"files": len(found), "bytes": sum(p.size for p in layouts)})
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with _Progress(emit) as progress:
                    for job, plan in zip(found, layouts, strict=True):
                        _extract(Pieces(client, cloud.bucket_name, plan, pool, config.parallel + 2, progress.add),
                                 job)
                break
            except Corrupt:
                if attempt == ATTEMPTS:
                    raise
                for job in found:  # start over from empty directories
                    _empty(job.target)
    for link, target in links:
        link.symlink_to(target)
    wal_dir.mkdir(exist_ok=True)  # pg_wal is not in barman's tar when it was a symlink


def _extract(pieces: Pieces, job: Job) -> None:
    decompressor = get_compressor(job.compression)
    stream = DecompressingStreamingIO(pieces, decompressor) if decompressor else pieces
    try:
        with tarfile.open(fileobj=stream, mode=get_streaming_tar_mode("r", job.compression)) as tar:
            tar.extractall(job.target)  # as barman-cloud-restore: no `filter` before Python 3.11.4
        pieces.verify()
    finally:
        pieces.close()


def _empty(directory: Path) -> None:
    for child in directory.iterdir() if directory.exists() else ():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


class _Progress:
    """Counts bytes handed on; a thread writes `{"done": n}` every PROGRESS_SECONDS and once at the end."""

    def __init__(self, emit: Callable[[dict], None]) -> None:
        self._emit, self._done, self._stop = emit, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def add(self, n: int) -> None:
        self._done += n

    def __enter__(self) -> _Progress:
        self._emit({"done": 0})
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._emit({"done": self._done})

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_SECONDS):
            self._emit({"done": self._done})


def lines(log: Path, offset: int, alive: Callable[[], bool]) -> Iterator[dict]:
    """Follow a downloader's output (its log file from `offset`) until it has ended: each JSON line, as it comes."""
    with open(log) as f:
        f.seek(offset)
        buffered = ""
        while True:
            running = alive()
            buffered += f.read()
            *complete, buffered = buffered.split("\n")
            for line in complete:
                if line.startswith("{"):
                    yield json.loads(line)
            if not running:
                return
            time.sleep(0.1)


def arguments(argv: list[str]) -> Any:
    """The downloader's options and barman-cloud's (see the module docstring)."""

    def options(parser: Any) -> None:
        parser.add_argument("--backup-id", required=True)
        parser.add_argument("--destination", required=True, help="the data directory to create (empty or absent)")
        parser.add_argument("--parallel", type=int, default=8, help="ranges fetched at once")
        parser.add_argument("--piece-bytes", type=int, default=8 << 20, help="range size of a single-part file")

    return cloud_config(argv, options)


def main(argv: list[str] | None = None) -> int:
    config = arguments(sys.argv[1:] if argv is None else argv)

    def emit(line: dict) -> None:
        print(json.dumps(line), flush=True)

    try:
        download(config, emit)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one line for the parent, whatever it was
        emit({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"})
        return 1
    emit({"ok": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
