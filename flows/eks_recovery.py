"""EKS cluster recovery: the runbook's "EKS Cluster Recovery".

assess (EKS status, node groups and Ready nodes, deployments available, pods not running) -> scale node groups
and wait until their nodes are Ready -> apply the cluster's manifests with its per-environment overrides ->
scale deployments -> wait for every rollout -> verify (assess again). Each step is rerun-safe: a node group at
its size, a manifest that matches, a deployment at its scale are left alone. Dry run reports and changes nothing.
Without manifests (capacity only, e.g. a pilot-light DR cluster) listed deployments that were never deployed there
are reported and left alone.
"""

from __future__ import annotations

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from drplan.clients import aws_client, kube_client
from drplan.errors import DrplanError
from drplan.plan import DEFAULT_PLAN, Cluster, Plan, load_plan
from flows.shared.report import RecoveryReport, finished, published
from tasks.eks import (
    NodegroupState,
    cluster_status,
    nodegroup_state,
    pods_not_running,
    scale_deployment,
    scale_nodegroup_task,
)
from tasks.k8s import availability, deployment_exists, wait_deployment_available
from tasks.manifests import Applied, apply_manifest, render_manifests


class ClusterAssessment(BaseModel):
    cluster: str
    status: str
    nodegroups: list[NodegroupState] = Field(default_factory=list)
    deployments: dict[str, str] = Field(default_factory=dict)
    """name -> "available" or what is missing."""
    pods_not_running: list[str] = Field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return (self.status == "ACTIVE" and all(g.ready_nodes >= g.desired for g in self.nodegroups)
                and all(v == "available" for v in self.deployments.values()) and not self.pods_not_running)

    def markdown(self) -> str:
        groups = ", ".join(f"{g.name} {g.ready_nodes}/{g.desired} Ready ({g.status})" for g in self.nodegroups)
        deployments = ", ".join(f"{k}: {v}" for k, v in self.deployments.items()) or "none"
        return (f"- EKS {self.cluster}: {self.status}; node groups: {groups or 'none'}\n- deployments: {deployments}"
                f"\n- pods not running: {', '.join(self.pods_not_running) or 'none'}")


class EksReport(RecoveryReport):
    kind: str = "cluster"
    before: ClusterAssessment | None = None
    after: ClusterAssessment | None = None
    applied: list[Applied] = Field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"# EKS recovery of {self.subject}: **{self.outcome}**", ""]
        if self.error:
            lines.append(f"- **error**: {self.error}")
        for title, state in (("Before", self.before), ("After", self.after)):
            if state:
                lines += [f"## {title}", state.markdown(), ""]
        return "\n".join([*lines, "## Timeline", self.timeline()])


@task(cache_policy=NO_CACHE)
def assess_cluster(plan: Plan, cluster: Cluster, deployments: list[str]) -> ClusterAssessment:
    """EKS status, node groups with their Ready nodes, the deployments' availability, pods not running."""
    eks, api = aws_client(plan, "eks", plan.region_of(cluster)), kube_client(plan, cluster)
    assessment = ClusterAssessment(cluster=cluster.name, status=cluster_status(eks, cluster.name))
    for name in cluster.nodegroups:
        assessment.nodegroups.append(nodegroup_state(eks, api, cluster.name, name))
    apps = k8s.AppsV1Api(api)
    for name in deployments:
        try:
            obj = apps.read_namespaced_deployment(name, cluster.namespace)
        except ApiException as exc:
            assessment.deployments[name] = "missing" if exc.status == 404 else f"API {exc.status}"
            continue
        done, state = availability(obj)
        assessment.deployments[name] = "available" if done else state
    assessment.pods_not_running = pods_not_running(api, cluster.namespace)
    return assessment


def deployments_of(cluster: Cluster, scale: dict[str, int], objects: list[dict]) -> list[str]:
    names = [*cluster.deployments, *scale, *(o["metadata"]["name"] for o in objects if o["kind"] == "Deployment")]
    return list(dict.fromkeys(names))


@flow(name="eks-recovery")
def eks_recovery(
    plan: str = DEFAULT_PLAN,
    cluster: str = "",
    nodes: dict[str, int] | None = None,
    scale: dict[str, int] | None = None,
    apply_manifests: bool = True,
    dry_run: bool = False,
) -> EksReport:
    """Bring a cluster back to serving: node capacity, manifests, scale, rollouts; report what changed."""
    dr_plan = load_plan(plan)
    if not cluster:
        raise DrplanError(f"name the cluster: cluster=NAME, one of: {', '.join(c.name for c in dr_plan.clusters)}")
    target = dr_plan.cluster(cluster)
    nodes, scale = nodes or {}, scale or {}
    unknown = sorted(set(nodes) - set(target.nodegroups))
    if unknown:
        raise DrplanError(f"node group {', '.join(unknown)} is not in clusters[{cluster}].nodegroups; "
                          f"use one of: {', '.join(target.nodegroups) or '(none)'}")
    if any(n < 0 for n in [*nodes.values(), *scale.values()]):
        raise DrplanError("node and replica counts must be 0 or more")
    objects = []
    if apply_manifests:
        if not target.manifests:
            raise DrplanError(f"cluster {cluster} has no manifests folder; set clusters[].manifests or "
                              "apply_manifests=false")
        objects = render_manifests(dr_plan, target)
    report = EksReport(flow="eks-recovery", plan=dr_plan.name, subject=cluster, dry_run=dry_run)
    with published(report, f"eks-recovery-{cluster}", dr_plan):
        recover_cluster(dr_plan, target, nodes, scale, objects, report)
    return finished(report, f"EKS recovery of {cluster}")


def recover_cluster(plan: Plan, cluster: Cluster, nodes: dict[str, int], scale: dict[str, int], objects: list[dict],
                    report: EksReport) -> None:
    deployments = deployments_of(cluster, scale, objects)
    report.before = assess_cluster(plan, cluster, deployments)
    report.record("assessed", cluster.name, "healthy" if report.before.healthy else "not healthy")
    eks, api = aws_client(plan, "eks", plan.region_of(cluster)), kube_client(plan, cluster)
    for group, desired in nodes.items():
        current = next(g for g in report.before.nodegroups if g.name == group)
        if report.dry_run:
            report.record("would scale", f"node group {group}", f"{current.desired} -> {desired} nodes")
            continue
        before, after = scale_nodegroup_task(eks, api, cluster.name, group, desired)
        report.record("scaled" if before != after else "already scaled", f"node group {group}",
                      f"{after} nodes Ready", before=str(before), after=str(after), mutating=before != after)
    for obj in objects:
        applied = apply_manifest(api, cluster.namespace, obj, dry_run=report.dry_run)
        report.applied.append(applied)
        report.record(applied.action, f"{applied.kind} {applied.name}", mutating=applied.action in ("created",
                                                                                                   "updated"))
    for name, replicas in scale.items():
        if report.dry_run:
            report.record("would scale", f"deployment {name}", f"to {replicas} replicas")
            continue
        before, after = scale_deployment(api, cluster.namespace, name, replicas)
        report.record("scaled" if before != after else "already scaled", f"deployment {name}",
                      before=str(before), after=str(after), mutating=before != after)
    if report.dry_run:
        report.outcome = "planned (dry run)"
        return
    if not objects:  # capacity only (a pilot-light cluster): what was never deployed here is not this run's job
        absent = [n for n in deployments if n not in scale and not deployment_exists(api, cluster.namespace, n)]
        if absent:
            report.record("left alone", ", ".join(absent), "not deployed in this cluster; apply the manifests to "
                          "deploy them")
            deployments = [n for n in deployments if n not in absent]
    for name in deployments:
        wait_deployment_available(api, cluster.namespace, name, timeout=600)
    report.after = assess_cluster(plan, cluster, deployments)
    report.record("verified", cluster.name, "healthy" if report.after.healthy else "not healthy")
    report.outcome = "recovered" if report.after.healthy else "failed"
    if not report.after.healthy:
        report.error = f"cluster {cluster.name} not healthy after recovery"
