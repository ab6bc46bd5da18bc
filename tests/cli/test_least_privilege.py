"""The generated policy under IAM enforcement: a moto_server of this module's own that authorizes every request
against IAM policies after its first three (INITIAL_NO_AUTH_ACTION_COUNT=3: they create an admin user, its
allow-all policy and its access key; everything after is signed and checked). drplan's real code paths run as a
user holding only `drplan plan iam-policy`'s policy: bucket backup and restore from the CLI, the RPO measurements
that need only AWS (bucket and configuration backup age, RDS describe and snapshots). The operations they make are
recorded and must be in drplan/iam_policy.py's table for that runbook (server-side copies through
drplan/s3fastcopy.py bypass botocore and its events: CopyObject is in the table from the source scan).

moto checks S3 requests against the bucket and object ARN, but every other service against the resource "*": the
user's policy is the generated one with the non-S3 statements widened to "*" (their scoping is tested without
servers in tests/drplan/test_iam_policy.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import boto3
import pytest
import yaml
from botocore.config import Config
from typer.testing import CliRunner

from cli.main import app
from drplan import clients, s3store
from drplan.errors import AccessDenied
from drplan.iam_policy import OPERATIONS, iam_policy
from drplan.plan import Plan, load_plan
from sandbox.launchers import moto
from tasks.rds import describe_instance, find_newest_snapshot
from tasks.s3 import find_newest_backup, find_newest_object

RUNBOOKS = ["s3-backup", "s3-recovery", "rpo-verification"]
LIVE, BACKUP, OTHER, INSTANCE = "iam-live", "iam-backup", "iam-other", "iam-rds-production"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
runner = CliRunner()


def admin_clients(url: str, key: dict) -> dict:
    return {service: boto3.client(service, endpoint_url=url, region_name="us-east-1", aws_access_key_id=key[
        "AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"], config=Config(
        request_checksum_calculation="when_required", response_checksum_validation="when_required"))
        for service in ("iam", "s3", "rds")}


@pytest.fixture(scope="module")
def iam_moto(tmp_path_factory) -> Iterator[tuple[str, dict]]:
    """(plan path, admin clients) on an enforcing moto seeded as admin: a live bucket, a configuration backup, an
    RDS instance with a snapshot, and a bucket the plan does not name."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        env.setenv("AWS_ACCESS_KEY_ID", "anyone")
        env.setenv("AWS_SECRET_ACCESS_KEY", "anyone")
        with moto() as url:
            env.undo()
            iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="anyone",
                               aws_secret_access_key="anyone")
            iam.create_user(UserName="admin")
            iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
            admin = admin_clients(url, iam.create_access_key(UserName="admin")["AccessKey"])
            s3 = admin["s3"]
            for bucket in (LIVE, BACKUP, OTHER):
                s3.create_bucket(Bucket=bucket)
            for n in range(20):
                s3.put_object(Bucket=LIVE, Key=f"docs/{n:03d}.txt", Body=f"document {n}".encode())
            s3.put_object(Bucket=BACKUP, Key="config/20261206T000000Z/cluster.json", Body=b"{}")
            admin["rds"].create_db_instance(DBInstanceIdentifier=INSTANCE, Engine="postgres",
                                            DBInstanceClass="db.t3.micro", AllocatedStorage=20,
                                            MasterUsername="postgres", MasterUserPassword="unused-in-moto",
                                            BackupRetentionPeriod=7)
            admin["rds"].create_db_snapshot(DBInstanceIdentifier=INSTANCE, DBSnapshotIdentifier="iam-snap")
            path = tmp_path_factory.mktemp("iam") / "plan.yaml"
            path.write_text(yaml.safe_dump({
                "name": "iam-test",
                "aws": {"region": "us-east-1", "dr_region": "us-west-2", "endpoint_url": url},
                "databases": [{"name": "iam-rds", "tier": "critical", "kind": "rds", "primary": INSTANCE,
                               "credentials_secret": "iam/db/admin"}],
                "buckets": [{"name": "data", "live": f"s3://{LIVE}/", "backup": f"s3://{BACKUP}/data/"}],
                "configuration": {"backup": f"s3://{BACKUP}/config/"},
            }))
            yield str(path), admin


def as_moto_sees_it(policy: dict) -> dict:
    return {**policy, "Statement": [s if all(a.startswith("s3:") for a in s["Action"]) else {**s, "Resource": "*"}
                                    for s in policy["Statement"]]}


def user(monkeypatch, admin: dict, name: str, policy: dict | None) -> None:
    """Create IAM user `name` holding only `policy` (none: no policy at all); drplan's clients use its key."""
    iam = admin["iam"]
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="drplan", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    clients._cached_client.cache_clear()  # clients built under other credentials


@pytest.fixture
def recorded(monkeypatch) -> Iterator[list[str]]:
    """`service:Operation` of every call drplan's clients make from now on (botocore's before-call event)."""
    calls: list[str] = []
    built = clients.new_client

    def recording(*args, **kwargs):
        client = built(*args, **kwargs)
        client.meta.events.register("before-call", lambda model, **_: calls.append(
            f"{model.service_model.service_name}:{model.name}"))
        return client

    monkeypatch.setattr(clients, "new_client", recording)
    monkeypatch.setattr(s3store, "new_client", recording)
    clients._cached_client.cache_clear()
    yield calls
    clients._cached_client.cache_clear()


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def measure_rpo(plan: Plan) -> list:
    """What rpo-verification measures with AWS alone (its tasks' bodies: no Prefect server here)."""
    s3, rds = clients.aws_client(plan, "s3"), clients.aws_client(plan, "rds")
    bucket = plan.buckets[0]
    return [find_newest_backup.fn(s3, bucket.backup), find_newest_object.fn(s3, bucket.live),
            find_newest_object.fn(s3, plan.configuration.backup),
            describe_instance(rds, INSTANCE)["DBInstanceIdentifier"], find_newest_snapshot.fn(rds, INSTANCE)]


def test_moto_refuses_a_user_without_a_policy(iam_moto, monkeypatch):
    path, admin = iam_moto
    user(monkeypatch, admin, "nobody", None)
    refused = runner.invoke(app, ["s3-backup", "--plan", path])
    assert refused.exit_code == 2
    assert error_lines(refused) == [
        f"error: AWS denied s3:ListBucket on arn:aws:s3:::{LIVE} (ListObjectsV2 in us-east-1); grant it to drplan's "
        "credentials (drplan plan iam-policy PLAN prints what the runbooks need)"], refused.stderr
    with pytest.raises(AccessDenied, match=f"AWS denied rds:DescribeDBInstances on DBInstanceIdentifier {INSTANCE}"):
        describe_instance(clients.aws_client(load_plan(path), "rds"), INSTANCE)


def test_backup_restore_and_rpo_measurements_work_with_only_the_generated_policy(iam_moto, monkeypatch, recorded):
    path, admin = iam_moto
    plan = load_plan(path)
    shown = runner.invoke(app, ["plan", "iam-policy", path, *(f"--flow={name}" for name in RUNBOOKS)])
    assert shown.exit_code == 0, shown.output
    user(monkeypatch, admin, "runbooks", as_moto_sees_it(json.loads(shown.stdout)))

    backed_up = runner.invoke(app, ["s3-backup", "--plan", path])
    assert backed_up.exit_code == 0, backed_up.output
    assert recorded and set(recorded) <= set(OPERATIONS["s3-backup"]), sorted(set(recorded))
    recorded.clear()

    admin["s3"].delete_object(Bucket=LIVE, Key="docs/007.txt")
    restored = runner.invoke(app, ["s3-restore", "--from", f"s3://{BACKUP}/data/", "--to", f"s3://{LIVE}/",
                                   "--plan", path])
    assert restored.exit_code == 0, restored.output
    assert admin["s3"].get_object(Bucket=LIVE, Key="docs/007.txt")["Body"].read() == b"document 7"
    assert recorded and set(recorded) <= set(OPERATIONS["s3-recovery"]), sorted(set(recorded))
    recorded.clear()

    backup, live, configuration, instance, snapshot = measure_rpo(plan)
    assert None not in (backup, live, configuration, snapshot) and instance == INSTANCE
    assert recorded and set(recorded) <= set(OPERATIONS["rpo-verification"]), sorted(set(recorded))
    with pytest.raises(AccessDenied, match=f"AWS denied s3:ListBucket on arn:aws:s3:::{OTHER} "):
        find_newest_object.fn(clients.aws_client(plan, "s3"), f"s3://{OTHER}/")  # scoped to the plan's buckets


def test_with_one_action_removed_the_run_fails_in_one_line_naming_it_and_the_resource(iam_moto, monkeypatch):
    path, admin = iam_moto
    plan = load_plan(path)
    policy = as_moto_sees_it(iam_policy(plan, RUNBOOKS))
    without = {**policy, "Statement": [{**s, "Action": [a for a in s["Action"] if a != "rds:DescribeDBSnapshots"]}
                                       for s in policy["Statement"]]}
    user(monkeypatch, admin, "no-snapshots", without)
    with pytest.raises(AccessDenied) as denied:
        measure_rpo(plan)
    assert str(denied.value).startswith(f"AWS denied rds:DescribeDBSnapshots on DBInstanceIdentifier {INSTANCE} "
                                        "(DescribeDBSnapshots in us-east-1)")

    without = {**policy, "Statement": [{**s, "Action": [a for a in s["Action"] if a != "s3:PutObject"]}
                                       for s in policy["Statement"]]}
    user(monkeypatch, admin, "no-puts", without)
    refused = runner.invoke(app, ["s3-backup", "--plan", path])
    assert refused.exit_code == 2
    [line] = error_lines(refused)
    assert re.fullmatch(rf"error: AWS denied s3:GetObject on arn:aws:s3:::{LIVE}/(docs/\d+\.txt) or s3:PutObject on "
                        rf"arn:aws:s3:::{BACKUP}/data/\w+/\1 \(CopyObject in us-east-1\); grant it .*; stopped after "
                        r"copying 0 of 20 objects \(20 failed, nothing deleted\); rerun to resume", line), line
