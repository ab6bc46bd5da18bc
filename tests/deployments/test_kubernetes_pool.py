"""The production work pool (docs/kubernetes.md): prefect.yaml's Kubernetes job template, accepted by a Prefect
server as a `kubernetes` pool's base job template, rendered by prefect-kubernetes for a run of every deployment as
its worker would, and the Job manifest validated by the kubernetes client's models: deserialised into a V1Job and
serialised back unchanged (a field the API does not know, or one in the wrong object, would be dropped)."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid

import pytest
import yaml
from kubernetes.client import ApiClient, V1Job
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.flows import load_flow_from_entrypoint
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from deployments.kubernetes_pool import base_job_template, pool_definition
from drplan.plan import DrillSettings
from tests.helpers import REPO

DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/drplan:test"


def as_v1job(manifest: dict) -> V1Job:
    return ApiClient().deserialize(json.dumps(manifest), "V1Job", "application/json")


def round_trip(manifest: dict) -> dict:
    """The manifest as the kubernetes client's models understand it (unknown or misplaced fields are lost)."""
    return ApiClient().sanitize_for_serialization(as_v1job(manifest))


def rendered_job(template: dict, deployment: dict, monkeypatch) -> tuple[dict, FlowRun]:
    """The Job manifest a Kubernetes worker would create for a run of `deployment` (prefect-kubernetes' rendering:
    the template with the deployment's job variables, then prepared for the flow run)."""
    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    values = (deployment.get("work_pool") or {}).get("job_variables") or {}
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    api_flow = Flow(id=uuid.uuid4(), name=flow.name)
    response = DeploymentResponse(id=uuid.uuid4(), name=deployment["name"], flow_id=api_flow.id)
    run = FlowRun(id=uuid.uuid4(), name="calm-otter", flow_id=api_flow.id, deployment_id=response.id)
    config.prepare_for_flow_run(run, response, api_flow)
    return config.job_manifest, run


@pytest.fixture(scope="module")
def pool_template(prefect_server) -> dict:
    """The template as a Prefect server stores it for a kubernetes pool (the server validates it)."""
    name = f"drplan-k8s-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        template = base_job_template(IMAGE)
        client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes", base_job_template=template))
        try:
            return client.read_work_pool(name).base_job_template
        finally:
            client.delete_work_pool(name)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_deployment_renders_a_valid_job(pool_template, deployment, monkeypatch):
    manifest, run = rendered_job(pool_template, deployment, monkeypatch)
    assert round_trip(manifest) == manifest
    job = as_v1job(manifest)
    pod = job.spec.template.spec
    (container,) = pod.containers
    defaults = pool_definition()["variables"]
    assert job.metadata.namespace == defaults["namespace"] and job.metadata.generate_name
    assert job.metadata.labels["prefect.io/deployment-name"] == deployment["name"]
    assert job.spec.backoff_limit == 0 and pod.restart_policy == "Never"
    assert pod.service_account_name == defaults["service_account_name"]  # the IRSA role's account
    assert container.image == IMAGE and container.args == ["prefect", "flow-run", "execute"]
    env = {e.name: e.value for e in container.env}
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id)
    assert container.resources.requests == {"cpu": defaults["cpu_request"], "memory": defaults["memory_request"]}
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    volumes = {v.name: v for v in pod.volumes}
    assert volumes[mounts[DrillSettings().work_dir]].empty_dir is not None  # restores need a writable disk


def test_a_misplaced_field_fails_the_round_trip():
    """prefect-kubernetes' own default puts the Job's completions and parallelism into the pod spec: the model
    check drops them, so a manifest with such a mistake is caught."""
    manifest = KubernetesWorker.get_default_base_job_template()["job_configuration"]["job_manifest"]
    manifest = copy.deepcopy(manifest)
    manifest["spec"]["template"]["spec"]["containers"][0].update(args=["prefect"], env=[], image="x")
    broken = {k: v for k, v in manifest.items() if k != "metadata"}
    broken["spec"] = {k: v for k, v in broken["spec"].items() if not str(v).startswith("{{")}
    kept = round_trip(broken)["spec"]["template"]["spec"]
    assert "completions" in broken["spec"]["template"]["spec"] and "completions" not in kept


def test_unknown_variable_is_refused(tmp_path):
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    config["definitions"]["kubernetes_pool"]["variables"]["cpu_requests"] = "1"
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="no such prefect-kubernetes variable: cpu_requests"):
        base_job_template(IMAGE, config=path)
