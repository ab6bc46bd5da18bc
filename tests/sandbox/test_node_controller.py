"""The sandbox's EKS node groups: Nodes follow the desired size in moto, up and down, joining NotReady first;
a node removed by hand comes back, a node made NotReady by someone else stays so (against the session sandbox's
DR cluster, pilot light with one node, put back as it was). The controller survives EKS and the Kubernetes API
going away, logs an error once, and stops on SIGTERM."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client import CoreV1Api
from kubernetes.config import new_client_from_config

from drplan import processes
from drplan.clients import aws_client, kube_client
from sandbox import stack
from sandbox.kube_api import write_kubeconfig
from sandbox.node_controller import NODEGROUP_LABEL, NodeController
from tests.helpers import free_port, wait_for
from tests.sandbox.test_kube_api import answers

CLUSTER = "devonn-eks-dr-sandbox"
GROUP = "dev_nodes"


def nodes(core: CoreV1Api) -> dict[str, str]:
    """Node name -> status of its Ready condition, for the node group's nodes."""
    return {n.metadata.name: next(c.status for c in n.status.conditions if c.type == "Ready")
            for n in core.list_node(label_selector=f"{NODEGROUP_LABEL}={GROUP}").items}


def ready(core: CoreV1Api, count: int) -> bool:
    return nodes(core) == {f"{GROUP}-{i}": "True" for i in range(count)}


@pytest.fixture
def scale(sandbox) -> Iterator:
    """Set the node group's desired size in moto; the plan's size is restored (and reached) afterwards."""
    cluster = sandbox.cluster(CLUSTER)
    group = cluster.nodegroups[GROUP]
    eks = aws_client(sandbox, "eks", sandbox.region_of(cluster))

    def set_desired(desired: int) -> None:
        eks.update_nodegroup_config(clusterName=CLUSTER, nodegroupName=GROUP,
                                    scalingConfig={"minSize": group.min, "desiredSize": desired, "maxSize": group.max})
    yield set_desired
    set_desired(group.desired)
    wait_for(lambda: stack.nodes_state(sandbox, cluster)[0], 10, "the plan's node count again")


@pytest.fixture
def core(sandbox) -> CoreV1Api:
    return CoreV1Api(kube_client(sandbox, sandbox.cluster(CLUSTER)))


def test_pilot_light_starts_with_the_plans_nodes(sandbox, core):
    group = sandbox.cluster(CLUSTER).nodegroups[GROUP]
    assert ready(core, group.desired)
    node = core.read_node(f"{GROUP}-0")
    assert node.metadata.labels[NODEGROUP_LABEL] == GROUP
    assert stack.nodes_state(sandbox, sandbox.cluster(CLUSTER)) == (True, f"{GROUP} 1/1 Ready")


def test_ready_nodes_follow_the_node_group_up_and_down(core, scale):
    seen: set[tuple[str, str]] = set()

    def settled(count: int) -> bool:
        seen.update(nodes(core).items())
        return ready(core, count)

    started = time.monotonic()
    scale(3)
    wait_for(lambda: settled(3), 10, "3 Ready nodes", interval=0.05)
    assert time.monotonic() - started >= 0.9, "nodes must take about a second to join"
    assert (f"{GROUP}-2", "False") in seen, "a joining node is registered NotReady first"

    scale(0)
    wait_for(lambda: nodes(core) == {}, 10, "the nodes to leave")

    scale(2)
    wait_for(lambda: ready(core, 2), 10, "2 Ready nodes")


def test_a_deleted_node_comes_back_and_a_failed_node_stays_failed(core, scale):
    scale(2)
    wait_for(lambda: ready(core, 2), 10, "2 Ready nodes")
    core.delete_node(f"{GROUP}-1")
    wait_for(lambda: ready(core, 2), 10, "the deleted node to rejoin")

    failed = {"type": "Ready", "status": "False", "reason": "KubeletStopped", "message": "injected by a test"}
    core.patch_node_status(f"{GROUP}-1", {"status": {"conditions": [failed]}})
    time.sleep(2)  # several rounds of the controller
    assert nodes(core) == {f"{GROUP}-0": "True", f"{GROUP}-1": "False"}
    core.delete_node(f"{GROUP}-1")  # what replacing a broken instance does
    wait_for(lambda: ready(core, 2), 10, "the replacement node")


def test_controller_logs_to_its_file(sandbox, sandbox_dir):
    log = (sandbox_dir / "logs" / f"nodes-{CLUSTER}.log").read_text()
    assert f"node controller for {CLUSTER} (us-west-2) started" in log
    assert f"node {GROUP}-0 Ready" in log


class FlakyEks:
    """Just enough of an EKS client: one node group whose size and availability the test sets."""

    def __init__(self, desired: int):
        self.desired = desired
        self.down = False

    def list_nodegroups(self, clusterName: str, **_: object) -> dict:  # noqa: N803 - boto3's parameter names
        if self.down:
            raise ConnectionError("moto is restarting")
        return {"nodegroups": [GROUP]}

    def describe_nodegroup(self, clusterName: str, nodegroupName: str) -> dict:  # noqa: N803
        return {"nodegroup": {"scalingConfig": {"desiredSize": self.desired}}}


def test_controller_survives_moto_and_the_api_going_away(own_processes: Path):
    """In process against a real kube_api that is restarted (losing every object), with EKS failing for a while:
    nothing is deleted while the node groups cannot be read, and the nodes are back once both answer."""
    listen = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "sandbox.kube_api", "--listen", listen]
    processes.start(own_processes, "kube-api", argv)
    stop = threading.Event()
    try:
        wait_for(lambda: answers(f"http://{listen}/version"), 15, "the Kubernetes API")
        write_kubeconfig(own_processes / "kubeconfig", f"http://{listen}", "t")
        core = CoreV1Api(new_client_from_config(config_file=str(own_processes / "kubeconfig"), context="t"))
        eks = FlakyEks(2)
        controller = NodeController(eks, core, "c", join_seconds=0.3)
        worker = threading.Thread(target=controller.run, args=(stop, 0.1), daemon=True)
        worker.start()
        wait_for(lambda: ready(core, 2), 10, "2 Ready nodes")

        eks.down = True
        time.sleep(0.5)
        assert ready(core, 2), "nodes must stay while EKS cannot be read"
        processes.stop(own_processes, "kube-api")
        time.sleep(0.5)
        processes.start(own_processes, "kube-api", argv)
        wait_for(lambda: answers(f"http://{listen}/version"), 15, "the Kubernetes API again")
        eks.down, eks.desired = False, 3
        wait_for(lambda: ready(core, 3), 10, "3 Ready nodes on the restarted API")
        assert worker.is_alive()
    finally:
        stop.set()


def test_process_logs_errors_and_stops_on_sigterm(own_processes: Path):
    dead = f"http://127.0.0.1:{free_port()}"
    write_kubeconfig(own_processes / "kubeconfig", dead, "t")
    argv = [sys.executable, "-m", "sandbox.node_controller", "--kubeconfig", str(own_processes / "kubeconfig"),
            "--context", "t", "--cluster", "c", "--region", "us-west-2", "--endpoint-url", dead]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    tracked = processes.start(own_processes, "nodes-c", argv, env=env)
    log = Path(tracked.log)
    wait_for(lambda: "cannot reconcile the nodes of c, retrying" in log.read_text(), 20, "the error in the log")
    time.sleep(1.5)  # more failed rounds: logged once, the process keeps going
    assert log.read_text().count("cannot reconcile") == 1
    started = time.monotonic()
    assert processes.stop(own_processes, "nodes-c"), "the node controller died on an error"
    assert time.monotonic() - started < 10
    assert "node controller stopped" in log.read_text()
