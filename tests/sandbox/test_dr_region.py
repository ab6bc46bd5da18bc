"""The sandbox's DR region (pilot light): its own Kubernetes API and nodes, the app's Secrets pointing at the DR
replica, nothing deployed, and the DR app (the kubelet's pods) serving only while its Deployment is there and
available. DNS points at the primary region's target, with a health check per region. Against the session
sandbox, left as it was."""

from __future__ import annotations

import base64
import copy

import httpx
import pytest
from kubernetes.client import ApiException, AppsV1Api, CoreV1Api

from drplan import processes
from drplan.clients import aws_client, kube_client
from sandbox import stack
from tasks.manifests import render_manifests
from tests.helpers import wait_for

DR_CLUSTER = "devonn-eks-dr-sandbox"


@pytest.fixture
def dr(sandbox):
    cluster = sandbox.cluster(DR_CLUSTER)
    return cluster, kube_client(sandbox, cluster)


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=5)


def test_each_cluster_has_its_own_api_and_kubeconfig(sandbox):
    primary, dr_cluster = sandbox.cluster("devonn-eks-sandbox"), sandbox.cluster(DR_CLUSTER)
    assert stack.kube_api_of(sandbox, primary) == ("kube-api", sandbox.sandbox.kube_api)
    assert stack.kube_api_of(sandbox, dr_cluster) == ("kube-api-dr", sandbox.sandbox.kube_api_dr)
    assert kube_client(sandbox, dr_cluster).configuration.host == f"http://{sandbox.sandbox.kube_api_dr}"
    assert kube_client(sandbox, primary).configuration.host == f"http://{sandbox.sandbox.kube_api}"
    assert primary.kubeconfig != dr_cluster.kubeconfig
    for cluster in (primary, dr_cluster):
        eks = aws_client(sandbox, "eks", sandbox.region_of(cluster))
        assert eks.list_clusters()["clusters"] == [cluster.name]  # each in its own region


def test_pilot_light_has_the_secrets_but_no_deployments(sandbox, sandbox_dir, dr):
    cluster, api = dr
    assert AppsV1Api(api).list_namespaced_deployment(cluster.namespace).items == []
    core = CoreV1Api(api)
    values = stack.sandbox_secrets(sandbox_dir)
    token = core.read_namespaced_secret(stack.TOKEN_SECRET, cluster.namespace).data["token"]
    assert base64.b64decode(token).decode() == values["api_token"]
    url = base64.b64decode(core.read_namespaced_secret("devonn-api-db", cluster.namespace).data["DATABASE_URL"])
    db = sandbox.database("devonn-postgres")
    assert url.decode().endswith(f"@{db.endpoints[db.dr_replica.identifier]}/{db.dbname}")


def test_dr_app_serves_only_while_its_deployment_is_available(sandbox, sandbox_dir, dr):
    cluster, api = dr
    apps = AppsV1Api(api)
    service = sandbox.services[0]
    health, stats = service.dr.health, service.dr.health.replace("/health", "/api/stats")
    absent = f"deployment devonn-api not running in namespace {cluster.namespace}"
    response = get(health)
    assert response.status_code == 503 and response.json() == {"status": "unavailable", "error": absent}
    assert get(stats).status_code == 503 and get(stats).json() == {"error": absent}

    manifest = copy.deepcopy(next(o for o in render_manifests(sandbox, cluster)
                                  if o["kind"] == "Deployment" and o["metadata"]["name"] == "devonn-api"))
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    image = container["image"]
    container["image"] = image.rsplit(":", 1)[0] + ":broken"  # the sandbox's broken build: never ready
    apps.create_namespaced_deployment(cluster.namespace, manifest)
    try:
        unavailable = f"deployment devonn-api has no available replicas in namespace {cluster.namespace}"
        wait_for(lambda: get(health).json().get("error") == unavailable, 10, "503: no available replicas")
        wait_for(lambda: len(pods(sandbox_dir, cluster)) == manifest["spec"]["replicas"], 30, "the broken pods")
        assert get(health).status_code == 503

        apps.patch_namespaced_deployment("devonn-api", cluster.namespace, {"spec": {"template": {"spec": {
            "containers": [{"name": container["name"], "image": image}]}}}})
        wait_for(lambda: get(health).status_code == 200, 60, "the DR app to serve")
        db = sandbox.database("devonn-postgres")
        assert get(health).json()["db"] == f"{db.endpoints[db.dr_replica.identifier]}/{db.dbname}"
        assert get(stats).json()["users"] == sandbox.sandbox.demo_rows  # the DR replica's data
        assert stack.dr_app_check(health)() == "healthy (serving)"
    finally:
        try:
            apps.delete_namespaced_deployment("devonn-api", cluster.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
    wait_for(lambda: get(health).json().get("error") == absent, 10, "the DR app back to pilot light")
    assert stack.dr_app_check(health)() == "pilot light (not deployed)"
    wait_for(lambda: pods(sandbox_dir, cluster) == [], 30, "the DR pods to stop")


def pods(sandbox_dir, cluster) -> list[str]:
    """The cluster's pods whose app processes run."""
    state = sandbox_dir / stack.kubelet_of(cluster)
    return [n for n in processes.tracked_names(state) if processes.running(state, n)] if state.is_dir() else []


def test_primary_apps_are_the_kubelets_pods_of_their_deployments(sandbox, sandbox_dir):
    cluster = sandbox.cluster("devonn-eks-sandbox")
    running = pods(sandbox_dir, cluster)
    for name in cluster.deployments:
        replicas = AppsV1Api(kube_client(sandbox, cluster)).read_namespaced_deployment(name, cluster.namespace)
        assert len([p for p in running if p.startswith(f"{cluster.namespace}.{name}-")]) == replicas.spec.replicas
        assert replicas.status.available_replicas == replicas.spec.replicas
    log = (sandbox_dir / "logs" / f"{stack.kubelet_of(cluster)}.log").read_text()
    assert f"pod {cluster.namespace}.devonn-api-" in log and "ready" in log


def test_dns_points_at_the_primary_target_with_a_health_check_per_region(sandbox):
    r53 = aws_client(sandbox, "route53")
    zone = next(z for z in r53.list_hosted_zones()["HostedZones"] if z["Name"] == sandbox.dns.zone + ".")
    records = {r["Name"]: r for r in r53.list_resource_record_sets(HostedZoneId=zone["Id"])["ResourceRecordSets"]
               if r["Type"] == "CNAME"}
    target = sandbox.dns.targets[sandbox.aws.region]
    assert {name: r["ResourceRecords"] for name, r in records.items()} == {
        f"{name}.": [{"Value": target}] for name in sandbox.dns.records}
    checks = [c["HealthCheckConfig"] for c in r53.list_health_checks()["HealthChecks"]]
    assert sorted((c["FullyQualifiedDomainName"], c["Type"], c["ResourcePath"]) for c in checks) == sorted(
        (name, "HTTPS", "/health") for name in sandbox.dns.targets.values())
