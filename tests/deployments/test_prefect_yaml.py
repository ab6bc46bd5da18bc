"""prefect.yaml as `prefect deploy` reads it: every entrypoint loads as a flow whose parameters match the
deployment's, the plan comes from DRPLAN_PLAN and is valid, every flow module is deployed, and the build step
refuses a deploy without a plan."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.utilities.templating import apply_values

from drplan.plan import load_plan
from tests.helpers import REPO

CONFIG = yaml.safe_load((REPO / "prefect.yaml").read_text())
DEPLOYMENTS = CONFIG["deployments"]
PLANS = ["plans/devonn.yaml", "plans/sandbox.yaml"]


def rendered(value, plan: str | None, monkeypatch: pytest.MonkeyPatch):
    """`value` with `{{ $VAR }}` placeholders filled from the environment, as `prefect deploy` does."""
    if plan is None:
        monkeypatch.delenv("DRPLAN_PLAN", raising=False)
    else:
        monkeypatch.setenv("DRPLAN_PLAN", plan)
    return apply_values(value, {})


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_entrypoint_is_a_flow_with_matching_parameters(deployment, plan, monkeypatch):
    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    parameters = rendered(deployment.get("parameters", {}), plan, monkeypatch)
    assert set(parameters) <= set(flow.parameters.properties)
    assert flow.parameters.required is None or set(flow.parameters.required) <= set(parameters)
    assert deployment.get("enforce_parameter_schema") is True
    assert parameters["plan"] == plan
    load_plan(REPO / parameters["plan"])


def test_every_flow_module_is_deployed():
    deployed = {d["entrypoint"].split(":")[0] for d in DEPLOYMENTS}
    modules = {f"flows/{p.name}" for p in (REPO / "flows").glob("*.py") if p.name != "__init__.py"}
    assert modules <= deployed, f"flows without a deployment in prefect.yaml: {sorted(modules - deployed)}"


@pytest.mark.parametrize("plan, code", [(None, 2), ("plans/sandbox.yaml", 0)])
def test_build_step_refuses_a_deploy_without_a_valid_plan(plan, code, monkeypatch):
    (step,) = CONFIG["build"]
    script = rendered(step["prefect.deployments.steps.run_shell_script"]["script"], plan, monkeypatch)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `drplan` as in an activated venv
    result = subprocess.run(shlex.split(script), cwd=REPO, env={**os.environ, "PATH": path}, capture_output=True,
                            text=True)
    assert result.returncode == code, result.stderr
