"""The WAL prefetcher (drplan/wal_prefetch.py) and its restore_command (drplan/wal_restore.py): its window against an
archive stand-in in memory; then the daemon and the restore_command against a real moto_server holding a barman-cloud
archive written by barman's own uploader: segments handed over in order and fetched ahead, a bounded spool, history
and partial files, the end of the archive, a dead daemon, and downloads corrupted or cut by the fault proxy. The
segments are synthetic (a valid first page header, random bytes, zeros): restores of real WAL are tested in
tests/sandbox/test_postgres.py."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from barman.clients.cloud_walarchive import CloudWalUploader
from barman.cloud_providers.aws_s3 import S3CloudInterface

from drplan import processes, wal_restore
from drplan.wal_prefetch import STATS, Corrupt, Prefetcher, check_segment
from sandbox.fault_proxy import FaultProxy
from sandbox.launchers import moto
from tests.helpers import REPO, free_port, wait_for

MIB = 1 << 20
SEG = 16 * MIB
BUCKET, SOURCE, SERVER = "wal-archive", "s3://wal-archive/pg/", "db"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
       "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}
TL1 = [f"00000001{log:08X}{seg:08X}" for log, seg in [(0, s) for s in range(0xF0, 0x100)] + [(1, 0), (1, 1)]]
PARTIAL = "000000010000000100000002"  # only as .partial: the old timeline's last segment
TL2 = [f"0000000200000001{seg:08X}" for seg in (2, 3, 4)]
PLAIN = "000000030000000100000005"  # uploaded uncompressed: its ETag is the MD5 of the segment itself


def segment(name: str, seed: int = 0) -> bytes:
    """A 16 MiB segment whose first page header names it (what check_segment reads), 4 KiB of noise, zeros."""
    tli, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    header = struct.pack("=HHIQI4xQII", 0xD118, 0x0002, tli, (log * 256 + seg) * SEG, 0, 42, SEG, 8192)
    noise = hashlib.shake_256(f"{name}/{seed}".encode()).digest(4096)
    return header + noise + bytes(SEG - len(header) - len(noise))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MemoryArchive:
    """Archive stand-in: which files exist (`.partial` and history included), what was fetched, in which order."""

    def __init__(self, files: list[str]) -> None:
        self.files, self.fetched = set(files), []

    def listing(self, hash_dir: str) -> dict[str, str]:
        return {n: n + ".gz" for n in self.files if len(n) == 24 and n[:16] == hash_dir}

    def find(self, name: str) -> str | None:
        return next((f + ".gz" for f in (name, name + ".partial") if f in self.files), None)

    def fetch(self, key: str, name: str, dest: Path) -> int | None:
        self.fetched.append(name)
        dest.write_text(key)
        return None if name.endswith(".history") else SEG


def take(spool: Path, name: str) -> str:
    """What the restore_command's mv does: the file leaves the spool; returns what it held."""
    held = (spool / name).read_text()
    (spool / name).unlink()
    return held


def settled(prefetcher: Prefetcher, spool: Path, expected: list[str]) -> bool:
    prefetcher.tick()
    return sorted(p.name for p in spool.iterdir()) == sorted(expected)


def test_the_window_follows_recovery_within_its_bound_and_never_fetches_ahead_past_the_archive(tmp_path):
    archive = MemoryArchive([*TL1, PARTIAL + ".partial", "00000002.history", *TL2])
    prefetcher = Prefetcher(archive, tmp_path, parallel=2, spool_bytes=3 * SEG)  # three segments
    try:
        assert prefetcher.request("00000002.history") == "ready" and take(tmp_path, "00000002.history")
        assert prefetcher.request("00000003.history") == "missing"
        assert prefetcher.request(TL1[0]) == "ready"  # fetched on demand; the next two fetched ahead meanwhile
        wait_for(lambda: settled(prefetcher, tmp_path, TL1[:3]), 10, "two segments ahead")
        for index, name in enumerate(TL1):
            assert take(tmp_path, name) == name + ".gz"
            ahead = TL1[index + 1: index + 4]  # the spool refills from what recovery took, up to three
            wait_for(lambda a=ahead: settled(prefetcher, tmp_path, a), 10, f"{ahead} spooled")
        assert archive.fetched.count(PARTIAL) == 0  # the .partial is never fetched ahead...
        assert prefetcher.request(PARTIAL) == "ready" and take(tmp_path, PARTIAL) == PARTIAL + ".partial.gz"
        assert prefetcher.request(TL2[0]) == "ready"  # ...and recovery moves on to timeline 2: the window follows
        wait_for(lambda: settled(prefetcher, tmp_path, TL2), 10, "timeline 2 spooled")
        prefetcher.request(TL1[0])  # a second recovery pass from the start: what was spooled ahead is dropped
        wait_for(lambda: settled(prefetcher, tmp_path, TL1[:3]), 10, "the window back at the start")
        assert prefetcher.request("000000020000000100000005") == "missing"
        assert "000000020000000100000005" not in archive.fetched and archive.fetched.count(TL1[5]) == 1
    finally:
        prefetcher.close()


@pytest.fixture(scope="module")
def moto_env(tmp_path_factory) -> dict[str, str]:
    """moto with the archive in barman-cloud's layout (gzip, hash directories, history file in wals/); yields the
    expected SHA-256 of every file by name."""
    with moto() as url, mock.patch.dict(os.environ, AWS):
        cloud = S3CloudInterface(SOURCE, endpoint_url=url)
        cloud.s3.meta.client.create_bucket(Bucket=BUCKET)
        work = tmp_path_factory.mktemp("wal")
        files = {name: segment(name) for name in [*TL1, *TL2]}
        files[PARTIAL + ".partial"] = segment(PARTIAL, seed=1)
        files["00000002.history"] = b"1\t1/2000000\tno recovery target specified\n"
        files[PLAIN] = segment(PLAIN)
        for name, data in files.items():
            (work / name).write_bytes(data)
            compression = None if name == PLAIN else "gzip"
            CloudWalUploader(cloud, SERVER, compression=compression).upload_wal(str(work / name))
        yield {"url": url, **{name.removesuffix(".partial"): digest(data) for name, data in files.items()}}


def cloud_args(url: str) -> list[str]:
    return ["--cloud-provider", "aws-s3", "--endpoint-url", url, SOURCE, SERVER]


def start_daemon(state: Path, spool: Path, url: str, parallel: int, spool_bytes: int) -> processes.Tracked:
    argv = [sys.executable, "-m", "drplan.wal_prefetch", "--spool", str(spool), "--parallel", str(parallel),
            "--spool-bytes", str(spool_bytes), *cloud_args(url)]
    tracked = processes.start(state, "prefetch", argv, env={**os.environ, **AWS, "PYTHONPATH": str(REPO)})
    wait_for(lambda: (spool / wal_restore.SOCKET).exists(), 30, "the prefetch daemon's socket")
    return tracked


def restore(command: str, name: str, pg_wal: Path) -> tuple[int, str | None]:
    """Run the restore_command as PostgreSQL does (%f, %p relative to the data directory); exit status and the
    SHA-256 of what it put in place."""
    dest = pg_wal / "RECOVERYXLOG"
    dest.unlink(missing_ok=True)
    line = command.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG")
    proc = subprocess.run(["sh", "-c", line], cwd=pg_wal.parent, env={**os.environ, **AWS, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, digest(dest.read_bytes()) if dest.exists() else None


def spool_use(spool: Path) -> int:
    """Segment files in the spool, spooled or being written."""
    return sum(1 for p in spool.iterdir() if p.name != wal_restore.SOCKET and not p.name.endswith(".history"))


def test_recovery_gets_every_file_in_order_from_a_bounded_spool_filled_ahead(moto_env, own_processes, tmp_path):
    spool, data = tmp_path / ("long-" * 16) / "spool", tmp_path / "data"  # its socket's path: beyond AF_UNIX's 107
    (data / "pg_wal").mkdir(parents=True)
    daemon = start_daemon(own_processes, spool, moto_env["url"], parallel=2, spool_bytes=4 * SEG)
    command = wal_restore.command(sys.executable, spool, cloud_args(moto_env["url"]))

    assert restore(command, "00000002.history", data / "pg_wal") == (0, moto_env["00000002.history"])
    assert restore(command, "00000003.history", data / "pg_wal") == (1, None)
    assert restore(command, TL1[0], data / "pg_wal") == (0, moto_env[TL1[0]])
    wait_for(lambda: all((spool / n).exists() for n in TL1[1:5]), 30, "the next 4 segments spooled ahead")
    for name in TL1[1:]:  # across a hash directory (0000000100000000 -> 0000000100000001)
        assert spool_use(spool) <= 4 + 1  # the spool's 4 segments, and one fetched on demand at most
        assert restore(command, name, data / "pg_wal") == (0, moto_env[name])
    assert not (spool / PARTIAL).exists()  # never fetched ahead
    assert restore(command, PARTIAL, data / "pg_wal") == (0, moto_env[PARTIAL])  # the .partial, asked for
    for name in TL2:  # recovery moves to timeline 2: the window follows
        assert restore(command, name, data / "pg_wal") == (0, moto_env[name])
    assert restore(command, "000000020000000100000005", data / "pg_wal") == (1, None)  # the end: at once

    processes.stop(own_processes, "prefetch")  # a dead daemon: the restore_command fetches by itself
    assert restore(command, TL1[3], data / "pg_wal") == (0, moto_env[TL1[3]])
    assert restore(command, "000000010000000100000009", data / "pg_wal") == (1, None)
    stats = Path(daemon.log).read_text().rsplit("stopped: ", 1)[1]
    taken = int(stats.split("taken ")[1].split(",")[0])
    assert taken >= len(TL1) - 5, stats  # most segments went by the shell's mv, fetched ahead


@pytest.mark.parametrize("kind", ["corrupt", "cut"])
def test_a_corrupted_or_cut_download_is_fetched_again_never_handed_over(moto_env, tmp_path, monkeypatch, kind):
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "pg_wal").mkdir()
    before = sum(STATS.values())
    with FaultProxy(moto_env["url"], fraction=1.0, kinds=(kind,), limit=1) as proxy:
        code = wal_restore.main(["--spool", str(tmp_path / "no-daemon"), *cloud_args(proxy.url), PLAIN,
                                 str(tmp_path / "pg_wal" / "RECOVERYXLOG")])
        assert proxy.counts()[kind] == 1
    assert code == 0
    assert digest((tmp_path / "pg_wal" / "RECOVERYXLOG").read_bytes()) == moto_env[PLAIN]
    assert sum(STATS.values()) > before  # the failed attempt was counted
    assert not [p for p in (tmp_path / "pg_wal").iterdir() if p.name != "RECOVERYXLOG"]  # no temporary left


def test_a_fetch_that_fails_stops_recovery_instead_of_ending_it(tmp_path, monkeypatch):
    for key, value in {**AWS, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    closed = f"http://127.0.0.1:{free_port()}"
    code = wal_restore.main(["--spool", str(tmp_path), *cloud_args(closed), TL1[0], str(tmp_path / "RECOVERYXLOG")])
    assert code == wal_restore.FAILED > 125  # PostgreSQL: FATAL, not "end of archive"


def test_check_segment_refuses_a_segment_that_is_not_the_one_named(tmp_path):
    path = tmp_path / "seg"
    path.write_bytes(segment(TL1[0]))
    assert check_segment(path, TL1[0]) == SEG
    with pytest.raises(Corrupt, match="not at the segment's start"):
        check_segment(path, TL1[1])
    path.write_bytes(segment(TL1[0])[: SEG // 2])
    with pytest.raises(Corrupt, match="segment size"):
        check_segment(path, TL1[0])


def test_restore_command_keeps_credentials_out_of_its_arguments(tmp_path):
    command = wal_restore.command("/venv/bin/python", tmp_path / "spool dir", cloud_args("http://127.0.0.1:9"))
    assert "testing" not in command and "AWS_" not in command
    assert command.startswith(f"mv -f '{tmp_path}/spool dir'/%f %p 2>/dev/null || exec /venv/bin/python -m ")
    assert command.endswith(f"{SOURCE} {SERVER} %f %p")


def test_daemon_stops_on_sigterm_and_removes_its_socket(moto_env, own_processes, tmp_path):
    spool = tmp_path / "spool"
    daemon = start_daemon(own_processes, spool, moto_env["url"], parallel=8, spool_bytes=1 << 30)
    os.kill(daemon.pid, signal.SIGTERM)
    wait_for(lambda: not daemon.alive, 30, "the daemon to stop")
    assert "stopped:" in Path(daemon.log).read_text()
    assert not (spool / wal_restore.SOCKET).exists()
