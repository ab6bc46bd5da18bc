"""Every prefect.yaml entrypoint loads as a flow whose parameters match the deployment's."""

from pathlib import Path

import pytest
import yaml
from prefect.flows import Flow, load_flow_from_entrypoint

from drplan.plan import load_plan

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_entrypoint_is_a_flow_with_matching_parameters(deployment, monkeypatch):
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    accepted = set(flow.parameters.properties)
    assert set(deployment.get("parameters", {})) <= accepted
    assert flow.parameters.required is None or set(flow.parameters.required) <= set(deployment["parameters"])
    assert deployment.get("enforce_parameter_schema") is True
    load_plan(ROOT / deployment["parameters"]["plan"])
