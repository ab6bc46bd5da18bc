"""Deploy a folder of Kubernetes manifests: create or update, with the cluster's per-environment overrides.

Supported kinds: Deployment, Service, ConfigMap (what an application's core services are; anything else is
refused by name rather than skipped). Updates are strategic-merge patches, so a manifest that matches the live
object changes nothing (same resourceVersion). The replica count of an existing Deployment is left to whoever
scales it (like an autoscaler would): the manifest's replicas only apply on creation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel

from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.plan import Cluster, ManifestOverrides, Plan

KINDS = ("Deployment", "Service", "ConfigMap")


class Applied(BaseModel):
    kind: str
    name: str
    action: str
    """created, updated or unchanged."""


def load_manifests(folder: Path) -> list[dict[str, Any]]:
    """Every object of every *.yaml / *.yml file in `folder` (sorted by file name), checked for kind and name."""
    if not folder.is_dir():
        raise DrplanError(f"manifest folder {folder} does not exist; fix clusters[].manifests")
    objects = []
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except yaml.YAMLError as exc:
            raise DrplanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        for doc in docs:
            kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
            if kind not in KINDS or not name:
                raise DrplanError(f"{path}: {kind or 'an object without kind'} {name or '(no name)'} is not "
                                  f"deployable here; manifests may hold {', '.join(KINDS)} with metadata.name")
            objects.append(doc)
    if not objects:
        raise DrplanError(f"manifest folder {folder} holds no manifests (*.yaml)")
    return objects


def with_overrides(obj: dict[str, Any], overrides: ManifestOverrides) -> dict[str, Any]:
    """The object with the environment's replicas and image registry applied."""
    obj = copy.deepcopy(obj)
    if obj["kind"] != "Deployment":
        return obj
    name = obj["metadata"]["name"]
    if name in overrides.replicas:
        obj["spec"]["replicas"] = overrides.replicas[name]
    for container in obj["spec"]["template"]["spec"].get("containers", []):
        for prefix, replacement in overrides.image_registry.items():
            if container.get("image", "").startswith(prefix + "/") or container.get("image") == prefix:
                container["image"] = replacement + container["image"][len(prefix):]
    return obj


def render_manifests(plan: Plan, cluster: Cluster) -> list[dict[str, Any]]:
    """The cluster's manifests folder with its overrides applied, exactly as a deploy renders it ([] without one)."""
    if not cluster.manifests:
        return []
    return [with_overrides(obj, cluster.overrides) for obj in load_manifests(plan.resolve_path(cluster.manifests))]


def _secret_envs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(deployment, env name, secretKeyRef) of every container env value the Deployments take from a Secret."""
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"].get("containers", []):
            for var in container.get("env", []):
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    yield obj["metadata"]["name"], var.get("name"), ref


def secret_refs(objects: list[dict[str, Any]]) -> set[str]:
    """Names of the Secrets the manifests' containers take env values from."""
    return {ref["name"] for _, _, ref in _secret_envs(objects)}


def _calls(api_client, kind: str) -> tuple[Any, Any, Any]:
    apps, core = k8s.AppsV1Api(api_client), k8s.CoreV1Api(api_client)
    return {
        "Deployment": (apps.read_namespaced_deployment, apps.create_namespaced_deployment,
                       apps.patch_namespaced_deployment),
        "Service": (core.read_namespaced_service, core.create_namespaced_service, core.patch_namespaced_service),
        "ConfigMap": (core.read_namespaced_config_map, core.create_namespaced_config_map,
                      core.patch_namespaced_config_map),
    }[kind]


def apply_manifest(api_client, namespace: str, obj: dict[str, Any], dry_run: bool = False) -> Applied:
    """Create the object, or patch it to match the manifest; with dry_run only say which it would be."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    read, create, patch = _calls(api_client, kind)
    try:
        live = read(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise DrplanError(f"{kind} {namespace}/{name}: Kubernetes API answered {exc.status} {exc.reason}") from None
        live = None
    if live is None:
        action = "would create" if dry_run else "created"
        if not dry_run:
            create(namespace, obj)
    elif dry_run:
        action = "would patch (exists)"
    else:
        body = copy.deepcopy(obj)
        if kind == "Deployment":
            body["spec"].pop("replicas", None)  # the scale of a live Deployment belongs to whoever scaled it
        after = patch(name, namespace, body)
        action = "updated" if after.metadata.resource_version != live.metadata.resource_version else "unchanged"
    run_logger().info("%s %s/%s: %s", kind, namespace, name, action)
    return Applied(kind=kind, name=name, action=action)


def env_secret_ref(objects: list[dict[str, Any]], deployment: str, env: str) -> tuple[str, str]:
    """(Secret, key) the deployment's manifest takes `env` from (valueFrom.secretKeyRef)."""
    for name, var, ref in _secret_envs(objects):
        if name == deployment and var == env:
            return ref["name"], ref["key"]
    raise DrplanError(f"the manifests have no Deployment {deployment} taking {env} from a Secret "
                      "(env valueFrom.secretKeyRef); fix the manifests")
