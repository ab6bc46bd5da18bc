"""The sandbox's kubelet: a cluster's Deployments run as app processes, reachable through load balancers.

Every POLL_SECONDS it lists the Deployments of every namespace and reconciles their pods the way the deployment
controller and the kubelet do together, only on one machine:

* a pod is a process (`python -m sandbox.demo_app` on a free loopback port, tracked by `drplan.processes` in
  this kubelet's state directory) for an image of the sandbox's registry (repository `devonn-api` or
  `devonn-worker`, any registry and tag). It gets the container's plain env values and those from ConfigMaps
  (configMapKeyRef, read when the pod starts: a changed ConfigMap takes a rollout) in its environment, and the
  names of the Secrets its env takes DATABASE_URL and API_TOKEN from (the app reads the Secrets itself);
* a pod is ready once its /health answers at all (any HTTP status: a database outage is the app's to report)
  and unready after FAILURE_THRESHOLD probes in a row without an answer; a pod whose process exits is replaced;
* an image tagged `broken` (the sandbox's broken build) runs an app that never listens, and an image the
  sandbox's registry does not hold gets pods without a process: neither ever becomes ready, and the Deployment
  reports Progressing=False (ProgressDeadlineExceeded) naming the image;
* `replicas` pods per Deployment; a changed pod template rolls out with a surge (the new pods start, an old pod
  stops for each new one ready, so a broken rollout leaves the old pods serving); a deleted Deployment's pods
  stop;
* the Deployment's status (observedGeneration, replicas, updatedReplicas, ready/availableReplicas, conditions) is
  what its pods are, written through the status subresource only when it changes.

Load balancers (HTTP, like an ALB in front of the ready pods; none ready: 503 with the reason as JSON):
* `--load-balancer NS/DEPLOYMENT=HOST:PORT`: bound at start, in front of that Deployment's pods (the plan's health
  URLs; in a pilot-light region it exists before anything is deployed, as a provisioned ALB does);
* every Service of type LoadBalancer: a free loopback port, published in the Service's
  status.loadBalancer.ingress (`ip` 127.0.0.1 and `ports`), in front of the ready pods its selector matches;
  closed when the Service is deleted.

Errors (the API away or restarting) are logged once and retried; the pods keep running meanwhile. On start it
stops pods a killed predecessor left; SIGTERM stops every pod, then the kubelet.

Run as `python -m sandbox.kubelet --kubeconfig FILE --context CTX --state-dir DIR [--load-balancer ...]`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import itertools
import json
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, AppsV1Api, CoreV1Api
from kubernetes.config import new_client_from_config

from drplan import processes
from drplan.pgserver import free_port
from drplan.plan import host_port
from sandbox.reconcile import reconcile_until

log = logging.getLogger("sandbox.kubelet")

APP_IMAGES = ("devonn-api", "devonn-worker")
"""Repositories the sandbox's registry holds (any registry, any tag); each runs sandbox.demo_app."""
BROKEN_TAG = "broken"
"""The tag of the sandbox's broken build: its app starts but never listens."""
SECRET_FLAGS = {"DATABASE_URL": "--db-secret", "API_TOKEN": "--token-secret"}
POLL_SECONDS = 0.5
FAILURE_THRESHOLD = 3
PROBE_TIMEOUT = 3.0  # above the app's database timeout: a /health that waits for a slow database still answers
PROXY_TIMEOUT = 10.0
REQUEST_TIMEOUT = 5
HOST = "127.0.0.1"


def _repository_and_tag(image: str) -> tuple[str, str]:
    if ":" in image.rsplit("/", 1)[-1]:
        repository, _, tag = image.rpartition(":")
        return repository, tag
    return image, "latest"


def in_registry(image: str) -> bool:
    return _repository_and_tag(image)[0].rsplit("/", 1)[-1] in APP_IMAGES


def is_broken(image: str) -> bool:
    return _repository_and_tag(image)[1] == BROKEN_TAG


def image_problem(image: str) -> str | None:
    """Why pods of `image` can never become ready in the sandbox, or None for a runnable image."""
    if not in_registry(image):
        return f"image {image} is not in the sandbox's registry (it holds {', '.join(APP_IMAGES)})"
    if is_broken(image):
        return f"image {image} is the sandbox's broken build: its app never becomes ready"
    return None


def pod_argv(namespace: str, template: dict[str, Any], port: int, kubeconfig: str, context: str) -> list[str]:
    """The app's command line for a pod of `template`: where to listen, and the names of its Secrets."""
    container = template["spec"]["containers"][0]
    argv = [sys.executable, "-m", "sandbox.demo_app", "--listen", f"{HOST}:{port}", "--kubeconfig", kubeconfig,
            "--context", context, "--namespace", namespace]
    for var in container.get("env") or []:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref and var.get("name") in SECRET_FLAGS:
            argv += [SECRET_FLAGS[var["name"]], ref["name"]]
    if is_broken(container.get("image", "")):
        argv.append("--broken")
    return argv


def pod_env(template: dict[str, Any], config_map: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """The container's plain env values and those from ConfigMaps (`config_map(name)` is its data), resolved once
    at the pod's start as a kubelet does (those from Secrets the app reads itself). A missing ConfigMap or key
    raises KeyError: the pod does not start (CreateContainerConfigError)."""
    env = {}
    for var in template["spec"]["containers"][0].get("env") or []:
        ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif ref:
            data = config_map(ref["name"])
            if ref["key"] not in data:
                raise KeyError(f"ConfigMap {ref['name']} has no key {ref['key']}")
            env[var["name"]] = data[ref["key"]]
    return env


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Pod:
    name: str
    namespace: str
    deployment: str
    template_hash: str
    labels: dict[str, str]
    port: int | None  # None: no process (an image the sandbox cannot run)
    tracked: processes.Tracked | None = None
    ready: bool = False
    failures: int = 0


@dataclass(frozen=True)
class Target:
    """What a load balancer sends requests to: the ready pods of a Deployment or of a Service's selector."""
    namespace: str
    deployment: str | None = None
    service: str | None = None
    selector: tuple[tuple[str, str], ...] = ()

    def matches(self, pod: Pod) -> bool:
        if pod.namespace != self.namespace:
            return False
        if self.deployment is not None:
            return pod.deployment == self.deployment
        return bool(self.selector) and set(self.selector) <= pod.labels.items()


class LoadBalancer(ThreadingHTTPServer):
    """An HTTP load balancer on loopback: each request to the next ready pod of its target."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], kubelet: Kubelet, target: Target):
        super().__init__(address, _Forward)
        self.kubelet = kubelet
        self.target = target
        self._turn = itertools.count()
        self.thread = threading.Thread(target=self.serve_forever, name=f"lb-{address[1]}", daemon=True)
        self.thread.start()

    def next_ports(self) -> tuple[list[int], str]:
        """The ready pods' ports, starting with this request's turn, or the reason there are none."""
        ports, reason = self.kubelet.ready_ports(self.target)
        if not ports:
            return [], reason
        start = next(self._turn) % len(ports)
        return ports[start:] + ports[:start], reason

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    server: LoadBalancer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        ports, reason = self.server.next_ports()
        for port in ports:
            conn = http.client.HTTPConnection(HOST, port, timeout=PROXY_TIMEOUT)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                answer = conn.getresponse()
                self._reply(answer.status, answer.read(), answer.getheader("Content-Type") or "application/json")
                return
            except OSError as exc:
                reason = f"pod on port {port} did not answer: {type(exc).__name__}"
            finally:
                conn.close()
        error = {"error": reason}
        self._reply(503, json.dumps({"status": "unavailable", **error} if self.path.startswith("/health")
                                    else error).encode(), "application/json")

    def _reply(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _answers(port: int) -> bool:
    """Whether the app on `port` answers GET /health at all."""
    conn = http.client.HTTPConnection(HOST, port, timeout=PROBE_TIMEOUT)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _condition(kind: str, status: bool, reason: str, message: str, old: dict[str, Any] | None) -> dict[str, str]:
    """A Deployment condition, keeping its times while it says the same."""
    same = old is not None and (old.get("status"), old.get("reason")) == (str(status), reason)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    since = old.get("lastTransitionTime", now) if same else now
    return {"type": kind, "status": str(status), "reason": reason, "message": message,
            "lastUpdateTime": old.get("lastUpdateTime", now) if same else now, "lastTransitionTime": since}


def deployment_status(obj: dict[str, Any], pods: list[Pod], current: str) -> dict[str, Any]:
    """The status of a Deployment whose pods are `pods` (those of template hash `current` are updated)."""
    spec = obj.get("spec") or {}
    wanted = spec.get("replicas", 1)
    updated = [p for p in pods if p.template_hash == current]
    available = sum(p.ready for p in pods)
    old = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}
    problem = image_problem(spec["template"]["spec"]["containers"][0].get("image", ""))
    is_available = available >= wanted
    conditions = [_condition("Available", is_available,
                             "MinimumReplicasAvailable" if is_available else "MinimumReplicasUnavailable",
                             "Deployment has minimum availability." if is_available
                             else "Deployment does not have minimum availability.", old.get("Available"))]
    if problem and wanted:
        conditions.append(_condition("Progressing", False, "ProgressDeadlineExceeded",
                                     f"ReplicaSet has timed out progressing: {problem}.", old.get("Progressing")))
    elif len(updated) == wanted == len(pods) and sum(p.ready for p in updated) == wanted:
        conditions.append(_condition("Progressing", True, "NewReplicaSetAvailable",
                                     "ReplicaSet has successfully progressed.", old.get("Progressing")))
    else:
        conditions.append(_condition("Progressing", True, "ReplicaSetUpdated", "ReplicaSet is progressing.",
                                     old.get("Progressing")))
    counts = {"replicas": len(pods), "updatedReplicas": len(updated), "readyReplicas": available,
              "availableReplicas": available, "unavailableReplicas": max(0, wanted - available)}
    status: dict[str, Any] = {"observedGeneration": obj["metadata"].get("generation", 1)}
    status.update({k: v for k, v in counts.items() if v})  # the API server omits zero counts
    status["conditions"] = conditions
    return status


class Kubelet:
    def __init__(self, api: ApiClient, kubeconfig: str, context: str, state_dir: Path,
                 load_balancers: dict[Target, tuple[str, int]] | None = None):
        self.apps = AppsV1Api(api)
        self.core = CoreV1Api(api)
        self.kubeconfig = kubeconfig
        self.context = context
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self.pods: list[Pod] = []
        self._deployments: set[tuple[str, str]] = set()
        self._fixed = [LoadBalancer(address, self, target) for target, address in (load_balancers or {}).items()]
        self._services: dict[tuple[str, str], LoadBalancer] = {}
        self._stopping: list[threading.Thread] = []
        self._failing: dict[str, str] = {}  # deployment -> the error that stops it, logged once
        self._probes = ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe")

    def ready_ports(self, target: Target) -> tuple[list[int], str]:
        """Ports of the target's ready pods, and why there are none (the phrase the 503 carries)."""
        with self._lock:
            pods = [p for p in self.pods if target.matches(p)]
            exists = (target.namespace, target.deployment) in self._deployments
        where = f"namespace {target.namespace}"
        if target.deployment is None:
            reason = f"service {target.service} has no ready endpoints in {where}"
        elif not exists:
            reason = f"deployment {target.deployment} not running in {where}"
        else:
            reason = f"deployment {target.deployment} has no available replicas in {where}"
        return [p.port for p in pods if p.ready and p.port is not None], reason

    def _list(self, call: Callable[..., Any]) -> list[dict[str, Any]]:
        response = call(_preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        return json.loads(response.data)["items"]

    def reconcile(self) -> None:
        deployments = self._list(self.apps.list_deployment_for_all_namespaces)
        services = self._list(self.core.list_service_for_all_namespaces)
        keys = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in deployments}
        with self._lock:
            self._deployments = keys
        for pod in [p for p in self.pods if (p.namespace, p.deployment) not in keys]:
            self._stop(pod, "its deployment is gone")
        self._probe(list(self.pods))
        failing = {}
        for obj in deployments:
            key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
            try:
                self._reconcile_deployment(obj)
            except Exception as exc:  # noqa: BLE001 - one bad Deployment must not stop the others
                failing[key] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                if failing[key] != self._failing.get(key):
                    log.warning("cannot run deployment %s: %s", key, failing[key])
        self._failing = failing
        self._reconcile_services(services)

    def _reconcile_deployment(self, obj: dict[str, Any]) -> None:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        namespace, name = meta["namespace"], meta["name"]
        template, wanted = spec["template"], spec.get("replicas", 1)
        current = template_hash(template)
        mine = [p for p in self.pods if (p.namespace, p.deployment) == (namespace, name)]
        for pod in mine:
            if pod.tracked is not None and not pod.tracked.alive:
                self._stop(pod, "its process exited")
        updated = [p for p in self.pods if (p.namespace, p.deployment, p.template_hash) == (namespace, name, current)]
        for pod in updated[wanted:]:
            self._stop(pod, f"scaled to {wanted}")
        for _ in range(wanted - len(updated)):
            self._start(namespace, name, template, current)
        new_ready = sum(p.ready for p in self.pods
                        if (p.namespace, p.deployment, p.template_hash) == (namespace, name, current))
        outdated = sorted((p for p in self.pods if (p.namespace, p.deployment) == (namespace, name)
                           and p.template_hash != current), key=lambda p: p.ready)
        for pod in outdated[:len(outdated) - max(0, wanted - new_ready)]:
            self._stop(pod, "replaced by the new pod template")
        pods = [p for p in self.pods if (p.namespace, p.deployment) == (namespace, name)]
        status, old = deployment_status(obj, pods, current), obj.get("status") or {}
        if status != old:  # a merge patch: a count now zero (omitted) is removed explicitly
            self.apps.patch_namespaced_deployment_status(name, namespace, {"status": {
                key: status.get(key) for key in old.keys() | status.keys()}}, _request_timeout=REQUEST_TIMEOUT)

    def _start(self, namespace: str, deployment: str, template: dict[str, Any], current: str) -> None:
        name = f"{namespace}.{deployment}-{current}-{secrets.token_hex(3)}"
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        image = template["spec"]["containers"][0].get("image", "")
        if not in_registry(image):
            pod = Pod(name, namespace, deployment, current, labels, None)
            log.warning("pod %s cannot run: %s", name, image_problem(image))
        else:
            env = pod_env(template, lambda config: self.core.read_namespaced_config_map(
                config, namespace, _request_timeout=REQUEST_TIMEOUT).data or {})
            port = free_port()
            tracked = processes.start(self.state_dir, name,
                                      pod_argv(namespace, template, port, self.kubeconfig, self.context),
                                      env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
            pod = Pod(name, namespace, deployment, current, labels, port, tracked)
            log.info("pod %s started on port %d (%s)", name, port, image)
        with self._lock:
            self.pods.append(pod)

    def _stop(self, pod: Pod, why: str) -> None:
        """Take the pod out of service at once; its process is stopped in the background (SIGTERM, then KILL)."""
        with self._lock:
            self.pods.remove(pod)
        log.info("pod %s stopping: %s", pod.name, why)
        if pod.tracked is not None:
            stopping = threading.Thread(target=processes.stop, args=(self.state_dir, pod.name), daemon=True)
            self._stopping = [t for t in self._stopping if t.is_alive()] + [stopping]
            stopping.start()

    def _probe(self, pods: list[Pod]) -> None:
        """The readiness probe of each pod with a process, all at once."""
        pods = [p for p in pods if p.port is not None]
        for pod, answered in zip(pods, self._probes.map(_answers, [p.port for p in pods]), strict=True):
            pod.failures = 0 if answered else pod.failures + 1
            ready = answered or (pod.ready and pod.failures < FAILURE_THRESHOLD)
            if ready != pod.ready:
                log.info("pod %s %s", pod.name, "ready" if ready else "not ready")
                pod.ready = ready

    def _reconcile_services(self, services: list[dict[str, Any]]) -> None:
        balanced = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services
                    if (s.get("spec") or {}).get("type") == "LoadBalancer"}
        for key in [k for k in self._services if k not in balanced]:
            self._services.pop(key).close()
            log.info("load balancer of service %s/%s closed", *key)
        for (namespace, name), svc in balanced.items():
            selector = tuple(sorted((svc["spec"].get("selector") or {}).items()))
            target = Target(namespace, service=name, selector=selector)
            lb = self._services.get((namespace, name))
            if lb is None or lb.target != target:
                if lb is not None:
                    lb.close()
                lb = self._services[(namespace, name)] = LoadBalancer((HOST, free_port()), self, target)
                log.info("load balancer of service %s/%s on %s:%d", namespace, name, HOST, lb.server_address[1])
            ingress = {"loadBalancer": {"ingress": [
                {"ip": HOST, "ports": [{"port": lb.server_address[1], "protocol": "TCP"}]}]}}
            if svc.get("status") != ingress:
                self.core.patch_namespaced_service_status(name, namespace, {"status": ingress},
                                                          _request_timeout=REQUEST_TIMEOUT)

    def run(self, stop: threading.Event, interval: float = POLL_SECONDS) -> None:
        reconcile_until(stop, interval, self.reconcile, log, "")

    def shutdown(self) -> None:
        """Close every load balancer and stop every pod."""
        for lb in [*self._fixed, *self._services.values()]:
            lb.close()
        for pod in list(self.pods):
            self._stop(pod, "kubelet stopping")
        for stopping in self._stopping:
            stopping.join()
        self._probes.shutdown()


def parse_load_balancer(value: str) -> tuple[Target, tuple[str, int]]:
    """NS/DEPLOYMENT=HOST:PORT."""
    where, _, address = value.partition("=")
    namespace, _, deployment = where.partition("/")
    if not (namespace and deployment and address):
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAMESPACE/DEPLOYMENT=HOST:PORT")
    return Target(namespace, deployment=deployment), host_port(address)


def stop_leftovers(state_dir: Path) -> None:
    """Stop the pods a killed kubelet left running in `state_dir`."""
    for name in processes.tracked_names(state_dir) if state_dir.is_dir() else []:
        if processes.stop(state_dir, name):
            log.info("stopped pod %s left by a previous kubelet", name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--context", required=True)
    parser.add_argument("--state-dir", required=True, type=Path, help="where the pods' processes are tracked")
    parser.add_argument("--load-balancer", action="append", default=[], type=parse_load_balancer,
                        metavar="NS/DEPLOYMENT=HOST:PORT", help="a load balancer in front of a Deployment's pods")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retry warnings while the API is away

    stop_leftovers(args.state_dir)
    api = new_client_from_config(config_file=args.kubeconfig, context=args.context)
    kubelet = Kubelet(api, args.kubeconfig, args.context, args.state_dir, dict(args.load_balancer))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("kubelet for %s started", args.context)
    try:
        kubelet.run(stop)
    finally:
        kubelet.shutdown()
    log.info("kubelet stopped")


if __name__ == "__main__":
    main()
