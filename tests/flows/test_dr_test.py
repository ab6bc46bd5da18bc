"""The DR test on the sandbox: every part reported, the evidence written and appended to the chain, a failing part
fails the whole test without stopping the others. Without the sandbox: the bucket restore part and the chain record
on a moto_server of their own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from drplan.clients import aws_client
from drplan.evidence import DirStore, history, newest, record_name
from drplan.plan import EvidenceSettings, load_plan
from drplan.results import Status
from drplan.timeutil import utcnow
from flows.dr_test import DrTestReport, dr_test, record_evidence, restore_parts
from sandbox.launchers import moto
from tasks.s3 import back_up_prefix
from tests.s3_moto import put_objects, s3_plan

PARTS = ["RPO verification", "backup of bucket data", "restore of bucket data", "DR readiness of us-west-2",
         "cross-region rehearsal", "restore drill of devonn-postgres"]


def with_evidence(directory: Path) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data["evidence"] = {"location": str(directory)}
    return change


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup")
def test_every_part_passes_and_the_evidence_is_written(sandbox, plan_variant, tmp_path):
    reports = sandbox.resolve_path(sandbox.drill.report_dir)
    before = set(reports.glob("dr-test-*")) if reports.exists() else set()
    plan = plan_variant(with_evidence(tmp_path / "evidence"))
    result = CliRunner().invoke(app, ["dr-test", "--plan", str(plan), "--database", "devonn-postgres"])
    assert result.exit_code == 0, result.output
    written = sorted(set(reports.glob("dr-test-*")) - before)
    assert [p.suffix for p in written] == [".json", ".md"]
    report = DrTestReport.model_validate_json(written[0].read_text())
    assert [p.name for p in report.parts] == PARTS
    assert {p.status for p in report.parts} == {Status.passed}, report.markdown()
    drill = report.parts[-1].summary
    assert drill.startswith("RTO ") and "(objective 1h00m, met)" in drill and "checks passed" in drill
    assert written[1].read_text().strip() == report.markdown()
    assert report.evidence == str(written[1]) and f"evidence: {written[1]}" in result.stdout
    assert ": verified, " in report.parts[2].summary and "-drtest-" in report.parts[2].summary
    assert not [b for b in aws_client(sandbox, "s3").list_buckets()["Buckets"] if "-drtest-" in b["Name"]]
    assert report.record == str(tmp_path / "evidence" / record_name(1)) and report.record_sha256
    (record,) = history(DirStore(tmp_path / "evidence"))
    assert record.sha256 == report.record_sha256 and record.report["parts"] == report.model_dump(mode="json")["parts"]
    verified = CliRunner().invoke(app, ["evidence", "verify", "--plan", str(plan)])
    assert verified.exit_code == 0 and f"1 records, head {record.sha256}" in verified.stdout


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup")
def test_a_failing_part_fails_the_test_and_the_others_still_run(sandbox, plan_variant, tmp_path):
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
    assert "1 breached" in report.parts[0].summary
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
