"""`drplan sandbox up | status | down`: every local stand-in the plan needs, in one state directory.

Order of `up`: moto (AWS, with the RDS data plane: real PostgreSQL behind every RDS instance) -> seed AWS (RDS
instances available) -> self-managed PostgreSQL primary, demo data, base backup, replicas, heartbeat -> demo data
and heartbeat of each RDS database -> per cluster a Kubernetes API (one for the primary region, one for the DR
region), a node controller that keeps its Nodes in step with the EKS node groups in moto, each service's Secrets
and (primary region only: the DR region is a pilot light) the deployments from its manifests -> per cluster a
kubelet running its Deployments' pods as demo app processes, with a load balancer on each service's health URL
address (in the DR region answering 503 until a region failover deploys the app there) -> a first bucket and
configuration backup. Each step finds what is already there and only completes what
is missing.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from rich.console import Console

from drplan import processes
from drplan.clients import aws_client, child_aws_env, kube_client, member_endpoint
from drplan.errors import DrplanError
from drplan.pgserver import PostgresError, ensure_os_user
from drplan.plan import Cluster, Database, DatabaseKind, Plan, Service, host_port
from drplan.timeutil import utcnow
from flows.config_backup import export_configuration
from sandbox import aws_seed, demo_data
from sandbox.kube_api import write_kubeconfig
from sandbox.launchers import http_ok, start_moto, wait_until
from sandbox.postgres import SandboxPostgres, heartbeat_state

PYTHON = sys.executable
TOKEN_SECRET = "devonn-api-token"


@dataclass(frozen=True)
class Component:
    name: str
    address: str
    pid: int | None
    healthy: bool
    detail: str


def moto_address(plan: Plan) -> tuple[str, int]:
    if not plan.aws.is_loopback:
        raise DrplanError("the sandbox needs aws.endpoint_url on loopback (e.g. http://127.0.0.1:15900)")
    return host_port(plan.aws.endpoint_url.split("://", 1)[1].rstrip("/"))


def sandbox_secrets(directory: Path) -> dict[str, str]:
    """The sandbox's generated database password and API token (0600 file, created once)."""
    path = directory / "secrets.json"
    if path.is_file():
        return json.loads(path.read_text())
    values = {"db_password": secrets.token_urlsafe(24), "api_token": secrets.token_urlsafe(24)}
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(values, out)
    return values


def postgres_of(plan: Plan, db: Database, directory: Path, password: str) -> SandboxPostgres:
    return SandboxPostgres.for_plan(plan, db, aws_seed.ADMIN_USER, password, directory)


def sandbox_postgres(plan: Plan, db: Database) -> SandboxPostgres:
    """The sandbox's servers of `db` (for a flow that stops or starts one, e.g. a Multi-AZ failover test)."""
    directory = plan.state_dir()
    return postgres_of(plan, db, directory, sandbox_secrets(directory)["db_password"])


def db_secret(service: Service) -> str:
    """The Kubernetes Secret holding the service's DATABASE_URL (its manifest references it)."""
    return f"{service.name}-db"


def rds_view(plan: Plan, db: Database, password: str) -> SandboxPostgres:
    """Connections to an RDS database's members through their endpoints (demo data, heartbeat): the servers
    themselves belong to the RDS data plane in the moto process."""
    ports = {}
    for role, member in db.members.items():
        with suppress(DrplanError):
            ports[member] = member_endpoint(plan, db, role)[1]
    return SandboxPostgres(plan.state_dir(), os_user=plan.sandbox.os_user, superuser=aws_seed.ADMIN_USER,
                           password=password, dbname=db.dbname, endpoint_url=None, aws_env={}, destination="",
                           server_name="", ports=ports)


def _postgres_databases(plan: Plan) -> list[Database]:
    return [d for d in plan.databases if d.kind is DatabaseKind.postgres]


def _rds_databases(plan: Plan) -> list[Database]:
    return [d for d in plan.databases if d.kind is DatabaseKind.rds]


def up_rds(plan: Plan, db: Database, view: SandboxPostgres, console: Console) -> None:
    """Demo data and the heartbeat writer on an RDS database's primary, through its endpoint."""
    assert plan.sandbox is not None
    console.print(f"  RDS {db.primary} on :{view.ports[db.primary]} (real PostgreSQL), "
                  f"replicas {', '.join(m for m in db.members.values() if m != db.primary)}")
    if demo_data.create_and_load(view, db.primary, plan.sandbox.demo_rows):
        console.print(f"  loaded demo data into {db.primary}")
    view.start_heartbeat(db.primary, interval=plan.sandbox.heartbeat_interval.total_seconds(),
                         table=db.integrity.heartbeat_table)


def wait_until_rds_drillable(plan: Plan, db: Database, timeout: float = 120) -> None:
    """Leave the RDS primary restorable past now by the drill's margin plus two heartbeats."""
    assert plan.sandbox is not None
    ready_at = utcnow() + plan.drill.target_margin + 2 * plan.sandbox.heartbeat_interval
    rds = aws_client(plan, "rds")
    wait_until(f"LatestRestorableTime of {db.primary} past {ready_at:%H:%M:%S}", lambda: (
        rds.describe_db_instances(DBInstanceIdentifier=db.primary)["DBInstances"][0].get(
            "LatestRestorableTime") or ready_at - timedelta(seconds=1)) >= ready_at, timeout=timeout)


def up_postgres(plan: Plan, db: Database, pg: SandboxPostgres, console: Console) -> None:
    assert plan.sandbox is not None
    primary, port = db.primary, host_port(db.endpoints[db.primary])[1]
    console.print(f"  postgres {primary} on :{port}")
    pg.up_primary(primary, port)
    if demo_data.create_and_load(pg, primary, plan.sandbox.demo_rows):
        console.print(f"  loaded demo data ({plan.sandbox.demo_rows} users, {2 * plan.sandbox.demo_rows} orders)")
    pg.start_heartbeat(primary, interval=plan.sandbox.heartbeat_interval.total_seconds(),
                       table=db.integrity.heartbeat_table)
    if not [b for b in pg.list_backups() if b.status == "DONE"]:
        console.print("  base backup (barman-cloud) ...")
        console.print(f"  base backup {pg.base_backup(primary)} done")
    for role in ("replica", "dr_replica"):
        member = db.members.get(role)
        if member:
            console.print(f"  postgres {role} {member} on :{pg.ports[member]}")
            pg.up_replica(member, pg.ports[member], port)


def wait_until_drillable(plan: Plan, db: Database, pg: SandboxPostgres, timeout: float = 120) -> None:
    """Leave the archive restorable past the newest base backup by the drill's margin: wait out the margin plus
    two heartbeats, then switch WAL and wait until that segment is archived."""
    assert plan.sandbox is not None
    backup_end = max(b.end_time for b in pg.list_backups() if b.status == "DONE" and b.end_time)
    ready_at = backup_end + plan.drill.target_margin + 2 * plan.sandbox.heartbeat_interval
    time.sleep(max(0.0, (ready_at - utcnow()).total_seconds()))
    with pg.connect(db.primary) as conn:
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        wait_until(f"archiving of WAL segment {segment}", lambda: conn.execute(
            "SELECT last_archived_wal >= %s FROM pg_stat_archiver", (segment,)).fetchone()[0], timeout=timeout)


def kube_api_of(plan: Plan, cluster: Cluster) -> tuple[str, str]:
    """Process name and host:port of the cluster's Kubernetes API: one per region, the DR region on its own port."""
    assert plan.sandbox is not None
    if is_pilot_light(plan, cluster):
        return "kube-api-dr", plan.sandbox.kube_api_dr
    return "kube-api", plan.sandbox.kube_api


def kubeconfig_of(plan: Plan, cluster: Cluster, directory: Path) -> Path:
    return plan.resolve_path(cluster.kubeconfig or str(directory / "kubeconfig"))


def is_pilot_light(plan: Plan, cluster: Cluster) -> bool:
    """A cluster in the DR region: nodes and the app's Secrets, nothing deployed until a region failover."""
    return plan.region_of(cluster) == plan.aws.dr_region


def apps_of(plan: Plan, cluster: Cluster) -> list[tuple[Service, str]]:
    """The services whose Secrets live in this cluster, each with the database member it uses there (primary, or
    the DR replica in the DR region)."""
    apps = []
    for service in plan.services:
        if service.cluster == cluster.name:
            apps.append((service, "primary"))
        elif service.dr and service.dr.cluster == cluster.name:
            apps.append((service, "dr_replica"))
    return apps


def nodes_state(plan: Plan, cluster: Cluster, api: Any = None) -> tuple[bool, str]:
    """Whether every node group has as many Ready nodes as EKS wants, and e.g. 'dev_nodes 3/3 Ready'."""
    from tasks.eks import nodegroup_state

    eks, api = aws_seed.aws_client(plan, "eks", plan.region_of(cluster)), api or kube_client(plan, cluster)
    groups = [nodegroup_state(eks, api, cluster.name, name)
              for name in sorted(eks.list_nodegroups(clusterName=cluster.name)["nodegroups"])]
    parts = [f"{g.name} {g.ready_nodes}/{g.desired} Ready" for g in groups]
    return all(g.ready_nodes == g.desired for g in groups), ", ".join(parts) or "no node groups"


def up_kubernetes(plan: Plan, cluster: Cluster, directory: Path, values: dict[str, str]) -> None:
    """The cluster's API on loopback, its node groups' nodes, the app's Secrets and (not in the pilot-light DR
    region) its deployments."""
    from kubernetes.client import ApiException, CoreV1Api
    from kubernetes.utils import FailToCreateError, create_from_dict

    from tasks.manifests import render_manifests

    assert plan.aws.endpoint_url is not None
    process, endpoint = kube_api_of(plan, cluster)
    processes.start(directory, process, [PYTHON, "-m", "sandbox.kube_api", "--listen", endpoint])
    wait_until(f"Kubernetes API {process}", lambda: http_ok(f"http://{endpoint}/version"))
    kubeconfig = kubeconfig_of(plan, cluster, directory)
    write_kubeconfig(kubeconfig, f"http://{endpoint}", cluster.context)
    processes.start(directory, f"nodes-{cluster.name}", [
        PYTHON, "-m", "sandbox.node_controller", "--kubeconfig", str(kubeconfig), "--context", cluster.context,
        "--cluster", cluster.name, "--region", plan.region_of(cluster), "--endpoint-url", plan.aws.endpoint_url,
    ], env={**os.environ, **child_aws_env(plan), "PYTHONUNBUFFERED": "1"})
    api = kube_client(plan, cluster)
    core = CoreV1Api(api)

    def create(call, *args) -> None:
        try:
            call(*args)
        except ApiException as exc:
            if exc.status != 409:
                raise

    create(core.create_namespace, {"metadata": {"name": cluster.namespace}})
    secrets_here = {TOKEN_SECRET: {"token": values["api_token"]}}
    for service, role in apps_of(plan, cluster):
        if service.database:
            db = plan.database(service.database)
            host_db, port_db = member_endpoint(plan, db, role if role in db.members else "primary")
            secrets_here[db_secret(service)] = {"DATABASE_URL": (
                f"postgresql://{aws_seed.ADMIN_USER}:{quote(values['db_password'], safe='')}"
                f"@{host_db}:{port_db}/{db.dbname}")}
    for name, data in secrets_here.items():
        create(core.create_namespaced_secret, cluster.namespace, {
            "metadata": {"name": name},
            "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        })
    if not is_pilot_light(plan, cluster):
        for obj in render_manifests(plan, cluster):
            try:
                create_from_dict(api, obj, namespace=cluster.namespace)
            except FailToCreateError as exc:
                if any(e.status != 409 for e in exc.api_exceptions):
                    raise
    wait_until(f"the Ready nodes of {cluster.name}", lambda: nodes_state(plan, cluster, api)[0])
    aws_seed.close_connections()  # before the apps bind their ports (see there)


def listen_address(health_url: str) -> str:
    """host:port a demo app listens on: the one its health URL names."""
    parts = urlsplit(health_url)
    return f"{parts.hostname}:{parts.port}"


def kubelet_of(cluster: Cluster) -> str:
    """Process name of the cluster's kubelet; its pods are tracked in the state directory's folder of that name."""
    return f"kubelet-{cluster.name}"


def up_kubelets(plan: Plan, directory: Path) -> None:
    """Each cluster's kubelet, with a load balancer on the health URL address of each service there; returns once
    the primary region's apps are healthy and the DR region's load balancers answer (503 in pilot light)."""
    for cluster in plan.clusters:
        balancers = []
        for service, role in apps_of(plan, cluster):
            health = service.health if role == "primary" or service.dr is None else service.dr.health
            balancers += ["--load-balancer", f"{cluster.namespace}/{service.name}={listen_address(health)}"]
        processes.start(directory, kubelet_of(cluster), [
            PYTHON, "-m", "sandbox.kubelet", "--kubeconfig", str(kubeconfig_of(plan, cluster, directory)),
            "--context", cluster.context, "--state-dir", str(directory / kubelet_of(cluster)), *balancers,
        ], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for service in (s for s in plan.services if s.cluster):
        wait_until(service.name, lambda s=service: httpx.get(s.health, timeout=2).status_code == 200, timeout=60)
        if service.dr:
            wait_until(f"{service.name} in the DR region", lambda d=service.dr: httpx.get(
                d.health, timeout=2).status_code > 0, timeout=60)


def up(plan: Plan, console: Console) -> None:
    assert plan.sandbox is not None
    directory = plan.state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the PostgreSQL OS user reaches its servers' directories below it
    ensure_os_user(plan.sandbox.os_user)
    values = sandbox_secrets(directory)
    host, port = moto_address(plan)
    console.print(f"[bold]sandbox[/] state in {directory}")
    console.print(f"  moto (AWS) on {host}:{port}, RDS data plane in {directory / 'rds'}")
    start_moto(directory, host, port, ["--rds-data-plane", str(directory / "rds"), "--os-user", plan.sandbox.os_user,
                                       "--archive-timeout", str(int(plan.sandbox.archive_timeout.total_seconds()))])
    aws_seed.seed(plan, values["db_password"], values["api_token"])
    for db in _rds_databases(plan):
        up_rds(plan, db, rds_view(plan, db, values["db_password"]), console)
    for db in _postgres_databases(plan):
        try:
            up_postgres(plan, db, postgres_of(plan, db, directory, values["db_password"]), console)
        except PostgresError as exc:
            raise DrplanError(str(exc)) from None
    for cluster in plan.clusters:
        kind = " (pilot light)" if is_pilot_light(plan, cluster) else ""
        console.print(f"  Kubernetes API for {cluster.name}{kind} on {kube_api_of(plan, cluster)[1]}, "
                      f"nodes from its EKS node groups")
        up_kubernetes(plan, cluster, directory, values)
    for service in (s for s in plan.services if s.cluster):
        console.print(f"  demo app {service.name} run by the kubelet behind {listen_address(service.health)}"
                      + (f", DR region's load balancer on {listen_address(service.dr.health)}" if service.dr else ""))
    up_kubelets(plan, directory)
    console.print("  first bucket and configuration backups")
    aws_seed.back_up_buckets(plan)
    export_configuration(plan)
    for db in _postgres_databases(plan):
        console.print(f"  WAL archive of {db.name} restorable past its newest base backup")
        wait_until_drillable(plan, db, postgres_of(plan, db, directory, values["db_password"]))
    for db in _rds_databases(plan):
        console.print(f"  {db.primary} restorable past now")
        wait_until_rds_drillable(plan, db)


def status(plan: Plan) -> list[Component]:
    directory = plan.state_dir()
    components = []

    def probed(name: str, address: str, pid: int | None, check: Callable[[], str]) -> None:
        try:
            components.append(Component(name, address, pid, True, check()))
        except Exception as exc:  # noqa: BLE001 - a status line, not a crash
            components.append(Component(name, address, pid, False, str(exc).splitlines()[0][:80]))

    def tracked(name: str, address: str, check: Callable[[], str]) -> None:
        proc = processes.running(directory, name)
        if proc is None:
            components.append(Component(name, address, None, False, "not running"))
            return
        probed(name, address, proc.pid, check)

    def http_check(url: str) -> Callable[[], str]:
        def check() -> str:
            response = httpx.get(url, timeout=3)
            if response.status_code >= 400:
                raise RuntimeError(f"HTTP {response.status_code}")
            return "healthy"
        return check

    def heartbeat(member: str) -> Callable[[], str]:
        interval = plan.sandbox.heartbeat_interval.total_seconds() if plan.sandbox else 5.0
        return lambda: heartbeat_state(directory, member, interval)

    host, port = moto_address(plan)
    tracked("moto", f"{host}:{port}", http_check(f"http://{host}:{port}/moto-api/"))
    values = sandbox_secrets(directory) if (directory / "secrets.json").is_file() else None
    for db in _postgres_databases(plan):
        pg = postgres_of(plan, db, directory, values["db_password"]) if values else None
        for member in db.members.values():
            def check(member: str = member, pg: SandboxPostgres | None = pg) -> str:
                st = pg.status(member)
                if st.in_recovery is None:
                    raise RuntimeError("not answering")
                return "standby, streaming" if st.in_recovery else "primary"
            tracked(member, db.endpoints[member], check)
        tracked(f"heartbeat-{db.primary}", db.endpoints[db.primary], heartbeat(db.primary))
    for db in _rds_databases(plan):
        components += rds_status(plan, db)
        tracked(f"heartbeat-{db.primary}", db.primary, heartbeat(db.primary))
    apis = dict(kube_api_of(plan, cluster) for cluster in plan.clusters) if plan.sandbox else {}
    for name, endpoint in sorted(apis.items()):
        tracked(name, endpoint, http_check(f"http://{endpoint}/version"))
    for cluster in plan.clusters:
        def nodes(cluster: Cluster = cluster) -> str:
            ok, detail = nodes_state(plan, cluster)
            if not ok:
                raise RuntimeError(detail)
            return detail
        tracked(f"nodes-{cluster.name}", kube_api_of(plan, cluster)[1], nodes)
        pods = directory / kubelet_of(cluster)
        tracked(kubelet_of(cluster), kube_api_of(plan, cluster)[1], lambda pods=pods: pods_running(pods))
    for service in (s for s in plan.services if s.cluster):
        probed(service.name, listen_address(service.health), None, http_check(service.health))
        if service.dr:
            probed(f"{service.name}-dr", listen_address(service.dr.health), None, dr_app_check(service.dr.health))
    return components


def pods_running(pods: Path) -> str:
    """A kubelet's status line: how many of its pods' processes run."""
    names = processes.tracked_names(pods) if pods.is_dir() else []
    return f"{sum(processes.running(pods, name) is not None for name in names)} pods running"


def rds_status(plan: Plan, db: Database) -> list[Component]:
    """Each member of an RDS database as RDS reports it (the data plane's servers run inside moto's process)."""
    components = []
    for role, member in db.members.items():
        try:
            instance = aws_client(plan, "rds", plan.member_region(db, role)).describe_db_instances(
                DBInstanceIdentifier=member)["DBInstances"][0]
            endpoint = instance.get("Endpoint") or {}
            address = f"{endpoint.get('Address')}:{endpoint.get('Port')}"
            components.append(Component(member, address, None, instance["DBInstanceStatus"] == "available",
                                        f"RDS {instance['DBInstanceStatus']}"))
        except Exception as exc:  # noqa: BLE001 - a status line, not a crash
            components.append(Component(member, "-", None, False, str(exc).splitlines()[0][:80]))
    return components


def dr_app_check(url: str) -> Callable[[], str]:
    """Healthy when serving (after a region failover) or, in pilot light, when it says its deployment is absent."""
    def check() -> str:
        response = httpx.get(url, timeout=3)
        if response.status_code == 200:
            return "healthy (serving)"
        reason = response.json().get("error", "") if response.status_code == 503 else ""
        if reason.startswith("deployment ") and "not running" in reason:
            return "pilot light (not deployed)"
        raise RuntimeError(f"HTTP {response.status_code}" + (f": {reason}" if reason else ""))
    return check


def down(plan: Plan, purge: bool = False) -> list[str]:
    """Stop every process the sandbox started (kubelets and their apps, node controllers, heartbeats, PostgreSQL,
    Kubernetes APIs, moto), and the restored copies that drills and recoveries of its databases left running."""
    directory = plan.state_dir()
    lines = []
    values = sandbox_secrets(directory) if (directory / "secrets.json").is_file() else None
    for cluster in plan.clusters:
        if processes.stop(directory, kubelet_of(cluster)):  # stops its pods
            lines.append(f"stopped {kubelet_of(cluster)}")
        pods = directory / kubelet_of(cluster)  # a killed kubelet's pods
        for name in processes.tracked_names(pods) if pods.is_dir() else []:
            if processes.stop(pods, name):
                lines.append(f"stopped app {name}")
    copies = plan.resolve_path(plan.drill.work_dir)  # restored by drills (--keep) and recoveries, still serving
    for name in processes.tracked_names(copies) if copies.is_dir() else []:
        if processes.stop(copies, name):
            lines.append(f"stopped restored copy {name}")
    for cluster in plan.clusters:
        if processes.stop(directory, f"nodes-{cluster.name}"):
            lines.append(f"stopped nodes-{cluster.name}")
    for db in _rds_databases(plan):
        if processes.stop(directory, f"heartbeat-{db.primary}"):
            lines.append(f"stopped heartbeat-{db.primary}")
    for db in _postgres_databases(plan):
        pg = postgres_of(plan, db, directory, values["db_password"]) if values else None
        if pg and pg.stop_heartbeat(db.primary):
            lines.append(f"stopped heartbeat-{db.primary}")
        for member in reversed(list(db.members.values())):
            if pg and pg.stop(member):
                lines.append(f"stopped postgres {member}")
    for name in processes.tracked_names(directory) if directory.is_dir() else []:
        if processes.stop(directory, name):
            lines.append(f"stopped {name}")
    rds = directory / "rds"  # the data plane's servers: moto (their owner) is stopped, so are they
    for name in processes.tracked_names(rds) if rds.is_dir() else []:
        if processes.stop(rds, name):
            lines.append(f"stopped RDS server {name}")
    if purge and directory.is_dir():
        shutil.rmtree(directory)
        lines.append(f"deleted {directory}")
    return lines or ["nothing was running"]
