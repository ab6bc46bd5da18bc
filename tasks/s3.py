"""S3 tasks (boto3): find the newest data and backups, write bucket backups with a manifest.

Bucket backup layout: `<backup>/<YYYYMMDDTHHMMSSZ>/<key>` for the copies, and, written last, the manifest
`<backup>/<YYYYMMDDTHHMMSSZ>.manifest.json`. A backup without its manifest is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE

from drplan.errors import DrplanError
from drplan.logs import run_logger

STAMP = "%Y%m%dT%H%M%SZ"
_MANIFEST = re.compile(r"(\d{8}T\d{6}Z)\.manifest\.json$")


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/prefix/ -> (bucket, 'prefix/')."""
    if not uri.startswith("s3://"):
        raise DrplanError(f"{uri!r} is not an S3 URI; write s3://bucket/prefix/")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix


def _objects(s3, uri: str):
    bucket, prefix = split_uri(uri)
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code == "NoSuchBucket":
            raise DrplanError(f"{uri}: bucket {bucket} does not exist; check the plan's bucket URIs") from None
        if code in ("AccessDenied", "403"):
            raise DrplanError(f"{uri}: access denied; grant s3:ListBucket on {bucket}") from None
        raise


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def find_newest_object(s3, uri: str) -> datetime | None:
    """LastModified of the newest object under `uri` (None when empty)."""
    newest = max((obj["LastModified"] for obj in _objects(s3, uri)), default=None)
    run_logger().info("%s newest object %s", uri, newest)
    return newest


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def find_newest_backup(s3, backup_uri: str) -> datetime | None:
    """Time of the newest complete (manifest written) bucket backup under `backup_uri`."""
    bucket, prefix = split_uri(backup_uri)
    stamps = []
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            for obj in page.get("Contents", []):
                match = _MANIFEST.search(obj["Key"])
                if match:
                    stamps.append(datetime.strptime(match.group(1), STAMP).replace(tzinfo=UTC))
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchBucket":
            raise DrplanError(f"{backup_uri}: bucket {bucket} does not exist; check buckets[].backup") from None
        raise
    newest = max(stamps, default=None)
    run_logger().info("%s newest complete backup %s", backup_uri, newest)
    return newest


def back_up_prefix(s3, live_uri: str, backup_uri: str, at: datetime) -> dict:
    """Server-side copy of every object under `live_uri` into `<backup>/<stamp>/`, then the manifest."""
    src_bucket, src_prefix = split_uri(live_uri)
    dst_bucket, dst_prefix = split_uri(backup_uri)
    stamp = at.astimezone(UTC).strftime(STAMP)
    entries = []
    for obj in _objects(s3, live_uri):
        key = obj["Key"][len(src_prefix):]
        s3.copy_object(
            Bucket=dst_bucket, Key=f"{dst_prefix}{stamp}/{key}",
            CopySource={"Bucket": src_bucket, "Key": obj["Key"]},
        )
        entries.append({"key": key, "size": obj["Size"], "etag": obj["ETag"].strip('"')})
    body = {"source": live_uri, "taken_at": at.astimezone(UTC).isoformat(), "objects": entries}
    raw = json.dumps(body, sort_keys=True).encode()
    s3.put_object(
        Bucket=dst_bucket, Key=f"{dst_prefix}{stamp}.manifest.json", Body=raw,
        ContentType="application/json", Metadata={"sha256": hashlib.sha256(raw).hexdigest()},
    )
    return body


def put_json(s3, uri: str, document: dict) -> None:
    bucket, key = split_uri(uri)
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(document, sort_keys=True, default=str).encode(),
                  ContentType="application/json")
