"""Deployment failure: return a service's Deployment to its newest known-good revision (or revision N).

validate (plan, service, its Deployment, the revision in its known-good history, tasks/revisions.py) -> dry run:
the changes (image, pod template, ConfigMap keys) and nothing else -> approval gate -> the ConfigMaps and the pod
template of the revision applied (a rollout restart when only ConfigMaps change) -> wait for the rollout ->
recovery validation -> passed: the revision recorded as the newest known-good; failed (or the rollout does not
finish): the previous revision applied again. A rerun finds the service at the revision and only validates; after
a killed run it undoes to the revision that run saved (drplan.io/undo) when validation fails.
"""

from __future__ import annotations

from prefect import flow

from drplan.clients import kube_client
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Cluster, Plan, Service, load_plan
from flows.shared.report import finished, published
from flows.shared.service_change import ServiceChangeReport, change_and_validate, service_in_cluster
from tasks.revisions import KnownGood, known_good, pick_known_good


def resolve(plan: str, service: str, to_revision: int | None) -> tuple[Plan, Service, Cluster, KnownGood]:
    """Every user-typed parameter, before the first side effect; refused in one line."""
    if to_revision is not None and to_revision < 1:
        raise DrplanError(f"--to-revision {to_revision}: revisions count from 1")
    dr_plan = load_plan(plan)
    svc, cluster = service_in_cluster(dr_plan, service)
    history = known_good(kube_client(dr_plan, cluster), cluster.namespace, svc.name)
    return dr_plan, svc, cluster, pick_known_good(history, svc.name, to_revision)


@flow(name="rollback")
def rollback(
    plan: str = DEFAULT_PLAN,
    service: str = "",
    to_revision: int | None = None,
    dry_run: bool = False,
    approve: bool = False,
) -> ServiceChangeReport:
    """Return the service's Deployment to its newest known-good revision (or `to_revision`) and validate it."""
    dr_plan, svc, cluster, target = resolve(plan, service, to_revision)
    report = ServiceChangeReport(flow="rollback", plan=dr_plan.name, subject=svc.name, dry_run=dry_run,
                                 target=target.describe())
    with published(report, f"rollback-{svc.name}", dr_plan):
        change_and_validate(dr_plan, report, svc, cluster, target, (
            f"## Approve the rollback of {svc.name}?\n\nDeployment **{svc.name}** in {cluster.name} returns to "
            f"known-good {target.describe()}: its ConfigMaps and pod template as then, a rollout, recovery "
            "validation. Validation failure applies the current revision again."), approve)
    return finished(report, f"rollback of {svc.name}")
