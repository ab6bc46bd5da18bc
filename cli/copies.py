"""`drplan copies list|remove`: the recovery and drill copies of the plan's databases, in-process (no flow run).
Exit 0 done, 1 removal not confirmed, 2 refused or an error (one line, nothing changed)."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from rich.table import Table

from cli.console import PlanOption, err, fail, out, plan_or_exit, refusals

copies_app = typer.Typer(no_args_is_help=True, help="Recovery and drill copies: list them, remove one no service uses.")


@copies_app.command("list")
def copies_list(
    plan: str = PlanOption,
    database: str = typer.Option(None, "--database", "-d", help="One database of the plan (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the copies as JSON."),
) -> None:
    """Every recovery and drill copy: kind, target time, created, since when it serves, address, which services
    use it now."""
    from pydantic import TypeAdapter

    from tasks.copies import COLUMNS, RecoveryCopy, list_copies

    dr_plan = plan_or_exit(plan)
    with refusals():
        if database:
            dr_plan.database(database)  # an unknown name is refused before anything is read
    with refusals("listing copies did not complete"), err.status("finding copies and the services using them..."):
        found = list_copies(dr_plan, database)
    if as_json:
        out.print_json(TypeAdapter(list[RecoveryCopy]).dump_json(found).decode())
        return
    table = Table(title=f"copies of {dr_plan.name}", title_justify="left")
    for column in COLUMNS:  # names and times whole: a name is copied into `drplan copies remove`
        table.add_column(column, overflow="fold", no_wrap=column not in ("address", "used by"))
    for copy in found:
        table.add_row(*map(escape, copy.row.values()))
    out.print(table if found else "no copies", highlight=False)


@copies_app.command("remove")
def copies_remove(
    name: str = typer.Argument(..., help="The copy, as `drplan copies list` names it."),
    plan: str = PlanOption,
    yes: bool = typer.Option(False, "--yes", help="Remove without asking."),
) -> None:
    """Remove a copy (stop and delete it) that no service uses; refused while a service's Deployment points at it."""
    from tasks.copies import removable, remove_copy

    dr_plan = plan_or_exit(plan)
    with refusals():
        copy = removable(dr_plan, name)
    if not yes:
        if not sys.stdin.isatty():
            raise fail(f"removing {name} needs a yes: run it on a terminal or pass --yes")
        restored = copy.row["target time"]
        if not typer.confirm(f"Remove {copy.kind} copy {name} of {copy.database} (restored to {restored})?",
                             default=False, err=True):
            err.print(f"{name} not removed", highlight=False)
            raise typer.Exit(1)
    with refusals(), err.status(f"removing {name}..."):
        remove_copy(dr_plan, name)  # checked again: a service may have moved to it meanwhile
    out.print(f"removed {copy.kind} copy {name} of {copy.database}", highlight=False)
