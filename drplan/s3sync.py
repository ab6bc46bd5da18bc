"""Sync one S3 prefix onto another, exactly and resumably: the engine behind bucket backup and recovery.

Both sides are listed once; a key is copied when it is missing or its size or ETag differs (never by time,
so a same-size rewrite is caught), server-side, by a pool of workers sharing one client; with `delete`, keys
absent from the source are removed afterwards. A rerun copies only what still differs. With a manifest the
source is checked against it before anything is copied; the target is checked after.

No Prefect import here: the CLI path stays fast to start. Callers log the report's summary.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, computed_field
from rich.filesize import decimal

from drplan.clients import retries_since
from drplan.errors import DrplanError
from drplan.progress import Reporter, Silent
from drplan.results import RetriesCounted
from drplan.s3fastcopy import FastCopy
from drplan.s3manifest import Manifest, Verification, compare, manifest_uri, read_manifest, resolve_backup
from drplan.s3store import (
    CHECKSUM_ALGORITHM,
    COPY_OBJECT_LIMIT,
    MIB,
    Copied,
    S3Object,
    ThrottleCounter,
    copy_object,
    delete_objects,
    describe,
    fatal,
    list_objects,
    parse_prefix,
)
from drplan.timeutil import utcnow


class SyncOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dry_run: bool = False
    """List what would be copied and deleted; change nothing."""
    delete: bool = False
    """Delete target keys the source does not have."""
    workers: int = Field(32, ge=1, le=256)
    multipart_threshold: int = Field(COPY_OBJECT_LIMIT, ge=5 * MIB, le=COPY_OBJECT_LIMIT)
    """Objects larger than this are copied with UploadPartCopy (at most 5 GiB: CopyObject's limit)."""
    part_size: int = Field(512 * MIB, ge=5 * MIB, le=COPY_OBJECT_LIMIT)
    fast_copy: bool = True
    """CopyObject as one signed request, botocore only as the fallback (drplan/s3fastcopy.py)."""


DEFAULTS = SyncOptions()


class Tally(BaseModel):
    objects: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.objects += 1
        self.bytes += size

    def __str__(self) -> str:
        return f"{self.objects} ({decimal(self.bytes)})"


class Failure(BaseModel):
    key: str
    error: str


class SyncReport(RetriesCounted):
    source: str
    target: str
    manifest: str | None = None
    """The manifest the source was checked against; None: the result is unverified."""
    dry_run: bool
    delete: bool
    workers: int
    started_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    planned_copy: Tally = Field(default_factory=Tally)
    planned_delete: Tally = Field(default_factory=Tally)
    copied: Tally = Field(default_factory=Tally)
    skipped: Tally = Field(default_factory=Tally)
    deleted: Tally = Field(default_factory=Tally)
    failed: Tally = Field(default_factory=Tally)
    failures: list[Failure] = []
    would_copy: list[str] = []
    would_delete: list[str] = []
    throttled: int = 0
    """Requests the store answered with SlowDown/503, each retried with backoff."""
    verification: Verification | None = None

    @computed_field
    @property
    def duration_s(self) -> float:
        return round(((self.finished_at or utcnow()) - self.started_at).total_seconds(), 3)

    @computed_field
    @property
    def objects_per_s(self) -> float:
        return round(self.copied.objects / self.duration_s, 1) if self.duration_s else 0.0

    @property
    def complete(self) -> bool:
        """Nothing failed and the target holds what the source does (not judged on a dry run)."""
        checked = self.verification
        return not self.failed.objects and not (checked and (checked.missing or checked.corrupt or checked.extra))

    @property
    def exit_code(self) -> int:
        return 0 if self.complete else 1

    @property
    def summary(self) -> str:
        if self.dry_run:
            head = f"dry run: would copy {self.planned_copy}, delete {self.planned_delete}; {self.skipped} unchanged"
        else:
            head = (f"copied {self.copied}, deleted {self.deleted}, {self.skipped} unchanged, "
                    f"{self.failed.objects} failed, {self.throttled} throttled, {self.aws_retries} AWS retries; "
                    f"{self.duration_s:.1f}s, {self.objects_per_s:.0f} objects/s")
        return head + (f"; {self.verification.summary}" if self.verification else "")


@dataclass
class SyncResult:
    report: SyncReport
    target: dict[str, S3Object] = field(default_factory=dict)
    """The target as the run left it: its listing at the start, updated with the copies and deletions."""
    copies: dict[str, Copied] = field(default_factory=dict)


def sync(s3, source: str, target: str, options: SyncOptions = DEFAULTS, *, progress: Reporter | None = None,
         manifest: Manifest | None = None, manifest_location: str | None = None) -> SyncResult:
    """Make the objects under `target` equal to those under `source` (see the module docstring). Errors that
    would fail every request (access denied, missing bucket) raise DrplanError; per-object failures are
    counted in the report, which a rerun resumes from."""
    retries = retries_since()
    src_bucket, src_prefix = parse_prefix(source)
    dst_bucket, dst_prefix = parse_prefix(target)
    if src_bucket == dst_bucket and (src_prefix.startswith(dst_prefix) or dst_prefix.startswith(src_prefix)):
        raise DrplanError(f"{source} and {target} overlap; sync between separate buckets or prefixes")
    report = SyncReport(source=source, target=target, manifest=manifest_location, dry_run=options.dry_run,
                        delete=options.delete, workers=options.workers, started_at=utcnow())
    progress = progress or Silent()
    with ThrottleCounter(s3) as throttle:
        with ThreadPoolExecutor(2) as pool:
            listed = pool.submit(list_objects, s3, source), pool.submit(list_objects, s3, target)
            src, dst = (future.result() for future in listed)
        if manifest is not None:
            checked = compare(source, manifest.expected(), src)
            if not checked.ok:
                raise DrplanError(f"{checked.summary}; nothing was copied, restore from another backup")
        copies = sorted(((key, obj) for key, obj in src.items() if dst.get(key) != obj), key=lambda c: -c[1].size)
        deletes = sorted(dst.keys() - src.keys()) if options.delete else []
        for key, obj in src.items():
            (report.planned_copy if dst.get(key) != obj else report.skipped).add(obj.size)
        for key in deletes:
            report.planned_delete.add(dst[key].size)
        result = SyncResult(report, dst)
        if options.dry_run:
            report.would_copy, report.would_delete = sorted(key for key, _ in copies), deletes
        else:
            progress.start(len(copies) + len(deletes), report.planned_copy.bytes)
            try:
                result.copies = _copy_all(s3, copies, (src_bucket, src_prefix), (dst_bucket, dst_prefix), options,
                                          report, progress)
                _delete_all(s3, dst_bucket, dst_prefix, {key: dst[key] for key in deletes}, report, progress)
            finally:
                progress.finish()
            failed = {f.key for f in report.failures}
            result.target = {key: obj for key, obj in dst.items() if key not in deletes or key in failed}
            result.target |= {key: S3Object(src[key].size, c.etag) for key, c in result.copies.items()}
            report.verification = _verify(target, src, result.copies, failed, manifest,
                                          extra=[key for key in deletes if key in failed])
        report.throttled += throttle.count
    report.aws_retries, report.finished_at = retries(), utcnow()
    return result


def _copy_all(s3, copies: list[tuple[str, S3Object]], src: tuple[str, str], dst: tuple[str, str],
              options: SyncOptions, report: SyncReport, progress: Reporter) -> dict[str, Copied]:
    """Copy with `workers` threads, at most 2 x workers queued; stop scheduling on a run-wide error."""
    done: dict[str, Copied] = {}
    stop: DrplanError | None = None

    def copy(key: str, obj: S3Object) -> Copied:
        return copy_object(s3, (src[0], src[1] + key), (dst[0], dst[1] + key), obj, options.multipart_threshold,
                           options.part_size, fast)

    fast = FastCopy(s3, options.workers + 2, CHECKSUM_ALGORITHM) if options.fast_copy else None
    queue = iter(copies)
    with ThreadPoolExecutor(options.workers, thread_name_prefix="s3sync") as pool:
        pending: dict = {}
        while True:
            while stop is None and len(pending) < 2 * options.workers and (item := next(queue, None)):
                pending[pool.submit(copy, *item)] = item
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                key, obj = pending.pop(future)
                try:
                    done[key] = future.result()
                    report.copied.add(obj.size)
                except Exception as exc:
                    stop = stop or (exc if isinstance(exc, DrplanError)
                                    else fatal(exc, "copying to", f"s3://{dst[0]}/{dst[1]}{key}"))
                    report.failed.add(obj.size)
                    report.failures.append(Failure(key=key, error=describe(exc)))
                progress.advance(1, obj.size)
    report.throttled += fast.throttled if fast else 0
    if stop is not None:
        raise DrplanError(f"{stop}; stopped after copying {report.copied.objects} of {len(copies)} objects "
                          f"({report.failed.objects} failed, nothing deleted); rerun to resume")
    return done


def _delete_all(s3, bucket: str, prefix: str, doomed: dict[str, S3Object], report: SyncReport,
                progress: Reporter) -> None:
    if not doomed:
        return
    try:
        refused = delete_objects(s3, bucket, [prefix + key for key in doomed])
    except Exception as exc:
        raise fatal(exc, "deleting in", f"s3://{bucket}/{prefix}") or DrplanError(
            f"deleting in s3://{bucket}/{prefix}: {describe(exc)}") from None
    for key, obj in doomed.items():
        if prefix + key in refused:
            report.failed.add(0)
            report.failures.append(Failure(key=key, error=f"delete: {refused[prefix + key]}"))
        else:
            report.deleted.add(obj.size)
    progress.advance(len(doomed), 0)


def _verify(target: str, src: dict[str, S3Object], copies: dict[str, Copied], failed: set[str],
            manifest: Manifest | None, extra: list[str]) -> Verification:
    """The target against the source (and manifest) without another listing: unchanged keys matched at the
    start; a copied key is confirmed by the ETag the store computed for the copy (equal to the source's when
    both are single-part MD5s or both multipart in the same layout) or else by the store's checksum against
    the manifest's."""
    recorded = manifest.checksums() if manifest else {}
    verdicts = {key: _agree(src[key].etag, c.etag, recorded.get(key), c.checksum) for key, c in copies.items()}
    missing = sorted(failed & src.keys())
    return Verification(
        location=target, verified=manifest is not None, objects=len(src) - len(missing),
        bytes=sum(obj.size for key, obj in src.items() if key not in failed), missing=missing,
        corrupt=sorted(key for key, same in verdicts.items() if same is False),
        unconfirmed=sorted(key for key, same in verdicts.items() if same is None), extra=extra,
        note="" if manifest else "no manifest: checked against the source listing only",
    )


def _agree(source_etag: str, copy_etag: str, recorded: str | None, checksum: str | None) -> bool | None:
    """Whether a copy holds the source's content: True, False, or None when nothing comparable was returned."""
    if ("-" in source_etag) == ("-" in copy_etag):
        return source_etag == copy_etag
    if recorded and checksum and recorded.split(":")[0] == checksum.split(":")[0]:
        return recorded == checksum
    return None


def restore(s3, source: str, target: str, options: SyncOptions = DEFAULTS, *,
            progress: Reporter | None = None) -> SyncReport:
    """Restore from a bucket backup: `source` names one backup (…/<stamp>/), or a backup root, meaning its newest
    complete backup. With a manifest the restore is verified; without one, flagged unverified."""
    backup_dir = resolve_backup(s3, source)
    manifest = read_manifest(s3, backup_dir)
    location = manifest_uri(backup_dir) if manifest else None
    return sync(s3, backup_dir, target, options, progress=progress, manifest=manifest,
                manifest_location=location).report
