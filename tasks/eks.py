"""EKS and cluster capacity: cluster status, node groups, scaling a node group until its nodes are Ready,
deployment scale and availability."""

from __future__ import annotations

import time

from botocore.exceptions import ClientError
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from drplan.errors import DrplanError
from drplan.logs import run_logger

NODEGROUP_LABEL = "eks.amazonaws.com/nodegroup"


class NodegroupState(BaseModel):
    name: str
    status: str
    desired: int
    min: int
    max: int
    ready_nodes: int


def cluster_status(eks, name: str) -> str:
    try:
        return eks.describe_cluster(name=name)["cluster"]["status"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            raise DrplanError(f"EKS cluster {name} not found in {eks.meta.region_name}; check clusters[].name "
                              "and clusters[].region") from None
        raise


def ready_nodes(api_client, nodegroup: str | None = None) -> int:
    """Nodes whose Ready condition is True (of one node group, by its EKS label)."""
    selector = f"{NODEGROUP_LABEL}={nodegroup}" if nodegroup else None
    nodes = k8s.CoreV1Api(api_client).list_node(label_selector=selector).items
    return sum(1 for n in nodes if any(c.type == "Ready" and c.status == "True"
                                       for c in (n.status.conditions if n.status else None) or []))


def nodegroup_state(eks, api_client, cluster: str, nodegroup: str) -> NodegroupState:
    try:
        group = eks.describe_nodegroup(clusterName=cluster, nodegroupName=nodegroup)["nodegroup"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            raise DrplanError(f"node group {nodegroup} not found in EKS cluster {cluster}; check "
                              "clusters[].nodegroups and failover.nodes") from None
        raise
    scaling = group["scalingConfig"]
    return NodegroupState(name=nodegroup, status=group["status"], desired=scaling["desiredSize"],
                          min=scaling["minSize"], max=scaling["maxSize"],
                          ready_nodes=ready_nodes(api_client, nodegroup))


def scale_nodegroup(eks, api_client, cluster: str, nodegroup: str, desired: int, timeout: float = 900,
                    interval: float = 1.0) -> tuple[int, int]:
    """Set the node group's desired size (widening min/max when needed), wait until it is ACTIVE and that many
    nodes are Ready. Returns (desired before, after); unchanged when it already had that size."""
    before = nodegroup_state(eks, api_client, cluster, nodegroup)
    if before.desired != desired:
        eks.update_nodegroup_config(clusterName=cluster, nodegroupName=nodegroup, scalingConfig={
            "minSize": min(before.min, desired), "maxSize": max(before.max, desired), "desiredSize": desired})
        run_logger().warning("node group %s/%s: desired %d -> %d", cluster, nodegroup, before.desired, desired)
    deadline = time.monotonic() + timeout
    while (state := nodegroup_state(eks, api_client, cluster, nodegroup)).status != "ACTIVE" \
            or state.ready_nodes < desired:
        if state.status in ("CREATE_FAILED", "DELETE_FAILED", "DEGRADED"):
            raise DrplanError(f"node group {cluster}/{nodegroup} is {state.status}")
        if time.monotonic() > deadline:
            raise DrplanError(f"node group {cluster}/{nodegroup}: {state.ready_nodes}/{desired} nodes Ready after "
                              f"{timeout:g}s (status {state.status})")
        time.sleep(interval)
    run_logger().info("node group %s/%s: %d nodes Ready", cluster, nodegroup, state.ready_nodes)
    return before.desired, desired


def scale_deployment(api_client, namespace: str, deployment: str, replicas: int) -> tuple[int, int]:
    """Set a deployment's replicas; returns (before, after). Unchanged when it already has them."""
    apps = k8s.AppsV1Api(api_client)
    try:
        before = apps.read_namespaced_deployment(deployment, namespace).spec.replicas
        if before != replicas:
            apps.patch_namespaced_deployment(deployment, namespace, {"spec": {"replicas": replicas}})
    except ApiException as exc:
        raise DrplanError(f"deployment {deployment} in namespace {namespace}: Kubernetes API answered "
                          f"{exc.status} {exc.reason}; is it in the manifests?") from None
    return before, replicas


def pods_not_running(api_client, namespace: str) -> list[str]:
    """Pods that are neither Running nor Succeeded (Pending, Failed, Unknown)."""
    pods = k8s.CoreV1Api(api_client).list_namespaced_pod(namespace).items
    return [f"{p.metadata.name} ({p.status.phase})" for p in pods
            if p.status and p.status.phase not in ("Running", "Succeeded")]


scale_nodegroup_task = task(scale_nodegroup, name="scale-nodegroup", cache_policy=NO_CACHE)
