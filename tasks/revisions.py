"""A service's revision and its known-good history (Kubernetes).

A revision is what a Deployment runs: its pod template (image, env, ...), the data of the ConfigMaps the template
references, and the names of the Secrets it references (never their values). The known-good history is the list
of revisions that passed recovery validation, newest last (at most HISTORY), kept as JSON in the Deployment's
annotation KNOWN_GOOD: found live in the cluster (`kubectl get deployment -o yaml`), and carried into every
configuration backup with the Deployment (docs/architecture.md says why there).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from pydantic import AwareDatetime, BaseModel

from drplan.clients import kube_client
from drplan.errors import DrplanError, first_line
from drplan.logs import run_logger
from drplan.plan import Cluster, Plan
from drplan.timeutil import utcnow
from tasks.k8s import RESTARTED_AT, restart_deployment

KNOWN_GOOD = "drplan.io/known-good"
UNDO = "drplan.io/undo"
"""Annotation holding the revision a change in progress returns to if its validation fails, written before the
change and removed when the run ends: a killed run's rerun finds it and still knows where to go back."""
HISTORY = 10
"""Known-good revisions kept per Deployment (the annotation stays far below Kubernetes' 256 KiB)."""


class Revision(BaseModel):
    template: dict[str, Any]
    """The Deployment's spec.template as the API serves it (camelCase)."""
    configmaps: dict[str, dict[str, str]] = {}
    """ConfigMaps the template references: name -> data (a missing one is absent)."""
    secrets: list[str] = []
    """Names of the Secrets the template references."""

    @property
    def images(self) -> list[str]:
        return [c.get("image", "") for c in self.template.get("spec", {}).get("containers", [])]

    def differences(self, other: Revision) -> list[str]:
        """What changes from this revision to `other`, one phrase each (ConfigMap key names only, no values); the
        restartedAt annotation of a rollout restart is not a difference."""
        changes = []
        if self.images != other.images:
            changes.append(f"image {', '.join(self.images)} -> {', '.join(other.images)}")
        if without_restart(self.template) != without_restart(other.template) and self.images == other.images:
            changes.append("pod template")
        for name in sorted(self.configmaps.keys() | other.configmaps.keys()):
            old, new = self.configmaps.get(name), other.configmaps.get(name)
            if old != new:
                keys = sorted(k for k in (old or {}).keys() | (new or {}).keys() if (old or {}).get(k) != (new or {})
                              .get(k))
                changes.append(f"ConfigMap {name} " + ("created" if old is None else f"keys {', '.join(keys)}"))
        return changes


class KnownGood(Revision):
    revision: int
    recorded_at: AwareDatetime
    reason: str
    """What found it good (the run whose validation passed, a configuration backup)."""

    def describe(self) -> str:
        return (f"revision {self.revision} ({', '.join(self.images)}, {self.reason}, "
                f"{self.recorded_at:%Y-%m-%d %H:%M:%SZ})")


class PendingUndo(BaseModel):
    revision: Revision
    """What the Deployment ran before the change."""
    by: str
    """The runbook that made the change (rollback, config-restore)."""
    started_at: AwareDatetime


def without_restart(template: dict[str, Any]) -> dict[str, Any]:
    """The template without the restartedAt annotation (and without annotations when that was the only one)."""
    template = copy.deepcopy(template)
    meta = template.get("metadata") or {}
    if RESTARTED_AT in (meta.get("annotations") or {}):
        del meta["annotations"][RESTARTED_AT]
        if not meta["annotations"]:
            del meta["annotations"]
    return template


def with_restart_of(template: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """`template` with the live template's restartedAt annotation (or none), so that only real changes roll."""
    template = without_restart(template)
    stamp = ((live.get("metadata") or {}).get("annotations") or {}).get(RESTARTED_AT)
    if stamp:
        template.setdefault("metadata", {}).setdefault("annotations", {})[RESTARTED_AT] = stamp
    return template


def references(template: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(ConfigMaps, Secrets) a pod template references: env valueFrom, envFrom, volumes."""
    configmaps, secrets = set(), set()
    spec = template.get("spec") or {}
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        for var in container.get("env") or []:
            source = var.get("valueFrom") or {}
            if "configMapKeyRef" in source:
                configmaps.add(source["configMapKeyRef"]["name"])
            if "secretKeyRef" in source:
                secrets.add(source["secretKeyRef"]["name"])
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                configmaps.add(source["configMapRef"]["name"])
            if "secretRef" in source:
                secrets.add(source["secretRef"]["name"])
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            configmaps.add(volume["configMap"]["name"])
        if "secret" in volume:
            secrets.add(volume["secret"]["secretName"])
    return configmaps, secrets


def read_deployment(api_client, namespace: str, name: str) -> dict[str, Any]:
    """The Deployment as the API serves it (a dict); a missing one is refused in one line."""
    try:
        obj = k8s.AppsV1Api(api_client).read_namespaced_deployment(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise DrplanError(f"deployment {name} does not exist in namespace {namespace}; check services[].name "
                              "and services[].cluster") from None
        raise DrplanError(f"deployment {namespace}/{name}: Kubernetes API answered {exc.status} {exc.reason}") from None
    return api_client.sanitize_for_serialization(obj)


def _configmap_data(core, namespace: str, name: str) -> dict[str, str] | None:
    try:
        return core.read_namespaced_config_map(name, namespace).data or {}
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise DrplanError(f"ConfigMap {namespace}/{name}: Kubernetes API answered {exc.status} {exc.reason}") from None


def revision_of(api_client, namespace: str, template: dict[str, Any]) -> Revision:
    """The revision `template` runs in the namespace now: the live data of the ConfigMaps it references."""
    configmaps, secrets = references(template)
    core = k8s.CoreV1Api(api_client)
    data = {name: _configmap_data(core, namespace, name) for name in sorted(configmaps)}
    return Revision(template=template, configmaps={k: v for k, v in data.items() if v is not None},
                    secrets=sorted(secrets))


def live_revision(api_client, namespace: str, deployment: str) -> Revision:
    return revision_of(api_client, namespace, read_deployment(api_client, namespace, deployment)["spec"]["template"])


def known_good(api_client, namespace: str, deployment: str) -> list[KnownGood]:
    """The Deployment's known-good revisions, oldest first ([] when none was recorded)."""
    return [KnownGood.model_validate(r) for r in json.loads(_annotations(api_client, namespace, deployment).get(
        KNOWN_GOOD, "[]"))]


def pending_undo(api_client, namespace: str, deployment: str) -> PendingUndo | None:
    """The undo a killed change left on the Deployment (annotation UNDO), or None."""
    annotations = _annotations(api_client, namespace, deployment)
    return PendingUndo.model_validate_json(annotations[UNDO]) if UNDO in annotations else None


def _annotations(api_client, namespace: str, deployment: str) -> dict[str, str]:
    return read_deployment(api_client, namespace, deployment)["metadata"].get("annotations") or {}


def set_pending_undo(api_client, namespace: str, deployment: str, undo: PendingUndo | None) -> None:
    """Write the undo before a change (None: remove it once the run has ended)."""
    value = undo.model_dump_json() if undo else None
    k8s.AppsV1Api(api_client).patch_namespaced_deployment(deployment, namespace,
                                                           {"metadata": {"annotations": {UNDO: value}}})


def pick_known_good(history: list[KnownGood], deployment: str, revision: int | None) -> KnownGood:
    """Revision `revision` of the history, or its newest; refused in one line when there is no such revision."""
    if not history:
        raise DrplanError(f"deployment {deployment} has no known-good revision yet (annotation {KNOWN_GOOD}); one is "
                          "recorded when recovery validation passes and at each configuration backup")
    if revision is None:
        return history[-1]
    found = next((r for r in history if r.revision == revision), None)
    if found is None:
        raise DrplanError(f"deployment {deployment} has no known-good revision {revision}; it keeps "
                          f"{', '.join(str(r.revision) for r in history)}")
    return found


def record_known_good(api_client, namespace: str, deployment: str, reason: str) -> tuple[KnownGood, bool]:
    """Record what the Deployment runs now as its newest known-good revision (after a passed validation); the
    same as the newest is not recorded again. Returns the newest known-good revision and whether it is new."""
    live = live_revision(api_client, namespace, deployment)
    history = known_good(api_client, namespace, deployment)
    if history and not history[-1].differences(live):
        return history[-1], False
    entry = KnownGood(**live.model_dump(), revision=history[-1].revision + 1 if history else 1,
                      recorded_at=utcnow(), reason=reason)
    kept = [*history, entry][-HISTORY:]
    k8s.AppsV1Api(api_client).patch_namespaced_deployment(deployment, namespace, {"metadata": {"annotations": {
        KNOWN_GOOD: json.dumps([r.model_dump(mode="json") for r in kept], sort_keys=True)}}})
    run_logger().info("deployment %s/%s: known-good %s", namespace, deployment, entry.describe())
    return entry, True


def apply_revision(api_client, namespace: str, deployment: str, target: Revision) -> list[str]:
    """Make the Deployment run `target`: each ConfigMap whose data differs replaced, the pod template replaced when
    it differs, else a rollout restart when a ConfigMap changed (pods read them at start). Returns what changed;
    nothing when it runs `target` already. The caller waits for the rollout."""
    core, apps = k8s.CoreV1Api(api_client), k8s.AppsV1Api(api_client)
    live = read_deployment(api_client, namespace, deployment)
    current = revision_of(api_client, namespace, live["spec"]["template"])
    changed = []
    for name, data in target.configmaps.items():
        if current.configmaps.get(name) == data:
            continue
        if name in current.configmaps:
            obj = api_client.sanitize_for_serialization(core.read_namespaced_config_map(name, namespace))
            obj["data"] = data
            obj["metadata"].pop("resourceVersion", None)
            core.replace_namespaced_config_map(name, namespace, obj)
        else:
            core.create_namespaced_config_map(namespace, {"metadata": {"name": name}, "data": data})
        changed.append(f"ConfigMap {name}")
    template = with_restart_of(target.template, live["spec"]["template"])
    if template != live["spec"]["template"]:
        live["spec"]["template"] = template
        live["metadata"].pop("resourceVersion", None)
        live.pop("status", None)
        apps.replace_namespaced_deployment(deployment, namespace, live)
        changed.append("pod template")
    elif changed:
        restart_deployment(api_client, namespace, deployment)
        changed.append("rollout restart")
    run_logger().info("deployment %s/%s: %s", namespace, deployment, ", ".join(changed) or "already at the revision")
    return changed


def remember_known_good(plan: Plan, cluster: Cluster, deployment: str, reason: str) -> KnownGood | None:
    """`record_known_good` for a step whose own work is done (a cutover, a configuration backup): a failure to
    record is logged, not raised."""
    try:
        return record_known_good(kube_client(plan, cluster), cluster.namespace, deployment, reason)[0]
    except (DrplanError, ApiException) as exc:
        run_logger().warning("deployment %s/%s: known-good revision not recorded: %s", cluster.namespace,
                             deployment, first_line(exc))
        return None
