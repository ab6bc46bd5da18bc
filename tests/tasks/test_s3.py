"""Bucket backup on a real moto_server: copies then manifest, verification (missing, corrupt, extra), an
incomplete backup flagged unverified, a damaged manifest refused, the s3-backup flow and the sandbox seeding."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from drplan.errors import DrplanError
from drplan.plan import Bucket, load_plan
from drplan.s3manifest import Manifest, backups, manifest_uri, read_manifest, resolve_backup
from drplan.s3store import transfer_client
from drplan.s3sync import SyncOptions
from drplan.timeutil import utcnow
from flows.s3_backup import s3_backup
from sandbox.launchers import moto
from tasks.s3 import (
    back_up_prefix,
    find_newest_backup,
    remove_bucket,
    restore_into_scratch,
    scratch_bucket_name,
    verify_backup,
)
from tests.s3_moto import inject, put_objects, s3_plan, uninject

LIVE = {f"uploads/{i // 10:02d}/file-{i:03d}.txt": f"content {i}\n".encode() * (1 + i % 7) for i in range(60)}
LIVE["empty"] = b""
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def moto_env(tmp_path_factory):
    with moto() as url:
        path = s3_plan(tmp_path_factory.mktemp("s3b"), url, [
            {"name": "data", "live": "s3://b-live/", "backup": "s3://b-backup/data/"},
            {"name": "other", "live": "s3://b-live-2/app/", "backup": "s3://b-backup/other/"},
        ])
        plan = load_plan(path)
        s3 = transfer_client(plan, 8)
        for bucket in ("b-live", "b-live-2", "b-backup"):
            s3.create_bucket(Bucket=bucket)
        put_objects(s3, "b-live", LIVE)
        put_objects(s3, "b-live-2", {"app/one": b"1", "app/two": b"22"})
        yield path, s3


def fresh_backup(s3, at: datetime) -> str:
    return back_up_prefix(s3, "s3://b-live/", "s3://b-backup/data/", at).backup


def test_backup_copies_every_object_and_writes_a_verifiable_manifest(moto_env):
    _, s3 = moto_env
    result = back_up_prefix(s3, "s3://b-live/", "s3://b-backup/data/", AT)
    assert result.backup == "s3://b-backup/data/20260102T030405Z/"
    assert result.manifest == "s3://b-backup/data/20260102T030405Z.manifest.json"
    assert (result.objects, result.copied) == (len(LIVE), len(LIVE))
    manifest = read_manifest(s3, result.backup)
    assert {e.key for e in manifest.objects} == set(LIVE)
    assert all(e.size == len(LIVE[e.key]) for e in manifest.objects)
    assert all(e.checksum and e.checksum.startswith("SHA256:") for e in manifest.objects)  # moto keeps SHA-256
    copy = s3.get_object(Bucket="b-backup", Key="data/20260102T030405Z/uploads/01/file-012.txt")["Body"].read()
    assert copy == LIVE["uploads/01/file-012.txt"]
    assert find_newest_backup.fn(s3, "s3://b-backup/data/") == AT.replace(microsecond=0)
    checked = verify_backup(s3, result.backup)
    assert checked.ok and checked.objects == len(LIVE), checked.summary


def test_the_manifest_is_written_last_so_rpo_ignores_an_unfinished_backup(moto_env):
    _, s3 = moto_env
    events = []
    s3.meta.events.register("before-call.s3.*", lambda model, **_: events.append(model.name), unique_id="order")
    try:  # botocore only, so that every request passes the event hook
        back_up_prefix(s3, "s3://b-live/", "s3://b-backup/data/", AT + timedelta(hours=1), SyncOptions(fast_copy=False))
    finally:
        s3.meta.events.unregister("before-call.s3.*", unique_id="order")
    assert events[-1] == "PutObject" and "CopyObject" in events and events.index("PutObject") == len(events) - 1


def test_verification_reports_missing_corrupt_and_extra_keys(moto_env):
    _, s3 = moto_env
    backup = fresh_backup(s3, AT + timedelta(hours=2))
    prefix = backup.removeprefix("s3://b-backup/")
    same_size = LIVE["uploads/02/file-020.txt"].replace(b"content", b"CONTENT")
    s3.delete_object(Bucket="b-backup", Key=f"{prefix}uploads/01/file-011.txt")
    s3.put_object(Bucket="b-backup", Key=f"{prefix}uploads/02/file-020.txt", Body=same_size)
    s3.put_object(Bucket="b-backup", Key=f"{prefix}intruder", Body=b"x")
    checked = verify_backup(s3, backup)
    assert checked.verified and not checked.ok
    assert checked.missing == ["uploads/01/file-011.txt"]
    assert checked.corrupt == ["uploads/02/file-020.txt"]
    assert checked.extra == ["intruder"]
    assert "1 missing" in checked.summary and "1 corrupt" in checked.summary and "1 extra" in checked.summary


def test_a_backup_without_manifest_is_listed_but_flagged_unverified(moto_env):
    _, s3 = moto_env
    backup = fresh_backup(s3, AT + timedelta(hours=3))
    s3.delete_object(Bucket="b-backup", Key=manifest_uri(backup).removeprefix("s3://b-backup/"))
    checked = verify_backup(s3, backup)
    assert not checked.verified and not checked.ok
    assert checked.objects == len(LIVE) and "no manifest" in checked.note
    assert "UNVERIFIED" in checked.summary
    assert find_newest_backup.fn(s3, "s3://b-backup/data/") == AT + timedelta(hours=2)  # the newest complete one


def test_a_damaged_manifest_is_never_trusted(moto_env):
    _, s3 = moto_env
    backup = fresh_backup(s3, AT + timedelta(hours=4))
    key = manifest_uri(backup).removeprefix("s3://b-backup/")
    body = json.loads(s3.get_object(Bucket="b-backup", Key=key)["Body"].read())
    body["objects"][0]["size"] += 1
    s3.put_object(Bucket="b-backup", Key=key, Body=json.dumps(body).encode())
    with pytest.raises(DrplanError, match="manifest checksum mismatch"):
        read_manifest(s3, backup)
    checked = verify_backup(s3, backup)
    assert not checked.verified and "checksum mismatch" in checked.note
    with pytest.raises(DrplanError, match="not valid JSON"):
        Manifest.load(b"{truncated", "somewhere")


def test_a_backup_root_without_any_complete_backup_is_never_restored_wholesale(moto_env):
    _, s3 = moto_env
    s3.put_object(Bucket="b-backup", Key="half/20260101T000000Z/a", Body=b"a")
    with pytest.raises(DrplanError, match="none is complete"):
        resolve_backup(s3, "s3://b-backup/half/")
    newest = resolve_backup(s3, "s3://b-backup/data/")  # the root resolves to its newest complete backup
    assert re.fullmatch(r"s3://b-backup/data/\d{8}T\d{6}Z/", newest)
    assert newest.removeprefix("s3://b-backup/data/").rstrip("/") == backups(s3, "s3://b-backup/data/")[0][-1]


def test_failed_copies_leave_no_manifest(moto_env):
    from tests.s3_moto import inject, uninject

    _, s3 = moto_env
    inject(s3, "CopyObject", 404, "NoSuchKey", when=lambda url: url.endswith("file-033.txt"))
    try:
        with pytest.raises(DrplanError, match="incomplete, no manifest written.*file-033"):
            back_up_prefix(s3, "s3://b-live/", "s3://b-backup/data/", AT + timedelta(hours=6),
                           SyncOptions(fast_copy=False))  # faults are injected through botocore's events
    finally:
        uninject(s3, "CopyObject", "NoSuchKey")
    assert read_manifest(s3, "s3://b-backup/data/20260102T090405Z/") is None
    resumed = fresh_backup(s3, AT + timedelta(hours=6))  # same stamp: resumes, copies only the missing one
    assert read_manifest(s3, resumed) is not None


@pytest.mark.usefixtures("prefect_server")
def test_backup_flow_backs_up_one_or_every_bucket(moto_env):
    path, s3 = moto_env
    state = s3_backup(plan=str(path), bucket="other", return_state=True)
    assert state.is_completed(), state.message
    [result] = state.result()
    assert result.source == "s3://b-live-2/app/" and result.objects == 2
    assert read_manifest(s3, result.backup).expected().keys() == {"one", "two"}
    state = s3_backup(plan=str(path), return_state=True)
    assert state.is_completed() and len(state.result()) == 2
    state = s3_backup(plan=str(path), bucket="nope", return_state=True)
    assert state.is_failed() and "unknown bucket 'nope'" in state.message


def test_sandbox_seeding_still_backs_up_through_back_up_prefix(moto_env):
    from sandbox import aws_seed

    path, s3 = moto_env
    aws_seed.back_up_buckets(load_plan(path))
    assert find_newest_backup.fn(s3, "s3://b-backup/other/") is not None


def test_backup_cli_reports_json_and_refuses_an_unknown_bucket_in_one_line(moto_env):
    import typer
    from typer.testing import CliRunner

    from cli.s3 import s3_backup as s3_backup_command

    path, s3 = moto_env
    app = typer.Typer()
    app.command()(s3_backup_command)
    result = CliRunner().invoke(app, ["--plan", str(path), "--bucket", "other", "--json"])
    assert result.exit_code == 0, result.output
    [backup] = json.loads(result.stdout)
    assert backup["objects"] == 2 and read_manifest(s3, backup["backup"]) is not None
    result = CliRunner().invoke(app, ["--plan", str(path), "--bucket", "nope"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: plan: unknown bucket 'nope'; the plan defines: data, other"]


DRTEST = Bucket(name="drtest", live="s3://b-live/", backup="s3://b-backup/drtest/")
STAMP = "20260102t030405z"  # AT's
SWEEP = timedelta(hours=2)


def scratch_buckets(s3) -> list[str]:
    return [b["Name"] for b in s3.list_buckets()["Buckets"] if "-drtest-" in b["Name"]]


def test_the_newest_backup_restored_into_a_scratch_bucket_verifies_and_the_bucket_is_removed(moto_env):
    _, s3 = moto_env
    back_up_prefix(s3, DRTEST.live, DRTEST.backup, AT)
    newest = back_up_prefix(s3, DRTEST.live, DRTEST.backup, AT + timedelta(days=1)).backup
    result = restore_into_scratch(s3, DRTEST, AT, SWEEP)
    assert result.ok, result.summary
    assert (result.backup, result.scratch) == (newest, f"b-live-drtest-{STAMP}")
    assert result.restore.copied.objects == len(LIVE) and result.verification.objects == len(LIVE)
    assert result.verification.bytes == sum(map(len, LIVE.values()))
    assert result.summary.startswith(f"{newest} -> s3://b-live-drtest-{STAMP}/: {len(LIVE)} (")
    assert "verified, 61 objects" in result.summary and result.removed and scratch_buckets(s3) == []


def test_a_corrupted_scratch_object_fails_verification_and_the_bucket_is_still_removed(moto_env):
    """An object rewritten in the scratch bucket after the restore and before its verification (at the listing
    that verifies it: the restore's own listing of the empty bucket comes first)."""
    _, s3 = moto_env
    back_up_prefix(s3, DRTEST.live, DRTEST.backup, AT + timedelta(days=2))
    other = boto3.client("s3", region_name="us-east-1", endpoint_url=s3.meta.endpoint_url, aws_access_key_id="x",
                         aws_secret_access_key="x")
    listings = []

    def corrupt(params, **_):
        if "-drtest-" in params["Bucket"]:
            listings.append(params["Bucket"])
            if len(listings) == 2:
                other.put_object(Bucket=params["Bucket"], Key="uploads/01/file-013.txt", Body=b"tampered")

    s3.meta.events.register("before-parameter-build.s3.ListObjectsV2", corrupt, unique_id="corrupt-scratch")
    try:
        result = restore_into_scratch(s3, DRTEST, AT, SWEEP)
    finally:
        s3.meta.events.unregister("before-parameter-build.s3.ListObjectsV2", unique_id="corrupt-scratch")
    assert len(listings) >= 2 and result.restore.complete and result.error is None
    assert not result.ok and result.verification.corrupt == ["uploads/01/file-013.txt"], result.summary
    assert "does not match its manifest: 1 corrupt (uploads/01/file-013.txt)" in result.summary
    assert result.removed and scratch_buckets(s3) == []


def test_a_failed_restore_is_an_error_and_the_scratch_bucket_is_removed(moto_env):
    _, s3 = moto_env
    back_up_prefix(s3, DRTEST.live, DRTEST.backup, AT + timedelta(days=3))
    inject(s3, "ListObjectsV2", 403, "AccessDenied", when=lambda url: "-drtest-" in url, times=1)
    try:
        result = restore_into_scratch(s3, DRTEST, AT, SWEEP)
    finally:
        uninject(s3, "ListObjectsV2", "AccessDenied")
    assert not result.ok and result.error.startswith(
        f"AWS denied s3:ListBucket on arn:aws:s3:::b-live-drtest-{STAMP} (ListObjectsV2 in us-east-1); grant it")
    assert result.removed and scratch_buckets(s3) == []


def test_no_complete_backup_is_an_error_and_no_bucket_is_made(moto_env):
    _, s3 = moto_env
    result = restore_into_scratch(s3, DRTEST.model_copy(update={"backup": "s3://b-backup/never/"}), AT, SWEEP)
    assert result.error == "s3://b-backup/never/ holds no complete backup; run drplan s3-backup"
    assert not result.ok and result.removed and scratch_buckets(s3) == []


def test_a_killed_test_s_scratch_bucket_is_swept_by_the_next_one_a_recent_one_kept(moto_env):
    _, s3 = moto_env
    back_up_prefix(s3, DRTEST.live, DRTEST.backup, AT + timedelta(days=4))
    old, young = "b-live-drtest-20200101t000000z", scratch_bucket_name(DRTEST.live, utcnow() - timedelta(hours=1))
    for name in (old, young, "b-live-drtest-notastamp0000000"):
        s3.create_bucket(Bucket=name)
        s3.put_object(Bucket=name, Key="left/behind", Body=b"x")
    result = restore_into_scratch(s3, DRTEST, AT, SWEEP)
    assert result.ok and result.swept == [old] and f"removed the leftovers {old}" in result.summary
    assert sorted(scratch_buckets(s3)) == sorted([young, "b-live-drtest-notastamp0000000"])
    for name in scratch_buckets(s3):
        remove_bucket(s3, name)


def test_a_scratch_bucket_name_keeps_to_s3_naming_rules():
    long = "s3://" + "a" * 38 + "-" + "b" * 24 + "/prefix/"  # cut after the '-': no '--' in the name
    assert scratch_bucket_name(long, AT) == "a" * 38 + f"-drtest-{STAMP}"
    assert len(scratch_bucket_name("s3://" + "c" * 63, AT)) == 63
    assert scratch_bucket_name("s3://devonn-data-production/", AT) == f"devonn-data-production-drtest-{STAMP}"


def test_newest_under_lists_each_prefix_once_and_reports_a_broken_one_alone(moto_env):
    from tasks.s3 import find_newest_object, newest_under

    _, s3 = moto_env
    fresh_backup(s3, utcnow().replace(microsecond=0))
    found = newest_under.fn(s3, ["s3://b-backup/data/", "s3://b-backup/none/"],
                            ["s3://b-live/", "s3://b-live-2/app/", "s3://no-such-bucket-x/"])

    assert found["s3://b-backup/data/"] == find_newest_backup.fn(s3, "s3://b-backup/data/") is not None
    assert found["s3://b-backup/none/"] is None
    assert found["s3://b-live/"] == find_newest_object.fn(s3, "s3://b-live/") is not None
    assert found["s3://b-live-2/app/"] == find_newest_object.fn(s3, "s3://b-live-2/app/") is not None
    assert isinstance(found["s3://no-such-bucket-x/"], DrplanError)
    assert "bucket no-such-bucket-x does not exist" in str(found["s3://no-such-bucket-x/"])
