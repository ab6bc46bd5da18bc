"""The barman-cloud catalogue in S3 (WAL archive and base backups of a self-managed PostgreSQL)."""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from drplan.logs import run_logger
from drplan.plan import BarmanBackup
from tasks.s3 import split_uri


class BaseBackup(BaseModel):
    backup_id: str
    status: str
    begin_time: datetime | None
    end_time: datetime | None


def _server_prefix(backup: BarmanBackup) -> tuple[str, str]:
    bucket, prefix = split_uri(backup.destination)
    return bucket, f"{prefix}{backup.server_name}/"


def holds_timeline(s3, backup: BarmanBackup, timeline: int) -> bool:
    """Whether the archive holds the history file of `timeline` (a server archived its promotion to it)."""
    bucket, prefix = _server_prefix(backup)
    return s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}wals/{timeline:08X}.history", MaxKeys=1
                              ).get("KeyCount", 0) > 0


def find_newest_wal(s3, backup: BarmanBackup, timeline: int | None = None) -> datetime | None:
    """When the newest WAL segment (of `timeline`, default any) reached the archive (segment directories sort by
    timeline and log)."""
    bucket, prefix = _server_prefix(backup)
    wals = f"{prefix}wals/" + (f"{timeline:08X}" if timeline else "")
    dirs = s3.list_objects_v2(Bucket=bucket, Prefix=wals, Delimiter="/").get("CommonPrefixes", [])
    if not dirs:
        return None
    newest_dir = max(d["Prefix"] for d in dirs)
    newest = None
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=newest_dir):
        for obj in page.get("Contents", []):
            if newest is None or obj["LastModified"] > newest:
                newest = obj["LastModified"]
    run_logger().info("newest WAL in s3://%s/%s at %s", bucket, newest_dir, newest)
    return newest


def parse_backup_info(backup_id: str, text: str) -> BaseBackup:
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def when(key: str) -> datetime | None:
        value = fields.get(key, "None").strip()
        return None if value in ("", "None") else datetime.fromisoformat(value)

    return BaseBackup(
        backup_id=backup_id, status=fields.get("status", "UNKNOWN").strip(),
        begin_time=when("begin_time"), end_time=when("end_time"),
    )


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def list_base_backups(s3, backup: BarmanBackup) -> list[BaseBackup]:
    """Every base backup in the catalogue with its status, oldest first."""
    bucket, prefix = _server_prefix(backup)
    result = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}base/", Delimiter="/")
    backups = []
    for entry in result.get("CommonPrefixes", []):
        backup_id = entry["Prefix"].rstrip("/").rsplit("/", 1)[-1]
        try:
            body = s3.get_object(Bucket=bucket, Key=f"{entry['Prefix']}backup.info")["Body"].read().decode()
        except s3.exceptions.NoSuchKey:
            continue  # a backup still being written has no backup.info yet
        backups.append(parse_backup_info(backup_id, body))
    return sorted(backups, key=lambda b: b.backup_id)


find_newest_wal_task = task(find_newest_wal, retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
