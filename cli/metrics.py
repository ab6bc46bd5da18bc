"""`drplan metrics`: the plan's metrics for Prometheus (drplan/metrics.py), served on /metrics or written once as a
node-exporter textfile. Runs in progress come from the Prefect API in the environment (PREFECT_API_URL), else from
`drplan serve`'s server when it runs."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from pathlib import Path

import typer
from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile

from cli.console import PlanOption, err, fail, plan_or_exit
from drplan.metrics import PlanCollector
from drplan.plan import Plan

ACTIVE = ("RUNNING", "PENDING", "PAUSED")


def runs_in_progress(plan: Plan) -> dict[str, int] | None:
    """Flow name -> active runs, or None when no Prefect API answers."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.settings import PREFECT_API_URL

    from cli.serve import platform_of

    platform = platform_of(plan)
    settings = contextlib.nullcontext() if PREFECT_API_URL.value() else platform.client_settings()
    try:
        with settings, get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE)))), limit=200)
            flows = {f.id: f.name for f in client.read_flows(
                flow_filter=FlowFilter(id=FlowFilterId(any_=list({r.flow_id for r in runs}))))} if runs else {}
    except Exception:  # noqa: BLE001 - no Prefect API is a metric (drplan_prefect_up 0), not a failed scrape
        return None
    return dict(Counter(flows.get(r.flow_id, "unknown") for r in runs))


def registry_of(plan: Plan) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlanCollector(plan, lambda: runs_in_progress(plan)))
    return registry


def metrics(
    plan: str = PlanOption,
    listen: str = typer.Option("127.0.0.1:9464", help="host:port to serve /metrics on."),
    textfile: Path = typer.Option(None, help="Write the metrics once to this file (node-exporter textfile "
                                               "collector) instead of serving them."),
) -> None:
    """Export the plan's data age, drill results, measured RTO per tier, region readiness and runs in progress
    for Prometheus, from the report files of its runs."""
    dr_plan = plan_or_exit(plan)
    registry = registry_of(dr_plan)
    if textfile is not None:
        if not textfile.parent.is_dir():
            raise fail(f"--textfile {textfile}: directory {textfile.parent} does not exist; create it or pick another")
        write_to_textfile(str(textfile), registry)
        return
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise fail(f"--listen {listen!r} is not host:port; e.g. --listen 127.0.0.1:9464")
    try:
        server, _ = start_http_server(int(port), addr=host, registry=registry)
    except OSError as exc:
        raise fail(f"--listen {listen}: {exc.strerror}; pick a free port") from None
    err.print(f"serving metrics of {dr_plan.name} on http://{listen}/metrics (Ctrl-C stops)", highlight=False)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
