"""EKS recovery on the sandbox's primary cluster (moto EKS, the Kubernetes emulator whose nodes follow the node
groups, manifests from kubernetes/manifests/): a lost deployment comes back, the node group scales until its
nodes are Ready, a rerun changes nothing, a dry run changes nothing; an unknown node group is refused before
anything runs."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s

from drplan.clients import aws_client, kube_client
from drplan.errors import DrplanError
from flows.eks_recovery import eks_recovery
from tasks.eks import ready_nodes
from tests.helpers import stack_snapshot

pytestmark = pytest.mark.usefixtures("prefect_server")
CLUSTER = "devonn-eks-sandbox"


def test_lost_deployment_and_capacity_come_back_and_a_rerun_changes_nothing(sandbox, sandbox_plan_path):
    cluster = sandbox.cluster(CLUSTER)
    api = kube_client(sandbox, cluster)
    apps = k8s.AppsV1Api(api)
    eks = aws_client(sandbox, "eks")
    apps.delete_namespaced_deployment("devonn-worker", cluster.namespace)  # the incident
    before = stack_snapshot(sandbox, "devonn-postgres")
    planned = eks_recovery(plan=str(sandbox_plan_path), cluster=CLUSTER, nodes={"dev_nodes": 4},
                           scale={"devonn-worker": 4}, dry_run=True)
    assert planned.outcome == "planned (dry run)"
    assert stack_snapshot(sandbox, "devonn-postgres") == before
    try:
        report = eks_recovery(plan=str(sandbox_plan_path), cluster=CLUSTER, nodes={"dev_nodes": 4},
                              scale={"devonn-worker": 4})
        assert report.outcome == "recovered", report.markdown()
        assert report.before.deployments["devonn-worker"] == "missing" and not report.before.healthy
        assert {(a.name, a.action) for a in report.applied} == {
            ("devonn-api-config", "unchanged"), ("devonn-api", "unchanged"), ("devonn-worker", "created")}
        steps = {(s.action, s.resource): (s.before, s.after) for s in report.steps}
        assert steps[("scaled", "node group dev_nodes")] == ("3", "4")
        assert steps[("scaled", "deployment devonn-worker")] == ("2", "4")
        assert ready_nodes(api, "dev_nodes") == 4
        assert apps.read_namespaced_deployment("devonn-worker", cluster.namespace).status.available_replicas == 4
        assert report.after.healthy

        again = eks_recovery(plan=str(sandbox_plan_path), cluster=CLUSTER, nodes={"dev_nodes": 4},
                             scale={"devonn-worker": 4})
        assert {s.action for s in again.steps} == {"assessed", "already scaled", "unchanged", "verified"}
    finally:
        eks_recovery(plan=str(sandbox_plan_path), cluster=CLUSTER, nodes={"dev_nodes": 3},
                     scale={"devonn-worker": 2})
    assert eks.describe_nodegroup(clusterName=CLUSTER, nodegroupName="dev_nodes")["nodegroup"][
        "scalingConfig"]["desiredSize"] == 3


def test_unknown_node_group_is_refused_before_anything_runs(sandbox, sandbox_plan_path):
    with pytest.raises(DrplanError, match="node group gpu_nodes is not in clusters"):
        eks_recovery(plan=str(sandbox_plan_path), cluster=CLUSTER, nodes={"gpu_nodes": 2})
