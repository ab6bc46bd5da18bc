"""The DR test on the sandbox: every part reported, the evidence written and appended to the chain, a failing part
fails the whole test without stopping the others; the failover part of each database (a client writing throughout:
its downtime, no row lost, protected and as planned afterwards). Without the sandbox: the bucket restore part and
the chain record on a moto_server of their own; the failover part skipped on a production plan."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s
from prefect import flow
from prefect.artifacts import Artifact
from typer.testing import CliRunner

from cli.main import app
from drplan.clients import aws_client, db_credentials, kube_client
from drplan.dr_test_part import Part
from drplan.drill_report import DrillReport, Measured
from drplan.errors import DrplanError
from drplan.evidence import DirStore, append, history, newest, record_name
from drplan.plan import PLANS_DIR, EvidenceSettings, Tier, load_plan
from drplan.results import CheckResult, Status
from drplan.timeutil import utcnow
from drplan.write_probe import PREFIX
from flows.dr_test import (
    DrTestReport,
    dr_test,
    drill_part,
    evidence_history,
    failover_part,
    failover_parts,
    failover_test,
    publish,
    record_evidence,
    restore_parts,
)
from sandbox.launchers import moto
from tasks.k8s import find_database_secret, read_secret_value, write_secret_value
from tasks.postgres import read_newest_heartbeat
from tasks.s3 import back_up_prefix
from tasks.topology import discover
from tests.helpers import wait_for
from tests.s3_moto import put_objects, s3_plan

PARTS = ["RPO verification", "backup of bucket data", "restore of bucket data", "DR readiness of us-west-2",
         "cross-region rehearsal", "restore drill of devonn-postgres", "failover of devonn-postgres"]


def with_evidence(directory: Path) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data["evidence"] = {"location": str(directory)}
    return change


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup", "fresh_backups",
                         "recovery_lock_freed_after_a_failure", "app_secrets_kept")
def test_every_part_passes_and_the_evidence_is_written(sandbox, plan_variant, tmp_path):
    reports = sandbox.resolve_path(sandbox.drill.report_dir)
    before = set(reports.glob("dr-test-*")) if reports.exists() else set()
    plan = plan_variant(with_evidence(tmp_path / "evidence"))
    result = CliRunner().invoke(app, ["dr-test", "--plan", str(plan), "--database", "devonn-postgres"])
    assert result.exit_code == 0, result.output
    written = sorted(set(reports.glob("dr-test-*")) - before)
    postmortem, written = written[0], written[1:]
    assert postmortem.name.endswith("-postmortem.md") and "## Learnings and action items" in postmortem.read_text()
    assert [p.suffix for p in written] == [".html", ".json", ".md"]
    page, written = written[0].read_text(), written[1:]
    report = DrTestReport.model_validate_json(written[0].read_text())
    assert [p.name for p in report.parts] == PARTS
    assert {p.status for p in report.parts} == {Status.passed}, report.markdown()
    drill = report.parts[5].summary
    assert drill.startswith("RTO ") and "(objective 1h00m, met)" in drill and "checks passed" in drill
    assert [(m.kind, m.category, m.met) for m in report.parts[5].measures] == [("RTO", "critical", True),
                                                                                 ("RPO", "database", True)]
    assert {m.category for m in report.parts[0].measures} == {"database", "file_storage", "configuration"}
    assert all(f"<td>{p.name}</td>" in page for p in report.parts)
    assert page.count("<svg") == sum(len(p.measures) for p in report.parts)
    assert written[1].read_text().strip() == report.markdown()
    assert report.evidence == str(written[1]) and f"evidence: {written[1]}" in result.stdout
    assert ": verified, " in report.parts[2].summary and "-drtest-" in report.parts[2].summary
    assert not [b for b in aws_client(sandbox, "s3").list_buckets()["Buckets"] if "-drtest-" in b["Name"]]
    assert report.record == str(tmp_path / "evidence" / record_name(1)) and report.record_sha256
    (record,) = history(DirStore(tmp_path / "evidence"))
    assert record.sha256 == report.record_sha256 and record.report["parts"] == report.model_dump(mode="json")["parts"]
    verified = CliRunner().invoke(app, ["evidence", "verify", "--plan", str(plan)])
    assert verified.exit_code == 0 and f"1 records, head {record.sha256}" in verified.stdout


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup", "fresh_bucket_backups",
                         "recovery_lock_freed_after_a_failure", "app_secrets_kept")
def test_a_failing_part_fails_the_test_and_the_others_still_run(sandbox, plan_variant, tmp_path):
    """The configuration backup is left as old as it is (minutes: the previous test's), so that it breaches an
    objective of one second; the buckets are backed up now, so that they do not."""
    def configuration_rpo_of_one_second(data: dict) -> None:
        data["objectives"]["rpo"]["configuration"] = "1s"
        with_evidence(tmp_path / "evidence")(data)

    state = dr_test(plan=str(plan_variant(configuration_rpo_of_one_second)), database="devonn-postgres",
                    return_state=True)
    assert state.is_failed()
    report = state.result(raise_on_failure=False)
    assert report.exit_code == 1 and [p.name for p in report.parts] == PARTS
    statuses = {p.name: p.status for p in report.parts}
    assert statuses.pop("RPO verification") is Status.failed
    assert set(statuses.values()) == {Status.passed}, report.markdown()
    assert "1 breached" in report.parts[0].summary, report.parts[0].details
    assert state.message == "DR test: failed: RPO verification"
    assert newest(DirStore(tmp_path / "evidence")).report["status"] == "failed"  # a failed test is recorded too


def test_unknown_database_is_refused_in_one_line(sandbox_plan_path):
    result = CliRunner().invoke(app, ["dr-test", "--plan", str(sandbox_plan_path), "--database", "nope"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr


def test_the_restore_part_and_the_evidence_record_without_the_sandbox(tmp_path):
    with moto() as url:
        plan = load_plan(s3_plan(tmp_path, url, [{"name": "data", "live": "s3://live/", "backup": "s3://backup/data/"},
                                                 {"name": "none", "live": "s3://live/x/", "backup": "s3://backup/none/"}]))
        s3 = aws_client(plan, "s3")
        for bucket in ("live", "backup"):
            s3.create_bucket(Bucket=bucket)
        put_objects(s3, "live", {"a": b"1", "b/c": b"22"})
        back_up_prefix(s3, "s3://live/", "s3://backup/data/", utcnow())
        parts = restore_parts.fn(plan, utcnow())
    assert [(p.name, p.status) for p in parts] == [("restore of bucket data", Status.passed),
                                                   ("restore of bucket none", Status.error)]
    assert "2 (3 bytes) objects restored" in parts[0].summary and "verified, 2 objects, 3 bytes" in parts[0].summary
    assert "error: s3://backup/none/ holds no complete backup; run drplan s3-backup" in parts[1].summary

    report = DrTestReport(plan=plan.name, started_at=utcnow(), parts=parts)
    record_evidence(plan, report)  # no evidence: section, no chain
    assert report.record is None and len(report.parts) == 2
    chained = plan.model_copy(update={"evidence": EvidenceSettings(location=str(tmp_path / "chain"))})
    record_evidence(chained, report)
    assert report.record == str(tmp_path / "chain" / record_name(1))
    assert f"Evidence record {report.record} (SHA-256 {report.record_sha256})" in report.markdown()
    assert newest(DirStore(tmp_path / "chain")).report["status"] == "error"
    (tmp_path / "chain" / record_name(1)).write_text("{}")  # a damaged head: this report is not chained
    record_evidence(chained, report)
    assert report.parts[-1].name == "evidence history" and report.parts[-1].status is Status.error
    assert "is altered" in report.parts[-1].summary


def test_a_drill_part_keeps_its_rto_and_rpo_against_its_tier_and_data_class():
    report = DrillReport(plan="p", database="devonn-rds", kind="rds", tier=Tier.secondary, scratch="s",
                         started_at=utcnow(), rto=Measured(measured=timedelta(minutes=5), objective=timedelta(hours=4)),
                         checks=[CheckResult(name="users: rows", status=Status.passed)])
    part = drill_part(report)
    assert [(m.kind, m.subject, m.category, m.measured, m.objective, m.met) for m in part.measures] == [
        ("RTO", "devonn-rds", "secondary", timedelta(minutes=5), timedelta(hours=4), True)]  # the RPO not measured
    assert part.status is Status.failed and Part.model_validate_json(part.model_dump_json()) == part


def test_the_html_report_reads_the_chain_or_says_why_not(tmp_path, monkeypatch):
    plan = load_plan(s3_plan(tmp_path, "http://127.0.0.1:9", []))
    assert evidence_history(plan) == []
    chained = plan.model_copy(update={"evidence": EvidenceSettings(location=str(tmp_path / "chain"))})
    record = append(DirStore(tmp_path / "chain"), {"parts": []})
    assert evidence_history(chained) == [record]

    def unreadable(store):
        raise DrplanError("listing s3://evidence/: AccessDenied")
    monkeypatch.setattr("flows.dr_test.history", unreadable)
    assert evidence_history(chained) == ["listing s3://evidence/: AccessDenied"]


@pytest.mark.usefixtures("prefect_server")
def test_publish_writes_the_html_page_beside_the_markdown_and_links_it(tmp_path):
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({
        "name": "publish-test", "aws": {"region": "us-east-1", "dr_region": "us-west-2"},
        "drill": {"report_dir": "reports"}, "evidence": {"location": "chain"}}))
    plan = load_plan(tmp_path / "plan.yaml")
    report = DrTestReport(plan=plan.name, started_at=utcnow(), finished_at=utcnow(), parts=[drill_part(DrillReport(
        plan=plan.name, database="devonn-rds", kind="rds", tier=Tier.critical, scratch="s", started_at=utcnow(),
        rto=Measured(measured=timedelta(minutes=5), objective=timedelta(hours=1)),
        rpo=Measured(measured=timedelta(seconds=3), objective=timedelta(minutes=5)),
        checks=[CheckResult(name="users: rows", status=Status.passed)]))])
    append(DirStore(tmp_path / "chain"), report.model_copy(update={"started_at": utcnow() - timedelta(days=92)})
           .model_dump(mode="json"))
    record_evidence(plan, report)

    path = flow(name="publish-dr-test")(publish)(plan, report)
    page = path.with_suffix(".html")
    html = page.read_text(encoding="utf-8")
    assert path.parent == tmp_path / "reports" and "restore drill of devonn-rds" in html
    assert html.count("<svg") == 2 and html.count('class="passed"') == 4  # RTO and RPO, each in two tests
    assert Artifact.get("dr-test-html").data == f"[{page.name}]({page.as_uri()})"
    postmortem = path.with_name(f"{path.stem}-postmortem.md").read_text()
    assert postmortem.startswith(f"# Post-mortem (draft): DR test of plan {plan.name}")
    assert "| restore drill of devonn-rds | passed |" in postmortem and "- RTO of devonn-rds (critical): 5m00s" \
        in postmortem and "## Learnings and action items" in postmortem


@pytest.fixture
def app_secrets_kept(sandbox) -> Iterator[Callable[[str], str | None]]:
    """A reader of the DATABASE_URL of the service using a database; afterwards the keys a cutover added to the
    services' Secrets (the kept previous URL) are removed, so that no later roll back moves an app off its primary."""
    secrets = {}
    for service in sandbox.services:
        cluster = sandbox.cluster(service.cluster)
        api = kube_client(sandbox, cluster)
        secrets[service.database] = (api, cluster.namespace, *find_database_secret(api, cluster.namespace,
                                                                                   service.name))

    def keys(api, namespace: str, secret: str) -> set[str]:
        return set(k8s.CoreV1Api(api).read_namespaced_secret(secret, namespace).data or {})

    before = {database: keys(*where[:3]) for database, where in secrets.items()}
    yield lambda database: read_secret_value(*secrets[database])
    for database, (api, namespace, secret, _) in secrets.items():
        for added in keys(api, namespace, secret) - before[database]:
            write_secret_value(api, namespace, secret, added, None)


@pytest.mark.usefixtures("prefect_server", "recovery_lock_freed_after_a_failure", "fast_rds_polls")
@pytest.mark.parametrize("database", ["devonn-rds", "devonn-postgres"])
def test_the_failover_part_measures_the_downtime_loses_no_row_and_leaves_the_database_protected_as_planned(
        database, sandbox, sandbox_plan_path, app_secrets_kept):
    db = sandbox.database(database)
    url = app_secrets_kept(database)
    report = failover_test(str(sandbox_plan_path), sandbox, db)

    assert report.status is Status.passed, report.markdown()
    probe = report.probe
    assert 0 < probe.downtime_seconds < math.inf and probe.resumed
    assert probe.lost == [] and probe.committed > 0 and probe.dropped
    assert report.protected
    # RDS: the standby takes over behind the same endpoint; PostgreSQL: the replica takes over, then back
    assert [r.flow for r in report.runs] == ["db-failover", "reprotect"] * (1 if db.kind.value == "rds" else 2)
    part = failover_part(report)
    assert (part.name, part.status) == (f"failover of {database}", Status.passed)
    assert "; 0 rows lost of " in part.summary and part.summary.endswith("; protected")
    topology = discover(sandbox, [database]).databases[0]
    assert topology.primary.identifier == db.primary and topology.differences == [], topology.markdown()
    assert app_secrets_kept(database) == url  # the app on the plan's primary, as before
    primary = topology.primary.target(db.dbname, db_credentials(sandbox, db))
    with primary.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE %s", [PREFIX + "%"]).fetchone() == (0,)
    wait_for(lambda: utcnow() - read_newest_heartbeat(primary, db.integrity.heartbeat_table) < timedelta(seconds=5),
             30, "the sandbox's heartbeat writer to write on the primary again")  # the tests after this one need it


def test_outside_the_sandbox_the_failover_part_is_skipped_unless_included():
    plan = load_plan(PLANS_DIR / "devonn.yaml")
    parts = failover_parts(plan, str(PLANS_DIR / "devonn.yaml"), None, include=False)
    assert [(p.name, p.status) for p in parts] == [(f"failover of {db.name}", Status.skipped) for db in plan.databases]
    assert {p.summary for p in parts} == {
        "skipped: a failover causes a short outage; include it with --include-failover (include_failover)"}
    report = DrTestReport(plan=plan.name, started_at=utcnow(),
                          parts=[Part(name="RPO verification", status=Status.passed, summary="met"), *parts])
    assert report.status is Status.passed and report.exit_code == 0
    (one,) = failover_parts(plan, str(PLANS_DIR / "devonn.yaml"), plan.databases[-1].name, include=False)
    assert one.name == f"failover of {plan.databases[-1].name}"
