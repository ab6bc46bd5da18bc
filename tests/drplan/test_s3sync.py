"""Bucket sync/restore on a real moto_server: cold copy, no-op resync, same-size rewrites, --delete, dry run,
multipart copies, resuming after failures, throttling retries, one-line errors through the CLI, the flow."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cli.s3 import s3_restore
from drplan.errors import DrplanError
from drplan.plan import load_plan
from drplan.progress import Silent
from drplan.s3store import MIB, transfer_client
from drplan.s3sync import SyncOptions, restore, sync
from sandbox.launchers import moto
from tasks.s3 import back_up_prefix
from tests.s3_moto import inject, listing, put_objects, s3_plan, slow_down_proxy, uninject

COUNT = 200
OBJECTS = {f"docs/{i // 50:02d}/doc-{i:04d}.bin": bytes([i % 251]) * (100 + i) for i in range(COUNT)}
BACKUP = "s3://s-backup/data/20260102T030405Z/"
WORKERS = SyncOptions(workers=8)
BOTOCORE_ONLY = {"fast_copy": False}  # faults are injected through botocore's events

app = typer.Typer()
app.command()(s3_restore)
runner = CliRunner()


@pytest.fixture(scope="module")
def moto_env(tmp_path_factory):
    with moto() as url:
        path = s3_plan(tmp_path_factory.mktemp("s3s"), url, [
            {"name": "data", "live": "s3://s-live/", "backup": "s3://s-backup/data/"}])
        s3 = transfer_client(load_plan(path), 8)
        for bucket in ("s-source", "s-backup", "s-live"):
            s3.create_bucket(Bucket=bucket)
        put_objects(s3, "s-source", OBJECTS)
        back_up_prefix(s3, "s3://s-source/", "s3://s-backup/data/", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
        yield path, s3


@pytest.fixture
def live(moto_env):
    """A fresh, empty target bucket per test."""
    _, s3 = moto_env
    name = f"t-{datetime.now(UTC):%H%M%S%f}"
    s3.create_bucket(Bucket=name)
    return name


def restore_into(s3, bucket: str, **options):
    return restore(s3, BACKUP, f"s3://{bucket}/", WORKERS.model_copy(update=options))


def contents(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_cold_copy_then_a_resync_copies_nothing(moto_env, live):
    _, s3 = moto_env
    report = restore_into(s3, live)
    assert (report.copied.objects, report.skipped.objects, report.failed.objects) == (COUNT, 0, 0)
    assert report.copied.bytes == sum(map(len, OBJECTS.values()))
    assert report.manifest == "s3://s-backup/data/20260102T030405Z.manifest.json"
    assert report.verification.ok and report.exit_code == 0, report.summary
    assert contents(s3, live, "docs/03/doc-0170.bin") == OBJECTS["docs/03/doc-0170.bin"]
    assert report.objects_per_s > 0 and report.duration_s > 0
    before = listing(s3, live)
    again = restore_into(s3, live)
    assert (again.copied.objects, again.skipped.objects) == (0, COUNT) and again.verification.ok
    assert listing(s3, live) == before


def test_same_size_rewrites_are_all_detected_and_recopied(moto_env, live):
    _, s3 = moto_env
    restore_into(s3, live)
    rewritten = sorted(OBJECTS)[::100]  # 1% of the objects, same size, different bytes
    for key in rewritten:
        s3.put_object(Bucket=live, Key=key, Body=b"\xff" * len(OBJECTS[key]))
    report = restore_into(s3, live)
    assert report.copied.objects == len(rewritten) and report.skipped.objects == COUNT - len(rewritten)
    assert all(contents(s3, live, key) == OBJECTS[key] for key in rewritten)


def test_delete_removes_only_keys_the_backup_lacks(moto_env, live):
    _, s3 = moto_env
    put_objects(s3, live, {"stray/one": b"1", "stray/two": b"22"})
    kept = restore_into(s3, live)
    assert kept.deleted.objects == 0 and kept.verification.ok and len(listing(s3, live)) == COUNT + 2
    report = restore_into(s3, live, delete=True)
    assert (report.deleted.objects, report.deleted.bytes, report.copied.objects) == (2, 3, 0)
    assert {k for k, *_ in listing(s3, live)} == set(OBJECTS) and report.verification.ok


def test_dry_run_lists_what_would_change_and_mutates_nothing(moto_env, live):
    _, s3 = moto_env
    restore_into(s3, live)
    s3.delete_object(Bucket=live, Key="docs/00/doc-0001.bin")
    s3.put_object(Bucket=live, Key="docs/00/doc-0002.bin", Body=b"\x00" * len(OBJECTS["docs/00/doc-0002.bin"]))
    s3.put_object(Bucket=live, Key="stray", Body=b"s")
    before = (listing(s3, live), listing(s3, "s-backup"))
    report = restore_into(s3, live, dry_run=True, delete=True)
    assert (listing(s3, live), listing(s3, "s-backup")) == before
    assert report.would_copy == ["docs/00/doc-0001.bin", "docs/00/doc-0002.bin"] and report.would_delete == ["stray"]
    assert report.copied.objects == report.deleted.objects == 0 and report.verification is None


def upload_in_parts(s3, bucket: str, key: str, parts: list[bytes], **extra) -> str:
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key, **extra)["UploadId"]
    done = [{"PartNumber": n, "ETag": s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n,
                                                     Body=body)["ETag"]} for n, body in enumerate(parts, start=1)]
    return s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                        MultipartUpload={"Parts": done})["ETag"]


def test_objects_above_the_threshold_are_copied_part_by_part_keeping_the_etag(moto_env, live):
    _, s3 = moto_env
    parts = [bytes([n]) * size for n, size in enumerate((6 * MIB, 6 * MIB, MIB))]  # 13 MiB in parts of 6, 6, 1
    etag = upload_in_parts(s3, "s-source", "big/blob", parts, ContentType="application/x-blob",
                           Metadata={"owner": "devonn"})
    options = WORKERS.model_copy(update={"multipart_threshold": 5 * MIB, "part_size": 5 * MIB})
    calls = []
    s3.meta.events.register("before-call.s3.UploadPartCopy", lambda **_: calls.append(1), unique_id="parts")
    try:
        report = sync(s3, "s3://s-source/big/", f"s3://{live}/big/", options).report
    finally:
        s3.meta.events.unregister("before-call.s3.UploadPartCopy", unique_id="parts")
    assert report.copied.objects == 1 and report.complete and len(calls) == 3, report.summary
    head = s3.head_object(Bucket=live, Key="big/blob")
    assert head["ETag"] == etag  # the source's part layout: same ETag, so the next run finds them equal
    assert head["ContentType"] == "application/x-blob" and head["Metadata"] == {"owner": "devonn"}
    assert contents(s3, live, "big/blob") == b"".join(parts)
    again = sync(s3, "s3://s-source/big/", f"s3://{live}/big/", options).report
    assert again.copied.objects == 0 and again.skipped.objects == 1


def test_a_single_part_object_above_the_threshold_is_copied_in_parts_of_part_size(moto_env, live):
    _, s3 = moto_env
    s3.put_object(Bucket="s-source", Key="plain/blob", Body=b"p" * (11 * MIB))
    options = WORKERS.model_copy(update={"multipart_threshold": 5 * MIB, "part_size": 5 * MIB})
    report = sync(s3, "s3://s-source/plain/", f"s3://{live}/plain/", options).report
    assert report.copied.objects == 1 and report.complete, report.summary
    assert s3.head_object(Bucket=live, Key="plain/blob")["ETag"].endswith('-3"')  # 5 + 5 + 1 MiB
    assert contents(s3, live, "plain/blob") == b"p" * (11 * MIB)


def test_a_failed_part_aborts_the_multipart_upload(moto_env, live):
    _, s3 = moto_env
    upload_in_parts(s3, "s-source", "big2/blob", [b"z" * (5 * MIB), b"z" * (5 * MIB), b"z"])
    options = WORKERS.model_copy(update={"multipart_threshold": 5 * MIB, "part_size": 5 * MIB})
    inject(s3, "UploadPartCopy", 404, "NoSuchKey", when=lambda url: "partNumber=2" in url)
    try:
        report = sync(s3, "s3://s-source/big2/", f"s3://{live}/big2/", options).report
    finally:
        uninject(s3, "UploadPartCopy", "NoSuchKey")
    assert report.failed.objects == 1 and report.failures[0].key == "blob" and report.exit_code == 1
    assert "blob" in report.verification.missing
    assert s3.list_multipart_uploads(Bucket=live).get("Uploads", []) == []


def test_a_rerun_copies_only_what_failed_before(moto_env, live):
    _, s3 = moto_env
    doomed = sorted(OBJECTS)[7::40]
    inject(s3, "CopyObject", 404, "NoSuchKey", when=lambda url: url.endswith(tuple(doomed)))
    try:
        first = restore_into(s3, live, **BOTOCORE_ONLY)
    finally:
        uninject(s3, "CopyObject", "NoSuchKey")
    assert sorted(f.key for f in first.failures) == doomed and first.exit_code == 1
    assert first.copied.objects == COUNT - len(doomed) and sorted(first.verification.missing) == doomed
    second = restore_into(s3, live)
    assert second.copied.objects == len(doomed) and second.skipped.objects == COUNT - len(doomed)
    assert second.exit_code == 0 and second.verification.ok


class VanishingSource(Silent):
    """Deletes one source object after the listings, before the copies start."""

    def __init__(self, s3, bucket: str, key: str) -> None:
        self.s3, self.bucket, self.key = s3, bucket, key

    def start(self, objects: int, size: int) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key)


def test_the_fast_copy_path_hands_errors_to_botocore(moto_env, live):
    _, s3 = moto_env
    put_objects(s3, "s-source", {f"vanish/{i}": b"v" * i for i in range(1, 21)})
    progress = VanishingSource(s3, "s-source", "vanish/7")
    report = sync(s3, "s3://s-source/vanish/", f"s3://{live}/", WORKERS, progress=progress).report
    assert report.copied.objects == 19 and [f.key for f in report.failures] == ["7"]
    assert report.failures[0].error.startswith("NoSuchKey")  # botocore's error, after the fast path gave up
    assert report.verification.missing == ["7"] and not report.verification.corrupt


def test_throttling_is_retried_with_backoff_and_counted(moto_env, live):
    _, s3 = moto_env
    answered = inject(s3, "CopyObject", 503, "SlowDown", times=3)
    try:
        report = restore_into(s3, live, **BOTOCORE_ONLY)
    finally:
        uninject(s3, "CopyObject", "SlowDown")
    assert len(answered) == 3 and report.throttled == report.aws_retries == 3
    assert report.copied.objects == COUNT and report.failed.objects == 0 and report.verification.ok


def test_throttling_on_the_fast_copy_path_is_counted_and_retried_through_botocore(moto_env, live, tmp_path):
    path, _ = moto_env
    moto_url = yaml.safe_load(path.read_text())["aws"]["endpoint_url"]
    with slow_down_proxy(moto_url, count=4) as proxy_url:
        proxied = s3_plan(tmp_path, proxy_url, [{"name": "data", "live": f"s3://{live}/", "backup": "s3://s-backup/data/"}])
        s3 = transfer_client(load_plan(proxied), 8)
        report = restore_into(s3, live)
    assert report.throttled == 4 and report.failed.objects == 0  # each 503 counted once, fast path or botocore
    assert report.copied.objects == COUNT and report.verification.ok, report.summary


def test_access_denied_stops_the_run_with_one_line_saying_what_was_done(moto_env, live):
    _, s3 = moto_env
    inject(s3, "CopyObject", 403, "AccessDenied", when=lambda url: "doc-01" in url)
    try:
        with pytest.raises(DrplanError) as caught:
            restore_into(s3, live, **BOTOCORE_ONLY)
    finally:
        uninject(s3, "CopyObject", "AccessDenied")
    message = str(caught.value)
    assert "\n" not in message and re.search(
        r"AWS denied s3:GetObject on arn:aws:s3:::\S+/doc-01\S* or s3:PutObject on arn:aws:s3:::\S+/doc-01\S* "
        r"\(CopyObject in us-east-1\)", message), message
    assert "stopped after copying" in message and "nothing deleted" in message and "rerun to resume" in message


def test_overlapping_source_and_target_are_refused(moto_env):
    _, s3 = moto_env
    with pytest.raises(DrplanError, match="overlap"):
        sync(s3, "s3://s-backup/data/", "s3://s-backup/data/restored/", WORKERS)


def test_cli_restores_and_reports_json(moto_env, live):
    path, s3 = moto_env
    args = ["--from", "s3://s-backup/data/", "--to", f"s3://{live}/", "--plan", str(path), "--workers", "8"]
    result = runner.invoke(app, [*args, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["would_copy"]) == COUNT and report["source"] == BACKUP and listing(s3, live) == []
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["copied"]["objects"] == COUNT and report["verification"]["verified"] is True
    assert {"objects_per_s", "duration_s", "throttled", "failed", "skipped", "deleted"} <= set(report)


@pytest.mark.parametrize(("source", "target", "expected"), [
    ("backup/data", "s3://s-live/", "'backup/data' is not an S3 URI"),
    ("s3://s-backup/data/", "s3://UPPER/", "'s3://UPPER/' is not an S3 URI"),
    ("s3://no-such-bucket/data/", "s3://s-live/", "the bucket does not exist (NoSuchBucket)"),
    ("s3://s-backup/data/", "s3://no-such-target/", "listing s3://no-such-target/: the bucket does not exist"),
])
def test_cli_errors_are_one_line_and_exit_2(moto_env, source, target, expected):
    path, _ = moto_env
    result = runner.invoke(app, ["--from", source, "--to", target, "--plan", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr


def test_cli_rejects_a_worker_count_out_of_range(moto_env):
    path, _ = moto_env
    result = runner.invoke(app, ["--from", BACKUP, "--to", "s3://s-live/", "--plan", str(path), "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in result.stderr


@pytest.mark.usefixtures("prefect_server")
def test_recovery_flow_is_a_dry_run_by_default_then_restores_with_progress(moto_env):
    from prefect import get_client

    from flows.s3_recovery import s3_recovery

    path, s3 = moto_env
    before = listing(s3, "s-live")
    state = s3_recovery(plan=str(path), return_state=True)
    assert state.is_completed(), state.message
    assert len(state.result().would_copy) == COUNT and listing(s3, "s-live") == before
    state = s3_recovery(plan=str(path), backup="20260102T030405Z", dry_run=False, workers=8, return_state=True)
    assert state.is_completed(), state.message
    assert state.result().copied.objects == COUNT and state.result().verification.ok

    async def artifacts() -> list:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))

    import asyncio

    found = {a.type: a for a in asyncio.run(artifacts())}
    assert found["progress"].data == 100.0 and "copied 200" in found["markdown"].description


def test_a_backup_that_no_longer_matches_its_manifest_is_not_restored(moto_env, live):
    _, s3 = moto_env
    at = datetime(2026, 1, 3, tzinfo=UTC)
    backup = back_up_prefix(s3, "s3://s-source/docs/00/", "s3://s-backup/tampered/", at).backup
    key = backup.removeprefix("s3://s-backup/") + "doc-0003.bin"
    s3.put_object(Bucket="s-backup", Key=key, Body=b"\x01" * len(OBJECTS["docs/00/doc-0003.bin"]))
    with pytest.raises(DrplanError, match=r"does not match its manifest: 1 corrupt \(doc-0003.bin\); nothing was"):
        restore(s3, "s3://s-backup/tampered/", f"s3://{live}/", WORKERS)
    assert listing(s3, live) == []
