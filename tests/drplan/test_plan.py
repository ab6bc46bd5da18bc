"""The plan model: both shipped plans load; a catalogue of broken plans, each with the message it must give."""

import copy
from datetime import timedelta

import pytest
import yaml

from drplan.plan import PLANS_DIR, PlanError, load_plan, parse_plan

BASE = yaml.safe_load((PLANS_DIR / "devonn.yaml").read_text())


def broken(change):
    data = copy.deepcopy(BASE)
    change(data)
    with pytest.raises(PlanError) as info:
        parse_plan(data, "p.yaml")
    return info.value.problems


def test_shipped_plans_load():
    prod = load_plan("devonn")
    assert prod.database("devonn-postgres").dr_replica.region == "us-west-2"
    assert prod.cluster("devonn-eks-production").nodegroups["dev_nodes"].desired == 3
    assert prod.objectives.rpo.database == timedelta(minutes=5)
    assert prod.objectives.rto.critical == timedelta(hours=1)
    assert prod.aws.endpoint_url is None
    assert (prod.drill.wal_prefetch.parallel, prod.drill.wal_prefetch.spool) == (8, 1 << 30)
    sandbox = load_plan(PLANS_DIR / "sandbox.yaml")
    assert sandbox.aws.is_loopback and sandbox.sandbox is not None
    assert {d.kind.value for d in sandbox.databases} == {"postgres", "rds"}


def test_plan_paths_resolve_against_the_plan_file():
    plan = load_plan("sandbox")
    assert plan.resolve_path("../.sandbox/kubeconfig") == PLANS_DIR.parent / ".sandbox" / "kubeconfig"


CATALOGUE = [
    ("unknown kind", lambda d: d["databases"][0].update(kind="mysql"),
     "databases[0].kind: 'mysql' is not allowed; write one of: 'rds', 'postgres'"),
    ("typo in a field name", lambda d: d["databases"][0].update(primry="x"),
     "databases[0].primry: unknown field; allowed here: name, tier, kind, primary"),
    ("missing region", lambda d: d["aws"].pop("region"),
     "aws.region: required field is missing; add it"),
    ("bad duration", lambda d: d["objectives"]["rpo"].update(database="5 minutes"),
     "objectives.rpo.database: '5 minutes' is not a duration; write e.g. 30s, 5m, 1h, 24h"),
    ("zero duration", lambda d: d["objectives"]["rto"].update(critical="0m"),
     "objectives.rto.critical: '0m' must be longer than zero"),
    ("same DR region", lambda d: d["aws"].update(dr_region="us-east-1"),
     "aws: dr_region must differ from region"),
    ("bucket not an S3 URI", lambda d: d["buckets"][0].update(backup="https://x"),
     "buckets[0].backup: 'https://x' is not an S3 URI; write s3://bucket-name/optional/prefix/"),
    ("backup inside live", lambda d: d["buckets"][0].update(backup="s3://devonn-data-production/bak/"),
     "buckets[0]: backup and live must not contain each other"),
    ("service names an unknown database", lambda d: d["services"][0].update(database="nope"),
     "services[0].database: 'nope' is not a database of this plan; use one of: devonn-postgres"),
    ("node group out of order", lambda d: d["clusters"][0]["nodegroups"]["dev_nodes"].update(min=4),
     "clusters[0].nodegroups.dev_nodes: need min <= desired <= max, got 4/3/5"),
    ("postgres without endpoints", lambda d: d["databases"][0].update(kind="postgres"),
     "databases[0]: kind postgres needs an endpoint for every member; add endpoints:"),
    ("endpoint of a non-member", lambda d: d["databases"][0].update(endpoints={"zzz": "10.0.0.1:5432"}),
     "databases[0]: endpoints names zzz, which is not a member"),
    ("endpoint without a port", lambda d: d["databases"][0].update(endpoints={"devonn-postgres-production": "h"}),
     "databases[0].endpoints.devonn-postgres-production: 'h' is not host:port"),
    ("duplicate database", lambda d: d["databases"].append(copy.deepcopy(d["databases"][0])),
     "databases[1].name: 'devonn-postgres' is already used by databases[0]; names must be unique"),
    ("DNS TTL too long", lambda d: d["dns"].update(ttl=3600),
     "dns.ttl: 3600 is out of range; write a number <= 300"),
    ("WAL prefetch parallelism 0", lambda d: d["drill"]["wal_prefetch"].update(parallel=0),
     "drill.wal_prefetch.parallel: 0 is out of range; write a number >= 1"),
    ("fleet drill concurrency 0", lambda d: d["drill"].update(fleet_concurrency=0),
     "drill.fleet_concurrency: 0 is out of range; write a number >= 1"),
    ("WAL spool smaller than a segment", lambda d: d["drill"]["wal_prefetch"].update(spool="8MiB"),
     "drill.wal_prefetch.spool: '8MiB' is smaller than one WAL segment (16 MiB); write 16MiB or more"),
    ("WAL spool not a size", lambda d: d["drill"]["wal_prefetch"].update(spool="lots"),
     "drill.wal_prefetch.spool: 'lots' is not a size; write e.g. 1GiB or 512MiB"),
    ("credentials_secret holding JSON", lambda d: d["databases"][0].update(credentials_secret='{"password":1}'),
     "databases[0].credentials_secret: '{\"password\":1}' is not a secret reference"),
    ("alarm mapped to an unknown runbook", lambda d: d["alarms"].append({"alarm": "x", "runbook": "rm-rf"}),
     "alarms[2].runbook: Input should be 'db-failover' or 'region-failover'"),
    ("alarm naming an unknown database", lambda d: d["alarms"].append(
        {"alarm": "x", "runbook": "db-failover", "parameters": {"database": "nope"}}),
     "alarms[2].parameters.database: 'nope' is not a database of this plan; use one of: devonn-postgres"),
    ("escalation interval of zero", lambda d: d["notifications"].update(escalation_interval="0s"),
     "notifications"),
    ("selector with neither tag nor name", lambda d: d.update(discover=[{"kind": "bucket", "backup": "s3://b/{name}/"}]),
     "discover[0]: a selector needs tag: KEY=VALUE, name: PATTERN, or both"),
    ("bucket selector without a backup template", lambda d: d.update(discover=[{"kind": "bucket", "name": "x-*",
                                                                               "backup": "s3://b/fixed/"}]),
     "discover[0]: a bucket selector needs backup: s3://backup-bucket/prefix/{name}/"),
    ("rds selector without a tier", lambda d: d.update(discover=[{"kind": "rds", "tag": "drplan:protect",
                                                                  "credentials_secret": "a/b"}]),
     "discover[0]: an rds selector needs tier: critical|secondary|tertiary, unless its tag's value is one"),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_broken_plan_names_the_field_and_the_fix(change, expected):
    problems = broken(change)
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize("key", ["password", "db_password", "token", "secret", "api_key"])
def test_inline_secrets_are_rejected_once(key):
    problems = broken(lambda d: d["databases"][0].update({key: "hunter2"}))
    assert problems == [
        f"databases[0].{key}: inline secrets are not allowed in a plan; store it in AWS Secrets Manager "
        "or a Prefect Secret block and reference it with credentials_secret / token_secret"
    ]


def test_url_with_password_is_rejected():
    problems = broken(lambda d: d["services"][0].update(health="https://admin:pw@api.devonn.ai/health"))
    assert problems == [
        "services[0].health: this URL carries a password; remove user:password@ and reference the "
        "credentials with credentials_secret"
    ]


def test_every_problem_is_reported_at_once():
    def many(d):
        d["databases"][0]["kind"] = "mysql"
        d["aws"].pop("region")
        d["dns"]["ttl"] = 0
    assert len(broken(many)) == 3


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(PlanError, match="no such plan file; pass a path to a YAML plan or one of: devonn, sandbox"):
        load_plan(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("aws: {region: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML at line"):
        load_plan(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(PlanError, match="a plan is a YAML mapping"):
        load_plan(scalar)


def test_unknown_resource_lookup_names_the_known_ones():
    with pytest.raises(PlanError, match="unknown database 'nope'; the plan defines: devonn-postgres"):
        load_plan("devonn").database("nope")
