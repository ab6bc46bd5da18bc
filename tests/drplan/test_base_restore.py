"""The base backup download (drplan/base_restore.py) against a real moto_server holding a barman-cloud backup in
barman's layout: a gzip'd tar uploaded in parts of varying sizes (as barman's uploader writes it), and a plain tar
uploaded in one piece; through the fault proxy (throttling, resets, bodies cut mid-range, a corrupted byte). The
tar content is synthetic (random files in a PGDATA-like tree); restores of real backups run in every sandbox
drill and recovery test."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from itertools import pairwise
from pathlib import Path
from unittest import mock

import boto3
import pytest

from drplan.base_restore import arguments, download
from sandbox.fault_proxy import FaultProxy
from sandbox.launchers import moto
from tests.helpers import REPO

BUCKET, SOURCE, SERVER = "base-backups", "s3://base-backups/pg/", "db"
MULTIPART, ONE_PART, SINGLE = "20261206T010203", "20261206T015959", "20261206T020304"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
       "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}
MIB = 1 << 20


def tree() -> dict[str, bytes]:
    """A PGDATA-like tree: incompressible relation files (so that the gzip'd tar spans several parts), small ones."""
    files = {f"base/5/{16384 + i}": hashlib.shake_256(f"rel{i}".encode()).digest(3 * MIB) for i in range(6)}
    files["PG_VERSION"] = b"18\n"
    files["global/pg_control"] = hashlib.shake_256(b"control").digest(8192)
    return files


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def backup_info(backup_id: str) -> bytes:
    return f"backup_id={backup_id}\nstatus=DONE\nversion=180000\nsystemid=7\n".encode()


@pytest.fixture(scope="module")
def moto_backup() -> dict:
    """moto with three backups of the same tree: gzip'd in parts of 5, 6 and 5 MiB and the rest; plain in a multipart
    upload of one part (as barman uploads a small backup); plain in one piece."""
    files = tree()
    with moto() as url, mock.patch.dict(os.environ, AWS):
        s3 = boto3.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket=BUCKET)
        base = f"pg/{SERVER}/base"
        packed = gzip.compress(tar_of(files), compresslevel=1)
        key = f"{base}/{MULTIPART}/data.tar.gz"
        upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        cuts = [0, 5 * MIB, 11 * MIB, 16 * MIB, len(packed)]
        assert len(packed) > cuts[-2] + 1
        parts = [{"PartNumber": n, "ETag": s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=n,
                                                          Body=packed[a:b])["ETag"]}
                 for n, (a, b) in enumerate(pairwise(cuts), 1)]
        s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
        key = f"{base}/{ONE_PART}/data.tar"  # a multipart upload of one part (small backups): ETag `<md5>-1`
        upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        part = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=tar_of(files))["ETag"]
        s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part}]})
        s3.put_object(Bucket=BUCKET, Key=f"{base}/{SINGLE}/data.tar", Body=tar_of(files))
        for backup in (MULTIPART, ONE_PART, SINGLE):
            s3.put_object(Bucket=BUCKET, Key=f"{base}/{backup}/backup.info", Body=backup_info(backup))
        yield {"url": url, "files": files,
               "sizes": {MULTIPART: len(packed), ONE_PART: len(tar_of(files)), SINGLE: len(tar_of(files))}}


def args(url: str, backup: str, destination: Path, parallel: int = 4, piece: int = MIB) -> list[str]:
    return ["--backup-id", backup, "--destination", str(destination), "--parallel", str(parallel), "--piece-bytes",
            str(piece), "--cloud-provider", "aws-s3", "--endpoint-url", url, SOURCE, SERVER]


def restored(destination: Path) -> dict[str, bytes]:
    return {str(p.relative_to(destination)): p.read_bytes() for p in destination.rglob("*") if p.is_file()}


def run(url: str, backup: str, destination: Path, **kw) -> list[dict]:
    emitted: list[dict] = []
    download(arguments(args(url, backup, destination, **kw)), emitted.append)
    return emitted


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("backup", [MULTIPART, ONE_PART, SINGLE])
def test_the_backup_is_restored_identically_through_throttling_resets_and_cut_bodies(moto_backup, tmp_path, aws_env,
                                                                                      backup):
    destination = tmp_path / "data"
    with FaultProxy(moto_backup["url"], fraction=0.5, seed=3, kinds=("slowdown", "reset", "cut"),
                    body_match=r"data\.tar") as proxy:  # barman's catalogue reads backup.info in one GET
        emitted = run(proxy.url, backup, destination, piece=512 * 1024)
        faults = proxy.counts()
    assert faults["cut"] and faults["reset"] and faults["slowdown"], faults  # each kind really happened
    assert restored(destination) == moto_backup["files"]
    assert (destination / "pg_wal").is_dir()  # not in barman's tar: created, as barman-cloud-restore does
    assert destination.stat().st_mode & 0o777 == 0o700  # PostgreSQL starts only on a private data directory
    assert emitted[0] == {"files": 1, "bytes": moto_backup["sizes"][backup]}
    assert emitted[-1] == {"done": moto_backup["sizes"][backup]}


def test_a_corrupted_range_is_caught_by_the_checksum_and_the_backup_downloaded_again(moto_backup, tmp_path, aws_env):
    destination = tmp_path / "data"
    with FaultProxy(moto_backup["url"], fraction=1.0, kinds=("corrupt",), limit=1, body_match=r"data\.tar") as proxy:
        run(proxy.url, MULTIPART, destination)
        assert proxy.counts()["corrupt"] == 1
    assert restored(destination) == moto_backup["files"]


def test_a_store_that_keeps_corrupting_fails_the_download_naming_the_checksum(moto_backup, tmp_path):
    env = {**os.environ, **AWS, "PYTHONPATH": str(REPO)}
    with FaultProxy(moto_backup["url"], fraction=1.0, kinds=("corrupt",), body_match=r"data\.tar") as proxy:
        proc = subprocess.run([sys.executable, "-m", "drplan.base_restore",
                               *args(proxy.url, SINGLE, tmp_path / "data", piece=4 * MIB)],
                              env=env, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1
    assert lines[0] == {"files": 1, "bytes": moto_backup["sizes"][SINGLE]}
    assert lines[-1]["error"].startswith("Corrupt: pg/db/base/20261206T020304/data.tar: checksum "), lines[-1]
    assert "differs from its ETag" in lines[-1]["error"]


def test_an_unknown_backup_or_a_non_empty_destination_is_refused_before_any_download(moto_backup, tmp_path, aws_env):
    with pytest.raises(SystemExit, match="backup 20200101T000000 of db is not in the catalogue"):
        run(moto_backup["url"], "20200101T000000", tmp_path / "data")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "PG_VERSION").write_text("17\n")
    with pytest.raises(SystemExit, match="used is not empty; a restore needs an empty directory"):
        run(moto_backup["url"], SINGLE, tmp_path / "used")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["PG_VERSION"]
