"""EKS recovery on the sandbox's primary cluster (moto EKS, the Kubernetes emulator whose nodes follow the node
groups, manifests from kubernetes/manifests/): a lost deployment comes back, the node group scales until its
nodes are Ready, a rerun changes nothing, a dry run changes nothing; manifests and overrides."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s

from drplan.clients import aws_client, kube_client
from drplan.errors import DrplanError
from drplan.plan import ManifestOverrides
from flows.eks_recovery import eks_recovery
from tasks.eks import ready_nodes
from tasks.manifests import load_manifests, secret_refs, with_overrides
from tests.helpers import REPO, stack_snapshot

pytestmark = pytest.mark.usefixtures("prefect_server")
CLUSTER = "devonn-eks-sandbox"
MANIFESTS = REPO / "kubernetes" / "manifests"


def test_overrides_change_replicas_and_registry_only():
    api = next(o for o in load_manifests(MANIFESTS) if o["metadata"]["name"] == "devonn-api")
    changed = with_overrides(api, ManifestOverrides(replicas={"devonn-api": 1},
                                                     image_registry={"registry.example/devonn": "ecr.dr/devonn"}))
    assert changed["spec"]["replicas"] == 1
    assert changed["spec"]["template"]["spec"]["containers"][0]["image"] == "ecr.dr/devonn/devonn-api:1.0"
    assert api["spec"]["replicas"] == 3  # the loaded manifest is not modified
    assert with_overrides(api, ManifestOverrides(image_registry={"registry.exam": "x"})) == api  # prefix of a name
    assert secret_refs([api]) == {"devonn-api-db", "devonn-api-token"}


@pytest.mark.parametrize(("text", "message"), [
    ("kind: Deployment\nmetadata: {name: x\n", "not valid YAML"),
    ("apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\n", "Secret creds is not deployable here"),
])
def test_bad_manifests_are_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(DrplanError, match=message) as refused:
        load_manifests(tmp_path)
    assert "\n" not in str(refused.value) and str(tmp_path / "bad.yaml") in str(refused.value)


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
        assert {(a.name, a.action) for a in report.applied} == {("devonn-api", "unchanged"),
                                                                ("devonn-worker", "created")}
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
