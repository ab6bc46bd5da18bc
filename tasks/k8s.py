"""Kubernetes tasks (official client)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from drplan.logs import run_logger


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def export_namespace(api_client, namespace: str) -> dict:
    """Deployments, services and config maps of a namespace as plain dicts; Secrets by name only, never values."""
    from kubernetes import client as k8s

    core, apps = k8s.CoreV1Api(api_client), k8s.AppsV1Api(api_client)
    sanitize = api_client.sanitize_for_serialization
    exported = {
        "deployments": [sanitize(d) for d in apps.list_namespaced_deployment(namespace).items],
        "services": [sanitize(s) for s in core.list_namespaced_service(namespace).items],
        "configmaps": [sanitize(c) for c in core.list_namespaced_config_map(namespace).items],
        "secret_names": [s.metadata.name for s in core.list_namespaced_secret(namespace).items],
    }
    run_logger().info("exported %s: %s", namespace, {k: len(v) for k, v in exported.items()})
    return exported
