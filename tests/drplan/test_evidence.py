"""The evidence chain on both stores (a local directory, and S3 on a real moto_server): append and verify, an altered
or missing record named, a record never overwritten, a half-written one never visible; the CLI's exit codes; the
readiness finding on the newest record's age."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from drplan.canonical import seal
from drplan.errors import DrplanError
from drplan.evidence import FORMAT, DirStore, append, history, newest, open_store, record_name, verify
from drplan.plan import PlanError, load_plan, parse_plan
from drplan.timeutil import utcnow
from flows.dr_readiness import dr_test_probe
from sandbox.launchers import moto

BUCKET = "evidence-test"


@pytest.fixture(scope="module")
def moto_env():
    with moto() as url:
        yield url


def plan_file(directory: Path, endpoint: str, location: str) -> Path:
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "name": "evidence-test",
        "aws": {"region": "us-east-1", "dr_region": "us-west-2", "endpoint_url": endpoint},
        "evidence": {"location": location, "grace": "14d"},
    }))
    return path


@pytest.fixture(params=["dir", "s3"])
def chain(request, moto_env, tmp_path):
    """A plan file with an empty chain in a tmp directory or under a fresh S3 prefix, and its store."""
    location = str(tmp_path / "evidence") if request.param == "dir" else f"s3://{BUCKET}/{tmp_path.name}/"
    path = plan_file(tmp_path, moto_env, location)
    store = open_store(load_plan(path))
    if request.param == "s3" and BUCKET not in {b["Name"] for b in store.s3.list_buckets()["Buckets"]}:
        store.s3.create_bucket(Bucket=BUCKET)
    return path, store


def overwrite(store, sequence: int, data: bytes | None) -> None:
    """Tamper with a record behind the store's back: new content, or deleted when `data` is None."""
    name = record_name(sequence)
    if isinstance(store, DirStore):
        target = store.path / name
        target.unlink() if data is None else target.write_bytes(data)
    elif data is None:
        store.s3.delete_object(Bucket=store.bucket, Key=store.prefix + name)
    else:
        store.s3.put_object(Bucket=store.bucket, Key=store.prefix + name, Body=data)


def three(store) -> list:
    return [append(store, {"plan": "evidence-test", "status": "passed", "run": i}) for i in range(3)]


def verify_cli(path: Path):
    return CliRunner().invoke(app, ["evidence", "verify", "--plan", str(path)])


def test_three_records_chain_and_verify(chain):
    path, store = chain
    records = three(store)
    assert [r.sequence for r in records] == [1, 2, 3]
    assert [r.previous for r in records] == [None, records[0].sha256, records[1].sha256]
    check = verify(store)
    assert check.ok and check.records == 3 and check.head == records[2].sha256, check.summary
    assert newest(store) == records[2]
    result = verify_cli(path)
    assert result.exit_code == 0, result.output
    assert "chain intact, 3 records" in result.stdout and records[2].sha256 in result.stdout
    listed = CliRunner().invoke(app, ["evidence", "list", "--plan", str(path), "--json"])
    assert listed.exit_code == 0 and listed.stdout.count('"sha256"') == 3


def test_one_altered_byte_in_record_2_is_named(chain):
    path, store = chain
    three(store)
    raw = bytearray(store.read(record_name(2)))
    raw[raw.index(b'"run":1') + 6] = ord("7")  # the report says run 7 now
    overwrite(store, 2, bytes(raw))
    check = verify(store)
    assert not check.ok and check.records == 1
    assert check.problem.startswith(f"record 2 ({store.where(record_name(2))}) is altered: its SHA-256")
    result = verify_cli(path)
    assert result.exit_code == 1 and "record 2" in result.stdout and "altered" in result.stdout, result.output
    assert "altered" in history(store)[1]


def test_a_rewritten_record_with_a_valid_hash_breaks_its_link(chain):
    """Record 2 replaced by one with a correct hash of its own, but not linked to record 1."""
    _, store = chain
    three(store)
    forged = {"format": FORMAT, "sequence": 2, "recorded_at": utcnow().isoformat(), "previous": "0" * 64,
              "report": {"status": "passed"}}
    overwrite(store, 2, seal(forged))
    check = verify(store)
    assert not check.ok and check.records == 1
    assert check.problem.startswith(f"record 2 ({store.where(record_name(2))}) does not link to record 1: it names "
                                    f"previous {'0' * 64}")


def test_a_missing_record_is_named_as_the_gap(chain):
    path, store = chain
    three(store)
    overwrite(store, 2, None)
    check = verify(store)
    assert check.problem == f"record 2 ({store.where(record_name(2))}) is missing: after record 1 comes record 3"
    result = verify_cli(path)
    assert result.exit_code == 1 and "record 2" in result.stdout and "missing" in result.stdout, result.output
    overwrite(store, 1, None)
    assert "the first record present is 3" in verify(store).problem


def test_a_record_is_never_overwritten(chain):
    _, store = chain
    first = append(store, {"status": "passed"})
    with pytest.raises(DrplanError, match="already exists"):
        store.create(record_name(1), b"{}")
    assert newest(store) == first


def test_a_damaged_head_refuses_an_append_naming_verify(chain):
    _, store = chain
    three(store)
    overwrite(store, 3, b'{"half": ')
    with pytest.raises(DrplanError, match=r"record 3 .* is altered.*run drplan evidence verify"):
        append(store, {"status": "passed"})


def test_a_half_written_record_is_never_visible(tmp_path):
    """A crash after the temporary file was written and before the link leaves only a hidden file: not a record."""
    store = DirStore(tmp_path / "evidence")
    three(store)
    (store.path / f".{record_name(4)}.dead.tmp").write_bytes(b'{"format": "drplan-evi')
    assert verify(store).records == 3 and verify(store).ok
    assert append(store, {"status": "passed"}).sequence == 4
    assert sorted(p.name for p in store.path.iterdir() if not p.name.startswith(".")) == \
        [record_name(n) for n in (1, 2, 3, 4)]


def test_an_empty_chain_verifies_and_an_unusable_location_is_exit_2(tmp_path, moto_env):
    path = plan_file(tmp_path, moto_env, str(tmp_path / "none"))
    result = verify_cli(path)
    assert result.exit_code == 0 and "0 records" in result.stdout
    missing = plan_file(tmp_path, moto_env, "s3://no-such-evidence-bucket/x/")
    result = verify_cli(missing)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "the bucket does not exist" in result.stderr


def test_a_plan_without_evidence_is_refused_in_one_line(tmp_path, moto_env):
    path = plan_file(tmp_path, moto_env, "x")
    data = yaml.safe_load(path.read_text())
    del data["evidence"]
    path.write_text(yaml.safe_dump(data))
    result = verify_cli(path)
    assert result.exit_code == 2 and "add evidence: {location: s3://bucket/prefix/}" in result.stderr


@pytest.mark.parametrize("location, message", [
    ("ftp://host/dir", "'ftp://host/dir' is neither an S3 prefix nor a directory; write s3://bucket-name/prefix/"),
    ("s3://Bad_Bucket/x", "'s3://Bad_Bucket/x' is not an S3 URI"),
    ("", "'' is neither an S3 prefix nor a directory"),
])
def test_a_bad_location_is_one_line_naming_the_fix(location, message):
    data = {"aws": {"region": "us-east-1", "dr_region": "us-west-2"}, "evidence": {"location": location}}
    with pytest.raises(PlanError) as caught:
        parse_plan(data)
    assert len(caught.value.problems) == 1 and caught.value.problems[0].startswith(f"evidence.location: {message}")


def test_readiness_reports_a_dr_test_older_than_a_quarter_plus_grace(tmp_path, moto_env):
    plan = load_plan(plan_file(tmp_path, moto_env, str(tmp_path / "evidence")))
    store = open_store(plan)
    ready, detail = dr_test_probe(plan)()
    assert not ready and detail == f"no DR test recorded in {store.location}; run drplan dr-test"
    old = utcnow() - timedelta(days=107)  # 92 + 14 grace + 1
    append(store, {"status": "passed"}, at=old)
    ready, detail = dr_test_probe(plan)()
    assert not ready, detail
    assert detail.startswith(f"last DR test {old:%Y-%m-%d} (") and "passed, record 1" in detail
    assert detail.endswith("older than a quarter (92d) plus grace 14d00h; run drplan dr-test")
    recent = utcnow() - timedelta(days=100)  # within the grace
    append(store, {"status": "failed"}, at=recent)
    ready, detail = dr_test_probe(plan)()
    assert ready and f"last DR test {recent:%Y-%m-%d}" in detail and "failed, record 2" in detail, detail
