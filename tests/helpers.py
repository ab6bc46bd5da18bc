"""Small helpers shared by the tests: free loopback ports, polling, snapshots of the sandbox, own PostgreSQL
topologies."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent  # the checkout: prefect.yaml, kubernetes/, the packages


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


@contextmanager
def prefect_api_url(url: str | None) -> Iterator[None]:
    """PREFECT_API_URL as a command sees it: `url`, or unset. The session's Prefect server (prefect_test_harness)
    sets it in the settings context, which the environment does not override."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url is None:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            yield
    else:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until predicate() is truthy and return its value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)
    return value


def logged_text(caplog) -> str:
    """Every log message pytest captured, as one text (to assert that no secret was logged)."""
    return "\n".join(r.getMessage() for r in caplog.records)


def stack_snapshot(plan, database: str) -> dict:
    """What a dry run must leave exactly as it was: each cluster's namespace (deployments with their status and
    resourceVersion, services, config maps, Secret names and data) and node group sizes, every RDS instance of both
    regions, the Route 53 records, and each PostgreSQL member's role and fence (or that it is down)."""
    from kubernetes import client as k8s

    from drplan.clients import aws_client, db_credentials, kube_client, pg_target
    from drplan.errors import DrplanError
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
    for cluster in plan.clusters:
        eks = aws_client(plan, "eks", plan.region_of(cluster))
        snapshot[f"eks {cluster.name}"] = [
            eks.describe_nodegroup(clusterName=cluster.name, nodegroupName=name)["nodegroup"]["scalingConfig"]
            for name in cluster.nodegroups]
    if plan.dns:
        r53 = aws_client(plan, "route53")
        for zone in r53.list_hosted_zones()["HostedZones"]:
            snapshot[f"dns {zone['Name']}"] = r53.list_resource_record_sets(HostedZoneId=zone["Id"])[
                "ResourceRecordSets"]
    db = plan.database(database)
    if db.kind.value == "postgres":
        for role in db.members:
            try:
                with pg_target(plan, db, role, db_credentials(plan, db)).connect() as conn:
                    snapshot[f"postgres {role}"] = conn.execute(
                        "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')").fetchone()
            except DrplanError:
                snapshot[f"postgres {role}"] = "down"
    return snapshot


@contextmanager
def clusters_restored(plan) -> Iterator[None]:
    """Put every cluster of `plan` back as it was afterwards (for tests that fail over a region): deployments
    created since are deleted, replicas and Secret data set back and the deployments awaited, node groups resized
    and their nodes awaited."""
    from kubernetes import client as k8s

    from drplan.clients import aws_client, kube_client
    from tasks.eks import ready_nodes
    from tasks.k8s import wait_deployment_available

    def state(cluster):
        api = kube_client(plan, cluster)
        eks = aws_client(plan, "eks", plan.region_of(cluster))
        replicas = {d.metadata.name: d.spec.replicas
                    for d in k8s.AppsV1Api(api).list_namespaced_deployment(cluster.namespace).items}
        secrets = {s.metadata.name: s.data for s in k8s.CoreV1Api(api).list_namespaced_secret(cluster.namespace).items}
        groups = {g: eks.describe_nodegroup(clusterName=cluster.name, nodegroupName=g)["nodegroup"]["scalingConfig"]
                  for g in cluster.nodegroups}
        return api, eks, replicas, secrets, groups

    before = {cluster.name: state(cluster) for cluster in plan.clusters}
    try:
        yield
    finally:
        for cluster in plan.clusters:
            api, eks, replicas, secrets, groups = before[cluster.name]
            apps, core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)
            for d in apps.list_namespaced_deployment(cluster.namespace).items:
                if d.metadata.name not in replicas:
                    apps.delete_namespaced_deployment(d.metadata.name, cluster.namespace)
                elif d.spec.replicas != replicas[d.metadata.name]:
                    apps.patch_namespaced_deployment(d.metadata.name, cluster.namespace,
                                                     {"spec": {"replicas": replicas[d.metadata.name]}})
            for name, data in secrets.items():
                core.patch_namespaced_secret(name, cluster.namespace, {"data": data})
            for name in replicas:  # the kubelet runs their pods again
                wait_deployment_available(api, cluster.namespace, name, timeout=120)
            for group, scaling in groups.items():
                eks.update_nodegroup_config(clusterName=cluster.name, nodegroupName=group, scalingConfig=scaling)
                wait_for(lambda a=api, g=group, n=scaling["desiredSize"]: ready_nodes(a, g) == n, 60,
                         f"{scaling['desiredSize']} Ready nodes in {cluster.name}/{group}")


@contextmanager
def own_postgres_topology(sandbox_plan_path: Path, sandbox_dir: Path, database: str, rpo: str = "5s",
                          archive_timeout: str = "60s") -> Iterator[Path]:
    """A copy of the sandbox plan whose `database` is a new real primary + streaming replica + DR replica with
    heartbeat (own WAL archive prefix, own state dir, database RPO `rpo`, WAL switched at least every
    `archive_timeout`), for tests that promote or stop servers.
    Yields the plan's path; stops every process and deletes the state afterwards."""
    import shutil
    import uuid

    import yaml
    from rich.console import Console

    from drplan import processes
    from drplan.plan import load_plan
    from sandbox import stack
    from sandbox.launchers import world_traversable_dir

    directory = world_traversable_dir("drplan-topology-")
    shutil.copy2(sandbox_dir / "secrets.json", directory / "secrets.json")  # the password moto's secret holds
    data = yaml.safe_load(sandbox_plan_path.read_text())
    data["objectives"]["rpo"]["database"] = rpo
    data["sandbox"]["state_dir"] = str(directory)
    data["sandbox"]["archive_timeout"] = archive_timeout  # default: a barman-cloud call a minute, not 12
    db = next(d for d in data["databases"] if d["name"] == database)
    db["endpoints"] = dict(zip(db["endpoints"], (f"127.0.0.1:{p}" for p in free_ports(3)), strict=True))
    db["backup"]["server_name"] = f"topology-{uuid.uuid4().hex[:8]}"
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = load_plan(path)
    try:
        stack.up_postgres(plan, plan.database(database), stack.sandbox_postgres(plan, plan.database(database)),
                          Console(quiet=True))
        yield path
    finally:
        for name in processes.tracked_names(directory):
            processes.stop(directory, name)
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def own_rds_topology(plan_path: Path, database: str = "devonn-rds") -> Iterator[Path]:
    """A copy of the plan at `plan_path` (written beside it) whose RDS `database` is a new Multi-AZ primary, read
    replica and cross-region DR replica of its own on the sandbox's RDS data plane (real PostgreSQL), with demo
    data and a heartbeat, for tests that promote or fail over. Yields the copy's path; deletes the instances and
    stops the heartbeat afterwards."""
    import uuid

    import yaml
    from botocore.exceptions import ClientError
    from rich.console import Console

    from drplan import processes
    from drplan.clients import aws_client
    from drplan.plan import load_plan
    from sandbox import aws_seed, stack

    suffix = uuid.uuid4().hex[:6]
    data = yaml.safe_load(plan_path.read_text())
    data["name"] = f"{data['name']}-{suffix}"  # its instances are tagged with it: the session's are not its members
    spec = next(d for d in data["databases"] if d["name"] == database)
    spec["primary"], spec["replica"] = f"{database}-{suffix}", f"{database}-replica-{suffix}"
    spec["dr_replica"]["identifier"] = f"{database}-dr-{suffix}"
    path = plan_path.with_name(f"plan-{database}-{suffix}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = load_plan(path)
    db = plan.database(database)
    password = stack.sandbox_secrets(plan.state_dir())["db_password"]
    try:
        aws_seed.ensure_rds(plan, password)
        stack.up_rds(plan, db, stack.rds_view(plan, db, password), Console(quiet=True))
        yield path
    finally:
        processes.stop(plan.state_dir(), f"heartbeat-{db.primary}")
        for role in ("dr_replica", "replica", "primary"):
            try:
                aws_client(plan, "rds", plan.member_region(db, role)).delete_db_instance(
                    DBInstanceIdentifier=db.members[role], SkipFinalSnapshot=True)
            except ClientError:
                pass  # never created, or already deleted by the test
        path.unlink(missing_ok=True)


def in_recovery(plan, database: str, role: str) -> bool:
    """Whether the database member with `role` is a standby (pg_is_in_recovery)."""
    from drplan.clients import db_credentials, pg_target

    db = plan.database(database)
    with pg_target(plan, db, role, db_credentials(plan, db)).connect() as conn:
        return conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]


def processes_with_env(key: str, value: str) -> list[str]:
    """Every process whose environment holds `key=value` (e.g. all a Prefect home started), as `pid: command`."""
    needle = f"{key}={value}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name}: {command[:120]}")
        except OSError:
            continue
    return found
