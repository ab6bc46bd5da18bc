"""The post-mortem draft every recovery run leaves beside its report: what drplan knows (impact window, timeline,
RTO against the objective, data at risk, what was verified, the decisions and who took them), and the sections only
people can write (root cause, action items) left empty."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from drplan.dr_test_part import Part
from drplan.plan import Plan
from drplan.results import Status, markdown_table
from drplan.timeutil import format_duration

if TYPE_CHECKING:  # the report module writes the draft
    from flows.shared.report import RecoveryReport

TODO = "_To be written by the incident owner._"


def rto_objective(plan: Plan, report: RecoveryReport) -> tuple[timedelta, str]:
    """The objective the run is measured against: its database's tier, else the most critical tier it serves."""
    if report.kind == "database" and report.subject in {db.name for db in plan.databases}:
        tier = plan.database(report.subject).tier
        return plan.objectives.rto_for(tier), f"tier {tier.value}"
    tiers = {s.tier for s in plan.services} or {db.tier for db in plan.databases}
    if not tiers:
        return plan.objectives.rto.critical, "tier critical"
    tier = min(tiers, key=plan.objectives.rto_for)
    return plan.objectives.rto_for(tier), f"tier {tier.value}, the most critical served"


def rto_line(plan: Plan, report: RecoveryReport) -> str:
    """`RTO <measured> (objective, tier, met or NOT met)`, from the first alarm or the request to the validated end."""
    objective, why = rto_objective(plan, report)
    if report.restored_at is None:
        return f"RTO: not restored by this run (objective {format_duration(objective)}, {why})"
    measured = report.restored_at - impact_start(report)
    verdict = "met" if measured <= objective else "NOT met"
    return f"RTO {format_duration(measured)} (objective {format_duration(objective)}, {why}, {verdict})"


def impact_start(report: RecoveryReport) -> datetime:
    """The first alarm, or the request when no alarm is known (or the alarm came later)."""
    return min(t for t in (report.first_alarm, report.requested_at) if t is not None)


def _at(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%SZ}" if moment else "-"


def draft(plan: Plan, report: RecoveryReport) -> str:
    """The post-mortem draft of a finished (or failed) recovery run, in markdown."""
    began = impact_start(report)
    changes = [s for s in report.steps if s.before is not None or s.after is not None]
    started = changes[0].at if changes else None
    checks = report.validation.checks if report.validation else []
    verified = markdown_table(["check", "status", "observed"], [[c.name, c.status.value, c.observed]
                                                                 for c in checks]) if checks else "nothing validated"
    decisions = [s for s in report.steps if s.action == "approval"]
    return "\n".join([
        f"# Post-mortem (draft): {report.flow} of {report.subject}, {began:%Y-%m-%d}",
        "",
        f"Written by drplan from the run's report ({report.written_to or 'not written'}). Outcome: "
        f"**{report.outcome}**" + (f"; error: {report.error}" if report.error else "") + ".",
        "",
        "## Impact window",
        "",
        markdown_table(["first alarm", "recovery requested", "recovery started (first change)", "service restored"],
                       [[_at(report.first_alarm), _at(report.requested_at), _at(started), _at(report.restored_at)]]),
        "",
        "## Measured against the objectives",
        "",
        f"- {rto_line(plan, report)}, from the first alarm or request to the service restored",
        f"- data at risk: {report.data_at_risk()}",
        "",
        "## Timeline",
        "",
        report.timeline(),
        "",
        "## What was verified",
        "",
        verified,
        "",
        "## Decisions",
        "",
        "\n".join(f"- {s.at:%H:%M:%SZ} {s.detail}" for s in decisions) or "- none asked (no destructive step "
                                                                             "reached)",
        "",
        "## Root cause",
        "",
        TODO,
        "",
        "## Action items",
        "",
        TODO,
    ])


def dr_test_draft(plan_name: str, started_at: datetime, outcome: str, parts: list[Part], written_to: str) -> str:
    """The post-mortem (learnings) draft of a DR test: its parts as the timeline, what they measured against the
    objectives, what did not pass, and the sections the team writes."""
    measures = [(p, m) for p in parts for m in p.measures]
    missed = [f"- {m.kind} of {m.subject} ({m.category}, {p.name}): {m}" for p, m in measures if not m.met]
    not_passed = [f"- {p.name}: {p.status.value}: {p.summary}" for p in parts
                  if p.status not in (Status.passed, Status.skipped)]
    return "\n".join([
        f"# Post-mortem (draft): DR test of plan {plan_name}, {started_at:%Y-%m-%d}",
        "",
        f"Written by drplan from the DR test's report ({written_to}). Outcome: **{outcome}**. A test changes nothing "
        "that serves, except the outage its failover part causes on purpose (its downtime is in its summary).",
        "",
        "## Timeline",
        "",
        markdown_table(["part", "status", "summary"], [[p.name, p.status.value, p.summary] for p in parts]),
        "",
        "## Measured against the objectives",
        "",
        "\n".join(f"- {m.kind} of {m.subject} ({m.category}): {m}" for _, m in measures) or "- nothing measured",
        "",
        "## What did not pass",
        "",
        "\n".join(not_passed + missed) or "- nothing: every part passed and every objective was met",
        "",
        "## Root cause of what did not pass",
        "",
        TODO,
        "",
        "## Learnings and action items",
        "",
        TODO,
    ])
