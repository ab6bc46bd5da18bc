"""The sandbox's Kubernetes API (kmock plus metadata, PATCH/PUT, selectors, the status subresource), driven
through the official client against the real process on a loopback port."""

from __future__ import annotations

import base64
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import kubernetes
import pytest
from kubernetes import client
from kubernetes.client import ApiException

from drplan import processes
from sandbox.kube_api import write_kubeconfig
from tests.helpers import free_port, wait_for

NS = "devonn"






def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


@contextmanager
def running_kube_api(state_dir: Path, context: str = "sandbox") -> Iterator[Path]:
    """The kube_api module as a tracked process; yields a kubeconfig for it. Stopped (SIGTERM) on exit."""
    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "sandbox.kube_api", "--listen", url.removeprefix("http://")]
    processes.start(state_dir, "kube-api", argv)
    try:
        wait_for(lambda: answers(f"{url}/version"), 15, "the Kubernetes API to answer")
        kubeconfig = state_dir / "kubeconfig"
        write_kubeconfig(kubeconfig, url, context)
        yield kubeconfig
    finally:
        started = time.monotonic()
        assert processes.stop(state_dir, "kube-api"), "kube_api died before the end of the tests"
        assert time.monotonic() - started < 5, "kube_api did not exit promptly on SIGTERM"


@pytest.fixture(scope="module")
def kube_api() -> Iterator[client.ApiClient]:
    state_dir = Path(tempfile.mkdtemp(prefix="drplan-kube-api-"))
    try:
        with running_kube_api(state_dir) as kubeconfig:
            kube_api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig), context="sandbox")
            client.CoreV1Api(kube_api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
            yield kube_api
        assert "Kubernetes API stopped" in (state_dir / "logs" / "kube-api.log").read_text()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def deployment(name: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    containers = [
        client.V1Container(name="app", image=f"{name}:1", env=[client.V1EnvVar(name="MODE", value="dr")]),
        client.V1Container(name="sidecar", image="proxy:1"),
    ]
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels), spec=client.V1PodSpec(containers=containers)
            ),
        ),
    )


def test_discovery_lists_the_resources_used(kube_api: client.ApiClient) -> None:
    core = {r.name: r for r in client.CoreV1Api(kube_api).get_api_resources().resources}
    apps = {r.name: r for r in client.AppsV1Api(kube_api).get_api_resources().resources}
    assert {"nodes", "namespaces", "secrets", "configmaps", "pods"} <= set(core)
    assert not core["nodes"].namespaced and core["secrets"].namespaced
    assert apps["deployments"].kind == "Deployment" and "patch" in apps["deployments"].verbs
    assert client.VersionApi(kube_api).get_code().major == "1"


def test_namespaces_and_nodes(kube_api: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    for name in ("node-a", "node-b"):
        ready = client.V1NodeCondition(type="Ready", status="True")
        node = client.V1Node(
            metadata=client.V1ObjectMeta(name=name, labels={"pool": "general"}),
            status=client.V1NodeStatus(conditions=[ready]),
        )
        core.create_node(node)
    nodes = core.list_node(label_selector="pool=general").items
    assert sorted(n.metadata.name for n in nodes) == ["node-a", "node-b"]
    assert all(n.status.conditions[0].type == "Ready" and n.status.conditions[0].status == "True" for n in nodes)
    assert NS in [n.metadata.name for n in core.list_namespace().items]
    namespace = core.read_namespace(NS)
    assert namespace.kind == "Namespace" and namespace.metadata.uid and namespace.metadata.creation_timestamp
    # a write to the main resource keeps the status; the status subresource changes it
    core.patch_node("node-b", {"metadata": {"labels": {"cordoned": "yes"}}, "status": {"conditions": []}})
    assert core.read_node("node-b").status.conditions[0].status == "True"
    core.patch_node_status("node-b", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    assert core.read_node("node-b").status.conditions[0].status == "False"
    assert [n.metadata.name for n in core.list_node(label_selector="pool=general,!cordoned").items] == ["node-a"]


def test_deployment_patch_bumps_generation_and_leaves_status_to_the_kubelet(kube_api: client.ApiClient) -> None:
    apps = client.AppsV1Api(kube_api)
    created = apps.create_namespaced_deployment(NS, deployment("web", 3))
    assert created.metadata.generation == 1 and created.metadata.uid and not created.status.replicas

    patch = {"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "app", "image": "web:2"}]}}}}
    patched = apps.patch_namespaced_deployment("web", NS, patch)
    assert patched.metadata.generation == 2 and not patched.status.observed_generation  # no kubelet here
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
    containers = {c.name: c for c in patched.spec.template.spec.containers}  # strategic merge, by name
    assert containers["app"].image == "web:2" and containers["app"].env[0].value == "dr"
    assert containers["sidecar"].image == "proxy:1"

    reported = apps.patch_namespaced_deployment_status("web", NS, {"status": {"observedGeneration": 2,
                                                                              "availableReplicas": 5}})
    assert reported.metadata.generation == 2 and reported.status.available_replicas == 5
    same = apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 5}, "status": {"replicas": 9}})
    assert same.metadata.generation == 2 and same.metadata.resource_version == reported.metadata.resource_version
    assert same.status.replicas is None  # the main resource never writes the status
    labelled = apps.patch_namespaced_deployment("web", NS, {"metadata": {"labels": {"tier": "critical"}}})
    assert labelled.metadata.generation == 2  # only a spec change bumps the generation
    json_patch = [{"op": "replace", "path": "/spec/replicas", "value": 2}]
    assert apps.patch_namespaced_deployment("web", NS, json_patch).metadata.generation == 3


def test_secret_replace_is_a_put_not_a_merge(kube_api: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="db"), data={"DATABASE_URL": b64("postgresql://a"), "old": b64("x")}
    )
    stale = core.create_namespaced_secret(NS, secret)
    current = core.read_namespaced_secret("db", NS)
    current.data = {"DATABASE_URL": b64("postgresql://b")}
    core.replace_namespaced_secret("db", NS, current)
    assert core.read_namespaced_secret("db", NS).data == {"DATABASE_URL": b64("postgresql://b")}
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_secret("db", NS, stale)  # an outdated resourceVersion
    assert conflict.value.status == 409


def test_missing_objects_give_404(kube_api: client.ApiClient) -> None:
    core, apps = client.CoreV1Api(kube_api), client.AppsV1Api(kube_api)
    for call in (
        lambda: core.read_namespaced_secret("nope", NS),
        lambda: apps.read_namespaced_deployment("nope", NS),
        lambda: core.patch_namespaced_config_map("nope", NS, {"data": {"a": "b"}}),
        lambda: core.read_node("nope"),
    ):
        with pytest.raises(ApiException) as missing:
            call()
        assert missing.value.status == 404


def test_configmaps_pods_delete_and_selectors(kube_api: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="other")))
    for ns, name, app in ((NS, "p1", "web"), (NS, "p2", "worker"), ("other", "p3", "web")):
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, labels={"app": app}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="i")]),
        )
        core.create_namespaced_pod(ns, pod)
    names = lambda pods: sorted(p.metadata.name for p in pods.items)  # noqa: E731
    assert names(core.list_pod_for_all_namespaces(label_selector="app=web")) == ["p1", "p3"]
    assert names(core.list_namespaced_pod(NS, label_selector="app in (web, worker)")) == ["p1", "p2"]
    assert names(core.list_namespaced_pod(NS, label_selector="app notin (web)")) == ["p2"]

    config = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings"), data={"a": "1"})
    core.create_namespaced_config_map(NS, config)
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map(NS, config)
    assert exists.value.status == 409
    core.patch_namespaced_config_map("settings", NS, {"data": {"b": "2"}})
    assert core.read_namespaced_config_map("settings", NS).data == {"a": "1", "b": "2"}
    core.delete_namespaced_config_map("settings", NS)
    assert "settings" not in [c.metadata.name for c in core.list_namespaced_config_map(NS).items]

    started = time.monotonic()
    events = list(kubernetes.watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1))
    assert [e["object"].metadata.name for e in events] == ["p1", "p2"] and time.monotonic() - started < 3


def test_write_kubeconfig_merges_contexts_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "kube" / "config"
    write_kubeconfig(path, "http://127.0.0.1:1", "primary")
    write_kubeconfig(path, "http://127.0.0.1:2", "dr")
    write_kubeconfig(path, "http://127.0.0.1:3", "dr")
    assert path.stat().st_mode & 0o777 == 0o600
    contexts, active = kubernetes.config.list_kube_config_contexts(config_file=str(path))
    assert sorted(c["name"] for c in contexts) == ["dr", "primary"] and active["name"] == "primary"
    dr = kubernetes.config.new_client_from_config(config_file=str(path), context="dr")
    assert dr.configuration.host == "http://127.0.0.1:3"
