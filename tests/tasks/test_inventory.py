"""Plans that discover, and plan drift, on a moto_server of this module's own: buckets and RDS instances the test
tags `drplan:protect` are found by `drplan plan drift` (and readiness's drift finding) without being added to the
plan; the plan's selectors take in what they match; an entry whose bucket is gone is named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from drplan.plan import PLANS_DIR, load_plan
from flows.dr_readiness import drift_probe
from sandbox.launchers import moto
from tasks.inventory import discovered_plan, plan_drift

runner = CliRunner()
PROTECT = "drplan:protect"


def client(url: str, service: str, region: str = "us-east-1"):
    return boto3.client(service, region_name=region, endpoint_url=url, aws_access_key_id="test",
                        aws_secret_access_key="test")


def instance(rds, identifier: str, tags: dict[str, str] | None = None) -> None:
    rds.create_db_instance(DBInstanceIdentifier=identifier, Engine="postgres", DBInstanceClass="db.t3.micro",
                           MasterUsername="admin1", MasterUserPassword="password-1", AllocatedStorage=20,
                           Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()])


@pytest.fixture(scope="module")
def drift_moto(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """(plan path, moto URL): the sandbox plan pointed at a moto seeded with its buckets and RDS members, a retired
    bucket entry, selectors for buckets named ledger-* and critical RDS instances named payments-*, and, live,
    resources tagged drplan:protect inside and outside those selectors."""
    with moto() as url:
        s3, rds, rds_dr = client(url, "s3"), client(url, "rds"), client(url, "rds", "us-west-2")
        for bucket in ("devonn-data-sandbox", "devonn-backup-sandbox", "orders-archive", "ledger-eu", "scratch"):
            s3.create_bucket(Bucket=bucket)
        s3.put_bucket_tagging(Bucket="orders-archive", Tagging={"TagSet": [{"Key": PROTECT, "Value": "critical"}]})
        s3.put_bucket_tagging(Bucket="ledger-eu", Tagging={"TagSet": [{"Key": PROTECT, "Value": "secondary"}]})
        s3.put_bucket_tagging(Bucket="scratch", Tagging={"TagSet": [{"Key": "team", "Value": "data"}]})
        instance(rds, "devonn-rds-production")
        rds.create_db_instance_read_replica(DBInstanceIdentifier="devonn-rds-replica-production",
                                            SourceDBInstanceIdentifier="devonn-rds-production")
        instance(rds_dr, "devonn-rds-dr-production")
        instance(rds, "payments-db", {PROTECT: "critical"})
        rds.create_db_instance_read_replica(DBInstanceIdentifier="payments-db-replica",  # covered through its source
                                            SourceDBInstanceIdentifier="payments-db",
                                            Tags=[{"Key": PROTECT, "Value": "critical"}])
        instance(rds, "billing-db", {PROTECT: "critical"})
        instance(rds, "untagged-db")

        data = yaml.safe_load((PLANS_DIR / "sandbox.yaml").read_text())
        data["aws"]["endpoint_url"] = url
        data["buckets"].append({"name": "retired", "live": "s3://retired-bucket/",
                                "backup": "s3://devonn-backup-sandbox/retired/"})
        data["discover"] = [
            {"kind": "bucket", "name": "ledger-*", "backup": "s3://devonn-backup-sandbox/{name}/"},
            {"kind": "rds", "tag": f"{PROTECT}=critical", "name": "payments-*",
             "credentials_secret": "devonn/db/admin"},
        ]
        path = tmp_path_factory.mktemp("drift") / "plan.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        yield path, url


def test_drift_names_the_tagged_resources_the_plan_leaves_out_and_the_entries_gone(drift_moto):
    path, _ = drift_moto
    before = path.read_bytes()

    result = runner.invoke(app, ["plan", "drift", str(path), "--json"])

    assert result.exit_code == 1, result.output
    drift = json.loads(result.stdout)
    assert {(r["kind"], r["name"]) for r in drift["uncovered"]} == {("bucket", "orders-archive"), ("rds", "billing-db")}
    assert drift["gone"] == ["buckets[1] retired: live bucket retired-bucket does not exist"]
    assert {(r["kind"], r["name"]) for r in drift["selected"]} == {("bucket", "ledger-eu"), ("rds", "payments-db")}
    assert path.read_bytes() == before  # reported, not added
    assert [b.name for b in load_plan(path).buckets] == ["data", "retired"]


def test_readiness_reports_the_drift(drift_moto):
    ready, detail = drift_probe(load_plan(drift_moto[0]))()
    assert not ready
    assert "bucket orders-archive tagged drplan:protect=critical is not in the plan" in detail
    assert "RDS instance billing-db (us-east-1) tagged drplan:protect=critical is not in the plan" in detail
    assert "retired-bucket does not exist" in detail


def test_selectors_take_in_what_they_match_and_nothing_else(drift_moto):
    plan = discovered_plan(load_plan(drift_moto[0]))

    ledger = plan.bucket("ledger-eu")
    assert (ledger.live, ledger.backup) == ("s3://ledger-eu/", "s3://devonn-backup-sandbox/ledger-eu/")
    payments = plan.database("payments-db")
    assert (payments.kind.value, payments.tier.value, payments.primary, payments.credentials_secret) == (
        "rds", "critical", "payments-db", "devonn/db/admin")
    assert [db.name for db in plan.databases] == ["devonn-postgres", "devonn-rds", "payments-db"]
    assert {b.name for b in plan.buckets} == {"data", "retired", "ledger-eu"}


def test_no_drift_once_the_plan_covers_them(drift_moto, tmp_path):
    path, url = drift_moto
    data = yaml.safe_load(path.read_text())
    data["buckets"].pop()  # the retired entry
    data["discover"].append({"kind": "bucket", "tag": PROTECT, "backup": "s3://devonn-backup-sandbox/{name}/"})
    data["discover"].append({"kind": "rds", "tag": PROTECT, "credentials_secret": "devonn/db/admin",
                             "tier": "secondary"})
    covered = tmp_path / "covered.yaml"
    covered.write_text(yaml.safe_dump(data, sort_keys=False))

    drift = plan_drift(load_plan(covered))

    assert not drift.drifted, drift.markdown()
    assert {r.name for r in drift.selected} == {"orders-archive", "ledger-eu", "payments-db", "billing-db"}
