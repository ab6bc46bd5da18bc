"""Small helpers shared by the tests: free loopback ports, polling, temp dirs the PostgreSQL OS user can reach."""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until predicate() is truthy and return its value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)
    return value


def world_traversable_dir(prefix: str) -> Path:
    """A temp dir the PostgreSQL OS user can reach (pytest's own tmp dirs are 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def logged_text(caplog) -> str:
    """Every log message pytest captured, as one text (to assert that no secret was logged)."""
    return "\n".join(r.getMessage() for r in caplog.records)


def stack_snapshot(plan, database: str) -> dict:
    """What a dry run must leave exactly as it was: the cluster namespace (deployments with their status and
    resourceVersion, services, config maps, Secret names and data), every RDS instance of both regions, and each
    PostgreSQL member's role."""
    from kubernetes import client as k8s

    from drplan.clients import aws_client, db_credentials, kube_client, pg_target
    from tasks.k8s import export_namespace

    snapshot: dict[str, Any] = {}
    for cluster in plan.clusters:
        api = kube_client(plan, cluster)
        snapshot[cluster.name] = export_namespace(api, cluster.namespace)
        snapshot[f"{cluster.name} secrets"] = {
            s.metadata.name: (s.metadata.resource_version, s.data)
            for s in k8s.CoreV1Api(api).list_namespaced_secret(cluster.namespace).items}
    for region in {plan.aws.region, plan.aws.dr_region} - {None}:
        snapshot[f"rds {region}"] = sorted(
            (i["DBInstanceIdentifier"], i["DBInstanceStatus"], i.get("ReadReplicaSourceDBInstanceIdentifier"))
            for i in aws_client(plan, "rds", region).describe_db_instances()["DBInstances"])
    db = plan.database(database)
    if db.kind.value == "postgres":
        for role in db.members:
            with pg_target(plan, db, role, db_credentials(plan, db)).connect() as conn:
                snapshot[f"postgres {role}"] = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    return snapshot
