"""The assembled sandbox: idempotent `up`, truthful `status` (both regions), the app wired through its Kubernetes
Secret, its deployments created from the manifests (applying them again changes nothing), and no secret in any
process's arguments."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
from kubernetes.client import AppsV1Api, CoreV1Api
from rich.console import Console

from drplan import processes
from drplan.clients import aws_client, kube_client
from sandbox import stack
from tasks.k8s import export_namespace
from tasks.manifests import render_manifests


def test_status_reports_every_component_healthy(sandbox):
    components = stack.status(sandbox)
    assert all(c.healthy for c in components), [(c.name, c.detail) for c in components if not c.healthy]
    names = {c.name: c.detail for c in components}
    assert names["devonn-postgres-production"] == "primary"
    assert names["devonn-postgres-replica-production"] == "standby, streaming"
    assert names["devonn-postgres-dr-production"] == "standby, streaming"
    assert {"moto", "kube-api", "devonn-api", "heartbeat-devonn-postgres-production"} <= set(names)
    assert names["kube-api-dr"] == "healthy"
    assert names["nodes-devonn-eks-sandbox"] == "dev_nodes 3/3 Ready"
    assert names["nodes-devonn-eks-dr-sandbox"] == "dev_nodes 1/1 Ready"
    assert names["devonn-api-dr"] == "pilot light (not deployed)"
    assert all(names[f"kubelet-{c.name}"].endswith(" pods running") for c in sandbox.clusters)


def test_up_again_changes_nothing(sandbox, sandbox_dir):
    stack.up(sandbox, Console(quiet=True))  # repairs what earlier tests of the session changed (known-good records)
    before = {n: processes.get(sandbox_dir, n) for n in processes.tracked_names(sandbox_dir)}
    db = sandbox.database("devonn-postgres")
    pg = stack.postgres_of(sandbox, db, sandbox_dir, stack.sandbox_secrets(sandbox_dir)["db_password"])
    backups = pg.list_backups()
    r53 = aws_client(sandbox, "route53")
    checks = r53.list_health_checks()["HealthChecks"]
    kube = {c.name: export_namespace(kube_client(sandbox, c), c.namespace) for c in sandbox.clusters}
    stack.up(sandbox, Console(quiet=True))
    after = {n: processes.get(sandbox_dir, n) for n in processes.tracked_names(sandbox_dir)}
    assert after == before
    assert {f"{kind}-{c.name}" for c in sandbox.clusters for kind in ("nodes", "kubelet")} | {
        "kube-api", "kube-api-dr"} <= set(after)
    assert pg.list_backups() == backups
    assert r53.list_health_checks()["HealthChecks"] == checks
    assert {c.name: export_namespace(kube_client(sandbox, c), c.namespace) for c in sandbox.clusters} == kube
    rds = aws_client(sandbox, "rds").describe_db_instances()["DBInstances"]
    assert sorted(i["DBInstanceIdentifier"] for i in rds) == ["devonn-rds-production", "devonn-rds-replica-production"]


def test_app_takes_its_database_from_the_kubernetes_secret(sandbox):
    cluster = sandbox.cluster("devonn-eks-sandbox")
    api = kube_client(sandbox, cluster)
    deployment = AppsV1Api(api).read_namespaced_deployment("devonn-api", cluster.namespace)
    env = deployment.spec.template.spec.containers[0].env
    assert [(e.name, e.value, (e.value_from.secret_key_ref or e.value_from.config_map_key_ref).name) for e in env] == [
        ("DATABASE_URL", None, "devonn-api-db"), ("API_TOKEN", None, stack.TOKEN_SECRET),
        ("ORDERS_TABLE", None, "devonn-api-config"),  # a setting, from its ConfigMap
    ]
    secret = CoreV1Api(api).read_namespaced_secret("devonn-api-db", cluster.namespace)
    url = base64.b64decode(secret.data["DATABASE_URL"]).decode()
    assert url.endswith(f"@{sandbox.database('devonn-postgres').endpoints['devonn-postgres-production']}/devonn")
    service = sandbox.services[0]
    base = service.health.removesuffix("/health")
    assert httpx.get(service.health, timeout=5).status_code == 200
    assert httpx.get(f"{base}/api/stats", timeout=5).json()["users"] == sandbox.sandbox.demo_rows
    assert httpx.get(f"{base}/api/me", timeout=5).status_code == 401
    token = stack.sandbox_secrets(Path(sandbox.state_dir()))["api_token"]
    assert httpx.get(f"{base}/api/me", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200


def test_no_secret_in_any_process_arguments(sandbox, sandbox_dir):
    values = stack.sandbox_secrets(sandbox_dir)
    leaks = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if values["db_password"] in args or values["api_token"] in args:
            leaks.append(cmdline.parent.name)
    assert not leaks, f"processes with a secret in argv: {leaks}"


def test_secrets_file_is_private(sandbox, sandbox_dir):
    assert (sandbox_dir / "secrets.json").stat().st_mode & 0o777 == 0o600


def test_deployments_come_from_the_manifests_and_applying_them_changes_nothing(sandbox):
    from tasks.manifests import apply_manifest

    cluster = sandbox.cluster("devonn-eks-sandbox")
    api = kube_client(sandbox, cluster)
    objects = render_manifests(sandbox, cluster)
    assert sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Deployment") == sorted(cluster.deployments)
    before = export_namespace(api, cluster.namespace)
    assert [apply_manifest(api, cluster.namespace, o).action for o in objects] == ["unchanged"] * len(objects)
    assert export_namespace(api, cluster.namespace) == before


def test_down_stops_restored_copies_left_running(sandbox_plan_path, tmp_path):
    """A recovery's copy keeps serving the app after the run; `down` stops it before purging its data."""
    import yaml

    from drplan.plan import load_plan

    data = yaml.safe_load(sandbox_plan_path.read_text())
    data["sandbox"]["state_dir"] = str(tmp_path / "state")
    data["drill"]["work_dir"] = str(tmp_path / "state" / "drills")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    plan = load_plan(path)
    copies = plan.resolve_path(plan.drill.work_dir)
    copy = processes.start(copies, "devonn-postgres-recovery-20261126t182930z", ["sleep", "600"])
    assert stack.down(plan, purge=True) == ["stopped restored copy devonn-postgres-recovery-20261126t182930z",
                                            f"deleted {tmp_path / 'state'}"]
    assert not copy.alive
