"""The least-privilege policy (drplan/iam_policy.py) without servers: the table covers every AWS operation the
source calls, each action gets a scope, the plan's resources are the ones named, and `drplan plan iam-policy`
prints it. Its enforcement by IAM is tests/flows/test_least_privilege.py."""

import json
import re
from pathlib import Path

import botocore.session
import pytest
import yaml
from botocore import xform_name
from botocore.stub import Stubber
from typer.testing import CliRunner

from cli.main import app
from drplan.clients import new_client
from drplan.errors import AccessDenied
from drplan.iam_policy import HEALTH, OPERATIONS, actions_of, iam_policy, operations
from drplan.plan import PLANS_DIR, load_plan, parse_plan

ROOT = Path(__file__).resolve().parents[2]
SOURCE = [p for package in ("drplan", "tasks", "flows", "cli", "checks", "deployments")
          for p in (ROOT / package).rglob("*.py")]


def called_operations() -> dict[str, list[str]]:
    """`service:Operation` -> where: every operation of a service drplan builds clients for, called on a client
    (`.describe_db_instances(`) or named as a paginator (`"list_objects_v2"`) anywhere in the source."""
    text = {path: path.read_text() for path in SOURCE}
    services = {m for t in text.values() for m in re.findall(r"(?:aws_client|new_client)\([^)]*?\"([a-z0-9]+)\"", t)}
    assert {"s3", "rds", "ec2", "eks", "route53", "cloudwatch", "secretsmanager", "sts", "iam"} <= services
    named: dict[str, set[str]] = {}
    for path, body in text.items():
        for name in re.findall(r"\.([a-z0-9_]+)\(|[\"']([a-z0-9_]+)[\"']", body):
            named.setdefault(name[0] or name[1], set()).add(str(path.relative_to(ROOT)))
    session, found = botocore.session.get_session(), {}
    for service in services:
        for operation in session.get_service_model(service).operation_names:
            if xform_name(operation) in named:
                found[f"{service}:{operation}"] = sorted(named[xform_name(operation)])
    return found


def test_every_aws_operation_the_source_calls_is_in_the_table():
    called = called_operations()
    assert {"rds:DescribeDBInstances", "s3:CopyObject", "route53:ChangeResourceRecordSets"} <= set(called)
    missing = {op: where for op, where in called.items() if op not in operations()}
    assert not missing, f"add these to drplan/iam_policy.py OPERATIONS: {missing}"


@pytest.mark.parametrize("plan_name", ["sandbox", "devonn"])
def test_every_action_of_every_runbook_gets_a_scope_and_only_unscopable_ones_get_a_star(plan_name):
    plan = load_plan(PLANS_DIR / f"{plan_name}.yaml")
    policy = iam_policy(plan)
    granted = {a for s in policy["Statement"] for a in s["Action"]}
    unused = set() if plan.alarms else {"cloudwatch:DescribeAlarms"}  # no alarms: alarm-watch reads none
    assert granted == {a for op in operations() for a in actions_of(op)} - unused
    for statement in policy["Statement"]:
        assert statement["Resource"], statement
        if "*" in statement["Resource"]:
            assert statement["Sid"].endswith("NoResourceScope"), statement


def test_resources_are_the_plans_buckets_prefixes_members_copies_secrets_and_clusters():
    plan = load_plan(PLANS_DIR / "sandbox.yaml")
    by_sid = {s["Sid"]: s for s in iam_policy(plan, account="123456789012")["Statement"]}
    objects = by_sid["S3ObjectsUnderThePlansPrefixes"]["Resource"]
    bucket = plan.buckets[0]
    assert f"arn:aws:s3:::{bucket.backup.removeprefix('s3://')}*" in objects
    assert f"arn:aws:s3:::{bucket.live.removeprefix('s3://')}*" in objects
    assert f"arn:aws:s3:::{plan.configuration.backup.removeprefix('s3://')}*" in objects
    rds = next(db for db in plan.databases if db.kind == "rds")
    members = by_sid["RdsThePlansMembersAndCopies"]["Resource"]
    assert f"arn:aws:rds:us-east-1:123456789012:db:{rds.primary}" in members
    assert f"arn:aws:rds:{rds.dr_replica.region}:123456789012:db:{rds.dr_replica.identifier}" in members
    assert f"arn:aws:rds:us-east-1:123456789012:db:{rds.name}-*" in members  # drill, recovery, replica copies
    assert not any(db.name in arn for db in plan.databases if db.kind == "postgres" for arn in members)
    secrets = by_sid["SecretsManagerThePlansCredentials"]["Resource"]
    assert f"arn:aws:secretsmanager:us-east-1:123456789012:secret:{rds.credentials_secret}-??????" in secrets
    assert by_sid["EksThePlansClusters"]["Resource"] == sorted(
        f"arn:aws:eks:{plan.region_of(c)}:123456789012:cluster/{c.name}" for c in plan.clusters)


def test_one_runbook_gets_only_its_own_actions():
    plan = load_plan(PLANS_DIR / "sandbox.yaml")
    backup = {a for s in iam_policy(plan, ["s3-backup"])["Statement"] for a in s["Action"]}
    assert backup == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject"}
    config = iam_policy(plan, ["configuration-backup"])["Statement"]  # writes, and validates (known-good revisions)
    s3 = [s for s in config if any(a.startswith("s3:") for a in s["Action"])]
    assert s3 == [{"Sid": "S3ObjectsUnderThePlansPrefixes", "Effect": "Allow", "Action": ["s3:PutObject"],
                   "Resource": s3[0]["Resource"]}]
    assert {a for s in config for a in s["Action"]} == {"s3:PutObject", *HEALTH}
    assert set(OPERATIONS["dr-readiness"]) <= set(OPERATIONS["region-failover"])  # it runs readiness as a subflow


def test_cli_prints_the_policy_as_json_and_refuses_an_unknown_runbook_in_one_line():
    runner = CliRunner()
    shown = runner.invoke(app, ["plan", "iam-policy", str(PLANS_DIR / "sandbox.yaml"), "--flow", "s3-recovery",
                                "--account", "123456789012"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == iam_policy(load_plan(PLANS_DIR / "sandbox.yaml"), ["s3-recovery"],
                                                  "123456789012")
    wrong = runner.invoke(app, ["plan", "iam-policy", str(PLANS_DIR / "sandbox.yaml"), "--flow", "s3-bakup"])
    assert wrong.exit_code == 2 and wrong.stdout == ""
    assert wrong.stderr.strip().startswith("error: unknown runbook s3-bakup; use one of rpo-verification")
    assert len(wrong.stderr.strip().splitlines()) == 1
    account = runner.invoke(app, ["plan", "iam-policy", str(PLANS_DIR / "sandbox.yaml"), "--account", "12"])
    assert account.exit_code == 2 and "an AWS account id is 12 digits" in account.stderr


def test_a_denied_call_is_one_line_naming_the_action_and_the_resource():
    plan = load_plan(PLANS_DIR / "sandbox.yaml")
    rds = new_client(plan.aws, "rds", "us-west-2")
    with Stubber(rds) as stub:  # AWS's own words name both
        stub.add_client_error("promote_read_replica", "AccessDenied", http_status_code=403, service_message=(
            "User: arn:aws:iam::123456789012:user/dr is not authorized to perform: rds:PromoteReadReplica on "
            "resource: arn:aws:rds:us-west-2:123456789012:db:dr-1 because no identity-based policy allows it"))
        with pytest.raises(AccessDenied) as denied:
            rds.promote_read_replica(DBInstanceIdentifier="dr-1")
    assert str(denied.value).startswith("AWS denied rds:PromoteReadReplica on "
                                        "arn:aws:rds:us-west-2:123456789012:db:dr-1 (PromoteReadReplica in us-west-2)")
    s3 = new_client(plan.aws, "s3", "us-east-1")
    with Stubber(s3) as stub:  # S3's "Access Denied" says neither: the operation's action and its object
        stub.add_client_error("head_object", "403", http_status_code=403)
        with pytest.raises(AccessDenied) as denied:
            s3.head_object(Bucket="b", Key="k/1")
    assert str(denied.value).startswith("AWS denied s3:GetObject on arn:aws:s3:::b/k/1 (HeadObject in us-east-1)")
    assert "\n" not in str(denied.value)


def test_selectors_widen_the_scope_to_what_they_may_take_in():
    data = yaml.safe_load((PLANS_DIR / "sandbox.yaml").read_text())
    data["discover"] = [{"kind": "bucket", "name": "ledger-*", "backup": "s3://devonn-backup-sandbox/{name}/"},
                        {"kind": "rds", "tag": "drplan:protect=critical", "credentials_secret": "devonn/db/admin"}]
    policy = iam_policy(parse_plan(data), None, "123456789012")
    scoped = {s["Sid"]: s["Resource"] for s in policy["Statement"]}

    assert "arn:aws:s3:::ledger-*" in scoped["S3ListThePlansBuckets"]
    assert {"arn:aws:s3:::ledger-*/*", "arn:aws:s3:::devonn-backup-sandbox/ledger-*/*"} <= set(
        scoped["S3ObjectsUnderThePlansPrefixes"])
    assert {"arn:aws:rds:us-east-1:123456789012:db:*", "arn:aws:rds:us-west-2:123456789012:db:*"} <= set(
        scoped["RdsThePlansMembersAndCopies"])  # a tag alone may take in any instance
