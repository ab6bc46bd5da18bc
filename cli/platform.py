"""`drplan serve` (the Prefect UI and API locally) and `drplan trigger` (start a deployment's run through the API).

`trigger` talks to the Prefect API configured in the environment (PREFECT_API_URL, PREFECT_API_AUTH_STRING or
PREFECT_API_KEY); exit 0 the run was created (or, with --wait, Completed), 1 it ended otherwise, 2 an error.
"""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

import httpx
import typer

from cli.console import PlanOption, err, fail, out, plan_or_exit, refusals
from drplan.errors import DrplanError

POLL_SECONDS = 2.0


def serve(
    plan: str = PlanOption,
    port: int | None = typer.Option(None, "--port", help="UI and API port (default 4200, or a free one if taken)."),
    stop: bool = typer.Option(False, "--stop", help="Stop the server, worker and receiver this command started."),
) -> None:
    """Run the Prefect UI and API locally (auth on), a worker, every deployment against the plan, automations."""
    from cli import serve as platform

    dr_plan = plan_or_exit(plan)
    with refusals():
        if stop:
            for line in platform.down(dr_plan) or ["nothing was running"]:
                out.print(line, highlight=False)
        else:
            platform.up(plan, out, port)


def trigger(
    deployment: str = typer.Argument(..., help="FLOW/DEPLOYMENT, e.g. s3-recovery/s3-recovery."),
    param: list[str] = typer.Option([], "--param", "-P", help="key=value, typed by the deployment's parameter "
                                                              "schema (JSON for numbers, booleans, lists); repeat."),
    wait: bool = typer.Option(False, "--wait", help="Follow the run to its end: exit 0 Completed, 1 otherwise."),
) -> None:
    """Create a flow run of a deployment with parameters; with --wait follow its states (and say how to approve)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise fail("no Prefect API configured: export PREFECT_API_URL and PREFECT_API_AUTH_STRING "
                   "(`drplan serve` prints them for the local server)")
    try:
        with get_client(sync_client=True) as client:
            try:
                found = client.read_deployment_by_name(deployment)
            except ObjectNotFound:
                raise fail(f"no deployment {deployment!r} (FLOW/DEPLOYMENT); see prefect deployment ls") from None
            run = client.create_flow_run_from_deployment(
                found.id, parameters=typed_parameters(found.parameter_openapi_schema, param))
            out.print(f"flow run {run.name} {run.id}: {run.state.name if run.state else 'created'} "
                      f"{_ui_url(run.id)}", highlight=False, soft_wrap=True)
            if wait:
                raise typer.Exit(0 if follow(client, run.id) == "COMPLETED" else 1)
    except DrplanError as exc:
        raise fail(str(exc)) from None
    except httpx.HTTPStatusError as exc:
        raise fail(f"the Prefect API answered {exc.response.status_code}: {_detail(exc.response)}") from None
    except httpx.TransportError as exc:
        raise fail(f"cannot reach the Prefect API at {PREFECT_API_URL.value()}: {exc}") from None


def typed_parameters(schema: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as flow parameters: raw text where the schema accepts a string, else parsed as JSON."""
    properties = schema.get("properties", {})
    parameters: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise DrplanError(f"--param {pair!r}: write key=value")
        if key not in properties:
            raise DrplanError(f"--param {key}: the deployment takes {', '.join(properties) or 'no parameters'}")
        if _accepts_string(properties[key], schema.get("definitions", {})):
            parameters[key] = raw
            continue
        try:
            parameters[key] = json.loads(raw)
        except ValueError:
            raise DrplanError(f"--param {key}={raw}: not valid JSON, and {key} is {_type_name(properties[key])} "
                              "(e.g. 42, true, [\"a\"])") from None
    return parameters


def follow(client, run_id: UUID) -> str:
    """Print every state the run enters until a final one; return that state's type (e.g. COMPLETED)."""
    shown = None
    while True:
        state = client.read_flow_run(run_id).state
        if state is not None and (state.name, state.message) != shown:
            shown = (state.name, state.message)
            out.print(f"{state.timestamp:%H:%M:%S} {state.name}" + (f": {state.message}" if state.message else ""),
                      highlight=False, soft_wrap=True)
            if state.is_paused():
                err.print(f"waiting for approval: resume it in the UI ({_ui_url(run_id)}) or POST "
                          f"/api/flow_runs/{run_id}/resume with {{\"run_input\": {{...}}}} (deployments/README.md)",
                          highlight=False, soft_wrap=True)
        if state is not None and state.is_final():
            return state.type.value
        time.sleep(POLL_SECONDS)


def _accepts_string(prop: dict[str, Any], definitions: dict[str, Any]) -> bool:
    if "$ref" in prop:
        prop = definitions.get(prop["$ref"].rsplit("/", 1)[-1], {})
    options = prop.get("anyOf") or prop.get("allOf") or [prop]
    return any(o.get("type") == "string" or ("$ref" in o and _accepts_string(o, definitions)) for o in options)


def _type_name(prop: dict[str, Any]) -> str:
    return prop.get("type") or " or ".join(o.get("type", "object") for o in prop.get("anyOf", [])) or "value"


def _ui_url(run_id: UUID) -> str:
    from prefect.settings import PREFECT_UI_URL

    return f"{PREFECT_UI_URL.value()}/runs/flow-run/{run_id}" if PREFECT_UI_URL.value() else ""


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return str(body.get("detail") or body.get("exception_message") or body) if isinstance(body, dict) else str(body)
