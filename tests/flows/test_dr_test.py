"""The DR test on the sandbox: every part reported, the evidence written, a failing part fails the whole test
without stopping the others."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app
from drplan.results import Status
from flows.dr_test import DrTestReport, dr_test

PARTS = ["RPO verification", "backup of bucket data", "DR readiness of us-west-2", "restore drill of devonn-postgres"]


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup")
def test_every_part_passes_and_the_evidence_is_written(sandbox, sandbox_plan_path):
    reports = sandbox.resolve_path(sandbox.drill.report_dir)
    before = set(reports.glob("dr-test-*")) if reports.exists() else set()
    result = CliRunner().invoke(app, ["dr-test", "--plan", str(sandbox_plan_path), "--database", "devonn-postgres"])
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


@pytest.mark.usefixtures("prefect_server", "fresh_base_backup")
def test_a_failing_part_fails_the_test_and_the_others_still_run(sandbox, plan_variant):
    def configuration_rpo_of_one_second(data: dict) -> None:
        data["objectives"]["rpo"]["configuration"] = "1s"

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


def test_unknown_database_is_refused_in_one_line(sandbox_plan_path):
    result = CliRunner().invoke(app, ["dr-test", "--plan", str(sandbox_plan_path), "--database", "nope"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr
