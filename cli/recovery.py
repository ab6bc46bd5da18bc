"""`drplan recover`, `failover`, `reprotect`, `dns-failover`, `eks-recover`, `region-failover`, `rollback`,
`config-restore`: recovery flows from a terminal.

The flow runs in this process against the Prefect API in the environment (a server with the UI when
PREFECT_API_URL is set, else a temporary local one that dies with this command, see cli.prefect_api). Without
--yes the run pauses for approval like it does from the UI: this command then shows the summary and asks on the
terminal, and an approval given in the UI or through the API resumes it just as well (without an answer on stdin,
only those). Exit 0 done, 1 refused or validation failed (rolled back), 2 error.
"""

from __future__ import annotations

import contextvars
import getpass
import threading
import time
from typing import Any
from uuid import uuid4

import typer
from rich.markdown import Markdown

from cli.console import JsonOption, PlanOption, err, fail, out, plan_or_exit, refusals
from cli.prefect_api import prefect_api
from cli.run_progress import RunProgress
from drplan.errors import DrplanError, first_line

POLL_SECONDS = 1.0


def recover(
    plan: str = PlanOption,
    database: str = typer.Option(..., "--database", "-d", help="The database to recover."),
    to: str = typer.Option(..., "--to", help="Target time: ISO 8601 with a zone (2026-11-26T03:00:00Z) or 'latest'."),
    promote: bool = typer.Option(False, "--promote", help="Cut the application over to the recovered copy."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List every step and resource; change nothing."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
) -> None:
    """Point-in-time recovery to <database>-recovery-<T>; with --promote, cut the app over after approval."""
    from drplan.clients import check_aws_access
    from flows.pitr_recovery import pitr_recovery
    from flows.shared.requests import validate_request
    from tasks.targets import restore_target
    from tasks.topology import discover

    plan_or_exit(plan)
    with refusals():  # refused in one line before anything runs: bad input, no AWS, a time outside the window
        dr_plan, (db,), when, _ = validate_request(plan, database, to, None)
        check_aws_access(dr_plan)
        if when is not None:
            restore_target(dr_plan, db, discover(dr_plan, [db.name]).databases[0].last_primary).window().check(when)
    run(pitr_recovery, f"recover-{database}", dict(plan=plan, database=database, target_time=to, promote=promote,
                                                   dry_run=dry_run, approve=yes), as_json)


def failover(
    plan: str = PlanOption,
    database: str = typer.Option(..., "--database", "-d", help="The database to fail over."),
    mode: str = typer.Option(..., "--mode", help="multi-az (test the standby) or promote-replica."),
    member: str = typer.Option(None, "--member", help="replica or dr_replica (default: dr_replica if the plan "
                                                     "has one, for promote-replica)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List every step and resource; change nothing."),
    force: bool = typer.Option(False, "--force", help="Promote even if the replica lags beyond the RPO."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
    no_fence: bool = typer.Option(False, "--no-fence", help="Do not fence the old primary (needs --force)."),
) -> None:
    """Multi-AZ failover test, or promote a replica (lag guard), fence the old primary, cut the app over,
    validate."""
    from flows.db_failover import db_failover
    from flows.shared.promotion import Request

    plan_or_exit(plan)
    with refusals():
        Request(plan, database, mode, member)  # refused before anything runs
        if no_fence and not force:
            raise DrplanError("--no-fence needs --force: both primaries could accept writes")
    run(db_failover, f"failover-{database}", dict(plan=plan, database=database, mode=mode, member=member,
                                                  dry_run=dry_run, force=force, approve=yes, fence=not no_fence),
        as_json)


def reprotect(
    plan: str = PlanOption,
    database: str = typer.Option(..., "--database", "-d", help="The database whose live primary to protect."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List every step and resource; change nothing."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
) -> None:
    """Give the live primary what the plan requires: WAL archiving, a base backup of its lineage, a replica in
    its region and in the other region. A no-op on a protected database."""
    from flows.reprotect import reprotect as flow_fn

    dr_plan = plan_or_exit(plan)
    with refusals():
        dr_plan.database(database)  # refused before anything runs
    run(flow_fn, f"reprotect-{database}", dict(plan=plan, database=database, dry_run=dry_run, approve=yes), as_json)


def dns_failover(
    plan: str = PlanOption,
    to: str = typer.Option(None, "--to", help="The region whose target the records get (default: aws.dr_region)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the region's services, list the record changes; "
                                                          "change nothing."),
    force: bool = typer.Option(False, "--force", help="Switch even if the region's services fail validation."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
) -> None:
    """DNS failover alone: once the region's services pass validation, UPSERT the records to its target."""
    from flows.dns_failover import dns_failover as flow_fn

    run_towards(flow_fn, "dns-failover", plan, to, dry_run, force, yes, as_json)


def eks_recover(
    plan: str = PlanOption,
    cluster: str = typer.Option(..., "--cluster", "-c", help="The cluster of the plan to bring back."),
    nodes: list[str] = typer.Option([], "--nodes", help="A node group's size, GROUP=COUNT (repeatable)."),
    scale: list[str] = typer.Option([], "--scale", help="A deployment's replicas, NAME=COUNT (repeatable)."),
    manifests: bool = typer.Option(True, "--manifests/--no-manifests",
                                   help="Apply clusters[].manifests with the cluster's overrides."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List every step and resource; change nothing."),
    as_json: bool = JsonOption,
) -> None:
    """EKS recovery: node groups until their nodes are Ready, manifests, scale, rollouts, cluster health."""
    from flows.eks_recovery import eks_recovery

    dr_plan = plan_or_exit(plan)
    with refusals():
        dr_plan.cluster(cluster)  # refused before anything runs
        parameters = dict(plan=plan, cluster=cluster, nodes=counts(nodes, "--nodes"), scale=counts(scale, "--scale"),
                          apply_manifests=manifests, dry_run=dry_run)
    run(eks_recovery, f"eks-recovery-{cluster}", parameters, as_json)


def rollback(
    plan: str = PlanOption,
    service: str = typer.Option(..., "--service", "-s", help="The service whose Deployment to roll back."),
    to_revision: int = typer.Option(None, "--to-revision", help="A known-good revision (default: the newest)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the changes; change nothing."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
) -> None:
    """Deployment failure: return the service to its newest known-good revision (or --to-revision), validate."""
    from flows.rollback import resolve
    from flows.rollback import rollback as flow_fn

    plan_or_exit(plan)
    with refusals():
        resolve(plan, service, to_revision)  # refused before anything runs
    run(flow_fn, f"rollback-{service}", dict(plan=plan, service=service, to_revision=to_revision, dry_run=dry_run,
                                             approve=yes), as_json)


def config_restore(
    plan: str = PlanOption,
    service: str = typer.Option(..., "--service", "-s", help="The service whose configuration to restore."),
    to: str = typer.Option(..., "--to", help="The configuration backup at or before this time (ISO 8601 with a "
                                             "zone)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the diff; change nothing."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
) -> None:
    """Configuration error: ConfigMaps and pod template back to the configuration backup at TIME, validate."""
    from flows.config_restore import config_restore as flow_fn
    from flows.config_restore import resolve

    plan_or_exit(plan)
    with refusals():
        resolve(plan, service, to)  # refused before anything runs
    run(flow_fn, f"config-restore-{service}", dict(plan=plan, service=service, to=to, dry_run=dry_run, approve=yes),
        as_json)


def counts(pairs: list[str], option: str) -> dict[str, int]:
    """`NAME=COUNT` options as a mapping; anything else is refused."""
    parsed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not (sep and name and value.isdigit()):
            raise DrplanError(f"{option} {pair!r}: write NAME=COUNT, e.g. {option} {name or 'name'}=3")
        parsed[name] = int(value)
    return parsed


def region_failover(
    plan: str = PlanOption,
    to: str = typer.Option(None, "--to", help="The region to serve from (default: aws.dr_region; aws.region to "
                                              "fail back)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every step and resource; change nothing."),
    force: bool = typer.Option(False, "--force", help="Fail over even if readiness or the lag guard says no."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
) -> None:
    """Move the services to another region: readiness, approval, promote, Secret, deploy, scale, validate, DNS."""
    from flows.region_failover import region_failover as flow_fn

    run_towards(flow_fn, "region-failover", plan, to, dry_run, force, yes, as_json)


def run_towards(flow_fn: Any, label: str, plan: str, to: str | None, dry_run: bool, force: bool, yes: bool,
                as_json: bool) -> None:
    """The commands that move traffic to a region: the region is refused before anything runs, then the flow."""
    from drplan.regions import traffic_target

    dr_plan = plan_or_exit(plan)
    with refusals():
        region, _ = traffic_target(dr_plan, to)
    run(flow_fn, f"{label}-{region}", dict(plan=plan, to=to or "", dry_run=dry_run, force=force, approve=yes),
        as_json)


def run(flow_fn: Any, label: str, parameters: dict[str, Any], as_json: bool) -> None:
    """Run the flow in a thread; answer its approval pause from the terminal; print the report (markdown, or
    JSON); exit."""
    with refusals(), prefect_api():
        _run(flow_fn, label, parameters, as_json)


def _run(flow_fn: Any, label: str, parameters: dict[str, Any], as_json: bool) -> None:
    from flows.shared.report import RecoveryReport

    report = answered(flow_fn, label, RecoveryReport, parameters)
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        out.print(Markdown(report.markdown()))
    if report.written_to:
        err.print(f"report: {report.written_to}", highlight=False, soft_wrap=True)
    if report.error:
        raise fail(report.error)
    raise typer.Exit(1 if report.failed or report.outcome.startswith("refused") else 0)


def answered(flow_fn: Any, label: str, report_type: type, parameters: dict[str, Any]) -> Any:
    """Run the flow in a thread (its run named `<label>-<hex>`), answer its approval pause from the terminal (an
    approval in the UI or through the API counts the same) and return its report; an error ends the command."""
    from flows.shared.report import run_report

    name = f"{label}-{uuid4().hex[:8]}"
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["report"] = run_report(flow_fn.with_options(flow_run_name=name), report_type, **parameters)
        except BaseException as exc:  # noqa: BLE001 - reported below, the thread must not die silently
            result["error"] = exc

    worker = threading.Thread(target=contextvars.copy_context().run, args=(target,), name=name,
                              daemon=True)  # the context carries the Prefect API settings (cli.prefect_api)
    worker.start()
    err.print(f"{name}: running", highlight=False)
    asked = set()
    progress = RunProgress(err, name)
    try:
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            paused = _paused_run(name) if worker.is_alive() else None
            if paused and paused.id not in asked:
                asked.add(paused.id)
                progress.pause()
                _ask(paused.id)
            progress.poll()
    finally:
        progress.close()
    if "error" in result:
        raise fail(f"{name}: {first_line(result['error'])}")
    return result["report"]


def _paused_run(name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return next((r for r in runs if r.state and r.state.is_paused()), None)


def _api() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def _ui(flow_run_id: Any) -> str:
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value() or _api().removesuffix("/api")
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _ask(flow_run_id: Any) -> None:
    """Show what the approval would change and, on a terminal, ask; resume the run with the answer."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.flow_runs import resume_flow_run

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    summary = next((a for a in artifacts if a.key and "approval" in a.key), None)
    if summary is not None:
        err.print(Markdown(str(summary.data)))
    err.print(f"flow run {flow_run_id} is waiting for approval: here, in the UI ({_ui(flow_run_id)}), or through "
              f"the API: POST {_api()}/flow_runs/{flow_run_id}/resume with "
              '{"run_input": {"approve": true, "reason": "..."}}', highlight=False, soft_wrap=True)
    try:
        approve = typer.confirm("Approve?", default=False, err=True)
        reason = typer.prompt("Reason (for the timeline)", default="approved at the terminal" if approve
                              else "refused at the terminal", err=True)
    except (typer.Abort, EOFError):  # no terminal to answer from (typer's own Abort): the UI or the API will
        err.print("no answer from the terminal; waiting for the approval in the UI or through the API")
        return
    try:
        resume_flow_run(flow_run_id, run_input={"approve": approve, "reason": reason,
                                                "approver": f"{getpass.getuser()} at the terminal"})
    except Exception as exc:  # approved elsewhere in the meantime
        err.print(f"not resumed from here: {first_line(exc)}")
    time.sleep(POLL_SECONDS)
