"""Returning a service to a revision (rollback, config-restore): the service looked up, its changes listed, the
approval gate, the change applied, the rollout waited for, recovery validation, and the change undone when
validation fails; a passed validation records what runs as the service's newest known-good revision."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from drplan.clients import kube_client
from drplan.errors import DrplanError, first_line
from drplan.plan import Cluster, Plan, Service
from drplan.timeutil import utcnow
from flows.shared.gates import request_approval, service_lock
from flows.shared.report import RecoveryReport
from tasks.health import validate_service_task
from tasks.k8s import DeploymentNotAvailable, wait_deployment_available
from tasks.revisions import (
    PendingUndo,
    Revision,
    apply_revision,
    live_revision,
    pending_undo,
    record_known_good,
    set_pending_undo,
)

ROLLOUT_TIMEOUT = 300.0
"""Seconds a rollout may take before it counts as failed (and the change is undone)."""


class ServiceChangeReport(RecoveryReport):
    kind: str = "service"
    target: str = ""
    """The revision the run returns the service to, in words."""
    changes: list[str] = Field(default_factory=list)
    """What differs between the live revision and the target (names and keys, never values)."""
    notes: list[str] = Field(default_factory=list)
    """What differs and is not the runbook's to change (Secrets)."""

    def markdown(self) -> str:
        lines = [f"# {self.flow} of {self.subject}: **{self.outcome}**", "", f"- target: {self.target or '-'}",
                 f"- changes: {'; '.join(self.changes) or 'none'}"]
        lines += [f"- note: {note}" for note in self.notes]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        return "\n".join([*lines, "", self.timeline(), self.validation_table()])


def service_in_cluster(plan: Plan, name: str) -> tuple[Service, Cluster]:
    """The plan's service `name` and the cluster it runs in; refused in one line otherwise."""
    service = next((s for s in plan.services if s.name == name), None)
    if service is None:
        raise DrplanError(f"unknown service {name!r}; the plan defines: "
                          f"{', '.join(s.name for s in plan.services) or '(none)'}")
    if not service.cluster:
        raise DrplanError(f"service {name} runs in no cluster of the plan; set services[].cluster")
    return service, plan.cluster(service.cluster)


def change_and_validate(plan: Plan, report: ServiceChangeReport, service: Service, cluster: Cluster,
                        target: Revision, summary: str, approve: bool, timeout: float = ROLLOUT_TIMEOUT) -> None:
    """Return the service to `target` (dry run: only list the changes), validate, undo on failure. One change of a
    service at a time (its lock); the undo is kept on the Deployment while the change runs, so the rerun of a
    killed run still undoes to where the service was before it."""
    api = kube_client(plan, cluster)
    where = f"deployment {service.name}"
    if report.dry_run:
        report.changes = live_revision(api, cluster.namespace, service.name).differences(target)
        for change in report.changes or ["nothing: it runs the target already"]:
            report.record("would change", where, change)
        if report.changes:
            report.record("would ask approval", service.name)
            report.record("would wait and validate", where, "roll back on failure")
        report.outcome = "planned (dry run)"
        return
    with service_lock(service.name):  # what runs is read under the lock: another change may just have finished
        before = live_revision(api, cluster.namespace, service.name)
        report.changes = before.differences(target)
        undo = pending_undo(api, cluster.namespace, service.name)
        if undo:
            report.record("found", where, f"an unfinished {undo.by} of {undo.started_at:%Y-%m-%d %H:%M:%SZ} (killed?): "
                          f"its undo to {', '.join(undo.revision.images)} kept")
        _change(plan, report, api, service, cluster, undo or PendingUndo(revision=before, by=report.flow,
                                                                         started_at=utcnow()),
                target, summary, approve, timeout, where)


def _change(plan: Plan, report: ServiceChangeReport, api: Any, service: Service, cluster: Cluster, undo: PendingUndo,
            target: Revision, summary: str, approve: bool, timeout: float, where: str) -> None:
    before = undo.revision
    if report.changes:
        if not request_approval(report, f"{report.flow}-approval-{service.name}".lower(),
                                f"{summary}\n\nChanges: {'; '.join(report.changes)}.", approve,
                                plan.approval.timeout).approve:
            report.outcome = "refused: nothing changed"
            return
        set_pending_undo(api, cluster.namespace, service.name, undo)
        changed = apply_revision(api, cluster.namespace, service.name, target)
        report.record("changed", where, ", ".join(changed) or "already at the target", before=_images(before),
                      after=_images(target), mutating=bool(changed))
    else:
        report.record("found", where, "it runs the target already: nothing to change")
    problem = _rollout(api, cluster, service, timeout)
    report.validation = validate_service_task(plan, service) if problem is None else None
    if problem is None and report.validation.passed:
        good, new = record_known_good(api, cluster.namespace, service.name, f"validated by {report.flow}")
        report.record("recorded known-good" if new else "known-good already", where, good.describe(), mutating=new)
        set_pending_undo(api, cluster.namespace, service.name, None)
        report.outcome = "recovered"
        return
    failed = problem or ", ".join(c.name for c in report.validation.checks if not c.passed)
    if not before.differences(target):
        report.record("validation failed", where, f"{failed}; nothing of this run's to undo")
        set_pending_undo(api, cluster.namespace, service.name, None)
        report.outcome = "validation failed"
        return
    undone = apply_revision(api, cluster.namespace, service.name, before)
    report.record("rolled back", where, f"validation failed ({failed}): {', '.join(undone) or 'nothing to undo'}",
                  before=_images(target), after=_images(before), mutating=bool(undone))
    undo_problem = _rollout(api, cluster, service, timeout)
    report.outcome = "validation failed: rolled back"
    if undo_problem:  # the service is neither at the target nor back where it was: an error for a human
        report.error = f"after the roll-back: {undo_problem}"
    else:
        set_pending_undo(api, cluster.namespace, service.name, None)


def _rollout(api: Any, cluster: Cluster, service: Service, timeout: float) -> str | None:
    """None once the rollout is done, else why not."""
    try:
        wait_deployment_available(api, cluster.namespace, service.name, timeout)
    except DeploymentNotAvailable as exc:
        return first_line(exc)
    return None


def _images(revision: Revision) -> str:
    return ", ".join(revision.images)
