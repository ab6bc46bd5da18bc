"""Account or role compromise: a principal's access revoked (`drplan revoke-access --principal ARN`), or given
back (`--restore`).

ARN validated and the principal found -> dry run lists the steps -> approval -> its active access keys deactivated
and recorded on it (tag drplan:revoked-keys) -> drplan's inline deny-all policy attached -> validation: no key
active, the deny policy in place. `--restore` undoes exactly what the recorded revocation did (the recorded keys
reactivated, the policy removed, the record dropped). A validation that fails undoes the run's own changes.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow

from drplan.clients import aws_client, check_aws_access
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, load_plan
from drplan.results import CheckResult, Status
from flows.shared.gates import request_approval
from flows.shared.report import RecoveryReport, finished, published
from tasks.health import ServiceValidation
from tasks.iam import DENY_POLICY, REVOKED_TAG, Principal


class AccessReport(RecoveryReport):
    kind: str = "principal"

    def markdown(self) -> str:
        lines = [f"# {self.flow} of {self.subject}: **{self.outcome}**"]
        if self.error:
            lines.append(f"\n- **error**: {self.error}")
        return "\n".join([*lines, "", "## Timeline", self.timeline(), self.validation_table()])


def principal(plan: str, arn: str) -> Principal:
    """The principal named by `arn`, found in IAM; refused in one line otherwise (nothing is changed)."""
    dr_plan = load_plan(plan)
    check_aws_access(dr_plan)
    return Principal(aws_client(dr_plan, "iam"), arn)


@flow(name="revoke-access")
def revoke_access(plan: str = DEFAULT_PLAN, principal_arn: str = "", restore: bool = False, dry_run: bool = False,
                  approve: bool = False) -> AccessReport:
    """Deactivate the principal's access keys and deny it everything (recorded); with `restore`, undo that."""
    dr_plan = load_plan(plan)
    who = principal(plan, principal_arn)
    report = AccessReport(flow="revoke-access", plan=dr_plan.name, subject=who.arn, dry_run=dry_run)
    with published(report, f"revoke-access-{who.kind}-{who.name}", dr_plan):
        (give_back if restore else take_away)(who, report, approve, dr_plan.approval.timeout)
    return finished(report, f"{'restoring' if restore else 'revoking'} the access of {who.arn}")


Change = tuple[str, str, Callable[[], None], Callable[[], None]]
"""(action, resource, do, undo)."""


def take_away(who: Principal, report: AccessReport, approve: bool, timeout) -> None:
    keys = who.active_keys()
    recorded = sorted(set(keys) | set(who.revoked_keys() or []))
    changes: list[Change] = [
        ("recorded", f"tag {REVOKED_TAG}", lambda: who.record_revoked(recorded), lambda: who.record_revoked(None)),
        *[("deactivated", f"access key {key}", lambda k=key: who.set_key(k, "Inactive"),
           lambda k=key: who.set_key(k, "Active")) for key in keys],
    ]
    if not who.denied():
        changes.append(("attached", f"policy {DENY_POLICY}", lambda: who.deny_all(True), lambda: who.deny_all(False)))
    apply(who, report, changes, approve, timeout, "revoked", lambda: [
        check("no access key active", "none", lambda: (not who.active_keys(), " ".join(who.active_keys()) or "none")),
        check(f"policy {DENY_POLICY}", "attached", lambda: (who.denied(), "attached" if who.denied() else "missing")),
    ])


def give_back(who: Principal, report: AccessReport, approve: bool, timeout) -> None:
    keys = who.revoked_keys()
    if keys is None:
        raise DrplanError(f"no revocation of {who.arn} is recorded (tag {REVOKED_TAG}); nothing to restore")
    changes: list[Change] = [
        *[("reactivated", f"access key {key}", lambda k=key: who.set_key(k, "Active"),
           lambda k=key: who.set_key(k, "Inactive")) for key in keys],
        ("detached", f"policy {DENY_POLICY}", lambda: who.deny_all(False), lambda: who.deny_all(True)),
        ("dropped", f"tag {REVOKED_TAG}", lambda: who.record_revoked(None), lambda: who.record_revoked(keys)),
    ]
    apply(who, report, changes, approve, timeout, "restored", lambda: [
        check("recorded keys active", " ".join(keys) or "none",
              lambda: (set(keys) <= set(who.active_keys()), " ".join(who.active_keys()) or "none")),
        check(f"policy {DENY_POLICY}", "removed",
              lambda: (not who.denied(), "attached" if who.denied() else "removed")),
    ])


def check(name: str, expected: str, probe: Callable[[], tuple[bool, str]]) -> CheckResult:
    passed, observed = probe()
    return CheckResult(name=name, status=Status.passed if passed else Status.failed, observed=observed,
                       expectation=expected)


def apply(who: Principal, report: AccessReport, changes: list[Change], approve: bool, timeout, done: str,
          checks: Callable[[], list[CheckResult]]) -> None:
    """Dry run, approval, the changes (each an event), validation; the done changes undone when it fails."""
    if report.dry_run:
        for action, resource, _, _ in changes:
            report.record(f"would be {action}", resource, who.arn)
        report.outcome = "planned (dry run)"
        return
    summary = "\n".join([f"## Approve: access of {who.arn} {done}?", "",
                         *(f"- {resource}: {action}" for action, resource, _, _ in changes)])
    if not request_approval(report, f"revoke-access-approval-{who.kind}-{who.name}", summary, approve,
                            timeout).approve:
        report.outcome = "refused: nothing changed"
        return
    applied: list[Change] = []
    try:
        for change in changes:
            change[2]()
            applied.append(change)
            report.record(change[0], change[1], who.arn, mutating=True)
        report.validation = ServiceValidation(service=who.arn, checks=checks())
    finally:
        if report.validation is None or not report.validation.passed:
            for action, resource, _, undo in reversed(applied):
                undo()
                report.record("rolled back", resource, f"undid: {action}", mutating=True)
            if report.validation is not None:
                report.outcome = "validation failed: rolled back"
    if report.validation.passed:
        report.outcome = f"access {done}"
