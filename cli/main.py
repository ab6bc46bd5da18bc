"""The `drplan` command line. Exit codes: 0 success / objectives met, 1 objectives breached, 2 error.

Every error is one line on stderr (`--debug`, anywhere on the command line, shows the traceback instead)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import typer  # noqa: E402
from rich.markdown import Markdown  # noqa: E402
from rich.table import Table  # noqa: E402

from cli import platform as cli_platform  # noqa: E402
from cli import recovery as cli_recovery
from cli.console import PlanOption, err, fail, out, plan_or_exit, refusals  # noqa: E402
from cli.copies import copies_app
from cli.evidence import evidence_app
from cli.metrics import metrics
from cli.prefect_api import prefect_api
from cli.s3 import s3_backup, s3_restore, s3_verify  # noqa: E402
from cli.security import revoke_access, rotate_credentials

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Disaster recovery as code.",
                  pretty_exceptions_enable=False)
plan_app = typer.Typer(no_args_is_help=True, help="Check DR plans.")
sandbox_app = typer.Typer(no_args_is_help=True, help="The local sandbox: moto, PostgreSQL, Kubernetes API, app.")
app.add_typer(plan_app, name="plan")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(copies_app, name="copies")
app.add_typer(evidence_app, name="evidence")
app.command("serve")(cli_platform.serve)
app.command("trigger")(cli_platform.trigger)
app.command("recover")(cli_recovery.recover)
app.command("failover")(cli_recovery.failover)
app.command("reprotect")(cli_recovery.reprotect)
app.command("dns-failover")(cli_recovery.dns_failover)
app.command("eks-recover")(cli_recovery.eks_recover)
app.command("region-failover")(cli_recovery.region_failover)
app.command("rollback")(cli_recovery.rollback)
app.command("config-restore")(cli_recovery.config_restore)
app.command("rotate-credentials")(rotate_credentials)
app.command("revoke-access")(revoke_access)
app.command("s3-backup")(s3_backup)
app.command("s3-restore")(s3_restore)
app.command("s3-verify")(s3_verify)
app.command("metrics")(metrics)


def main() -> None:
    """The `drplan` entry point: an unexpected error is one line and exit 2, its traceback only with --debug."""
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    try:
        app()
    except Exception as exc:
        if debug:
            raise
        from drplan.errors import first_line

        raise SystemExit(fail(f"{type(exc).__name__}: {first_line(exc)} (--debug shows the traceback)").exit_code
                         ) from None


@plan_app.command("validate")
def plan_validate(file: Path = typer.Argument(..., help="The plan YAML file.")) -> None:
    """Validate a plan: exit 0, or exit 2 with one line per problem naming the field and the fix. With a Prefect API
    configured (PREFECT_API_URL), the notification blocks the plan names must exist there."""
    from prefect.settings import PREFECT_API_URL

    plan = plan_or_exit(str(file))
    if PREFECT_API_URL.value():
        from tasks.notify import missing

        with refusals("notification blocks not checked"):
            absent = missing(plan.notifications.blocks())
        for field, block in absent.items():
            err.print(f"{file}: {field}: no notification block named {block!r} in the Prefect API at "
                      f"{PREFECT_API_URL.value()}; create it (deployments/README.md) or fix the name",
                      highlight=False, soft_wrap=True)
        if absent:
            raise typer.Exit(2)
    out.print(
        f"{file}: valid ({len(plan.databases)} databases, {len(plan.buckets)} buckets, "
        f"{len(plan.clusters)} clusters, {len(plan.services)} services)",
        highlight=False,
    )


@plan_app.command("iam-policy")
def plan_iam_policy(
    file: Path = typer.Argument(..., help="The plan YAML file."),
    flows: list[str] = typer.Option(None, "--flow", help="Only this runbook's needs (repeatable), e.g. s3-backup."),
    account: str = typer.Option("*", "--account", help="The AWS account id to put in the ARNs."),
) -> None:
    """Print the least-privilege IAM policy (JSON) of the plan's runbooks: only the AWS actions they call, scoped
    to the plan's buckets, prefixes, RDS members and copies, secrets, hosted zone and clusters."""
    from drplan.iam_policy import iam_policy

    plan = plan_or_exit(str(file))
    if not (account == "*" or (account.isdigit() and len(account) == 12)):
        raise fail(f"--account {account!r}: an AWS account id is 12 digits; give it or leave it out (\"*\")")
    with refusals():
        policy = iam_policy(plan, flows or None, account)
    print(json.dumps(policy, indent=2))


@plan_app.command("drift")
def plan_drift(
    file: Path = typer.Argument(..., help="The plan YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the drift as JSON."),
) -> None:
    """What the plan and the live AWS inventory disagree on: resources tagged drplan:protect that the plan does not
    cover, and plan entries whose bucket or RDS instance no longer exists (the plan file is not changed). Exit 0
    none, 1 drift, 2 error."""
    from tasks.inventory import plan_drift as read_drift

    plan = plan_or_exit(str(file))
    with refusals("drift not read"), err.status("reading the AWS inventory..."):
        drift = read_drift(plan)
    if as_json:
        out.print_json(drift.model_dump_json())
    else:
        out.print(Markdown(drift.markdown()))
    raise typer.Exit(1 if drift.drifted else 0)


@app.command("verify-rpo")
def verify_rpo(
    plan: str = PlanOption,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Measure data age of every database, bucket and configuration against the RPO objectives."""
    plan_or_exit(plan)  # a broken plan is refused before anything runs
    from drplan.rpo import RpoReport
    from flows.rpo_verification import rpo_verification
    from flows.shared.report import run_report

    with refusals("RPO verification did not complete"), prefect_api(), \
            err.status("verifying RPO (databases, buckets, configuration)..."):
        result = run_report(rpo_verification, RpoReport, plan=plan)
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        show_rpo(result)
    raise typer.Exit(result.exit_code)


def show_rpo(report) -> None:
    table = Table(title=f"RPO verification: {report.plan}", title_justify="left")
    for column in ("resource", "class", "measure", "newest", "age", "objective", "status", "detail"):
        table.add_column(column, overflow="fold")
    colours = {"met": "green", "breached": "red", "error": "yellow"}
    for m in report.measurements:
        row = m.row
        row["status"] = f"[{colours[row['status']]}]{row['status']}[/]"
        table.add_row(*row.values())
    out.print(table)
    if report.differences:
        out.print("measured on the live topology, which differs from the plan:")
        for line in report.differences:
            out.print(f"  - {line}", highlight=False)
    out.print(report.summary)
    for m in report.errors + report.breaches:
        err.print(f"{m.label}: {m.resource} {m.measure}: {m.detail or 'older than ' + m.row['objective']}",
                  highlight=False, soft_wrap=True)


@app.command("topology")
def topology(
    plan: str = PlanOption,
    database: str = typer.Option(None, "--database", "-d", help="One database of the plan (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the topology as JSON."),
) -> None:
    """The live topology: which member accepts writes now, who replicates from it, which member each service really
    uses, and every difference from the plan. Exit 0 as planned, 1 differences, 2 error."""
    from tasks.topology import discover

    dr_plan = plan_or_exit(plan)
    with refusals():
        if database:
            dr_plan.database(database)  # an unknown name is refused before anything is probed
    with refusals("topology discovery did not complete"), err.status("discovering the live topology..."):
        result = discover(dr_plan, [database] if database else None)
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        show_topology(result)
    raise typer.Exit(1 if result.differences else 0)


def show_topology(topology) -> None:
    from rich.markup import escape

    from drplan.topology import BINDING_COLUMNS, MEMBER_COLUMNS

    colours = {"primary": "green", "replica": "cyan", "fenced": "yellow", "down": "red", "missing": "red"}
    for db in topology.databases:
        members = Table(title=f"{db.database}: members", title_justify="left")
        for column in MEMBER_COLUMNS:
            members.add_column(column, overflow="fold")
        for m in db.members:
            row = {column: escape(cell) for column, cell in m.row.items()}  # an error's [...] is not markup
            row["state"] = f"[{colours[m.state]}]{row['state']}[/]"
            members.add_row(*row.values())
        out.print(members)
        if db.bindings:
            bindings = Table(title=f"{db.database}: used by", title_justify="left")
            for column in BINDING_COLUMNS:
                bindings.add_column(column, overflow="fold")
            for b in db.bindings:
                bindings.add_row(*map(escape, b.row.values()))
            out.print(bindings)
    count = len(topology.differences)
    out.print(f"{count} difference(s) from the plan" if count else "no differences from the plan", highlight=False)
    for line in topology.differences:
        err.print(line, highlight=False, soft_wrap=True)


@app.command("drill")
def drill(
    plan: str = PlanOption,
    database: str = typer.Option(None, "--database", "-d", help="One database of the plan (default: all)."),
    target_time: str = typer.Option(None, "--target-time", help="ISO 8601 time with a zone, or 'latest'."),
    random_within: str = typer.Option(None, "--random-within", help="A random target time in this span, e.g. 24h."),
    keep: bool = typer.Option(False, "--keep", help="Keep the scratch copy for inspection."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON."),
) -> None:
    """Restore to a scratch copy, check it, measure RTO/RPO, clean up. Exit 0 pass, 1 checks failed, 2 error."""
    from flows.restore_drill import restore_drill
    from flows.shared.requests import validate_request

    plan_or_exit(plan)
    with refusals():
        validate_request(plan, database, target_time, random_within)  # refused before anything runs
    with refusals("restore drill did not complete"), prefect_api():
        reports = cli_recovery.answered(restore_drill, "drill", list, dict(
            plan=plan, database=database, target_time=target_time, random_within=random_within, keep=keep))
    if as_json:
        out.print_json(data=[json.loads(r.model_dump_json()) for r in reports])
    else:
        for report in reports:
            out.print(Markdown(report.markdown()))
    raise typer.Exit(max(r.exit_code for r in reports))


@app.command("fleet-drill")
def fleet_drill(
    plan: str = PlanOption,
    database: list[str] = typer.Option([], "--database", "-d", help="A database of the plan; repeat (default: all)."),
    target_time: str = typer.Option(None, "--target-time", help="ISO 8601 time with a zone, or 'latest'."),
    as_json: bool = typer.Option(False, "--json", help="Print the fleet report as JSON."),
) -> None:
    """Drill every database as runs of the restore-drill deployment on the pool's workers, at most the plan's
    drill.fleet_concurrency at once. Needs PREFECT_API_URL (`drplan serve`). Exit 0 all passed, 1 a drill failed,
    2 a drill could not complete."""
    import asyncio

    from prefect.settings import PREFECT_API_URL

    from drplan.errors import DrplanError, first_line
    from drplan.fleet_report import FleetReport
    from flows.fleet_drill import fleet_drill as fleet_flow
    from flows.shared.requests import validate_request

    dr_plan = plan_or_exit(plan)
    with refusals():
        validate_request(plan, None, target_time, None)
        for name in database:
            dr_plan.database(name)
    if not PREFECT_API_URL.value():
        raise fail("a fleet drill runs on the work pool's workers: export PREFECT_API_URL and PREFECT_API_AUTH_STRING "
                   "(`drplan serve` prints them for the local server)")
    with refusals("fleet drill did not complete"), err.status("fleet drill: runs of restore-drill on the workers..."):
        state = asyncio.run(fleet_flow(plan=plan, databases=database or None, target_time=target_time,
                                       return_state=True))
        report = state.result(raise_on_failure=False)
        if not isinstance(report, FleetReport):
            raise DrplanError(first_line(report))
    if as_json:
        out.print_json(data=json.loads(report.model_dump_json()))
    else:
        out.print(Markdown(report.markdown()))
    raise typer.Exit(report.exit_code)


@app.command("readiness")
def readiness(
    plan: str = PlanOption,
    region: str = typer.Option(None, "--region", help="The region to check (default: aws.dr_region)."),
) -> None:
    """Could the region take over right now? One finding per check. Exit 0 ready, 1 not ready, 2 error."""
    from drplan.regions import placements
    from flows.dr_readiness import ReadinessReport, dr_readiness
    from flows.shared.report import run_report

    dr_plan = plan_or_exit(plan)
    region = region or dr_plan.aws.dr_region
    with refusals():
        placements(dr_plan, region)
    with refusals("readiness check did not complete"), prefect_api(), \
            err.status(f"checking whether {region} could take over..."):
        report = run_report(dr_readiness, ReadinessReport, plan=plan, region=region)
    out.print(Markdown(report.markdown()))
    raise typer.Exit(0 if report.ready else 1)


@app.command("dr-test")
def dr_test(
    plan: str = PlanOption,
    database: str = typer.Option(None, "--database", "-d",
                                 help="Drill and fail over one database of the plan (default: all)."),
    include_failover: bool = typer.Option(False, "--include-failover",
                                          help="Outside the sandbox, also test a failover of each database (a short "
                                               "outage; asks for approval)."),
) -> None:
    """The DR test: RPO, backups, DR readiness, restore drill, failover test (on the sandbox; elsewhere with
    --include-failover), one evidence report (written to drill.report_dir). Exit 0 passed, 1 a part failed, 2 a
    part could not be checked."""
    from flows.dr_test import DrTestReport
    from flows.dr_test import dr_test as dr_test_flow
    from flows.shared.requests import validate_request

    plan_or_exit(plan)
    with refusals():
        validate_request(plan, database, None, None)  # refused before anything runs
    with refusals("DR test did not complete"), prefect_api():
        report = cli_recovery.answered(dr_test_flow, "dr-test", DrTestReport,
                                       dict(plan=plan, database=database, include_failover=include_failover))
    out.print(Markdown(report.markdown()))
    out.print(f"evidence: {report.evidence} (and .json; .html for management)", highlight=False, soft_wrap=True)
    raise typer.Exit(report.exit_code)


@sandbox_app.command("up")
def sandbox_up(plan: str = PlanOption) -> None:
    """Start (or complete) the sandbox the plan describes. Idempotent."""
    from sandbox import stack

    dr_plan = plan_or_exit(plan)
    with refusals():
        stack.up(dr_plan, out)
    _show_status(stack.status(dr_plan))


@sandbox_app.command("break")
def sandbox_break(
    scenario: str = typer.Argument(..., help="delete-orders, stop-primary, delete-objects, dr-nodes-zero, "
                                             "delete-dns, bad-deploy, bad-config or leaked-credentials."),
    plan: str = PlanOption,
) -> None:
    """Break the sandbox the way production breaks, to rehearse a recovery; prints the command that recovers it."""
    from sandbox.disasters import break_sandbox

    dr_plan = plan_or_exit(plan)
    with refusals():
        disaster = break_sandbox(dr_plan, plan, scenario)
    out.print(f"broken: {disaster.broken}", highlight=False, soft_wrap=True)
    out.print(f"recover: {disaster.recover}", highlight=False, soft_wrap=True)


@sandbox_app.command("status")
def sandbox_status(plan: str = PlanOption) -> None:
    """Every sandbox component (and `drplan serve`'s processes while it runs), its address and whether it is
    healthy (exit 1 if any is not)."""
    from cli import serve as platform
    from sandbox import stack

    dr_plan = plan_or_exit(plan)
    components = stack.status(dr_plan) + platform.status(dr_plan)
    _show_status(components)
    raise typer.Exit(0 if all(c.healthy for c in components) else 1)


@sandbox_app.command("down")
def sandbox_down(
    plan: str = PlanOption,
    purge: bool = typer.Option(False, "--purge", help="Also delete the sandbox's state directory."),
) -> None:
    """Stop every process the sandbox and `drplan serve` started; with --purge delete their state."""
    from cli import serve as platform
    from sandbox import stack

    dr_plan = plan_or_exit(plan)
    for line in platform.down(dr_plan) + stack.down(dr_plan, purge=purge):
        out.print(line, highlight=False)


def _show_status(components) -> None:
    table = Table(title="sandbox", title_justify="left")
    for column in ("component", "address", "pid", "state"):
        table.add_column(column)
    for c in components:
        state = f"[green]{c.detail}[/]" if c.healthy else f"[red]{c.detail}[/]"
        table.add_row(c.name, c.address, str(c.pid or "-"), state)
    out.print(table)


if __name__ == "__main__":
    main()
