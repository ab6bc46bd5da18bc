"""The sandbox's kubelet against its own Kubernetes API: a Deployment of the app's image gets `replicas` app
processes with its env and Secret names, scaled, rolled on a template change, stopped on delete; a broken image
never becomes ready (an old version keeps serving); load balancers on a fixed port and for a Service of type
LoadBalancer (published in its status) reach only ready pods; SIGTERM and a restart after SIGKILL leave no pod."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import kubernetes
import pytest
from kubernetes import client

from drplan import processes
from sandbox.kubelet import Pod, deployment_status, image_problem, template_hash
from tests.helpers import free_port, wait_for
from tests.sandbox.test_kube_api import running_kube_api

NS = "shop"
IMAGE = "registry.example/devonn/devonn-api:1.0"


@dataclass
class Cluster:
    apps: client.AppsV1Api
    core: client.CoreV1Api
    balancer: str  # the fixed load balancer of deployment `web` in NS
    state_dir: Path
    argv: list[str]

    @property
    def pods_dir(self) -> Path:
        return self.state_dir / "kubelet"

    def running_pods(self) -> list[processes.Tracked]:
        names = processes.tracked_names(self.pods_dir) if self.pods_dir.is_dir() else []
        return [t for t in (processes.running(self.pods_dir, n) for n in names) if t is not None]


def answer(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=3)
    except httpx.HTTPError:
        return None


def web(replicas: int, image: str = IMAGE, **env: str) -> dict:
    return {"metadata": {"name": "web"}, "spec": {
        "replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
            "name": "web", "image": image,
            "env": [{"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "web-db", "key": "DATABASE_URL"}}},
                    {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "web-token", "key": "token"}}},
                    *({"name": k, "value": v} for k, v in env.items())]}]}}}}


def rolled_out(cluster: Cluster, name: str = "web") -> client.V1Deployment | None:
    d = cluster.apps.read_namespaced_deployment(name, NS)
    s = d.status
    wanted = d.spec.replicas
    done = s.observed_generation == d.metadata.generation and (s.available_replicas or 0) == wanted
    return d if done and (s.updated_replicas or 0) == (s.replicas or 0) == wanted else None


@pytest.fixture(scope="module")
def kubelet() -> Iterator[Cluster]:
    state_dir = Path(tempfile.mkdtemp(prefix="drplan-kubelet-"))
    try:
        with running_kube_api(state_dir) as kubeconfig:
            api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig), context="sandbox")
            core = client.CoreV1Api(api)
            core.create_namespace({"metadata": {"name": NS}})
            balancer = f"127.0.0.1:{free_port()}"
            argv = [sys.executable, "-m", "sandbox.kubelet", "--kubeconfig", str(kubeconfig), "--context", "sandbox",
                    "--state-dir", str(state_dir / "kubelet"), "--load-balancer", f"{NS}/web={balancer}"]
            processes.start(state_dir, "kubelet", argv)
            cluster = Cluster(client.AppsV1Api(api), core, f"http://{balancer}", state_dir, argv)
            try:
                wait_for(lambda: answer(f"{cluster.balancer}/health"), 30, "the kubelet's load balancer")
                yield cluster
            finally:
                assert processes.stop(state_dir, "kubelet"), "the kubelet died during the tests"
                assert cluster.running_pods() == [], "pods outlived the kubelet"
                assert "kubelet stopped" in (state_dir / "logs" / "kubelet.log").read_text()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def test_deployment_runs_as_app_processes_behind_the_load_balancer(kubelet: Cluster) -> None:
    absent = answer(f"{kubelet.balancer}/health")
    assert absent.status_code == 503
    assert absent.json() == {"status": "unavailable", "error": f"deployment web not running in namespace {NS}"}

    kubelet.apps.create_namespaced_deployment(NS, web(2, MODE="rehearsal"))
    try:
        d = wait_for(lambda: rolled_out(kubelet), 60, "two ready pods")
        assert {c.type: (c.status, c.reason) for c in d.status.conditions} == {
            "Available": ("True", "MinimumReplicasAvailable"), "Progressing": ("True", "NewReplicaSetAvailable")}
        pods = kubelet.running_pods()
        assert len(pods) == 2
        for pod in pods:
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{pod.pid}/environ").read_text().split("\0") if v)
            args = Path(f"/proc/{pod.pid}/cmdline").read_text().split("\0")
            assert environ["MODE"] == "rehearsal"  # the container's plain env
            assert args[args.index("--namespace") + 1] == NS and args[args.index("--db-secret") + 1] == "web-db"
            assert args[args.index("--token-secret") + 1] == "web-token"
        health = answer(f"{kubelet.balancer}/health")  # the app itself answers: its Secret is missing here
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"

        kubelet.apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 1}})
        wait_for(lambda: rolled_out(kubelet) and len(kubelet.running_pods()) == 1, 30, "scaled to one pod")
        [kept] = kubelet.running_pods()
        assert kept in pods  # scaling down keeps a pod

        restarted = {"spec": {"template": {"metadata": {"annotations": {"restartedAt": "now"}}}}}
        kubelet.apps.patch_namespaced_deployment("web", NS, restarted)
        wait_for(lambda: rolled_out(kubelet) and len(kubelet.running_pods()) == 1
                 and kubelet.running_pods() != [kept], 60, "the rollout of the new template")
        assert kubelet.running_pods()[0] not in pods
    finally:
        kubelet.apps.delete_namespaced_deployment("web", NS)
    wait_for(lambda: kubelet.running_pods() == [], 30, "the pods to stop")
    wait_for(lambda: answer(f"{kubelet.balancer}/health").json()["error"] == absent.json()["error"], 10, "503 again")


def test_broken_image_never_becomes_ready_and_the_old_version_keeps_serving(kubelet: Cluster) -> None:
    kubelet.apps.create_namespaced_deployment(NS, web(1))
    try:
        wait_for(lambda: rolled_out(kubelet), 60, "the good version")
        good = kubelet.running_pods()
        broken = IMAGE.replace(":1.0", ":broken")
        kubelet.apps.patch_namespaced_deployment("web", NS, {"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": broken}]}}}})
        d = wait_for(lambda: (d := kubelet.apps.read_namespaced_deployment("web", NS)).status.observed_generation
                     == 2 and d, 30, "the broken rollout")
        wait_for(lambda: len(kubelet.running_pods()) == 2, 30, "the broken pod's process")
        progressing = {c.type: c for c in d.status.conditions}["Progressing"]
        assert (progressing.status, progressing.reason) == ("False", "ProgressDeadlineExceeded")
        assert broken in progressing.message and "broken build" in progressing.message
        assert d.status.available_replicas == 1 and d.status.replicas == 2  # the old pod, not the broken one
        assert good[0] in kubelet.running_pods()
        assert answer(f"{kubelet.balancer}/health").json()["status"] == "unhealthy"  # the old app answers
    finally:
        kubelet.apps.delete_namespaced_deployment("web", NS)
    wait_for(lambda: kubelet.running_pods() == [], 30, "the pods to stop")

    kubelet.apps.create_namespaced_deployment(NS, web(2, image=broken))
    try:
        wait_for(lambda: len(kubelet.running_pods()) == 2, 60, "two broken pods")
        d = kubelet.apps.read_namespaced_deployment("web", NS)
        assert not d.status.available_replicas and d.status.unavailable_replicas == 2
        wait_for(lambda: answer(f"{kubelet.balancer}/health").json()["error"] ==
                 f"deployment web has no available replicas in namespace {NS}", 10, "503: no available replicas")
    finally:
        kubelet.apps.delete_namespaced_deployment("web", NS)
    wait_for(lambda: kubelet.running_pods() == [], 30, "the pods to stop")


def published(cluster: Cluster, name: str) -> list[client.V1LoadBalancerIngress] | None:
    status = cluster.core.read_namespaced_service(name, NS).status
    return status.load_balancer.ingress if status and status.load_balancer else None


def test_service_of_type_load_balancer_publishes_its_address(kubelet: Cluster) -> None:
    kubelet.apps.create_namespaced_deployment(NS, web(1))
    service = {"metadata": {"name": "web-lb"}, "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                                                        "ports": [{"port": 80, "targetPort": 8080}]}}
    kubelet.core.create_namespaced_service(NS, service)
    try:
        ingress = wait_for(lambda: published(kubelet, "web-lb"), 30, "the load balancer's address")
        assert ingress[0].ip == "127.0.0.1" and ingress[0].ports[0].protocol == "TCP"
        url = f"http://127.0.0.1:{ingress[0].ports[0].port}"
        wait_for(lambda: rolled_out(kubelet), 60, "the pod")
        assert answer(f"{url}/health").json()["status"] == "unhealthy"  # the app (no Secret here)
        assert answer(f"{url}/api/none").status_code == 404
    finally:
        kubelet.core.delete_namespaced_service("web-lb", NS)
        kubelet.apps.delete_namespaced_deployment("web", NS)
    wait_for(lambda: answer(f"{url}/health") is None, 10, "the load balancer to close")
    wait_for(lambda: kubelet.running_pods() == [], 30, "the pods to stop")


def test_restart_after_sigkill_stops_the_pods_left_behind(kubelet: Cluster) -> None:
    kubelet.apps.create_namespaced_deployment(NS, web(1))
    try:
        wait_for(lambda: rolled_out(kubelet), 60, "the pod")
        [left] = kubelet.running_pods()
        os.kill(processes.get(kubelet.state_dir, "kubelet").pid, signal.SIGKILL)
        wait_for(lambda: processes.running(kubelet.state_dir, "kubelet") is None, 10, "the kubelet to die")
        assert left.alive  # an orphan now
        processes.start(kubelet.state_dir, "kubelet", kubelet.argv)
        wait_for(lambda: not left.alive, 30, "the orphan to be stopped")
        wait_for(lambda: rolled_out(kubelet) and kubelet.running_pods(), 60, "a new pod")
    finally:
        kubelet.apps.delete_namespaced_deployment("web", NS)
    wait_for(lambda: kubelet.running_pods() == [], 30, "the pods to stop")


def pod(hash_: str, ready: bool) -> Pod:
    return Pod(f"p-{hash_}-{ready}", NS, "web", hash_, {"app": "web"}, 1, ready=ready)


def test_deployment_status_follows_the_pods() -> None:
    obj = web(2)
    obj["metadata"]["generation"] = 3
    current = template_hash(obj["spec"]["template"])
    status = deployment_status(obj, [pod(current, True), pod("old", True), pod(current, False)], current)
    assert {k: v for k, v in status.items() if k != "conditions"} == {
        "observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Available", "True", "MinimumReplicasAvailable"), ("Progressing", "True", "ReplicaSetUpdated")]
    obj["status"] = status
    assert deployment_status(obj, [pod(current, True), pod("old", True), pod(current, False)], current) == status
    empty = deployment_status(web(0), [], current)
    assert set(empty) == {"observedGeneration", "conditions"}  # zero counts are omitted


@pytest.mark.parametrize(("image", "problem"), [
    (IMAGE, None),
    ("registry.us-west-2.example/devonn/devonn-worker:2", None),
    ("devonn-api", None),
    ("registry.example/devonn/devonn-api:broken", "is the sandbox's broken build"),
    ("nginx:1.27", "is not in the sandbox's registry"),
])
def test_image_problem(image, problem):
    found = image_problem(image)
    assert found == problem if problem is None else problem in found and image in found
