"""`drplan rotate-credentials` and `drplan revoke-access`: the security runbooks (credential, account or role
compromise), run like the recovery commands (cli/recovery.py: approval on the terminal, report, exit 0 done, 1
refused or validation failed (rolled back), 2 error). No credential is ever an argument or printed."""

from __future__ import annotations

import typer

from cli.console import JsonOption, PlanOption, plan_or_exit, refusals
from cli.recovery import run


def rotate_credentials(
    plan: str = PlanOption,
    database: str = typer.Option("", "--database", "-d", help="The database whose password to rotate."),
    service: str = typer.Option("", "--service", "-s", help="The service whose API token to rotate."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List every step and resource; change nothing."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
) -> None:
    """Credential compromise: a new password (database) or API token (service) through Secrets Manager's
    AWSPENDING -> AWSCURRENT, the Kubernetes Secrets, a rollout; then proof that the old one is refused."""
    from flows.credential_rotation import chosen
    from flows.credential_rotation import rotate_credentials as flow_fn

    dr_plan = plan_or_exit(plan)
    with refusals():
        what = chosen(dr_plan, database, service)  # refused in one line before anything runs
    run(flow_fn, f"rotate-credentials-{what.name}", dict(plan=plan, database=database, service=service,
                                                         dry_run=dry_run, approve=yes), as_json)


def revoke_access(
    plan: str = PlanOption,
    principal: str = typer.Option(..., "--principal", help="The IAM user or role ARN."),
    restore: bool = typer.Option(False, "--restore", help="Undo the recorded revocation of this principal."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List every step and resource; change nothing."),
    yes: bool = typer.Option(False, "--yes", help="Approve in advance (no pause for approval)."),
    as_json: bool = JsonOption,
) -> None:
    """Account or role compromise: deactivate the principal's access keys and deny it everything (recorded on the
    principal); --restore gives back exactly that."""
    from flows.access_revocation import principal as find
    from flows.access_revocation import revoke_access as flow_fn

    plan_or_exit(plan)
    with refusals():
        who = find(plan, principal)  # refused in one line before anything runs
    run(flow_fn, f"revoke-access-{who.name}", dict(plan=plan, principal_arn=principal, restore=restore,
                                                   dry_run=dry_run, approve=yes), as_json)
