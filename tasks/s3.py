"""S3 tasks (boto3): find the newest data and backups, back up a bucket prefix with a manifest, verify a backup,
restore one.

Bucket backup layout (drplan/s3manifest.py): `<backup>/<YYYYMMDDTHHMMSSZ>/<key>` for the copies, and, written
last, the manifest `<backup>/<YYYYMMDDTHHMMSSZ>.manifest.json`. A backup without its manifest is incomplete.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import AwareDatetime, BaseModel

from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.plan import Bucket
from drplan.pool import bounded_map
from drplan.progress import ArtifactProgress, Reporter
from drplan.s3manifest import (
    STAMP,
    Manifest,
    ManifestEntry,
    Verification,
    backups,
    compare,
    read_manifest,
    resolve_backup,
    stamp_of,
    write_manifest,
)
from drplan.s3store import delete_objects, list_objects, parse_prefix
from drplan.s3store import parse_uri as split_uri
from drplan.s3sync import DEFAULTS, SyncOptions, SyncReport, restore, sync
from drplan.timeutil import utcnow


def _objects(s3, uri: str):
    bucket, prefix = split_uri(uri)
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code == "NoSuchBucket":
            raise DrplanError(f"{uri}: bucket {bucket} does not exist; check the plan's bucket URIs") from None
        raise


def newest_backup(s3, backup_uri: str) -> datetime | None:
    """Time of the newest complete (manifest written) bucket backup under `backup_uri`: one delimited listing."""
    complete, _ = backups(s3, backup_uri)
    return datetime.strptime(complete[-1], STAMP).replace(tzinfo=UTC) if complete else None


def newest_object(s3, uri: str) -> datetime | None:
    """LastModified of the newest object under `uri` (None when empty)."""
    return max((obj["LastModified"] for obj in _objects(s3, uri)), default=None)


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def find_newest_object(s3, uri: str) -> datetime | None:
    """LastModified of the newest object under `uri` (None when empty)."""
    newest = newest_object(s3, uri)
    run_logger().info("%s newest object %s", uri, newest)
    return newest


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def find_newest_backup(s3, backup_uri: str) -> datetime | None:
    """Time of the newest complete (manifest written) bucket backup under `backup_uri`."""
    newest = newest_backup(s3, backup_uri)
    run_logger().info("%s newest complete backup %s", backup_uri, newest)
    return newest


LISTING_WORKERS = 10
"""Listings at once: botocore's connection pool per client holds 10."""


@task(cache_policy=NO_CACHE)
def newest_under(s3, backups: list[str], prefixes: list[str], workers: int = LISTING_WORKERS
                 ) -> dict[str, datetime | None | Exception]:
    """Every URI of `backups` -> its newest complete backup (one delimited listing each) and of `prefixes` -> its
    newest object (one listing per 1,000 objects), listed `workers` at a time; a URI that cannot be read maps to
    its exception, so that one broken bucket does not hide the others."""
    jobs = [(newest_backup, uri) for uri in dict.fromkeys(backups)] + \
        [(newest_object, uri) for uri in dict.fromkeys(prefixes)]
    found = bounded_map(lambda job: job[0](s3, job[1]), jobs, workers)
    run_logger().info("newest of %d backup and %d live prefixes listed", len(set(backups)), len(set(prefixes)))
    return {uri: DrplanError(first_line(result)) if isinstance(result, Exception) else result
            for (_, uri), result in found.items()}


class BackupResult(BaseModel):
    source: str
    backup: str
    manifest: str
    taken_at: AwareDatetime
    objects: int
    bytes: int
    copied: int
    throttled: int
    aws_retries: int
    duration_s: float


def back_up_prefix(s3, live_uri: str, backup_uri: str, at: datetime, options: SyncOptions = DEFAULTS,
                   progress: Reporter | None = None) -> BackupResult:
    """Server-side copy of every object under `live_uri` into `<backup>/<stamp>/`, verified, then the manifest.
    A rerun for the same `at` resumes. Raises DrplanError (and writes no manifest) when anything failed."""
    if at.tzinfo is None:
        raise DrplanError(f"backup time {at.isoformat()} has no time zone; pass an aware UTC time")
    bucket, prefix = parse_prefix(backup_uri)
    target = f"s3://{bucket}/{prefix}{at.astimezone(UTC).strftime(STAMP)}/"
    result = sync(s3, live_uri, target, options.model_copy(update={"delete": True, "dry_run": False}),
                  progress=progress)
    report = result.report
    if not report.complete:
        first = report.failures[0] if report.failures else None
        reason = f"{report.failed.objects} failed, first {first.key}: {first.error}" if first else \
            report.verification.summary
        raise DrplanError(f"backup {target} incomplete, no manifest written ({reason}); rerun to resume")
    manifest = Manifest(
        source=live_uri, backup=target, taken_at=at.astimezone(UTC), completed_at=utcnow(),
        objects=[ManifestEntry(key=key, size=obj.size, etag=obj.etag,
                               checksum=result.copies[key].checksum if key in result.copies else None)
                 for key, obj in sorted(result.target.items())],
    )
    location = write_manifest(s3, target, manifest)
    run_logger().info("backup %s: %d objects, manifest %s", target, len(manifest.objects), location)
    return BackupResult(source=live_uri, backup=target, manifest=location, taken_at=manifest.taken_at,
                        objects=len(manifest.objects), bytes=manifest.bytes, copied=report.copied.objects,
                        throttled=report.throttled, aws_retries=report.aws_retries, duration_s=report.duration_s)


@task(cache_policy=NO_CACHE)
def back_up_bucket(s3, bucket: Bucket, at: datetime, options: SyncOptions = DEFAULTS) -> BackupResult:
    """Back up one plan bucket (live -> backup), with a progress artifact."""
    key = re.sub(r"[^a-z0-9-]", "-", f"s3-backup-{bucket.name}".lower())  # artifact keys: a-z, 0-9, -
    progress = ArtifactProgress(key, f"backup of {bucket.live}")
    return back_up_prefix(s3, bucket.live, bucket.backup, at, options, progress)


def verify_backup(s3, backup_dir: str, copy: str | None = None) -> Verification:
    """One backup (…/<stamp>/), or `copy` (a prefix restored from it), against the backup's manifest: missing,
    corrupt (size or ETag differs) and extra keys. Without a usable manifest only the listing is reported, flagged
    unverified."""
    location = copy or backup_dir
    actual = list_objects(s3, location)
    try:
        manifest = read_manifest(s3, backup_dir)
        note = "" if manifest else "no manifest: the backup is incomplete; only its listing was checked"
    except DrplanError as exc:
        manifest, note = None, str(exc)
    if manifest is None:
        checked = Verification(location=location, verified=False, objects=len(actual),
                               bytes=sum(obj.size for obj in actual.values()), note=note)
    else:
        checked = compare(location, manifest.expected(), actual)
    run_logger().info("%s", checked.summary)
    return checked


@task(cache_policy=NO_CACHE)
def restore_backup(s3, source: str, target: str, options: SyncOptions) -> SyncReport:
    """Sync a bucket backup onto the live prefix (see drplan.s3sync.restore), with a progress artifact."""
    report = restore(s3, source, target, options, progress=ArtifactProgress("s3-recovery", f"{source} -> {target}"))
    run_logger().info("%s -> %s: %s", report.source, report.target, report.summary)
    return report


class ScratchRestore(BaseModel):
    """The newest backup of a plan bucket restored into a scratch bucket, verified against its manifest, removed."""

    bucket: str
    backup: str | None = None
    scratch: str
    restore: SyncReport | None = None
    verification: Verification | None = None
    error: str | None = None
    removed: bool = False
    swept: list[str] = []
    """Scratch buckets an earlier, killed test left, removed before this one."""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.removed and bool(self.verification and self.verification.ok) and \
            bool(self.restore and self.restore.complete)

    @property
    def summary(self) -> str:
        done = f"{self.backup} -> s3://{self.scratch}/"
        if self.restore and self.verification:
            done += (f": {self.restore.copied} objects restored in {self.restore.duration_s:.1f}s; "
                     f"{self.verification.summary}")
        problems = ([f"error: {self.error}"] if self.error else []) + (
            [] if self.removed else [f"scratch bucket {self.scratch} NOT removed; delete it by hand"]) + (
            [f"removed the leftovers {', '.join(self.swept)}"] if self.swept else [])
        return "; ".join([done, *problems, f"{self.duration_s:.1f}s in all"])


SCRATCH_STAMP = "%Y%m%dt%H%M%Sz"
"""The time in a scratch bucket's name (bucket names are lowercase)."""


def scratch_bucket_name(live_uri: str, at: datetime) -> str:
    """`<live bucket>-drtest-<stamp>`, the live name shortened to keep within S3's 63 characters."""
    suffix = f"-drtest-{at.astimezone(UTC):{SCRATCH_STAMP}}"
    return split_uri(live_uri)[0][:63 - len(suffix)].rstrip(".-") + suffix


def sweep_scratch_buckets(s3, live_uri: str, before: datetime) -> list[str]:
    """Remove the scratch buckets of `live_uri` named for a time before `before` (left by a DR test that was killed).
    Returns their names."""
    name = scratch_bucket_name(live_uri, before)
    base, length = name[:name.rindex("-drtest-") + 8], len(f"{before:{SCRATCH_STAMP}}")
    swept = []
    for bucket in s3.list_buckets().get("Buckets", []):
        stamp = bucket["Name"].removeprefix(base)
        if bucket["Name"].startswith(base) and len(stamp) == length:
            try:
                made = datetime.strptime(stamp, SCRATCH_STAMP).replace(tzinfo=UTC)
            except ValueError:
                continue
            if made < before:
                remove_bucket(s3, bucket["Name"])
                swept.append(bucket["Name"])
    return swept


def remove_bucket(s3, name: str) -> None:
    """Empty a bucket (every object; it has no versions: drplan created it unversioned) and delete it."""
    keys = list(list_objects(s3, f"s3://{name}/"))
    refused = delete_objects(s3, name, keys)
    if refused:
        key, reason = next(iter(refused.items()))
        raise DrplanError(f"emptying s3://{name}/: {len(refused)} objects not deleted, first {key}: {reason}")
    s3.delete_bucket(Bucket=name)


def restore_into_scratch(s3, bucket: Bucket, at: datetime, sweep_after: timedelta,
                         options: SyncOptions = DEFAULTS) -> ScratchRestore:
    """Restore the newest complete backup of `bucket` into a new bucket named for the test (started `at`), verify the
    copy against the backup's manifest, and remove the bucket whatever happened (the result says if it could not).
    Scratch buckets of earlier tests older than `sweep_after` (a killed run's) are removed first."""
    started = utcnow()
    result = ScratchRestore(bucket=bucket.name, scratch=scratch_bucket_name(bucket.live, at))
    created = False
    try:
        result.swept = sweep_scratch_buckets(s3, bucket.live, started - sweep_after)
        result.backup = resolve_backup(s3, bucket.backup)
        if stamp_of(result.backup) is None:
            raise DrplanError(f"{bucket.backup} holds no complete backup; run drplan s3-backup")
        region = s3.meta.region_name
        s3.create_bucket(Bucket=result.scratch, **({} if region == "us-east-1" else
                                                   {"CreateBucketConfiguration": {"LocationConstraint": region}}))
        created = True
        result.restore = restore(s3, result.backup, f"s3://{result.scratch}/", options)
        result.verification = verify_backup(s3, result.backup, copy=f"s3://{result.scratch}/")
    except Exception as exc:  # reported; the scratch bucket is removed all the same
        result.error = first_line(exc)
    finally:
        try:
            if created:
                remove_bucket(s3, result.scratch)
            result.removed = True
        except Exception as exc:
            result.error = result.error or f"removing s3://{result.scratch}/: {first_line(exc)}"
    result.duration_s = round((utcnow() - started).total_seconds(), 3)
    run_logger().info("%s", result.summary)
    return result


def put_json(s3, uri: str, document: dict) -> None:
    bucket, key = split_uri(uri)
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(document, sort_keys=True, default=str).encode(),
                  ContentType="application/json")


def get_json(s3, uri: str) -> dict:
    bucket, key = split_uri(uri)
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def configuration_backup_at(s3, backup_uri: str, cluster: str, when: datetime) -> str | None:
    """URI of the newest configuration backup of `cluster` (`<backup_uri><STAMP>/<cluster>.json`) taken at or
    before `when`; None when there is none."""
    _, prefix = split_uri(backup_uri)
    taken = []
    for obj in _objects(s3, backup_uri):
        stamp, _, name = obj["Key"][len(prefix):].partition("/")
        try:
            at = datetime.strptime(stamp, STAMP).replace(tzinfo=UTC)
        except ValueError:
            continue
        if name == f"{cluster}.json" and at <= when:
            taken.append((at, f"{backup_uri}{stamp}/{name}"))
    return max(taken)[1] if taken else None
