"""The post-mortem draft: impact window from the request (or an earlier alarm) to the validated end, RTO against the
subject's tier, data at risk in the runbook's words, what was verified, who decided, and empty sections for people."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from drplan.plan import load_plan
from drplan.results import CheckResult, Status
from drplan.timeutil import utcnow
from flows.pitr_recovery import PitrReport
from flows.shared.postmortem import TODO, dr_test_draft, draft
from flows.shared.report import Step
from tasks.health import ServiceValidation

PLAN = load_plan(str(Path(__file__).resolve().parents[3] / "plans" / "sandbox.yaml"))


def recovery(minutes: float, passed: bool = True, alarm_minutes_before: float | None = None) -> PitrReport:
    """A PITR recovery of devonn-rds (tier secondary, RTO 4 h) that took `minutes` after it was requested."""
    requested = utcnow() - timedelta(hours=6)
    at = requested + timedelta(minutes=1)
    return PitrReport(
        flow="pitr-recovery", plan=PLAN.name, subject="devonn-rds", dry_run=False, promote=True,
        outcome="recovered" if passed else "validation failed: rolled back", requested_at=requested,
        first_alarm=requested - timedelta(minutes=alarm_minutes_before) if alarm_minutes_before else None,
        finished_at=requested + timedelta(minutes=minutes), target_time=requested - timedelta(minutes=30),
        steps=[Step(at=at, action="restored", resource="devonn-rds-recovery-1"),
               Step(at=at + timedelta(minutes=2), action="approval", resource="devonn-rds",
                    detail="approve=True (by alice at the terminal) orders deleted after T"),
               Step(at=at + timedelta(minutes=3), action="cut over", resource="deployment devonn-api",
                    before="postgresql://admin:***@old:5432/devonn", after="postgresql://admin:***@new:5432/devonn")],
        validation=ServiceValidation(service="devonn-api", checks=[
            CheckResult(name="health", status=Status.passed if passed else Status.failed, observed="200")]),
    )


def test_a_validated_recovery_within_its_tier_is_met():
    report = recovery(minutes=50)
    text = draft(PLAN, report)
    assert text.startswith("# Post-mortem (draft): pitr-recovery of devonn-rds")
    assert "- RTO 50m00s (objective 4h00m, tier secondary, met), from the first alarm or request" in text
    started = f"{report.steps[2].at:%Y-%m-%d %H:%M:%SZ}"  # the first change, not the first step
    assert f"| - | {report.requested_at:%Y-%m-%d %H:%M:%SZ} | {started} | {report.finished_at:%Y-%m-%d %H:%M:%SZ} |" \
        in text
    assert "what was written after it is not in the recovery copy" in text
    assert "- " + f"{report.steps[1].at:%H:%M:%SZ} approve=True (by alice at the terminal)" in text
    assert "| health | passed | 200 |" in text
    assert text.count(TODO) == 2 and "## Root cause" in text and "## Action items" in text


def test_the_window_starts_at_the_first_alarm_and_a_failed_validation_is_not_restored():
    late = draft(PLAN, recovery(minutes=200, alarm_minutes_before=60))
    assert "RTO 4h20m (objective 4h00m, tier secondary, NOT met), from the first alarm or request" in late
    failed = draft(PLAN, recovery(minutes=20, passed=False))
    assert "not restored by this run" in failed and "| health | failed | 200 |" in failed


def test_a_dr_test_draft_lists_its_parts_measures_and_what_did_not_pass():
    from drplan.dr_test_part import Measure, Part

    late = Measure(kind="RTO", subject="devonn-rds", category="secondary", measured=timedelta(hours=5),
                   objective=timedelta(hours=4))
    parts = [Part(name="restore drill of devonn-rds", status=Status.failed, summary="RTO 5h", measures=[late]),
             Part(name="failover of devonn-rds", status=Status.skipped, summary="skipped: not included")]
    text = dr_test_draft("devonn", utcnow(), "failed", parts, "reports/dr-test-x.md")
    assert "| restore drill of devonn-rds | failed | RTO 5h |" in text
    assert "| failover of devonn-rds | skipped |" in text
    assert "- restore drill of devonn-rds: failed: RTO 5h" in text
    assert "- RTO of devonn-rds (secondary, restore drill of devonn-rds): 5h00m (objective 4h00m, NOT met)" in text
    assert "failover of devonn-rds: skipped" not in text.split("## What did not pass")[1]
    assert text.count(TODO) == 2
