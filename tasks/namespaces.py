"""A throwaway Kubernetes namespace for a rehearsal: created, given Secrets, its Deployments exposed through a
load balancer, and removed with everything in it.

Removal deletes the namespace's Deployments, Services and Secrets first, then the namespace, and waits until the
namespace is gone (a real API server cascades and keeps the namespace Terminating meanwhile; deleting the
contents first does the same work and lets the caller know the app's pods are stopping before its database goes).
"""

from __future__ import annotations

import base64
import time

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from drplan.errors import DrplanError
from drplan.logs import run_logger

POLL_SECONDS = 0.5


def _ignore_missing(call, *args) -> bool:
    """Run a delete; False when the object was already gone."""
    try:
        call(*args)
    except ApiException as exc:
        if exc.status != 404:
            raise DrplanError(f"{call.__name__} {args[0]}: Kubernetes API answered {exc.status} {exc.reason}") from None
        return False
    return True


def create_namespace(api_client, namespace: str, labels: dict[str, str]) -> None:
    try:
        k8s.CoreV1Api(api_client).create_namespace({"metadata": {"name": namespace, "labels": labels}})
    except ApiException as exc:
        raise DrplanError(f"namespace {namespace}: Kubernetes API answered {exc.status} {exc.reason}") from None
    run_logger().info("namespace %s created", namespace)


def labelled_namespaces(api_client, label: str) -> list[str]:
    """The namespaces carrying `label: "true"`, by name."""
    return sorted(n.metadata.name for n in k8s.CoreV1Api(api_client).list_namespace().items
                  if (n.metadata.labels or {}).get(label) == "true")


def copy_secret(api_client, source_namespace: str, namespace: str, name: str,
                override: dict[str, str] | None = None) -> None:
    """Secret `name` of `source_namespace` created in `namespace`, with the keys in `override` replaced. Values
    are never logged."""
    core = k8s.CoreV1Api(api_client)
    try:
        data = dict(core.read_namespaced_secret(name, source_namespace).data or {})
    except ApiException as exc:
        raise DrplanError(f"secret {source_namespace}/{name}: Kubernetes API answered {exc.status} {exc.reason}; "
                          "the DR cluster must hold the Secrets the manifests reference") from None
    data |= {key: base64.b64encode(value.encode()).decode() for key, value in (override or {}).items()}
    core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "type": "Opaque", "data": data})
    run_logger().info("secret %s/%s created (keys %s)", namespace, name, ", ".join(sorted(data)))


def expose(api_client, namespace: str, deployment: str, timeout: float) -> str:
    """A Service of type LoadBalancer in front of the deployment's pods (`kubectl expose`); returns the
    http://host:port its load balancer publishes once it does."""
    apps, core = k8s.AppsV1Api(api_client), k8s.CoreV1Api(api_client)
    labels = apps.read_namespaced_deployment(deployment, namespace).spec.template.metadata.labels
    core.create_namespaced_service(namespace, {"metadata": {"name": deployment}, "spec": {
        "type": "LoadBalancer", "selector": labels, "ports": [{"name": "http", "port": 80}]}})
    deadline = time.monotonic() + timeout
    while True:
        status = core.read_namespaced_service(deployment, namespace).status
        ingress = (status.load_balancer.ingress if status and status.load_balancer else None) or []
        if ingress:
            host = ingress[0].hostname or ingress[0].ip
            port = ingress[0].ports[0].port if ingress[0].ports else 80
            run_logger().info("service %s/%s: load balancer %s:%s", namespace, deployment, host, port)
            return f"http://{host}:{port}"
        if time.monotonic() > deadline:
            raise DrplanError(f"service {namespace}/{deployment} got no load balancer address within {timeout:g}s")
        time.sleep(POLL_SECONDS)


def delete_namespace(api_client, namespace: str, timeout: float) -> list[str]:
    """Delete the namespace with its Deployments, Services, Secrets and ConfigMaps and wait until it is gone;
    returns what was deleted (nothing when the namespace did not exist)."""
    apps, core = k8s.AppsV1Api(api_client), k8s.CoreV1Api(api_client)
    try:
        core.read_namespace(namespace)
    except ApiException as exc:
        if exc.status == 404:
            return []
        raise DrplanError(f"namespace {namespace}: Kubernetes API answered {exc.status} {exc.reason}") from None
    deleted = []
    for kind, listing, delete in (
            ("deployment", apps.list_namespaced_deployment, apps.delete_namespaced_deployment),
            ("service", core.list_namespaced_service, core.delete_namespaced_service),
            ("secret", core.list_namespaced_secret, core.delete_namespaced_secret),
            ("configmap", core.list_namespaced_config_map, core.delete_namespaced_config_map)):
        for obj in listing(namespace).items:
            if _ignore_missing(delete, obj.metadata.name, namespace):
                deleted.append(f"{kind} {obj.metadata.name}")
    _ignore_missing(core.delete_namespace, namespace)
    deadline = time.monotonic() + timeout
    while True:
        try:
            core.read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                break
            raise
        if time.monotonic() > deadline:
            raise DrplanError(f"namespace {namespace} still exists {timeout:g}s after its deletion")
        time.sleep(POLL_SECONDS)
    run_logger().info("namespace %s deleted with %s", namespace, ", ".join(deleted) or "nothing in it")
    return [*deleted, f"namespace {namespace}"]
