"""`drplan revoke-access` against a moto_server of this module's own that enforces IAM (as in
tests/cli/test_least_privilege.py): drplan runs as an admin user; the compromised principal's own key is refused
by AWS after the revocation and accepted again after `--restore`. Bad input is refused in one line, unchanged.

moto enforces the deny-all policy but not a key's Inactive status: the key's status is read back through IAM."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError
from typer.testing import CliRunner

from cli.main import app
from drplan import clients
from sandbox.launchers import moto
from tasks.iam import DENY_POLICY, REVOKED_TAG

ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("prefect_server")


def client(url: str, service: str, key: dict):
    return boto3.client(service, endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                        aws_secret_access_key=key["SecretAccessKey"])


@pytest.fixture(scope="module")
def iam_world(tmp_path_factory) -> Iterator[tuple[str, str, object]]:
    """(moto URL, plan path, admin IAM client) on an enforcing moto; drplan's clients use the admin's key."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        env.setenv("AWS_ACCESS_KEY_ID", "anyone")
        env.setenv("AWS_SECRET_ACCESS_KEY", "anyone")
        with moto() as url:
            iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1")
            iam.create_user(UserName="admin")
            iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
            key = iam.create_access_key(UserName="admin")["AccessKey"]
            env.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
            env.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
            clients._cached_client.cache_clear()
            directory = tmp_path_factory.mktemp("revoke")
            path = directory / "plan.yaml"
            path.write_text(yaml.safe_dump({
                "name": "revoke-test",
                "aws": {"region": "us-east-1", "dr_region": "us-west-2", "endpoint_url": url},
                "databases": [{"name": "db", "tier": "critical", "kind": "rds", "primary": "db-production",
                               "credentials_secret": "revoke/db/admin"}],
                "drill": {"report_dir": str(directory / "reports")},
            }))
            yield url, str(path), client(url, "iam", key)
    clients._cached_client.cache_clear()


def works(url: str, key: dict) -> bool:
    try:
        client(url, "s3", key).list_buckets()
        return True
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "AccessDenied"
        return False


def test_revoked_key_is_refused_and_restore_gives_it_back(iam_world):
    url, path, iam = iam_world
    iam.create_user(UserName="leaky")
    iam.put_user_policy(UserName="leaky", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
    key = iam.create_access_key(UserName="leaky")["AccessKey"]
    arn = iam.get_user(UserName="leaky")["User"]["Arn"]
    assert works(url, key)

    planned = runner.invoke(app, ["revoke-access", "--plan", path, "--principal", arn, "--dry-run"])
    assert planned.exit_code == 0 and "planned (dry run)" in planned.stdout, planned.output
    assert works(url, key)

    revoked = runner.invoke(app, ["revoke-access", "--plan", path, "--principal", arn, "--yes"])
    assert revoked.exit_code == 0 and "access revoked" in revoked.stdout, revoked.output
    assert not works(url, key)  # AWS refuses the principal's own key
    assert [k["Status"] for k in iam.list_access_keys(UserName="leaky")["AccessKeyMetadata"]] == ["Inactive"]
    assert DENY_POLICY in iam.list_user_policies(UserName="leaky")["PolicyNames"]
    assert {t["Key"]: t["Value"] for t in iam.list_user_tags(UserName="leaky")["Tags"]}[REVOKED_TAG] == key[
        "AccessKeyId"]
    again = runner.invoke(app, ["revoke-access", "--plan", path, "--principal", arn, "--yes"])
    assert again.exit_code == 0, again.output  # rerun-safe: the record keeps the key
    assert REVOKED_TAG in {t["Key"] for t in iam.list_user_tags(UserName="leaky")["Tags"]}

    restored = runner.invoke(app, ["revoke-access", "--plan", path, "--principal", arn, "--restore", "--yes"])
    assert restored.exit_code == 0 and "access restored" in restored.stdout, restored.output
    assert works(url, key)
    assert [k["Status"] for k in iam.list_access_keys(UserName="leaky")["AccessKeyMetadata"]] == ["Active"]
    assert iam.list_user_policies(UserName="leaky")["PolicyNames"] == ["all"]
    assert iam.list_user_tags(UserName="leaky")["Tags"] == []


def test_a_role_is_denied_everything_and_restored(iam_world):
    url, path, iam = iam_world
    arn = iam.create_role(RoleName="leaky-role", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    revoked = runner.invoke(app, ["revoke-access", "--plan", path, "--principal", arn, "--yes"])
    assert revoked.exit_code == 0 and "access revoked" in revoked.stdout, revoked.output
    assert iam.list_role_policies(RoleName="leaky-role")["PolicyNames"] == [DENY_POLICY]
    restored = runner.invoke(app, ["revoke-access", "--plan", path, "--principal", arn, "--restore", "--yes"])
    assert restored.exit_code == 0, restored.output
    assert iam.list_role_policies(RoleName="leaky-role")["PolicyNames"] == []


def test_unknown_principal_or_bad_arn_or_nothing_to_restore_is_refused_in_one_line(iam_world):
    url, path, iam = iam_world
    iam.create_user(UserName="untouched")
    users = iam.list_users()["Users"]
    for arn, line in (
        ("arn:aws:iam::123456789012:user/nobody", "error: no IAM user nobody"),
        ("arn:aws:s3:::bucket", "is no IAM user or role ARN"),
    ):
        refused = runner.invoke(app, ["revoke-access", "--plan", path, "--principal", arn, "--yes"])
        assert refused.exit_code == 2 and line in refused.stderr, refused.output
        assert len(refused.stderr.strip().splitlines()) == 1
    arn = iam.get_user(UserName="untouched")["User"]["Arn"]
    nothing = runner.invoke(app, ["revoke-access", "--plan", path, "--principal", arn, "--restore", "--yes"])
    assert nothing.exit_code == 2 and "no revocation of" in nothing.stderr, nothing.output
    assert iam.list_users()["Users"] == users and iam.list_user_policies(UserName="untouched")["PolicyNames"] == []
