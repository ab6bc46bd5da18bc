"""S3 primitives shared by bucket backup, verification and sync: URIs, one-pass listings, server-side copies
(CopyObject, or UploadPartCopy above a threshold), batched deletes, a transfer client, and error lines.

Object identity is (size, ETag) as listed: the ETag is S3's MD5 of a single-part object and a digest of the
part MD5s of a multipart one, and it changes whenever an object is rewritten, even with the same size.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from drplan.clients import new_client
from drplan.errors import DrplanError, first_line
from drplan.plan import Plan
from drplan.s3fastcopy import FastCopy

MIB = 1024 * 1024
COPY_OBJECT_LIMIT = 5 * 1024 * MIB
"""CopyObject copies at most 5 GiB; larger objects need UploadPartCopy."""
MAX_PARTS = 10_000
CHECKSUM_ALGORITHM = "SHA256"
"""Asked of every single-request copy, so the store computes a content checksum of what it wrote."""
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                            "TooManyRequestsException", "ServiceUnavailable", "503"})
FATAL_CODES = {
    "AllAccessDisabled": "access denied",
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret key does not match",
    "ExpiredToken": "the session token has expired",
    "NoSuchBucket": "the bucket does not exist",
    "NotImplemented": "the store does not implement this operation",
}
"""Errors that would fail every other request too: a run stops on the first one. (A refusal for lack of permission
is drplan.errors.AccessDenied already, raised by the client: drplan.clients.new_client.)"""

_URI = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>\S*))?")


@dataclass(frozen=True)
class S3Object:
    size: int
    etag: str


@dataclass(frozen=True)
class Copied:
    """What the store reports for a finished copy: the new ETag and, where it keeps one, a checksum."""

    etag: str
    checksum: str | None


def parse_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ('bucket', 'some/prefix'); a malformed URI is a one-line DrplanError."""
    match = _URI.fullmatch(uri.strip()) if isinstance(uri, str) else None
    if not match or ".." in match["bucket"]:
        raise DrplanError(f"{uri!r} is not an S3 URI; write s3://bucket-name/optional/prefix/ (bucket names: 3-63 "
                          "lowercase letters, digits, '.' and '-')")
    return match["bucket"], match["prefix"] or ""


def parse_prefix(uri: str) -> tuple[str, str]:
    """Like parse_uri, for a 'directory': the prefix is empty or ends with '/'."""
    bucket, prefix = parse_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if "//" in prefix or prefix.startswith("/"):
        raise DrplanError(f"{uri!r} has an empty path segment; write s3://{bucket}/path/to/prefix/")
    return bucket, prefix


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def fatal(exc: Exception, action: str, uri: str) -> DrplanError | None:
    """The one-line DrplanError for an error that stops a whole run, or None for a per-object error."""
    if isinstance(exc, ClientError) and error_code(exc) in FATAL_CODES:
        return DrplanError(f"{action} {uri}: {FATAL_CODES[error_code(exc)]} ({error_code(exc)})")
    return None


def describe(exc: Exception) -> str:
    """A short, single-line description of a per-object failure."""
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message") or ""
        return f"{error_code(exc)}: {message}".strip(": ")
    return first_line(exc)


def list_objects(s3, uri: str) -> dict[str, S3Object]:
    """Every object under a prefix, keyed relative to it: one paginated ListObjectsV2 pass, no HEADs."""
    bucket, prefix = parse_prefix(uri)
    found: dict[str, S3Object] = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"][len(prefix):]] = S3Object(obj["Size"], obj.get("ETag", "").strip('"'))
    except (ClientError, BotoCoreError) as exc:
        raise fatal(exc, "listing", uri) or DrplanError(f"listing {uri}: {describe(exc)}") from None
    return found


def part_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges of a multipart copy: `part_size` each (more if 10,000 parts would not do)."""
    part_size = max(part_size, -(-size // MAX_PARTS))
    return [(start, min(start + part_size, size) - 1) for start in range(0, size, part_size)]


def source_layout(s3, copy_source: dict, obj: S3Object) -> list[tuple[int, int]] | None:
    """The byte ranges of a multipart source's own parts (one HEAD ?partNumber=n per part), None if the
    object is single-part or the sizes do not add up."""
    if "-" not in obj.etag:
        return None
    count = int(obj.etag.rsplit("-", 1)[1])
    ranges, start = [], 0
    for number in range(1, count + 1):
        length = s3.head_object(**copy_source, PartNumber=number)["ContentLength"]
        ranges.append((start, start + length - 1))
        start += length
    return ranges if start == obj.size else None


def copy_object(s3, source: tuple[str, str], target: tuple[str, str], obj: S3Object, threshold: int,
                part_size: int, fast: FastCopy | None = None) -> Copied:
    """Server-side copy of one listed object (bucket, key) -> (bucket, key): CopyObject up to `threshold`
    bytes (through `fast` when given and it succeeds), UploadPartCopy above it. Content type and metadata
    travel with the object either way."""
    copy_source = {"Bucket": source[0], "Key": source[1]}
    if obj.size <= min(threshold, COPY_OBJECT_LIMIT):
        if fast and (quick := fast.copy(source, target)):
            return Copied(*quick)
        result = s3.copy_object(Bucket=target[0], Key=target[1], CopySource=copy_source,
                                ChecksumAlgorithm=CHECKSUM_ALGORITHM)["CopyObjectResult"]
        return Copied(result["ETag"].strip('"'), _checksum(result))
    return _multipart_copy(s3, copy_source, target, obj, part_size)


def _checksum(result: dict) -> str | None:
    for algorithm in ("SHA256", "SHA1", "CRC64NVME", "CRC32C", "CRC32"):
        if result.get(f"Checksum{algorithm}"):
            return f"{algorithm}:{result[f'Checksum{algorithm}']}"
    return None


def _multipart_copy(s3, copy_source: dict, target: tuple[str, str], obj: S3Object, part_size: int) -> Copied:
    """A multipart source is copied part for part in its own layout, so the copy's ETag equals the source's
    (a check of the content and, next time, a match); a single-part one in parts of `part_size`. Any failure
    aborts the upload, so no invisible half-copy is left behind."""
    head = s3.head_object(**copy_source)
    ranges = source_layout(s3, copy_source, obj) or part_ranges(obj.size, part_size)
    carried = {name: head[name] for name in ("ContentType", "ContentEncoding", "ContentDisposition",
                                              "ContentLanguage", "CacheControl", "Metadata") if head.get(name)}
    upload_id = s3.create_multipart_upload(Bucket=target[0], Key=target[1], **carried)["UploadId"]
    try:
        parts = []
        for number, (first, last) in enumerate(ranges, start=1):
            result = s3.upload_part_copy(
                Bucket=target[0], Key=target[1], UploadId=upload_id, PartNumber=number,
                CopySource=copy_source, CopySourceRange=f"bytes={first}-{last}", CopySourceIfMatch=f'"{obj.etag}"',
            ).get("CopyPartResult", {})
            if "ETag" not in result:
                raise DrplanError(f"copying to s3://{target[0]}/{target[1]}: the store does not implement "
                                  "UploadPartCopy; raise the multipart threshold")
            parts.append({"PartNumber": number, "ETag": result["ETag"]})
        done = s3.complete_multipart_upload(Bucket=target[0], Key=target[1], UploadId=upload_id,
                                            MultipartUpload={"Parts": parts})
    except BaseException:
        s3.abort_multipart_upload(Bucket=target[0], Key=target[1], UploadId=upload_id)
        raise
    return Copied(done["ETag"].strip('"'), None)


def delete_objects(s3, bucket: str, keys: list[str]) -> dict[str, str]:
    """Delete keys in batches of 1,000 (DeleteObjects). Returns key -> error for keys the store refused."""
    errors: dict[str, str] = {}
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start:start + 1000]]
        response = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors |= {e["Key"]: f"{e.get('Code')}: {e.get('Message', '')}" for e in response.get("Errors", [])}
    return errors


def transfer_client(plan: Plan, workers: int) -> Any:
    """An S3 client for many concurrent requests: one connection per worker, shared by all threads."""
    return new_client(plan.aws, "s3", plan.aws.region,
                      Config(max_pool_connections=workers + 2, parameter_validation=False))


class ThrottleCounter:
    """Counts responses that asked the client to slow down (botocore's standard mode retries them with
    exponential backoff and jitter). Attach to a client for the duration of a `with` block."""

    def __init__(self, s3) -> None:
        self.count = 0
        self._events = s3.meta.events
        self._lock = threading.Lock()
        self._id = f"drplan-throttle-{id(self)}"

    def __enter__(self) -> ThrottleCounter:
        self._events.register("needs-retry.s3", self._seen, unique_id=self._id)
        return self

    def __exit__(self, *exc: object) -> None:
        self._events.unregister("needs-retry.s3", unique_id=self._id)

    def _seen(self, response: tuple | None = None, **_: Any) -> None:
        if response is None:
            return
        http, parsed = response
        if http.status_code == 503 or parsed.get("Error", {}).get("Code") in THROTTLE_CODES:
            with self._lock:
                self.count += 1
