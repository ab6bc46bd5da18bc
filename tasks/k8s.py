"""Kubernetes tasks (official client): namespace export, and application cutover through a Secret."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, SecretStr

from drplan.clients import kube_client
from drplan.errors import DrplanError
from drplan.logs import run_logger
from drplan.plan import Cluster, Plan


def export_namespace(api_client, namespace: str) -> dict:
    """Deployments, services and config maps of a namespace as plain dicts; Secrets by name only, never values."""
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


def secret_fingerprints(data: dict[str, str], salt: str) -> dict[str, str]:
    """key -> a salted SHA-256 fingerprint of its (base64) value: tells a changed key without keeping the value."""
    return {key: hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:16] for key, value in data.items()}


def export_secret_keys(api_client, namespace: str) -> dict:
    """Each Secret's key names with a fingerprint of each value under a new random salt (for a configuration
    backup: `secret_fingerprints` tells a changed key later without keeping the value)."""
    salt = os.urandom(16).hex()
    return {"fingerprint_salt": salt, "secret_fingerprints": {
        s.metadata.name: secret_fingerprints(s.data or {}, salt)
        for s in k8s.CoreV1Api(api_client).list_namespaced_secret(namespace).items}}


def live_secret_fingerprints(api_client, namespace: str, names: list[str], salt: str) -> dict[str, dict[str, str]]:
    """The fingerprints (as `secret_fingerprints`) of the named Secrets that exist in the namespace."""
    found, core = {}, k8s.CoreV1Api(api_client)
    for name in names:
        try:
            found[name] = secret_fingerprints(core.read_namespaced_secret(name, namespace).data or {}, salt)
        except ApiException as exc:
            if exc.status != 404:  # missing: the difference is the Secret itself
                raise _api_error(exc, f"secret {name} in namespace {namespace}") from None
    return found


# Application cutover: the app's database URL lives in a Kubernetes Secret (env valueFrom.secretKeyRef).
# Secret values are never logged nor returned unredacted; the value before a cutover is kept in the same
# Secret under PREVIOUS_SUFFIX, so a rollback needs nothing outside the cluster.

DATABASE_ENV = "DATABASE_URL"
TOKEN_ENV = "API_TOKEN"
"""The variable a service takes its API token from (a Secret too: `drplan rotate-credentials --service`)."""
PREVIOUS_SUFFIX = ".drplan-previous"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


class DeploymentNotAvailable(DrplanError):
    """A deployment did not report all replicas available for its current generation in time."""


def redact_url(url: str) -> str:
    """A URL with its password (and query, which may carry one) masked: scheme://user:***@host:port/db."""
    try:
        parts = urlsplit(url)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "***"
    user = f"{parts.username}:***@" if parts.username and parts.password is not None else (
        f"{parts.username}@" if parts.username else "")
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "***" if parts.query else "", ""))


def _api_error(exc: ApiException, what: str, hint: str = "") -> DrplanError:
    if exc.status == 404:
        return DrplanError(f"{what} does not exist{'; ' + hint if hint else ''}")
    return DrplanError(f"{what}: Kubernetes API answered {exc.status} {exc.reason}")


def find_database_secret(api_client, namespace: str, deployment: str, env: str = DATABASE_ENV) -> tuple[str, str]:
    """(secret name, key) the deployment's containers take `env` from (valueFrom.secretKeyRef)."""
    what = f"deployment {deployment} in namespace {namespace}"
    try:
        obj = k8s.AppsV1Api(api_client).read_namespaced_deployment(deployment, namespace)
    except ApiException as exc:
        raise _api_error(exc, what, "check clusters[].deployments") from None
    for container in obj.spec.template.spec.containers or []:
        for var in container.env or []:
            ref = var.value_from.secret_key_ref if var.name == env and var.value_from else None
            if ref:
                return ref.name, ref.key
    raise DrplanError(f"{what} has no {env} from a Secret (env valueFrom.secretKeyRef); "
                      "point the container's env at the Secret that holds the database URL")


def _secret_data(api_client, namespace: str, secret: str) -> dict[str, str]:
    try:
        return k8s.CoreV1Api(api_client).read_namespaced_secret(secret, namespace).data or {}
    except ApiException as exc:
        raise _api_error(exc, f"secret {secret} in namespace {namespace}") from None


def read_secret_value(api_client, namespace: str, secret: str, key: str) -> str | None:
    """The decoded value of one key of a Secret; None when the Secret has no such key."""
    data = _secret_data(api_client, namespace, secret)
    return base64.b64decode(data[key]).decode() if key in data else None


def write_secret_value(api_client, namespace: str, secret: str, key: str, value: str | None) -> str | None:
    """Set (or, with None, remove) one key of a Secret by PATCH; returns the previous value. Idempotent."""
    previous = read_secret_value(api_client, namespace, secret, key)
    where = f"secret {namespace}/{secret} key {key}"
    if previous == value:
        run_logger().info("%s already holds this value; nothing to change", where)
        return previous
    encoded = None if value is None else base64.b64encode(value.encode()).decode()
    try:
        k8s.CoreV1Api(api_client).patch_namespaced_secret(secret, namespace, {"data": {key: encoded}})
    except ApiException as exc:
        raise _api_error(exc, f"secret {secret} in namespace {namespace}") from None
    run_logger().info("%s %s", where, "removed" if value is None else "updated")
    return previous


def deployment_exists(api_client, namespace: str, deployment: str) -> bool:
    try:
        k8s.AppsV1Api(api_client).read_namespaced_deployment(deployment, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise _api_error(exc, f"deployment {deployment} in namespace {namespace}") from None
    return True


def read_database_url(api_client, namespace: str, deployment: str, env: str = DATABASE_ENV
                      ) -> tuple[str, str] | None:
    """(`namespace/secret:key`, the decoded value) of the Secret the deployment takes `env` from; None when the
    deployment does not exist. The value holds a password: never log or return it unredacted."""
    if not deployment_exists(api_client, namespace, deployment):
        return None
    secret, key = find_database_secret(api_client, namespace, deployment, env)
    value = read_secret_value(api_client, namespace, secret, key)
    if value is None:
        raise DrplanError(f"secret {namespace}/{secret} has no key {key}, which deployment {deployment} takes {env} "
                          "from")
    return f"{namespace}/{secret}:{key}", value


def restart_deployment(api_client, namespace: str, deployment: str) -> str:
    """Roll the deployment's pods, like `kubectl rollout restart`; returns the restartedAt timestamp. Microseconds:
    two restarts within one second (cut over, then roll back) must still change the pod template."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
    try:
        k8s.AppsV1Api(api_client).patch_namespaced_deployment(deployment, namespace, patch)
    except ApiException as exc:
        raise _api_error(exc, f"deployment {deployment} in namespace {namespace}",
                         "check clusters[].deployments") from None
    run_logger().info("restarted deployment %s/%s at %s", namespace, deployment, now)
    return now


def availability(obj) -> tuple[bool, str]:
    """Whether the rollout of the current generation is done (as `kubectl rollout status` sees it: every replica
    updated and available, no old one left), and the status in one phrase (with the message of a failing
    condition: why it fails)."""
    wanted = obj.spec.replicas if obj.spec.replicas is not None else 1
    status = obj.status
    available = (status.available_replicas if status else 0) or 0
    updated = (status.updated_replicas if status else 0) or 0
    total = (status.replicas if status else 0) or 0
    observed = (status.observed_generation if status else 0) or 0
    done = observed >= (obj.metadata.generation or 0) and available == updated == total == wanted
    conditions = ", ".join(
        f"{c.type}={c.status} ({c.reason}" + (f": {' '.join(c.message.split())}" if c.status == "False" and c.message
                                             else "") + ")" for c in (status.conditions if status else None) or [])
    return done, (f"{available}/{wanted} replicas available ({updated} updated, {total} in all), observed "
                  f"generation {observed} of {obj.metadata.generation}" + (f"; {conditions}" if conditions else ""))


def wait_deployment_available(api_client, namespace: str, deployment: str, timeout: float = 300,
                              interval: float = 0.5) -> None:
    """Wait until the deployment observed its current generation and all its replicas are available."""
    apps = k8s.AppsV1Api(api_client)
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, state = availability(apps.read_namespaced_deployment(deployment, namespace))
        except ApiException as exc:
            raise _api_error(exc, f"deployment {deployment} in namespace {namespace}",
                             "check clusters[].deployments") from None
        if done:
            run_logger().info("deployment %s/%s available: %s", namespace, deployment, state)
            return
        if time.monotonic() >= deadline:
            raise DeploymentNotAvailable(
                f"deployment {deployment} in namespace {namespace} not available after {timeout:g}s: {state}")
        time.sleep(interval)


class CutoverResult(BaseModel):
    deployment: str
    secret: str
    """namespace/secret:key that holds the database URL."""
    previous_url_redacted: str | None
    url_redacted: str
    changed: bool


def _set_database_url(plan: Plan, cluster: Cluster, deployment: str, url: str, keep_previous: bool,
                      timeout: float) -> CutoverResult:
    """Point the deployment's database Secret at `url`, then restart and wait for the rollout if it changed."""
    api = kube_client(plan, cluster)
    namespace = cluster.namespace
    secret, key = find_database_secret(api, namespace, deployment)
    current = read_secret_value(api, namespace, secret, key)
    changed = current != url
    if changed and keep_previous and current is not None:
        write_secret_value(api, namespace, secret, key + PREVIOUS_SUFFIX, current)
    write_secret_value(api, namespace, secret, key, url)
    if changed:
        restart_deployment(api, namespace, deployment)
        wait_deployment_available(api, namespace, deployment, timeout)
    result = CutoverResult(
        deployment=deployment, secret=f"{namespace}/{secret}:{key}", changed=changed, url_redacted=redact_url(url),
        previous_url_redacted=None if current is None else redact_url(current),
    )
    run_logger().info("%s: database %s -> %s%s", deployment, result.previous_url_redacted, result.url_redacted,
                      "" if changed else " (already set; nothing changed)")
    return result


def cut_over(plan: Plan, cluster: Cluster, deployment: str, new_url: SecretStr, timeout: float = 300
             ) -> CutoverResult:
    """Move the deployment to the database at `new_url` through its Secret; the old URL is kept for roll_back."""
    return _set_database_url(plan, cluster, deployment, new_url.get_secret_value(), keep_previous=True,
                             timeout=timeout)


def roll_back(plan: Plan, cluster: Cluster, deployment: str, timeout: float = 300) -> CutoverResult:
    """Restore the database URL the last cut_over replaced, then drop the kept copy."""
    api = kube_client(plan, cluster)
    secret, key = find_database_secret(api, cluster.namespace, deployment)
    previous = read_secret_value(api, cluster.namespace, secret, key + PREVIOUS_SUFFIX)
    if previous is None:
        raise DrplanError(f"secret {cluster.namespace}/{secret} holds no {key}{PREVIOUS_SUFFIX}; "
                          "nothing to roll back (no cut_over since the last roll_back)")
    result = _set_database_url(plan, cluster, deployment, previous, keep_previous=False, timeout=timeout)
    write_secret_value(api, cluster.namespace, secret, key + PREVIOUS_SUFFIX, None)
    return result


cut_over_task = task(cut_over, name="cut-over-database", cache_policy=NO_CACHE)
roll_back_task = task(roll_back, name="roll-back-database", cache_policy=NO_CACHE)
