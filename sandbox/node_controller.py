"""The sandbox's EKS managed node groups: Kubernetes Nodes that follow each node group's desired size in moto.

Every POLL_SECONDS it reads the cluster's node groups (eks list_nodegroups / describe_nodegroup,
scalingConfig.desiredSize) and reconciles Nodes named `<nodegroup>-<i>`, labelled
`eks.amazonaws.com/nodegroup: <nodegroup>`, the way EKS and the kubelet do, only faster:

* a missing node (i < desired) registers at once with Ready=False (reason NodeJoining) and turns Ready=True
  JOIN_SECONDS later, so code that waits for Ready nodes really waits;
* a surplus node (i >= desired, or its node group is gone) is deleted;
* a node made NotReady by someone else (another reason than NodeJoining, e.g. a test injecting a fault) is left
  as it is.

Errors (moto or the Kubernetes API away or restarting, the cluster not in moto) are logged once and retried on
the next round; nothing is deleted while the node groups cannot be read.

Run as `python -m sandbox.node_controller --kubeconfig FILE --context CTX --cluster NAME --region REGION
--endpoint-url URL`, AWS credentials in the environment; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import threading
import time
from typing import Any

import boto3
from botocore.config import Config
from kubernetes.client import ApiException, CoreV1Api
from kubernetes.config import new_client_from_config

from sandbox.reconcile import reconcile_until

log = logging.getLogger("sandbox.node_controller")

NODEGROUP_LABEL = "eks.amazonaws.com/nodegroup"
JOINING = "NodeJoining"
POLL_SECONDS = 0.5
JOIN_SECONDS = 1.0
REQUEST_TIMEOUT = 2


def _ready_condition(ready: bool) -> dict[str, str]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    reason, message = ("KubeletReady", "kubelet is posting ready status") if ready else (
        JOINING, "node is joining the cluster")
    return {"type": "Ready", "status": str(ready), "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": now}


def node_manifest(nodegroup: str, index: int, cluster: str) -> dict[str, Any]:
    """A freshly registered (not yet Ready) node of `nodegroup`."""
    name = f"{nodegroup}-{index}"
    return {
        "metadata": {
            "name": name,
            "labels": {NODEGROUP_LABEL: nodegroup, "kubernetes.io/hostname": name,
                       "sandbox/cluster": cluster},
        },
        "spec": {"providerID": f"aws:///sandbox/{cluster}/{name}"},
        "status": {"conditions": [_ready_condition(False)]},
    }


def _ready(node: Any) -> Any:
    """The node's Ready condition, or None."""
    return next((c for c in (node.status.conditions if node.status else None) or [] if c.type == "Ready"), None)


class NodeController:
    def __init__(self, eks: Any, core: CoreV1Api, cluster: str, join_seconds: float = JOIN_SECONDS):
        self.eks = eks
        self.core = core
        self.cluster = cluster
        self.join_seconds = join_seconds
        self._ready_at: dict[str, float] = {}  # node uid -> when it turns Ready

    def desired_sizes(self) -> dict[str, int]:
        """Node group -> desired size, as EKS (moto) has it now."""
        names: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self.eks.list_nodegroups(clusterName=self.cluster, **token)
            names += page.get("nodegroups", [])
            if not page.get("nextToken"):
                break
            token = {"nextToken": page["nextToken"]}
        return {
            name: int(self.eks.describe_nodegroup(clusterName=self.cluster, nodegroupName=name)["nodegroup"]
                      ["scalingConfig"]["desiredSize"])
            for name in names
        }

    def reconcile(self) -> None:
        desired = self.desired_sizes()
        nodes = self.core.list_node(label_selector=NODEGROUP_LABEL, _request_timeout=REQUEST_TIMEOUT).items
        existing: dict[str, Any] = {}
        for node in nodes:
            group = (node.metadata.labels or {}).get(NODEGROUP_LABEL, "")
            match = re.fullmatch(re.escape(group) + r"-(\d+)", node.metadata.name)
            if not match:
                continue  # not one of ours
            if int(match.group(1)) >= desired.get(group, 0):
                self.core.delete_node(node.metadata.name, _request_timeout=REQUEST_TIMEOUT)
                self._ready_at.pop(node.metadata.uid, None)
                log.info("node %s left (node group %s at %d)", node.metadata.name, group, desired.get(group, 0))
            else:
                existing[node.metadata.name] = node
        now = time.monotonic()
        for group, size in sorted(desired.items()):
            for index in range(size):
                name = f"{group}-{index}"
                node = existing.get(name)
                if node is None:
                    try:
                        created = self.core.create_node(node_manifest(group, index, self.cluster),
                                                        _request_timeout=REQUEST_TIMEOUT)
                    except ApiException as exc:
                        if exc.status != 409:
                            raise
                        continue  # raced with ourselves before a restart; next round sees it
                    self._ready_at[created.metadata.uid] = now + self.join_seconds
                    log.info("node %s registered (node group %s at %d), joining", name, group, size)
                    continue
                condition = _ready(node)
                if condition is None or condition.status == "True" or condition.reason != JOINING:
                    continue
                if now >= self._ready_at.setdefault(node.metadata.uid, now + self.join_seconds):
                    self.core.patch_node_status(name, {"status": {"conditions": [_ready_condition(True)]}},
                                                _request_timeout=REQUEST_TIMEOUT)
                    self._ready_at.pop(node.metadata.uid, None)
                    log.info("node %s Ready", name)

    def run(self, stop: threading.Event, interval: float = POLL_SECONDS) -> None:
        reconcile_until(stop, interval, self.reconcile, log, f" the nodes of {self.cluster}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--context", required=True)
    parser.add_argument("--cluster", required=True, help="EKS cluster name")
    parser.add_argument("--region", required=True)
    parser.add_argument("--endpoint-url", default=None, help="AWS endpoint (the sandbox's moto)")
    parser.add_argument("--join-seconds", type=float, default=JOIN_SECONDS,
                        help="delay between a node registering and it turning Ready")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retry warnings while the API is away

    eks = boto3.client("eks", region_name=args.region, endpoint_url=args.endpoint_url, config=Config(
        retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=5))
    api = new_client_from_config(config_file=args.kubeconfig, context=args.context)
    controller = NodeController(eks, CoreV1Api(api), args.cluster, args.join_seconds)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("node controller for %s (%s) started", args.cluster, args.region)
    controller.run(stop)
    log.info("node controller stopped")


if __name__ == "__main__":
    main()
